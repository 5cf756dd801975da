"""The multi-conversation engine: live conversations over bounded caches, decoded together (continuous batching).

Every conversation is an `EngineSession` (a `ChatSession` whose forward passes go to the engine's scheduler
instead of running inline), so turns, stop, sampling, eviction and stats are exactly the session's. Each turn runs
in its caller's thread; its forward passes are steps the one scheduler thread runs:

* single-token decode steps waiting at the same time run as ONE batched fast-path step over all their bounded
  caches (`fastpath.batched.decode_batch`); conversations join and leave between any two steps (Orca-style
  iteration-level scheduling, as in vLLM and llama.cpp's server);
* prefill runs in pieces of at most `prefill_piece` tokens (the session's own chunks split further), one piece
  per scheduler step between batched decode steps, so a long new prompt does not stall the conversations that
  are decoding;
* H2O/TOVA conversations (attention-score policies) and models the fast path cannot run decode singly.

`Engine.open_turn` serves a stateless API over stateful caches: clients resend the whole conversation; a request
whose earlier messages are exactly a live conversation's continues on its cache (only the new message is
prefilled), any other starts a conversation whose history streams through the bounded cache. At most
`max_sessions` conversations live; the least recently used idle one is freed past that, so memory stays bounded by
the model plus `max_sessions` caches.
"""

from __future__ import annotations

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

from streamchat.config import Settings
from streamchat.fastpath import decoder_for_step, prepare_decoder
from streamchat.fastpath.batched import decode_batch
from streamchat.model import LoadedModel
from streamchat.session import ChatSession, SessionError, clean_text

SWITCH_INTERVAL = 0.0005  # seconds a Python thread may hold the GIL while another waits (see Engine.__init__)
GATHER_SECONDS = 0.003  # how long the scheduler waits for every active turn's next step before running a batch


class Overloaded(RuntimeError):
    """No capacity for this request now; `retry_after` seconds is a fair wait. `status`: 429 (busy) or 503 (full)."""

    def __init__(self, message: str, status: int = 429, retry_after: int = 1):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _Step:
    __slots__ = ("session", "ids", "fed", "done", "logits", "error")

    def __init__(self, session: ChatSession, ids: list[int]):
        self.session, self.ids, self.fed = session, ids, 0  # fed: prefill tokens run so far (in pieces)
        self.done = threading.Event()
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None


class EngineSession(ChatSession):
    """A ChatSession whose forward passes run on the engine's scheduler thread (batched with other sessions')."""

    def __init__(self, engine: "Engine", settings: Settings):
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

    def __init__(self, engine: "Engine", conversation: Conversation, request: TurnRequest, new_conversation: bool,
                 history_known: bool = True):
        self.engine, self.conversation, self.request = engine, conversation, request
        self.new_conversation, self.history_known = new_conversation, history_known
        self.result = TurnResult()
        self._turns_before = conversation.session.turns

    def run(self, stop: threading.Event) -> Iterator[str]:
        """Text pieces of the reply; setting `stop` ends it at the next token (the conversation stays consistent).
        Stop strings end the reply before them. Releases the conversation when done, however it ends."""
        conversation, request, session = self.conversation, self.request, self.conversation.session
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
            extension=self.engine.extension(conversation, turn.evicted_turn if turn else 0, reason),
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
        self._pending: list[_Step] = []
        self._active = 0  # sessions inside a turn (each will submit steps)
        self._running = True
        self.steps = self.batched_steps = self.batched_rows = 0  # scheduler counters (metrics)
        prepare_decoder(loaded.model, settings)  # quantized weights at start-up, not inside the first request
        # Every token crosses threads (turn -> scheduler -> turn -> event loop) and each crossing needs the GIL. A
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

    def extension(self, conversation: Conversation, evicted_turn: int, stop_reason: str) -> dict[str, Any]:
        """The `streamchat` object of a response: what the bounded cache holds and what it evicted."""
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
        }

    def stats(self) -> dict[str, Any]:
        """Live figures for /metrics (safe from any thread)."""
        with self._lock:
            conversations = {c.id: c.session.cache.stats() for c in self.conversations.values()}
            conversations.update({session.label: session.cache.stats() for session in list(self._outside)})
        with self._cond:
            queued, active = len(self._pending), self._active  # turns of API conversations and UI tabs alike
        return {
            "conversations": conversations,
            "active_turns": active,
            "queued_steps": queued,
            "steps": self.steps,
            "batched_steps": self.batched_steps,
            "batched_rows": self.batched_rows,
        }

    def close(self) -> None:
        """Stop the scheduler; steps still waiting fail with RuntimeError."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # ----- the scheduler ---------------------------------------------------------------------------------------

    def _enter(self) -> None:
        with self._cond:
            self._active += 1

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _submit(self, session: ChatSession, ids: list[int]) -> torch.Tensor:
        step = _Step(session, ids)
        with self._cond:
            if not self._running:
                raise RuntimeError("the engine is closed")
            self._pending.append(step)
            self._cond.notify_all()
        step.done.wait()
        if step.error is not None:
            raise step.error
        return step.logits

    def _schedule(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                while self._running and not self._pending:
                    self._cond.wait(0.5)
                if not self._running:
                    for step in self._pending:
                        step.error = RuntimeError("the engine is closed")
                        step.done.set()
                    self._pending = []
                    return
                deadline = time.monotonic() + GATHER_SECONDS
                while len(self._pending) < self._active and time.monotonic() < deadline:
                    self._cond.wait(max(deadline - time.monotonic(), 0.0))
                batch, self._pending = self._pending, []
            self._run(batch)
            del batch  # no step (and its session) outlives its run in this frame while the scheduler waits

    def _run(self, batch: list[_Step]) -> None:
        """One scheduler step: the oldest prefill piece, then every waiting decode step (batched where possible).
        Later prefill pieces wait for the next step (their turns see no difference: only when they run)."""
        prefills = [step for step in batch if len(step.ids) != 1]
        decodes = [step for step in batch if len(step.ids) == 1]
        if prefills:
            self._run_piece(prefills[0])
            with self._cond:
                self._pending[:0] = prefills[int(prefills[0].done.is_set()):]
        groups: dict[int, tuple[Any, list[_Step]]] = {}
        for step in decodes:
            session, cache = step.session, step.session.cache
            try:
                session.evicted_last_turn += cache.make_room(1)
                decoder = decoder_for_step(session.model, cache, session.settings)
            except Exception as error:  # noqa: BLE001 - handed to the waiting turn
                step.error = error
                step.done.set()
                continue
            if decoder is None or cache.policy.needs_attention_scores:
                self._run_single(step)
            else:
                groups.setdefault(id(decoder), (decoder, []))[1].append(step)
        for decoder, steps in groups.values():
            if len(steps) == 1:
                self._run_single(steps[0])
                continue
            try:
                for step in steps:
                    step.session._recent_ids.extend(step.ids)
                logits = decode_batch(decoder, [s.ids[0] for s in steps], [s.session.cache for s in steps])
                for row, step in enumerate(steps):
                    step.logits = logits[row : row + 1]
                self.batched_steps += 1
                self.batched_rows += len(steps)
            except Exception as error:  # noqa: BLE001
                for step in steps:
                    step.error = error
            self.steps += 1
            for step in steps:
                step.done.set()

    def _run_piece(self, step: _Step) -> None:
        """The next `prefill_piece` tokens of a prefill step: the same as the session feeding them as chunks of
        that size (make_room, then forward); the step is done after its last piece, with that piece's logits."""
        piece = step.ids[step.fed : step.fed + self.prefill_piece]
        try:
            step.logits = ChatSession._forward(step.session, piece)
            step.fed += len(piece)
        except Exception as error:  # noqa: BLE001 - raised in the turn's own thread
            step.error = error
        self.steps += 1
        if step.error is not None or step.fed >= len(step.ids):
            step.done.set()

    def _run_single(self, step: _Step) -> None:
        try:
            step.logits = ChatSession._forward(step.session, step.ids)
        except Exception as error:  # noqa: BLE001 - raised in the turn's own thread
            step.error = error
        self.steps += 1
        step.done.set()
