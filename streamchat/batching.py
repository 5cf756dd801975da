"""The multi-conversation engine: live conversations over bounded caches, decoded together (continuous batching).

Every conversation is an `EngineSession` (a `ChatSession` whose forward passes go to the engine's scheduler
instead of running inline), so turns, stop, sampling, eviction and stats are exactly the session's. Each turn runs
in its caller's thread, which tokenizes, detokenizes and streams text; the one scheduler thread runs the model:

* a reply's decode loop runs on the scheduler (engine-driven, as vLLM's and llama.cpp's servers do): each
  scheduler step feeds every decoding conversation's last sampled token, all as rows of ONE batched fast-path
  step over their bounded caches (`fastpath.batched.feed_batch`), samples each row's next token (greedy rows
  together: the repetition penalty and the first maximum in one native pass per row) and keeps the tokens in an
  outbox; conversations join and leave between any two steps (Orca-style iteration-level scheduling);
* the life of a token: the turn's thread asks for its next token (`_take`); the step that feeds the token before
  it samples it (`_deliver`, into the outbox); the next step hands it out as it starts (`_hand_out`), so the turn
  turns it into text (and the server into an SSE chunk) while that step runs without the GIL, the step feeding
  the very token the turn is reading. A token is fed only once its turn asked for it: a turn that stops after
  token k leaves token k (fed, or waiting as its next prefill's first) and nothing after it;
* waiting prefills go in pieces into the same native call, oldest first, under a budget of prompt tokens per step
  (`prefill_piece` while conversations are decoding, IDLE_PREFILL_TOKENS when none is): chunked prefill, so a
  new prompt costs the decoding conversations a few more rows in a step, not a whole prefill forward;
* H2O/TOVA conversations (attention-score policies) and models the fast path cannot run decode singly.

`Engine.open_turn` serves a stateless API over stateful caches: clients resend the whole conversation; a request
whose earlier messages are exactly a live conversation's continues on its cache (only the new message is
prefilled), any other starts a conversation whose history streams through the bounded cache. At most
`max_sessions` conversations live; the least recently used idle one is freed past that, so memory stays bounded by
the model plus `max_sessions` caches.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList

from streamchat import native, persist
from streamchat.config import Settings
from streamchat.fastpath import decoder_for_prefill, decoder_for_step, prepare_decoder
from streamchat.fastpath.batched import feed_batch
from streamchat.model import LoadedModel
from streamchat.sentence_embedding import MAX_TOKENS
from streamchat.session import (
    ChatSession,
    SessionError,
    candidate_probabilities,
    clean_text,
    native_greedy,
    native_sampling,
)

SWITCH_INTERVAL = 0.0005  # seconds a Python thread may hold the GIL while another waits (see Engine.__init__)
GATHER_SECONDS = 0.003  # how long the scheduler waits for every active turn's next step before running a batch
IDLE_PREFILL_TOKENS = 512  # prompt tokens per step while no conversation is decoding (then nobody waits for it)
_END = object()  # a reply's token queue: the scheduler ended the decode (stopped, or the engine closed)


class Overloaded(RuntimeError):
    """No capacity for this request now; `retry_after` seconds is a fair wait. `status`: 429 (busy) or 503 (full)."""

    def __init__(self, message: str, status: int = 429, retry_after: int = 1):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class ConversationError(SessionError):
    """A conversation that cannot be exported or imported (unknown id, busy, or a file that does not fit); the
    engine is unchanged. `status` is the HTTP status a server answers with: 400, 404 or 409."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


DRAIN_RETRY_AFTER = 5  # seconds a client is told to wait when a draining replica refuses it (Retry-After)


class _Step:
    """A forward pass a turn's thread waits for (`EngineSession._forward`): a prefill chunk, run in pieces, or a
    single token outside a reply's decode loop; `logits` [1, vocab] of its last token when `done` is set."""

    __slots__ = ("call", "done", "error", "fed", "ids", "logits", "session")

    def __init__(self, session: ChatSession, ids: list[int], call=None):
        self.session, self.ids, self.fed = session, ids, 0  # fed: prefill tokens run so far (in pieces)
        self.call = call  # instead of a forward pass: a function of no arguments run alone, its result in `logits`
        self.done = threading.Event()
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None


class _Decode:
    """A reply decoding on the scheduler. Counts are of reply tokens: `fed` to the cache (one more, `token`, is
    sampled and not fed yet: the first from the prefill's logits), `taken`: asked for by the turn's thread (which
    went past every token before).
    Token k is fed only once the turn asked for token k (`taken > fed`), so at most one token is fed ahead of
    what the turn has seen, and a turn that stops after token k leaves nothing after it in the cache."""

    __slots__ = (
        "cancelled",
        "ended",
        "fed",
        "limit",
        "processors",
        "session",
        "settings",
        "stop",
        "taken",
        "token",
        "tokens",
    )

    def __init__(
        self,
        session: ChatSession,
        token: int,
        limit: int,
        stop: threading.Event,
        processors: LogitsProcessorList,
        settings: Settings,
    ):
        self.session, self.token, self.limit, self.stop = session, token, limit, stop
        self.processors, self.settings = processors, settings
        self.fed, self.taken = 0, 1
        self.tokens: queue.SimpleQueue = queue.SimpleQueue()  # sampled ids; then _END or an exception
        self.cancelled = False
        self.ended = threading.Event()

    def ready(self) -> bool:
        """Whether the scheduler can act on it now: feed its token, or end it."""
        return self.cancelled or self.stop.is_set() or self.taken > self.fed


class EngineSession(ChatSession):
    """A ChatSession whose forward passes run on the engine's scheduler thread (batched with other sessions')."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        super().__init__(engine.loaded, settings)

    def send(self, user_text, stop=None, max_new_tokens=None) -> Iterator[str]:
        self.engine._enter()
        threads = torch.get_num_threads()
        # This thread only samples (small ops on one logits row); the scheduler thread runs the forward passes.
        # torch's thread count is per thread under OpenMP: one here keeps this thread from waking a second OpenMP
        # pool, whose spinning workers would take the cores from the scheduler's (measured: 11 ms a step, not 5).
        torch.set_num_threads(1)
        try:
            yield from super().send(user_text, stop, max_new_tokens)
        finally:
            torch.set_num_threads(threads)
            self.engine._leave()

    def _forward(self, ids: list[int]) -> torch.Tensor:
        return self.engine._submit(self, ids)

    def _embed(self, texts: list[str], max_tokens: int = MAX_TOKENS):
        """Conversation memory's sentence vectors, computed on the scheduler thread (which owns the cores)."""
        return self.engine._submit(self, [], call=lambda: ChatSession._embed(self, texts, max_tokens))

    def _reply_tokens(self, logits, limit, stop, processors, settings) -> Iterator[int]:
        """ChatSession's reply tokens, decoded by the engine's scheduler (see the module's docstring)."""
        token_id = self._sample(logits, processors, settings)  # the first token, from the prefill's logits
        self._pending = [token_id]
        if token_id in self.end_of_turn_ids or limit <= 1:
            yield token_id
            return
        job = self.engine._start_decode(_Decode(self, token_id, limit, stop, processors, settings))
        last, received = token_id, 1
        try:
            yield token_id
            while True:
                self.engine._take(job)  # the consumer went past `last`: the scheduler may feed it and sample on
                item = job.tokens.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                last, received = item, received + 1
                yield item
        finally:
            self.engine._end_decode(job)  # the scheduler lets go of this session before the turn's stats
            self._pending = [] if job.fed >= received else [last]  # the last token seen waits unless it was fed


@dataclass
class TurnRequest:
    """One chat-completions request, already validated: `messages` are {"role", "content"} dicts (an optional
    system message first, then user/assistant turns, a user message last)."""

    messages: list[dict[str, str]]
    conversation_id: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class TurnResult:
    text: str = ""
    finish_reason: str = "stop"  # OpenAI's: "stop" (end of turn, stop string, stopped) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extension: dict[str, Any] = field(default_factory=dict)


class Conversation:
    def __init__(self, conversation_id: str, session: EngineSession):
        self.id, self.session = conversation_id, session
        self.history: list[dict[str, str]] | None = None  # messages the cache holds after its last full turn
        self.busy = False


class Turn:
    """An admitted request: `run(stop)` streams the reply's text pieces; `result` is filled when it ends."""

    def __init__(
        self,
        engine: Engine,
        conversation: Conversation,
        request: TurnRequest,
        new_conversation: bool,
        history_known: bool = True,
    ):
        self.engine, self.conversation, self.request = engine, conversation, request
        self.new_conversation, self.history_known = new_conversation, history_known
        self.result = TurnResult()
        self._turns_before = conversation.session.turns

    def run(self, stop: threading.Event) -> Iterator[str]:
        """Text pieces of the reply; setting `stop` ends it at the next token (the conversation stays consistent).
        Stop strings end the reply before them. Releases the conversation when done, however it ends."""
        _conversation, request, session = self.conversation, self.request, self.conversation.session
        text, sent, ended_by_stop_string = "", 0, False
        self._turns_before = session.turns
        hold = max((len(s) for s in request.stop), default=1) - 1  # keep back what could start a stop string
        try:
            pieces = session.send(request.messages[-1]["content"], stop, request.max_tokens)
            try:
                for piece in pieces:
                    text += piece
                    cut = min((text.find(s) for s in request.stop if s in text), default=-1)
                    if cut >= 0:
                        text, ended_by_stop_string = text[:cut], True
                        stop.set()
                    ready = len(text) if ended_by_stop_string else max(sent, len(text) - hold)
                    if ready > sent:
                        yield text[sent:ready]
                        sent = ready
                    if ended_by_stop_string:
                        break
            finally:
                pieces.close()
            if sent < len(text):
                yield text[sent:]
                sent = len(text)
        finally:
            self._finish(text, ended_by_stop_string)

    def _finish(self, text: str, ended_by_stop_string: bool) -> None:
        conversation, session = self.conversation, self.conversation.session
        turn = session.last_turn if session.turns > self._turns_before else None  # None: refused or failed
        reason = turn.stop_reason if turn else "error"
        complete = ended_by_stop_string or reason in ("eos", "max_new_tokens")
        complete = complete and self.history_known
        conversation.history = [*self.request.messages, {"role": "assistant", "content": text}] if complete else None
        self.result = TurnResult(
            text=text,
            finish_reason="length" if reason == "max_new_tokens" and not ended_by_stop_string else "stop",
            prompt_tokens=turn.prompt_tokens if turn else 0,
            completion_tokens=turn.new_tokens if turn else 0,
            extension=self.engine.extension(
                conversation, turn.evicted_turn if turn else 0, reason, continued=not self.new_conversation
            ),
        )
        self.engine._release(conversation)


class Engine:
    """Live conversations on one loaded model and the scheduler thread that runs their steps. Thread-safe."""

    def __init__(self, loaded: LoadedModel, settings: Settings, max_sessions: int = 8, prefill_piece: int = 32):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if prefill_piece < 1:
            raise ValueError("prefill_piece must be at least 1")
        self.loaded, self.settings = loaded, settings
        self.max_sessions, self.prefill_piece = max_sessions, prefill_piece
        self.conversations: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first
        self._outside: weakref.WeakSet[EngineSession] = weakref.WeakSet()  # new_session()'s (web UI tabs)
        self._outside_count = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition()
        self._pending: list[_Step] = []  # forward passes turns' threads asked for (prefill pieces)
        self._decodes: list[_Decode] = []  # replies decoding on the scheduler
        self._outbox: dict[_Decode, int] = {}  # tokens sampled, handed to their turns when the next step starts
        self._active = 0  # sessions inside a turn (each will submit steps)
        self._running = True
        self.draining = False  # drain(): no new turns; the ones replying finish
        self.steps = self.batched_steps = self.batched_rows = 0  # scheduler counters (metrics)
        self.mixed_pieces = 0  # prefill pieces that ran in the same native call as decode rows
        self.step_threads = 0  # threads the last step ran on (torch's and the native kernels' count there)
        prepare_decoder(loaded.model, settings)  # quantized weights at start-up, not inside the first request
        # Every token crosses threads (scheduler -> turn -> event loop) and each crossing needs the GIL. A
        # thread running Python keeps it for up to the switch interval (5 ms by default): as long as a decode step.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._threads = torch.get_num_threads()  # the forward passes' (per thread under OpenMP: set in _schedule)
        self._thread = threading.Thread(target=self._schedule, name="streamchat-scheduler", daemon=True)
        self._thread.start()

    # ----- conversations -----------------------------------------------------------------------------------

    def new_session(self, settings: Settings | None = None) -> EngineSession:
        """A session (outside the conversation store: the web UI keeps its own) whose steps this engine batches.
        It counts in `stats()` (as "ui-N") for as long as its owner keeps it."""
        session = EngineSession(self, settings or self.settings)
        with self._lock:
            self._outside_count += 1
            session.label = f"ui-{self._outside_count}"
            self._outside.add(session)
        return session

    def open_turn(self, request: TurnRequest) -> Turn:
        """Admit a request: pick the live conversation it continues, or start one (freeing the least recently used
        idle conversation past `max_sessions`). Raises Overloaded (nothing free) or SessionError (bad input)."""
        messages = [{"role": m["role"], "content": clean_text(m["content"])} for m in request.messages]
        request.messages = messages
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        earlier = messages[1 if system is not None else 0 : -1]
        with self._lock:
            if self.draining:
                raise Overloaded("this replica is draining: send the request to another one", 503, DRAIN_RETRY_AFTER)
            if self._active_turns() >= self.max_sessions:
                raise Overloaded(f"all {self.max_sessions} conversation slots are replying; retry shortly", 429)
            conversation, restart = None, False
            if request.conversation_id is not None:
                conversation = self.conversations.get(request.conversation_id)
                if conversation is not None and conversation.busy:
                    raise Overloaded(f"conversation {request.conversation_id!r} is still replying", 429)
                # The id selects the conversation; earlier messages sent with it must be what its cache holds
                # (an edited message, another system prompt, a reply the client never saw in full): else the
                # conversation starts again from the messages sent, under the same id. Only the new message
                # sent: the cache goes on as it is.
                restart = conversation is not None and len(messages) > 1 and conversation.history != messages[:-1]
            else:
                for candidate in reversed(self.conversations.values()):
                    if not candidate.busy and candidate.history == messages[:-1]:
                        conversation = candidate
                        break
            new = conversation is None or restart
            if new:
                if not restart:
                    conversation = self._allocate(request.conversation_id)
                try:
                    prompt = ... if system is None else system  # none sent: the configured one
                    conversation.session.reset(system_prompt=prompt, settings=self.settings)
                    conversation.session.seed_history(earlier)
                except SessionError:
                    self._drop(conversation)
                    raise
            known = True
            if not new and len(messages) == 1 and request.conversation_id is not None:  # only the new message sent
                if conversation.history is not None:
                    request.messages = [*conversation.history, messages[-1]]  # the history after this turn
                else:
                    known = False  # the cache's history is not known as messages (a stopped reply): it stays so
            self._apply_sampling(conversation.session, request)
            conversation.busy = True
            conversation.history = None
            self.conversations.move_to_end(conversation.id)
            return Turn(self, conversation, request, new, known)

    def _allocate(self, conversation_id: str | None) -> Conversation:
        conversation_id = conversation_id or f"conv-{uuid.uuid4().hex[:16]}"
        if len(self.conversations) < self.max_sessions:
            session = EngineSession(self, self.settings)
        else:
            idle = next((c for c in self.conversations.values() if not c.busy), None)
            if idle is None:
                raise Overloaded(f"all {self.max_sessions} conversations are replying; retry shortly", 503)
            del self.conversations[idle.id]
            session = idle.session  # its cache is reused: memory stays at max_sessions caches
        conversation = Conversation(conversation_id, session)
        self.conversations[conversation_id] = conversation
        return conversation

    def _drop(self, conversation: Conversation) -> None:
        with self._lock:
            self.conversations.pop(conversation.id, None)

    def _apply_sampling(self, session: EngineSession, request: TurnRequest) -> None:
        base = self.settings
        changes = {
            "temperature": base.temperature if request.temperature is None else request.temperature,
            "top_p": base.top_p if request.top_p is None else request.top_p,
            "seed": base.seed if request.seed is None else request.seed,
        }
        session.apply_settings(session.settings.replace(**changes))

    def _release(self, conversation: Conversation) -> None:
        with self._lock:
            conversation.busy = False

    def _active_turns(self) -> int:
        return sum(c.busy for c in self.conversations.values())

    def extension(
        self, conversation: Conversation, evicted_turn: int, stop_reason: str, continued: bool = True
    ) -> dict[str, Any]:
        """The `streamchat` object of a response: what the bounded cache holds and what it evicted; `continued`:
        whether the turn went on from the conversation's cache (False: it started from the messages sent, the
        history streamed through the cache again, as after a failover to a replica that did not hold it)."""
        session = conversation.session
        stats = session.cache.stats()
        return {
            "conversation_id": conversation.id,
            "policy": stats["policy"],
            "cache_tokens": stats["cache_tokens"],
            "cache_capacity": stats["cache_capacity"],
            "evicted_this_turn": evicted_turn,
            "evicted_total": stats["evicted_total"],
            "pinned_tokens": session.pinned_tokens,
            "seen_tokens": stats["seen_total"],
            "kv_bytes": stats["kv_bytes"],
            "stop_reason": stop_reason,
            "continued": continued,
            **self._memory_extension(session),
        }

    @staticmethod
    def _memory_extension(session: ChatSession) -> dict[str, Any]:
        """Conversation memory's part of the `streamchat` object: the passages in the cache this turn (turn, role,
        text), the recalled tokens, the store's size, and why memory stopped if it did. Nothing with memory off."""
        memory = session.memory_stats()
        if not memory:
            return {}
        turn = session.last_turn
        figures = {
            "memory": memory["memory"],
            "recalled": turn.recalled if turn else [],
            "recalled_tokens": session.cache.recall_length,
            "recall_changed": bool(turn and turn.recall_changed),
        }
        figures.update(
            {key: memory[key] for key in ("memory_passages", "memory_file_bytes", "memory_note") if key in memory}
        )
        return figures

    # ----- moving conversations between replicas, draining ------------------------------------------------------

    def conversation_ids(self) -> list[str]:
        """Ids of the live conversations, least recently used first (what a draining replica can hand over)."""
        with self._lock:
            return list(self.conversations)

    def export_conversation(self, conversation_id: str) -> bytes:
        """The conversation as the bytes of a `.streamchat` file (persist.py's format: cache, policy state, sampler,
        messages), with its id and the message history it answers to, so that `import_conversation` on another
        engine continues it exactly. ConversationError: 404 unknown id, 409 replying now."""
        with self._lock:
            conversation = self.conversations.get(conversation_id)
            if conversation is None:
                raise ConversationError(f"no live conversation {conversation_id!r} on this replica", 404)
            if conversation.busy:
                raise ConversationError(f"conversation {conversation_id!r} is replying; retry when it is done", 409)
            extra = {"conversation_id": conversation.id, "history": conversation.history}
            return persist.dumps(conversation.session, extra=extra)

    def import_conversation(self, conversation_id: str, data: bytes) -> dict[str, Any]:
        """Take over the conversation in `data` (`export_conversation`'s bytes) under `conversation_id`, replacing
        a live one of that id: the next request continues on its cache as it would have where it came from.
        Everything is checked before anything changes: ConversationError naming the problem (400: not a session
        file, damaged, another model or dtype, malformed history; 409: that id is replying) leaves the engine as
        it was. A new id may free the least recently used idle conversation (503 Overloaded if none is idle).
        Returns the conversation's cache figures."""
        if self.draining:
            raise Overloaded("this replica is draining: send the conversation to another one", 503, DRAIN_RETRY_AFTER)
        try:
            tensors, meta = persist.decode(data, "the upload")
        except persist.SessionFileError as error:
            raise ConversationError(str(error)) from None
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        history = extra.get("history")
        if history is not None and not (
            isinstance(history, list)
            and all(
                isinstance(m, dict) and {*m} == {"role", "content"} and all(isinstance(v, str) for v in m.values())
                for m in history
            )
        ):
            raise ConversationError("cannot load the upload: its message history is malformed")
        with self._lock:
            existing = self.conversations.get(conversation_id)
            if existing is not None and existing.busy:
                raise ConversationError(f"conversation {conversation_id!r} is replying; retry when it is done", 409)
            if existing is not None:
                session, evict = existing.session, None
            elif len(self.conversations) < self.max_sessions:
                session, evict = EngineSession(self, self.settings), None
            else:
                evict = next((c for c in self.conversations.values() if not c.busy), None)
                if evict is None:
                    raise Overloaded(f"all {self.max_sessions} conversations are replying; retry shortly", 503)
                session = evict.session
            try:
                persist.apply(session, tensors, meta, "the upload")  # checks all first: a refusal changes nothing
            except persist.SessionFileError as error:
                raise ConversationError(str(error)) from None
            if evict is not None:
                del self.conversations[evict.id]
            conversation = existing or Conversation(conversation_id, session)
            conversation.history = history
            self.conversations[conversation_id] = conversation
            self.conversations.move_to_end(conversation_id)
            return session.cache.stats()

    def drain(self) -> None:
        """Refuse new turns from now on (Overloaded 503 with `DRAIN_RETRY_AFTER`); the ones replying finish, and
        the conversations can still be exported."""
        with self._lock:
            self.draining = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no turn is replying, at most `timeout_s` seconds; True if none is."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._active_turns():
                    return True
            time.sleep(0.05)
        with self._lock:
            return not self._active_turns()

    def stats(self) -> dict[str, Any]:
        """Live figures for /metrics (safe from any thread)."""
        with self._lock:
            conversations = {c.id: c.session.cache.stats() for c in self.conversations.values()}
            conversations.update({session.label: session.cache.stats() for session in list(self._outside)})
        with self._cond:
            queued, active = len(self._pending), self._active  # turns of API conversations and UI tabs alike
            decoding = len(self._decodes)
        return {
            "conversations": conversations,
            "active_turns": active,
            "queued_steps": queued,
            "decoding": decoding,
            "steps": self.steps,
            "batched_steps": self.batched_steps,
            "batched_rows": self.batched_rows,
            "step_threads": self.step_threads,
        }

    def close(self) -> None:
        """Stop the scheduler; steps still waiting fail with RuntimeError, replies decoding end with it."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=10)
        with self._cond:
            for job in list(self._decodes):
                self._finish_decode(job, RuntimeError("the engine is closed"))

    # ----- the scheduler ---------------------------------------------------------------------------------------

    def _enter(self) -> None:
        with self._cond:
            self._active += 1

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _submit(self, session: ChatSession, ids: list[int], call=None) -> torch.Tensor:
        step = _Step(session, ids, call)
        with self._cond:
            if not self._running:
                raise RuntimeError("the engine is closed")
            self._pending.append(step)
            self._cond.notify_all()
        step.done.wait()
        if step.error is not None:
            raise step.error
        return step.logits

    def _start_decode(self, job: _Decode) -> _Decode:
        with self._cond:
            if not self._running:
                raise RuntimeError("the engine is closed")
            self._decodes.append(job)
            self._cond.notify_all()
        return job

    def _take(self, job: _Decode) -> None:
        with self._cond:
            job.taken += 1
            self._cond.notify_all()

    def _end_decode(self, job: _Decode) -> None:
        """The turn's thread is done with `job`: returns once the scheduler no longer touches its session."""
        with self._cond:
            job.cancelled = True
            if not self._running:
                self._finish_decode(job, RuntimeError("the engine is closed"))
            self._cond.notify_all()
        job.ended.wait()

    def _finish_decode(self, job: _Decode, last=_END) -> None:
        """End `job` (under self._cond): its turn gets `last` (_END or an exception) after the tokens it has."""
        if job.ended.is_set():
            return
        if job in self._outbox:
            job.tokens.put(self._outbox.pop(job))
        job.tokens.put(last)
        if job in self._decodes:
            self._decodes.remove(job)
        job.ended.set()

    def _schedule(self) -> None:
        # torch gives a thread its count lazily, at the thread's first parallel call, from whichever count any
        # thread set last: a turn's thread (which sets 1, EngineSession.send) would leave this thread decoding on
        # one core. Asking first makes the count set here this thread's own.
        torch.get_num_threads()
        torch.set_num_threads(1 if native.library() is not None else self._threads)
        native.pin_threads(self._threads)  # the native step on the engine's threads, torch's small ops on this one
        while True:
            with self._cond:
                while self._running and not self._pending and not any(job.ready() for job in self._decodes):
                    self._cond.wait(0.5)
                if not self._running:
                    for step in self._pending:
                        step.error = RuntimeError("the engine is closed")
                        step.done.set()
                    self._pending = []
                    return
                # Wait a moment for turns still on their last token (or about to submit a step), so that the
                # conversations decoding now share this step rather than alternate between two.
                deadline = time.monotonic() + GATHER_SECONDS
                while time.monotonic() < deadline and (
                    any(not job.ready() for job in self._decodes)
                    or len(self._pending) + len(self._decodes) < self._active
                ):
                    self._cond.wait(max(deadline - time.monotonic(), 0.0))
                batch, self._pending = self._pending, []
                jobs = self._ready_decodes()
            self._run(batch, jobs)
            del batch, jobs  # no step (and its session) outlives its run in this frame while the scheduler waits

    def _ready_decodes(self) -> list[_Decode]:
        """(Under self._cond) the replies whose next token can be fed now; stopped or cancelled ones end here."""
        ready = []
        for job in list(self._decodes):
            if job.cancelled or job.stop.is_set():
                self._finish_decode(job)
            elif job.ready():
                ready.append(job)
        return ready

    def _run(self, batch: list[_Step], jobs: list[_Decode]) -> None:
        """One scheduler step: every decode row (replies' next tokens and turns' single-token steps) and the waiting
        prefills' next pieces, oldest first, up to a budget of prompt tokens (`prefill_piece` while conversations
        are decoding: they wait for this step; IDLE_PREFILL_TOKENS when none is), all as rows of one native call
        where the native step runs them (chunked prefill, as vLLM's scheduler mixes prefill and decode under a
        token budget), so several new requests prefill together and the decoding ones wait a few rows, not a whole
        prefill forward. A prefill the native step cannot run (H2O/TOVA, torch's kernels) runs alone, one per step;
        so does a decode row it cannot batch. What is left of a prefill waits for the next step."""
        self.step_threads = native.kernel_threads() if native.library() is not None else torch.get_num_threads()
        for step in [step for step in batch if step.call is not None]:
            try:
                step.logits = step.call()
            except Exception as error:
                step.error = error
            step.done.set()
        batch = [step for step in batch if step.call is None]
        prefills = [step for step in batch if len(step.ids) != 1]
        rows: list[_Step | _Decode] = [step for step in batch if len(step.ids) == 1] + jobs
        groups: dict[int, tuple[Any, list, list]] = {}  # id(decoder) -> (decoder, decode rows, prefill pieces)
        for row in rows:
            session, cache = row.session, row.session.cache
            try:
                session.evicted_last_turn += cache.make_room(1)
                decoder = decoder_for_step(session.model, cache, session.settings)
            except Exception as error:
                self._deliver([row], error=error)
                continue
            if decoder is None or (cache.policy.needs_attention_scores and not decoder.native_ready([cache])):
                self._hand_out()
                self._run_alone(row)
            else:
                groups.setdefault(id(decoder), (decoder, [], []))[1].append(row)
        budget = self.prefill_piece if rows else max(self.prefill_piece, IDLE_PREFILL_TOKENS)
        self._plan_prefill(prefills, groups, budget)
        self._hand_out()
        for decoder, members, pieces in groups.values():
            if len(members) == 1 and not pieces:
                self._run_alone(members[0])
                continue
            chunks = [[_token(row)] for row in members] + [ids for _, ids in pieces]
            caches = [row.session.cache for row in members] + [step.session.cache for step, _ in pieces]
            try:
                for row in members:
                    row.session._recent_ids.append(_token(row))
                for step, ids in pieces:
                    step.session._recent_ids.extend(ids)
                logits = feed_batch(decoder, chunks, caches)
            except Exception as error:
                self.steps += 1
                self._deliver(members, error=error)
                for step, _ in pieces:
                    step.error = error
                    step.done.set()
                continue
            self.steps += 1
            if len(chunks) > 1:
                self.batched_steps += 1
                self.batched_rows += len(chunks)
            self.mixed_pieces += len(pieces) if members else 0
            for index, (step, ids) in enumerate(pieces, start=len(members)):
                step.fed += len(ids)
                if step.fed >= len(step.ids):
                    step.logits = logits[index : index + 1].clone()
                    step.done.set()
            self._deliver(members, logits[: len(members)])
        if prefills:
            with self._cond:
                self._pending[:0] = [step for step in prefills if not step.done.is_set()]

    def _plan_prefill(self, prefills: list[_Step], groups: dict, budget: int) -> None:
        """Put the waiting prefills' next pieces, oldest first, into the native groups (room made for each) until
        `budget` prompt tokens; the oldest prefill the native step cannot run runs alone now."""
        alone = False
        for step in prefills:
            session, cache = step.session, step.session.cache
            decoder = decoder_for_prefill(session.model, cache, session.settings)
            if decoder is None:
                if not alone:  # pieces of prefill_piece always: the transformers forward rounds by chunk shape,
                    alone = True  # so a conversation's prefill is cut the same batched or alone (same replies)
                    self._hand_out()
                    self._run_piece(step)
                continue
            if budget <= 0:
                continue
            ids = step.ids[step.fed : step.fed + budget]
            try:
                session.evicted_last_turn += cache.make_room(len(ids))
            except Exception as error:
                step.error = error
                step.done.set()
                continue
            groups.setdefault(id(decoder), (decoder, [], []))[2].append((step, ids))
            budget -= len(ids)

    def _hand_out(self) -> None:
        """Give the turns the tokens sampled last step, as this step starts: their threads turn them into text while
        the step runs without the GIL, rather than take the GIL from the scheduler between steps."""
        with self._cond:
            outbox, self._outbox = self._outbox, {}
        for job, token in outbox.items():
            job.tokens.put(token)

    def _run_alone(self, row) -> None:
        try:
            logits = ChatSession._forward(row.session, [_token(row)])
        except Exception as error:
            self.steps += 1
            self._deliver([row], error=error)
            return
        self.steps += 1
        self._deliver([row], logits)

    def _deliver(self, rows: list, logits: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        """Hand each row its outcome: a turn's step gets its logits [1, vocab]; a reply its next token (sampled
        here), or the error, which ends it."""
        jobs = [(index, row) for index, row in enumerate(rows) if isinstance(row, _Decode)]
        for index, row in enumerate(rows):
            if isinstance(row, _Step):
                row.logits, row.error = (None, error) if error is not None else (logits[index : index + 1], None)
                row.done.set()
        if not jobs:
            return
        if error is None:
            for _, job in jobs:
                job.fed += 1
            try:
                mine = logits[: len(rows)] if len(jobs) == len(rows) else logits[[index for index, _ in jobs]]
                tokens = sample_rows([job for _, job in jobs], mine)  # a view when every row is a reply: no copy
            except Exception as failure:
                error = failure
        if error is None:
            with self._cond:
                for (_, job), token in zip(jobs, tokens):
                    job.token = token
                    self._outbox[job] = token
                    if token in job.session.end_of_turn_ids or job.fed + 1 >= job.limit:  # fed + 1 sampled
                        self._finish_decode(job)  # the token first, then the end
            return
        with self._cond:
            for _, job in jobs:
                self._finish_decode(job, error)

    def _run_piece(self, step: _Step) -> None:
        """The next `prefill_piece` tokens of a prefill step: the same as the session feeding them as chunks of
        that size (make_room, then forward); the step is done after its last piece, with that piece's logits."""
        piece = step.ids[step.fed : step.fed + self.prefill_piece]
        try:
            step.logits = ChatSession._forward(step.session, piece)
            step.fed += len(piece)
        except Exception as error:
            step.error = error
        self.steps += 1
        if step.error is not None or step.fed >= len(step.ids):
            step.done.set()


def _token(row) -> int:
    return row.token if isinstance(row, _Decode) else row.ids[0]


def sample_rows(jobs: list[_Decode], logits: torch.Tensor) -> list[int]:
    """The next token of each reply from its logits row (fp32 [len(jobs), vocab], changed in place), as
    `ChatSession._sample` draws it alone, rows under the same sampling settings together. Where the native kernels
    run: greedy rows the penalty and the first maximum, sampled rows penalty, temperature, top-k, top-p and a draw
    at a uniform number from the session's generator, one native pass per row (`native.greedy`, `native.sample`).
    Else their session's own logits processors over the batch, then the first maximum, or top-k and top-p over the
    batch and each its own torch.multinomial draw. Seeded replies repeat, batched or alone."""
    tokens: list[int | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        settings = job.settings
        groups.setdefault(
            (settings.repetition_penalty, settings.temperature, settings.top_k, settings.top_p), []
        ).append(index)
    for (penalty, temperature, top_k, top_p), indices in groups.items():
        rows = logits[indices] if len(indices) < len(jobs) else logits
        histories = torch.stack([jobs[i].session._recent_ids.padded for i in indices])  # [rows, capacity]
        if native_greedy(jobs[indices[0]].processors, rows, jobs[indices[0]].settings):  # as ChatSession._sample
            chosen = native.greedy(rows, histories, penalty)
        elif native_sampling(jobs[indices[0]].processors, rows, jobs[indices[0]].settings):  # as ChatSession._sample
            uniforms = torch.cat([torch.rand(1, generator=jobs[i].session.generator) for i in indices])
            chosen = native.sample(rows, histories, penalty, temperature, top_k, top_p, uniforms)
        else:
            for processor in jobs[indices[0]].processors:  # the same settings: the same processors for every row
                rows = processor(histories, rows)
            if temperature == 0:
                chosen = rows.argmax(dim=-1).tolist()
            else:
                probabilities, candidates = candidate_probabilities(rows, top_k, top_p)
                chosen = []
                for row, index in enumerate(indices):
                    choice = int(
                        torch.multinomial(probabilities[row : row + 1], 1, generator=jobs[index].session.generator)
                    )
                    chosen.append(choice if candidates is None else int(candidates[row, choice]))
        for index, token in zip(indices, chosen):
            tokens[index] = token
    return tokens
