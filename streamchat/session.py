"""The chat session: the one place that drives the model (turns, chunked prefill, decode, sampling, stats).

Each turn feeds only its new tokens. The chat template is rendered with placeholders in place of message
contents, so the structure (role headers, end-of-turn markers) is tokenized with special tokens while what a user
typed is always tokenized as plain text: typing `<|im_end|>` cannot end a turn. The stream rendered so far is kept
in that placeholder form; a new turn feeds the difference between it and the template applied to the whole
conversation, so the cache always holds what the template would have produced.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from streamchat import native
from streamchat.attention import attention_kwargs
from streamchat.cache import BoundedCache
from streamchat.config import Settings, load_settings
from streamchat.conversation_store import (
    SEMANTIC_MIN_COSINE,
    ConversationStore,
    Passage,
    StoreError,
    passage_texts,
    split_passages,
)
from streamchat.fastpath import decoder_for_prefill, decoder_for_step, kv_dtype_for, prepare_decoder
from streamchat.memory import release_free_memory, rss_bytes
from streamchat.model import LoadedModel
from streamchat.scoring import continuation_logprobs, feed
from streamchat.sentence_embedding import EMBED_DIM, MAX_TOKENS, EmbedderUnavailable, SentenceEmbedder, load_embedder

CACHE_KEYS = (
    "policy",
    "sinks",
    "window",
    "heavy",
    "recent",
    "h2o_score",
    "h2o_decay",
    "slack",
    "evict_unit",
    "memory",
    "recall_tokens",
)
# Settings that name files or machine resources: fixed for a run, never taken from a chat front end (`/set`, the
# UI's configure API) nor from a loaded session file, so no chat input can make streamchat read or write a path.
LOCAL_KEYS = ("model", "device", "dtype", "threads", "sessions_dir", "prompts_file")
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
LONG_PREFILL = 256  # prompt tokens after which a turn hands freed memory back (memory.release_free_memory)
HISTORY_KEEP = 64  # conversation messages the session keeps as text (the cache holds far less of them anyway)
HISTORY_LIMIT = 96  # trimming back to HISTORY_KEEP happens past this, so its cost is paid once per 32 messages


# transformers' fast tokenizers apply `split_special_tokens` by switching a setting of the shared Rust tokenizer
# for the call: two threads tokenizing at once (the server's and the web UI's conversations) could see each
# other's setting, and a turn header such as <|im_start|> would be split into pieces. One lock for every call.
_TOKENIZE_LOCK = threading.Lock()


RECALL_HEADER = "Recalled from earlier in this conversation:"
RECALL_LINE_TOKENS = 10  # "(turn 12, assistant) " and the line break, counted before tokenizing the whole frame
# A user message is searched by meaning with its first this many tokens (of the sentence model's tokenizer): the
# query's vector is computed in the turn's time to first token (16 tokens: about 7 ms, AMD EPYC, AVX2, 2 threads);
# a question about something said earlier is short, and a long message's opening says what it is about
# (docs/recall.md).
QUERY_TOKENS = 16


def _passages(value: Any, name: str) -> list[Passage]:
    """Passages from a saved session's memory section; ValueError naming `name` when malformed."""
    if not isinstance(value, list) or not all(
        isinstance(p, dict)
        and {*p} == {"turn", "role", "text", "tokens"}
        and type(p["turn"]) is int
        and type(p["tokens"]) is int
        and isinstance(p["role"], str)
        and isinstance(p["text"], str)
        for p in value
    ):
        raise ValueError(f"memory: {name} are malformed")
    return [Passage(**p) for p in value]


def _passage_key(passage: Passage) -> tuple[int, str, str]:
    return passage.turn, passage.role, passage.text


def snippet(text: str, width: int = 60) -> str:
    """`text` on one line, cut to about `width` characters at a word boundary (with an ellipsis when cut)."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    return flat[:width].rsplit(" ", 1)[0] + "..."


def _placeholder(index: int) -> str:
    return f"\ue000{index}\ue001"


class SessionError(ValueError):
    """Input the session refuses (empty message, system prompt too long...); the session is unchanged."""


@dataclass
class TurnStats:
    turn: int
    prompt_tokens: int  # tokens of the prompt processed (fewer than asked after a stop during prefill)
    new_tokens: int
    stop_reason: str  # "eos", "max_new_tokens", "stopped" (stop flag), "stopped_in_prefill"
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    evicted_turn: int
    cache: dict[str, Any] = field(default_factory=dict)
    rss_bytes: int = 0
    prompt_tokens_requested: int = 0  # tokens the prompt had (pending reply token and turn template included)
    recalled: list[dict[str, Any]] = field(default_factory=list)  # memory on: passages in the cache this turn
    recall_changed: bool = False  # memory on: the recalled region was rewritten this turn (a re-prefill)

    def to_dict(self) -> dict[str, Any]:
        flat = asdict(self)
        flat.update(flat.pop("cache"))
        return flat


def clean_text(text: str) -> str:
    """Replace lone surrogates (which UTF-8 cannot encode) with U+FFFD; everything else is kept as typed."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _whole_characters(decoded: str, content: str) -> str:
    """The decoded start of `content` without a character cut in two at its end: a token boundary can fall inside a
    multi-byte character, which decodes to U+FFFD (kept only where `content` itself has one there)."""
    while decoded.endswith("\ufffd") and not content.startswith(decoded):
        decoded = decoded[:-1]
    return decoded


class IncrementalDecoder:
    """Token ids in, text out, never splitting a multi-byte character (the windowed scheme of TGI/vLLM)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


def candidate_probabilities(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampling probabilities [B, n] after top-k then top-p, per row of logits [B, vocab], and the token ids they
    belong to ([B, n]; None: all of them).

    With top-k on, top-p runs over the k candidates only, not the whole vocabulary: the same distribution (every
    other token already has probability 0) without sorting 49,152 logits per token, which transformers'
    TopPLogitsWarper does (3 ms: a quarter of a decode step on 2 cores)."""
    indices = None
    if 0 < top_k < logits.shape[-1]:
        logits, indices = logits.topk(top_k, dim=-1)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return torch.softmax(logits, dim=-1), indices


def native_greedy(processors: LogitsProcessorList, logits: torch.Tensor, settings: Settings) -> bool:
    """Whether `native.greedy` chooses these rows under `settings` (greedy, contiguous fp32 CPU logits, the kernels
    built) and computes these processors itself: the repetition penalty (any other processor: torch's path)."""
    return (
        settings.temperature == 0
        and logits.dtype == torch.float32
        and logits.device.type == "cpu"
        and logits.is_contiguous()
        and native.library() is not None
        and all(isinstance(p, RepetitionPenaltyLogitsProcessor) for p in processors)
    )


def native_sampling(processors: LogitsProcessorList, logits: torch.Tensor, settings: Settings) -> bool:
    """Whether `native.sample` draws these rows under `settings` (`native.can_sample`: sampled, top-k on, the
    kernels built) and computes these processors itself: the repetition penalty and temperature that
    `ChatSession._logits_processors` builds (any other processor: torch's path, which applies the list)."""
    return native.can_sample(logits, settings.temperature, settings.top_k, settings.top_p) and all(
        isinstance(p, (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper)) for p in processors
    )


class RecentTokens:
    """The last `capacity` token ids fed (the repetition penalty's history): in order, and as a fixed int64 tensor
    [capacity] padded with `pad` (the vocabulary size, which RepetitionPenaltyLogitsProcessor ignores) whose entries
    are the same ids in another order, which the penalty does not see: sampling reads it without building a tensor
    per token (that took 130 us for 1,024 ids)."""

    def __init__(self, capacity: int, pad: int, ids=()):
        self.ids: deque[int] = deque(maxlen=capacity)
        self.padded = torch.full((capacity,), pad, dtype=torch.int64)
        self._next = 0  # where the next id goes in `padded` (over the oldest once full)
        self.extend(ids)

    def extend(self, ids) -> None:
        ids = list(ids)[-len(self.padded) :]
        self.ids.extend(ids)
        values, capacity = torch.tensor(ids, dtype=torch.int64), len(self.padded)
        first = min(len(ids), capacity - self._next)
        self.padded[self._next : self._next + first] = values[:first]
        self.padded[: len(ids) - first] = values[first:]
        self._next = (self._next + len(ids)) % capacity

    def append(self, token_id: int) -> None:
        self.ids.append(token_id)
        self.padded[self._next] = token_id
        self._next = (self._next + 1) % len(self.padded)

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


class ChatSession:
    """A conversation with a bounded cache: turn 10,000 works like turn 1, and memory stays at the budget."""

    def __init__(self, loaded: LoadedModel, settings: Settings):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings
        self.device = next(self.model.parameters()).device
        self._check_budget(settings)
        self.cache = self.make_cache(settings)
        prepare_decoder(self.model, settings)  # once per model and weight option, before the first reply
        self.end_of_turn_ids = self._end_of_turn_ids()
        self.generator = torch.Generator(device=self.device)
        self.last_turn: TurnStats | None = None
        self.last_reply_ids: list[int] = []
        self.busy = False
        self.memory_store: ConversationStore | None = None
        self.memory_note: str | None = None  # why conversation memory stopped (a store error), for the front ends
        self._frame: tuple[str, str] | None = None  # the recalled region's template text (`_recall_frame`)
        self._embedder: SentenceEmbedder | bool | None = False  # False: not loaded yet; None: unavailable
        self._embedder_error = ""  # why it is unavailable
        self._recall_changed = False
        self._memory_note_new = False  # memory_note not yet told (recall_note tells it once)
        self.reset()

    # ----- conversation state -------------------------------------------------------------------------------

    def reset(self, system_prompt: str | None = ..., settings: Settings | None = None) -> None:
        """Start a new conversation, optionally with another system prompt or settings.

        Raises SessionError (leaving the session as it was) if a pinned system prompt does not fit the budget.
        """
        settings = settings or self.settings
        if system_prompt is not ...:
            settings = settings.replace(system_prompt=clean_text(system_prompt) if system_prompt else None)
        if not self.cache_fits(settings):
            self._check_budget(settings)
        cache = self.cache if self.cache_fits(settings) else self.make_cache(settings)
        messages = [] if settings.system_prompt is None else [{"role": "system", "content": settings.system_prompt}]
        pinned = self._pinned_prefix_length(messages, cache.capacity) if settings.pin_system_prompt else 0
        self.settings, self.cache, self.messages, self.pinned_tokens = settings, cache, messages, pinned
        cache.reset()
        cache.pin(pinned)
        self._fed_template = ""  # the stream so far, rendered with placeholders for contents
        self._pending: list[int] = []  # sampled tokens not yet in the cache (fed first next turn)
        self._recent_ids = RecentTokens(cache.capacity, self.model.config.vocab_size)
        self.turns = 0
        self.evicted_last_turn = 0
        self.last_turn = None
        self._reset_memory()
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)

    def _reset_memory(self, passages: list[Passage] = (), vectors: list[np.ndarray] | None = None) -> None:
        """A conversation memory holding `passages` (a new conversation: none), or none with memory off."""
        self._unstored: list[dict[str, Any]] = []  # messages not yet out of the window: turn, role, text, end
        self.recalled: list[Passage] = []  # what the cache's recalled region holds now
        self.memory_note = None
        if not self.settings.memory:
            self.close_memory()
            return
        try:
            if self.memory_store is None:
                self.memory_store = ConversationStore()
            self.memory_store.clear()
            self.memory_store.add(list(passages), vectors)
        except StoreError as error:
            self._memory_failed(error)
        self._passage_embedder()  # loaded now (once a process), not mid-conversation at the first eviction

    def _memory_failed(self, error: StoreError) -> None:
        self.memory_note = f"{error}; the chat goes on without conversation memory"
        self._memory_note_new = True
        if self.memory_store is not None:
            self.memory_store.close()
        self.memory_store = None

    def close_memory(self) -> None:
        """Close the conversation memory's file (a temporary one is deleted)."""
        if self.memory_store is not None:
            self.memory_store.close()
            self.memory_store = None

    def make_cache(self, settings: Settings) -> BoundedCache:
        """The cache a conversation runs on; a subclass may return another with the same interface (the stress
        test's dense baseline does)."""
        return BoundedCache(self.model, settings, kv_dtype_for(self.model, settings))

    def _check_budget(self, settings: Settings) -> None:
        """Refuse a cache budget beyond the model's context: positions past it were never trained."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and settings.budget > context:
            raise SessionError(
                f"the cache budget ({settings.budget} tokens) exceeds the model's context length ({context}): "
                "lower window (or heavy/recent)"
            )

    def cache_fits(self, settings: Settings) -> bool:
        """Whether the current cache object can serve `settings` (the same cache settings)."""
        return all(getattr(self.cache.settings, key) == getattr(settings, key) for key in CACHE_KEYS)

    def apply_settings(self, settings: Settings) -> bool:
        """Use new settings; returns True when that needed a new conversation (cache, model or system prompt
        changed), False when they apply to the next turn as is (sampling)."""
        for key in LOCAL_KEYS:
            if getattr(settings, key) != getattr(self.settings, key):
                raise SessionError(f"{key} cannot change in a running session: start streamchat again with it")
        restart_keys = (*CACHE_KEYS, "system_prompt", "pin_system_prompt")
        if any(getattr(settings, key) != getattr(self.settings, key) for key in restart_keys):
            self.reset(settings=settings)
            return True
        self.settings = settings
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        return False

    def seed_history(self, messages: list[dict[str, str]]) -> None:
        """Make `messages` (user/assistant turns, after the system prompt) the conversation so far, not yet fed:
        the next `send` streams them through the cache, in chunks, before its own message (how a server starts a
        conversation a client resends whole). Call right after `reset`; raises SessionError otherwise or for a
        message that is not a {"role": "user"|"assistant", "content": str} dict."""
        if self.turns or self._fed_template or self.visible_messages:
            raise SessionError("seed_history needs a fresh conversation: call reset first")
        for message in messages:
            if not (
                isinstance(message, dict)
                and message.get("role") in ("user", "assistant")
                and isinstance(message.get("content"), str)
            ):
                raise SessionError("earlier messages must be user or assistant messages with text content")
        self.messages = [*self.messages, *({"role": m["role"], "content": clean_text(m["content"])} for m in messages)]

    @property
    def visible_messages(self) -> list[dict[str, str]]:
        """The conversation without the system prompt."""
        return [m for m in self.messages if m["role"] != "system"]

    def stats(self) -> dict[str, Any]:
        """Live figures, safe to read from another thread while a turn runs."""
        return {**self.cache.stats(), **self.memory_stats(), "rss_bytes": rss_bytes(), "turns": self.turns}

    def memory_stats(self) -> dict[str, Any]:
        """The conversation memory's figures (`ConversationStore.stats`), `memory` on/off and any `memory_note`;
        empty with memory off."""
        if not self.settings.memory:
            return {}
        figures: dict[str, Any] = {
            "memory": self.memory_store is not None,
            "recalled": self._recalled_records(),
            "memory_semantic": bool(self.settings.recall_semantic) and self._embedder is not None,
        }
        if self.memory_store is not None:
            try:
                figures.update(self.memory_store.stats())
            except StoreError as error:
                self._memory_failed(error)
                figures["memory"] = False
        if self.memory_note:
            figures["memory_note"] = self.memory_note
        return figures

    # ----- saving and resuming (the file format is persist.py's) ----------------------------------------------

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole session as tensors (cache buffers, sampler state) and a JSON-able dict."""
        if self.busy:
            raise SessionError("a reply is still being generated; stop it before saving")
        cache_tensors, cache_meta = self.cache.state()
        tensors = {f"cache.{name}": tensor for name, tensor in cache_tensors.items()}
        tensors["generator_state"] = self.generator.get_state()
        meta = {
            "identity": self.loaded.identity,
            "settings": self.settings.to_dict(),
            "messages": self.messages,
            "pinned_tokens": self.pinned_tokens,
            "fed_template": self._fed_template,
            "pending": self._pending,
            "recent_ids": list(self._recent_ids),
            "turns": self.turns,
            "last_turn": asdict(self.last_turn) if self.last_turn else None,
            "cache": cache_meta,
        }
        if self.settings.memory:  # the store travels with the file: its passages, the messages not yet in it
            stored, vectors = [], None
            try:
                if self.memory_store:
                    stored, vectors = self.memory_store.passages()
            except StoreError as error:
                self._memory_failed(error)
            if vectors is not None:  # each passage's [k, dim], concatenated, and the k of each
                tensors["memory.vectors"] = torch.from_numpy(np.concatenate(vectors))
                tensors["memory.vector_counts"] = torch.tensor([len(v) for v in vectors], dtype=torch.int32)
            stored = [p.to_dict() for p in stored]
            meta["memory"] = {
                "passages": stored,
                "unstored": self._unstored,
                "recalled": [p.to_dict() for p in self.recalled],
            }
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Become the session `export_state` gave, to continue exactly where it was.

        Everything is checked and built aside first: a SessionError says what does not fit (another model, dtype,
        shapes, inconsistent fields) and leaves this session as it was.
        """
        if self.busy:
            raise SessionError("a reply is still being generated; stop it before loading")
        if meta.get("identity") != self.loaded.identity:
            raise SessionError(
                f"the session was saved with model {meta.get('identity')!r}, but {self.loaded.identity!r} is loaded: "
                "start streamchat with that model to resume it"
            )
        try:
            saved = meta["settings"]
            if saved.get("dtype") != self.settings.dtype:
                raise ValueError(f"it was saved with dtype {saved.get('dtype')}; start streamchat with that dtype")
            saved = {"kv_dtype": "model", **saved}  # files from before kv_dtype kept K/V in the model's dtype
            stored = tensors.get("cache.layer0.keys")
            if saved["kv_dtype"] == "auto" and stored is not None:  # what `auto` chose where it was saved (it may
                saved["kv_dtype"] = str(stored.dtype).removeprefix("torch.")  # choose otherwise here): kept as is
            settings = load_settings(None, {**saved, **{key: getattr(self.settings, key) for key in LOCAL_KEYS}})
            self._check_budget(settings)
            messages, template, turns = meta["messages"], meta["fed_template"], meta["turns"]
            vocab = self.model.get_input_embeddings().num_embeddings
            pending, recent = meta["pending"], meta["recent_ids"]
            if not (
                isinstance(messages, list)
                and all(isinstance(m, dict) and {*m} == {"role", "content"} for m in messages)
                and all(isinstance(v, str) for m in messages for v in m.values())
                and isinstance(template, str)
                and all(int(index) < len(messages) for index in _PLACEHOLDER.findall(template))
                and type(turns) is int
                and turns >= 0
                and isinstance(pending, list)
                and isinstance(recent, list)
                and all(type(i) is int and 0 <= i < vocab for i in (*pending, *recent))
            ):
                raise ValueError("messages, template, turns or token ids are malformed")
            memory = meta.get("memory", {"passages": [], "unstored": [], "recalled": []})
            if not isinstance(memory, dict):
                raise ValueError("memory: expected a mapping")
            if settings.memory:
                passages = _passages(memory.get("passages"), "passages")
                recalled = _passages(memory.get("recalled"), "recalled")
                unstored = memory.get("unstored")
                if not (
                    isinstance(unstored, list)
                    and all(isinstance(m, dict) and {*m} == {"turn", "role", "text", "end"} for m in unstored)
                    and all(type(m["turn"]) is int and type(m["end"]) is int for m in unstored)
                    and all(isinstance(m["role"], str) and isinstance(m["text"], str) for m in unstored)
                ):
                    raise ValueError("memory: unstored messages are malformed")
            vectors, counts = tensors.get("memory.vectors"), tensors.get("memory.vector_counts")
            if counts is None and vectors is not None and vectors.dim() == 2:  # a file of one vector a passage
                counts = torch.ones(len(vectors), dtype=torch.int32)
            if vectors is not None and (
                not settings.memory
                or vectors.dtype != torch.float16
                or vectors.dim() != 2
                or counts.dtype != torch.int32
                or tuple(counts.shape) != (len(passages),)
                or bool((counts < 1).any())
                or int(counts.sum()) != len(vectors)
            ):
                raise ValueError("memory.vectors: expected float16 [vectors, dim] and int32 counts, one a passage")
            cache = self.make_cache(settings)
            cache_tensors = {name[6:]: t for name, t in tensors.items() if name.startswith("cache.")}
            if len(cache_tensors) + 1 + (vectors is not None) + ("memory.vector_counts" in tensors) != len(tensors):
                raise ValueError("unexpected tensors besides the cache and the sampler state")
            cache.load_state(cache_tensors, meta["cache"])
            if cache.pinned != meta["pinned_tokens"]:
                raise ValueError("the pinned prefix does not match the cache")
            generator = torch.Generator(device=self.device)
            generator.set_state(tensors["generator_state"])
            last_turn = TurnStats(**meta["last_turn"]) if meta["last_turn"] else None
        except KeyError as error:
            raise SessionError(f"the saved session lacks {error}") from None
        except (TypeError, ValueError, RuntimeError) as error:
            raise SessionError(f"the saved session does not fit: {error}") from None
        self.settings, self.cache, self.generator, self.last_turn = settings, cache, generator, last_turn
        self.messages, self.pinned_tokens, self._fed_template, self.turns = messages, cache.pinned, template, turns
        self._pending, self._recent_ids = (
            list(pending),
            RecentTokens(cache.capacity, self.model.config.vocab_size, recent),
        )
        self.evicted_last_turn, self.last_reply_ids = 0, []
        if settings.memory:  # vectors of another width (an earlier semantic score): the passages are found by words
            kept = vectors is not None and vectors.shape[1] == EMBED_DIM
            split = np.split(vectors.numpy(), np.cumsum(counts.numpy())[:-1]) if kept else None
            self._reset_memory(passages, split)
            self._unstored, self.recalled = [dict(m) for m in unstored], recalled
        else:
            self._reset_memory()

    # ----- conversation memory (streamchat/conversation_store.py) -----------------------------------------------

    def _recalled_records(self) -> list[dict[str, Any]]:
        """What the recalled region holds, for the front ends: turn, role and text of each passage."""
        return [{"turn": p.turn, "role": p.role, "text": p.text} for p in self.recalled]

    def _note_message(self, role: str, text: str, end: int) -> None:
        """Memory on: keep a message said this turn, whose content ends at stream index `end`, until the window has
        passed it (`_store_evicted`)."""
        if self.memory_store is not None and text.strip():
            self._unstored.append({"turn": self.turns + 1, "role": role, "text": text, "end": end})

    def _record_messages(self, pieces, base: int, messages: list[dict[str, str]]) -> None:
        """Memory on: note the messages whose contents `pieces` fed (from stream index `base` on) with the stream
        index their content ends at; each goes into the store once the window has passed it (`_store_evicted`)."""
        end = base
        for ids, index, _ in pieces:
            end += len(ids)
            if index is not None and messages[index]["role"] != "system":
                self._note_message(messages[index]["role"], messages[index]["content"], end)

    def _store_evicted(self, cache: BoundedCache) -> None:
        """Move the noted messages that ended before the cache's window (`BoundedCache.window_start`) into the
        store, as passages with their token counts and, `recall_semantic` on, their sentence vectors."""
        boundary = cache.window_start()
        evicted = [m for m in self._unstored if m["end"] <= boundary]
        if not evicted:
            return
        self._unstored = [m for m in self._unstored if m["end"] > boundary]
        texts = [(m, text) for m in evicted for text in split_passages(m["text"])]
        passages = [Passage(m["turn"], m["role"], text, len(self._tokenize(text, True))) for m, text in texts]
        vectors = None
        if self._passage_embedder():
            groups = [passage_texts(p.text) for p in passages]
            flat = self._embed([text for group in groups for text in group])
            ends = np.cumsum([len(group) for group in groups])
            vectors = np.split(flat, ends[:-1])
        self.memory_store.add(passages, vectors)

    def _store_after_turn(self) -> None:
        """Memory on: store what left the window this turn now, after the reply, so that the sentence vectors of
        evicted messages are computed while the user reads it, not in the next turn's time to first token."""
        if self.memory_store is None:
            return
        try:
            self._store_evicted(self.cache)
        except StoreError as error:
            self._memory_failed(error)

    def _passage_embedder(self) -> SentenceEmbedder | None:
        """The semantic score's sentence embedder (`streamchat.sentence_embedding`, shared by the process); None:
        lexical search only (`recall_semantic` off, or the bundled model not installed: said once in
        `memory_note`)."""
        if not self.settings.recall_semantic:
            return None
        if self._embedder is False:
            try:
                self._embedder = load_embedder()
            except EmbedderUnavailable as error:
                self._embedder, self._embedder_error = None, str(error)
        if self._embedder is None and self.memory_store is not None and self.memory_note is None:
            self.memory_note = f"semantic recall is off: {self._embedder_error}; recall goes on by words alone"
            self._memory_note_new = True
        return self._embedder

    def _embed(self, texts: list[str], max_tokens: int = MAX_TOKENS) -> np.ndarray:
        """Unit sentence vectors of `texts` (each cut at `max_tokens`), float32 [n, EMBED_DIM] (a subclass may run
        it elsewhere: the batching engine runs it on its scheduler thread, which owns the cores)."""
        return self._passage_embedder().embed(texts, max_tokens)

    def _recall_frame(self) -> tuple[str, str]:
        """Template text before and after a recalled region's content: that of a system message in the middle of
        a conversation where the chat template renders one there, else of a user message, else line breaks."""
        if self._frame is None:
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
            self._frame = ("\n", "\n")
            for role in ("system", "user"):
                try:
                    base = self._render(probe, add_generation_prompt=False)
                    full = self._render([*probe, {"role": role, "content": "c"}], add_generation_prompt=False)
                except Exception:  # a template that refuses the role there (jinja's TemplateError and others)
                    continue
                delta, mark = full[len(base) :], _placeholder(2)
                if full.startswith(base) and delta.count(mark) == 1:
                    before, after = delta.split(mark)
                    self._frame = (before, after)
                    break
        return self._frame

    def _recall_ids(self, passages: list[Passage]) -> list[int]:
        """The tokens of the recalled region: one framed message listing `passages` with their turn and role."""
        before, after = self._recall_frame()
        lines = [RECALL_HEADER, *(f"(turn {p.turn}, {p.role}) {p.text}" for p in passages)]
        return self._tokenize(before, False) + self._tokenize("\n".join(lines), True) + self._tokenize(after, False)

    def would_recall(self, query: str) -> list[Passage]:
        """The stored passages a user message `query` would bring back into the cache now, in conversation order
        (memory off or failed: none). Nothing changes: the `recall` benchmark asks it beside each probe."""
        if self.memory_store is None:
            return []
        try:
            return self._choose_recall(clean_text(query))
        except StoreError:
            return []

    def _choose_recall(self, query: str) -> list[Passage]:
        """The stored passages to recall for `query`: the relevant ones (`ConversationStore.search`), best first, that
        fit `recall_tokens` with their frame, in conversation order. A best passage too long for the budget alone is
        cut to fit. When the best match is in the recalled region already, the region as it is (a rewrite is a
        re-prefill: memorycost measured MT-Bench turns swapping topic matches back and forth otherwise). With
        sentence vectors, a passage other than the best that shares the query's words but not its meaning is left
        out ("What is my name?" / "Dear [Supervisor's Name], ...": 100 tokens of re-prefill for nothing)."""
        vector = None
        if self.memory_store.has_vectors and self._passage_embedder() is not None:
            vector = self._embed([query], QUERY_TOKENS)[0]
        found = self.memory_store.search(query, vector)
        if not found:
            return []
        best = found[0]
        if any(p.id == best.id or _passage_key(p) == _passage_key(best) for p in self.recalled):
            return list(self.recalled)  # the best match is recalled already: the region stays, no re-prefill
        if vector is not None:  # past the best, a passage found by words must be close in meaning too
            found = [best, *(p for p in found[1:] if p.semantic >= SEMANTIC_MIN_COSINE)]
        room = self.settings.recall_tokens - len(self._recall_ids([]))
        chosen, used = [], 0
        for passage in found:
            if used + passage.tokens + RECALL_LINE_TOKENS <= room:
                chosen.append(passage)
                used += passage.tokens + RECALL_LINE_TOKENS
        if not chosen:
            ids = self._tokenize(best.text, True)[: max(room - RECALL_LINE_TOKENS, 1)]
            text = _whole_characters(self.tokenizer.decode(ids), best.text)
            chosen = [Passage(best.turn, best.role, text, len(ids), best.id, best.score)]
        while (
            len(chosen) > 1 and len(self._recall_ids(sorted(chosen, key=lambda p: p.id))) > self.settings.recall_tokens
        ):
            chosen.pop()  # the least relevant: the token estimate per line was short
        return sorted(chosen, key=lambda p: p.id)

    def _recall(self, query: str, cache: BoundedCache, feed, commit: bool = True) -> bool:
        """Memory on: store what left the window, search the store with `query` (a new user message) and make the
        cache's recalled region the passages chosen (`BoundedCache.replace_recall`), by `feed(ids)` running the
        model over the region's tokens into `cache`. Kept as it is when nothing matches or the same passages are
        chosen again (no re-prefill). `commit` False: a fork being scored, the session's own record unchanged.
        Returns whether the region was rewritten. A store error ends memory for this conversation, with a note."""
        if self.memory_store is None:
            return False
        try:
            self._store_evicted(cache)
            chosen = self._choose_recall(query)
        except StoreError as error:
            self._memory_failed(error)
            return False
        if not chosen or [_passage_key(p) for p in chosen] == [_passage_key(p) for p in self.recalled]:
            return False
        ids = self._recall_ids(chosen)
        if len(ids) > self.settings.recall_tokens:  # a frame longer than the budget: recall nothing
            return False
        keep = 0  # the tokens the region begins with already (its frame at least) are not fed again
        held = self._recall_ids(self.recalled) if self.recalled else []
        if len(held) == cache.recall_length:
            while keep < min(len(held), len(ids)) - 1 and held[keep] == ids[keep]:
                keep += 1
        evicted = cache.replace_recall(len(ids), lambda: feed(ids[keep:]), keep)
        if commit:
            self.recalled = chosen
            self.evicted_last_turn += evicted
        return True

    def _feed_recall(self, ids: list[int]) -> None:
        """Run the model over a recalled region's tokens into the session's cache. They are not part of the
        repetition penalty's history (a recalled name would be penalized in the very reply that needs it)."""
        recent = list(self._recent_ids)
        chunk = self.settings.prefill_chunk
        for start in range(0, len(ids), chunk):
            self._forward(ids[start : start + chunk])
        self._recent_ids = RecentTokens(self.cache.capacity, self.model.config.vocab_size, recent)

    # ----- tokenization -------------------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        placeholders = [{**m, "content": _placeholder(i)} for i, m in enumerate(messages)]
        return self.tokenizer.apply_chat_template(
            placeholders, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _segments(self, template_text: str, messages: list[dict[str, str]]) -> list[tuple[str, int | None]]:
        """Split rendered template text into (structure text, None) and (content text, message index) parts."""
        parts: list[tuple[str, int | None]] = []
        cursor = 0
        for match in _PLACEHOLDER.finditer(template_text):
            if match.start() > cursor:
                parts.append((template_text[cursor : match.start()], None))
            index = int(match.group(1))
            parts.append((messages[index]["content"], index))
            cursor = match.end()
        if cursor < len(template_text):
            parts.append((template_text[cursor:], None))
        return parts

    def _tokenize(self, text: str, is_content: bool) -> list[int]:
        if not text:
            return []
        with _TOKENIZE_LOCK:
            return self.tokenizer(text, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]

    def _pinned_prefix_length(self, messages: list[dict[str, str]], capacity: int) -> int:
        """Tokens before the first user message's content: the system prompt and the first turn header."""
        probe = [*messages, {"role": "user", "content": ""}]
        text = self._render(probe, add_generation_prompt=True)
        before_user = text[: text.index(_placeholder(len(probe) - 1))]
        count = sum(len(self._tokenize(part, index is not None)) for part, index in self._segments(before_user, probe))
        limit = capacity // 2
        if count > limit:
            raise SessionError(
                f"the system prompt takes {count} tokens, but a pinned prompt may use at most half the cache "
                f"budget ({limit} of {capacity}): shorten it, raise the window, or set "
                "pin_system_prompt: false"
            )
        return count

    def encode_turn(self, user_text: str) -> tuple[list[tuple[list[int], int | None, str]], list[dict[str, str]]]:
        """The token pieces a new user turn feeds, and the conversation it leads to.

        Pieces are (ids, message index or None, placeholder-form text) so that a stop mid-prefill can record
        exactly what was fed.
        """
        messages = [*self.messages, {"role": "user", "content": user_text}]
        return self._encode(messages, add_generation_prompt=True), messages

    def _encode(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> list[tuple[list[int], int | None, str]]:
        """The pieces that take the stream fed so far to the template of `messages` (see `encode_turn`)."""
        full = self._render(messages, add_generation_prompt=add_generation_prompt)
        fed = self._fed_template
        if not full.startswith(fed):  # a template that rewrites history: feed from where the two differ
            common = 0
            while common < min(len(fed), len(full)) and fed[common] == full[common]:
                common += 1
            fed = fed[:common]
        pieces = []
        delta = full[len(fed) :]
        cursor = 0
        for text, index in self._segments(delta, messages):
            width = len(_placeholder(index)) if index is not None else len(text)
            pieces.append((self._tokenize(text, index is not None), index, delta[cursor : cursor + width]))
            cursor += width
        return pieces

    def _message_start_offsets(self, pieces, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """Token offsets, within the concatenated ids of `pieces`, where a new message's role header begins.

        A header starts where the template of the messages before it ends. It is found inside a structure piece
        by tokenizing the piece's two sides apart; where that does not give the piece's own tokens (a token
        spanning the boundary) the start is left unmarked, and eviction there stays token-level."""
        delta_start = len(self._render(messages, add_generation_prompt)) - sum(len(p[2]) for p in pieces)
        points = [len(self._render(messages[:i], False)) if i else 0 for i in range(len(self.messages), len(messages))]
        if add_generation_prompt:
            points.append(len(self._render(messages, False)))
        offsets = []
        for point in (p - delta_start for p in points):
            chars = tokens = 0
            for ids, index, text in pieces:
                if point == chars:
                    offsets.append(tokens)
                    break
                if chars < point < chars + len(text):
                    before, after = text[: point - chars], text[point - chars :]
                    if index is None and self._tokenize(before, False) + self._tokenize(after, False) == ids:
                        offsets.append(tokens + len(self._tokenize(before, False)))
                    break
                chars, tokens = chars + len(text), tokens + len(ids)
        return sorted({offset for offset in offsets if offset >= 0})

    def _mark_message_starts(self, cache: BoundedCache, pieces, messages, add_generation_prompt: bool) -> None:
        """Under `evict_unit: message`, tell `cache` where the messages about to be fed (after `_pending`) begin."""
        if self.settings.evict_unit != "message":
            return
        base = cache.seen_tokens + len(self._pending)
        for offset in self._message_start_offsets(pieces, messages, add_generation_prompt):
            if not cache.message_starts or base + offset > cache.message_starts[-1]:
                cache.mark_message_start(base + offset)

    # ----- model ----------------------------------------------------------------------------------------------

    def _end_of_turn_ids(self) -> set[int]:
        ids = set()
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return ids

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Feed ids (at most the cache's room) and return the next-token logits, fp32 [1, vocab]."""
        self.evicted_last_turn += self.cache.make_room(len(ids))
        fast = decoder_for_step(self.model, self.cache, self.settings) if len(ids) == 1 else None
        if fast is not None:  # single-token decode: the flat fast path, same cache semantics (streamchat/fastpath)
            self._recent_ids.extend(ids)
            return fast.decode(ids[0], self.cache)
        chunked = decoder_for_prefill(self.model, self.cache, self.settings)
        if chunked is not None:  # a prefill chunk through the native step: one row per token, causal
            self._recent_ids.extend(ids)
            return chunked.prefill(ids, self.cache)
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
                **attention_kwargs(self.cache),
            )
        self._recent_ids.extend(ids)
        return out.logits[:, -1].float()

    def _logits_processors(self, settings: Settings) -> LogitsProcessorList:
        """The processors over the whole vocabulary: repetition penalty and temperature (top-k and top-p: `_sample`)."""
        processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if settings.temperature > 0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        return processors

    def _sample(self, logits: torch.Tensor, processors: LogitsProcessorList, settings: Settings) -> int:
        """The next token: greedy at temperature 0, else drawn after top-k and top-p (in one native pass where the
        kernels run: `native.sample`, the same processors' arithmetic; `logits` may be changed in place)."""
        if native_greedy(processors, logits, settings):  # one pass: torch's penalty and argmax took ~1 ms a token
            return native.greedy(logits, self._recent_ids.padded.unsqueeze(0), settings.repetition_penalty)[0]
        if native_sampling(processors, logits, settings):
            uniform = torch.rand(1, generator=self.generator)
            return native.sample(
                logits,
                self._recent_ids.padded.unsqueeze(0),
                settings.repetition_penalty,
                settings.temperature,
                settings.top_k,
                settings.top_p,
                uniform,
            )[0]
        if processors:
            history = self._recent_ids.padded.unsqueeze(0).to(self.device)
            for processor in processors:  # as LogitsProcessorList does, without its per-call signature inspection
                logits = processor(history, logits)
        if settings.temperature == 0:
            return int(logits.argmax(dim=-1))
        probabilities, indices = candidate_probabilities(logits, settings.top_k, settings.top_p)
        choice = torch.multinomial(probabilities, 1, generator=self.generator)
        return int(choice if indices is None else indices[0, choice])

    # ----- a turn ---------------------------------------------------------------------------------------------

    def send(
        self, user_text: str, stop: threading.Event | None = None, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        """Stream the reply to `user_text` as text pieces; `self.last_turn` holds the turn's stats afterwards.

        Setting `stop` ends the turn at the next chunk or token, leaving the cache consistent.
        """
        if not isinstance(user_text, str) or not user_text.strip():
            raise SessionError("empty message: type something to send")
        if self.busy:
            raise SessionError("a reply is still being generated; stop it first")
        settings = self.settings
        limit = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= limit <= 1_000_000:
            raise SessionError(f"max_new_tokens must be between 1 and 1,000,000, got {limit}")
        stop = stop or threading.Event()
        user_text = clean_text(user_text)
        self.busy = True
        try:
            yield from self._turn(user_text, stop, limit, settings)
        finally:
            self.busy = False

    def _turn(self, user_text: str, stop: threading.Event, limit: int, settings: Settings) -> Iterator[str]:
        started = time.perf_counter()
        self.evicted_last_turn = 0
        self._recall_changed = self._recall(user_text, self.cache, self._feed_recall)
        pieces, messages = self.encode_turn(user_text)
        base = self.cache.seen_tokens + len(self._pending)
        self._mark_message_starts(self.cache, pieces, messages, add_generation_prompt=True)
        ids = list(self._pending)
        for piece_ids, _, _ in pieces:
            ids.extend(piece_ids)
        chunk = min(settings.prefill_chunk, self.cache.room)
        fed, logits = 0, None
        while fed < len(ids) and not stop.is_set():
            logits = self._forward(ids[fed : fed + chunk])
            fed += len(ids[fed : fed + chunk])
        prefill_seconds = time.perf_counter() - started
        if fed >= LONG_PREFILL:
            release_free_memory()  # the chunks' activations: otherwise RSS keeps their high-water mark
        if fed < len(ids):
            self.cache.drop_message_starts(self.cache.seen_tokens)
            self._record_partial_prefill(pieces, messages, fed - len(self._pending))
            self._pending = self._pending[fed:]
            self._finish(len(ids), fed, 0, "stopped_in_prefill", prefill_seconds, 0.0, 0.0)  # fed of len(ids)
            return
        self._pending = []
        for _, _, template_text in pieces:
            self._fed_template += template_text
        self._record_messages(pieces, base, messages)
        self.messages = messages
        yield from self._decode(logits, limit, stop, started, len(ids), prefill_seconds, settings)

    def feed_exchange(self, user_text: str, reply_text: str, score_user: bool = False) -> tuple[float, int] | None:
        """Add a user turn and a given assistant reply without generating (teacher forcing): the cache then holds
        what the chat template renders for both, as if the model had replied `reply_text`. A scripted benchmark's
        filler turns (`streamchat.evaluate.recall`) use it; `last_turn` records it with stop_reason "given".
        `score_user`: also return the negative log-likelihood (natural log, summed) of the user message's content
        tokens as fed, and their count (a text's perplexity through the chat path: `memorycost --ppl-text`)."""
        for text in (user_text, reply_text):
            if not isinstance(text, str) or not text.strip():
                raise SessionError("empty message: type something to send")
        if self.busy:
            raise SessionError("a reply is still being generated; stop it first")
        started = time.perf_counter()
        self.evicted_last_turn = 0
        self._recall_changed = self._recall(clean_text(user_text), self.cache, self._feed_recall)
        messages = [
            *self.messages,
            {"role": "user", "content": clean_text(user_text)},
            {"role": "assistant", "content": clean_text(reply_text)},
        ]
        pieces = self._encode(messages, add_generation_prompt=False)
        base = self.cache.seen_tokens + len(self._pending)
        self._mark_message_starts(self.cache, pieces, messages, add_generation_prompt=False)
        ids = [*self._pending, *(i for piece_ids, _, _ in pieces for i in piece_ids)]
        chunk = min(self.settings.prefill_chunk, self.cache.room)
        scored = None
        if score_user:
            scored = self._feed_scored(ids, pieces, len(messages) - 2, chunk)
        else:
            for start in range(0, len(ids), chunk):
                self._forward(ids[start : start + chunk])
        self._pending = []
        self._fed_template += "".join(text for _, _, text in pieces)
        self._record_messages(pieces, base, messages)
        self.messages = messages
        self._finish(len(ids), len(ids), 0, "given", time.perf_counter() - started, 0.0, 0.0)
        return scored

    def _feed_scored(self, ids: list[int], pieces, index: int, chunk: int) -> tuple[float, int]:
        """Feed `ids` keeping every position's logits (`scoring.feed`); the NLL sum and count of the tokens of
        message `index`'s content piece."""
        start = len(self._pending)
        for piece_ids, piece_index, _ in pieces:
            if piece_index == index:
                break
            start += len(piece_ids)
        count = len(piece_ids) if piece_index == index else 0
        with torch.inference_mode():
            logits = feed(self.model, self.cache, ids, chunk)
        self._recent_ids.extend(ids)
        if not count or start == 0:
            return 0.0, 0
        targets = torch.tensor(ids[start : start + count])
        logprobs = torch.log_softmax(logits[start - 1 : start + count - 1].double(), dim=-1)
        return -float(logprobs.gather(-1, targets[:, None]).sum()), count

    def exchange_tokens(self, user_text: str, reply_text: str) -> int:
        """Tokens `feed_exchange(user_text, reply_text)` would feed now (tokenization only, nothing fed)."""
        messages = [
            *self.messages,
            {"role": "user", "content": clean_text(user_text)},
            {"role": "assistant", "content": clean_text(reply_text)},
        ]
        return len(self._pending) + sum(len(ids) for ids, _, _ in self._encode(messages, add_generation_prompt=False))

    def score_reply(self, user_text: str, candidates: list[str], reply_prefix: str = "") -> torch.Tensor:
        """log P(reply_prefix + candidate | conversation so far + user turn `user_text`) for each candidate,
        fp64 [len(candidates)] (natural log, summed over the candidate's tokens only; the prefix is context).

        Multiple-choice scoring, as evaluation harnesses score small models. Runs on forks of the cache
        (`BoundedCache.fork`), evicting there as the chat would: the session, its cache and its conversation are
        unchanged. Each candidate is tokenized with the prefix (as content) and scored on the tokens after the
        prefix's own; a candidate that merges with the prefix's last token is tokenized apart instead.
        Raises SessionError for an empty turn or candidate list, or while a reply is being generated."""
        if not isinstance(user_text, str) or not user_text.strip() or not candidates:
            raise SessionError("score_reply needs a user turn and at least one candidate")
        if self.busy:
            raise SessionError("a reply is still being generated; stop it first")
        pieces, messages = self.encode_turn(clean_text(user_text))
        context = self.cache.fork()
        chunk = self.settings.prefill_chunk
        self._recall(
            clean_text(user_text),
            context,
            lambda ids: feed(self.model, context, ids, chunk, last_only=True),
            commit=False,
        )
        self._mark_message_starts(context, pieces, messages, add_generation_prompt=True)
        prefix_ids = self._tokenize(reply_prefix, True)
        ids = [*self._pending, *(i for piece_ids, _, _ in pieces for i in piece_ids), *prefix_ids]
        next_logits = feed(self.model, context, ids, chunk, last_only=True)[-1]
        scores = []
        for candidate in candidates:
            joint = self._tokenize(reply_prefix + candidate, True)
            merged = joint[: len(prefix_ids)] != prefix_ids
            tail = self._tokenize(candidate, True) if merged else joint[len(prefix_ids) :]
            if not tail:
                raise SessionError(f"candidate {candidate!r} has no tokens")
            scores.append(continuation_logprobs(self.model, context.fork(), next_logits, tail, chunk).sum())
        return torch.stack(scores)

    def _record_partial_prefill(self, pieces, messages: list[dict[str, str]], fed: int) -> None:
        """After a stop mid-prefill, make the conversation say exactly what the cache holds."""
        kept = len(self.messages)
        for piece_ids, index, template_text in pieces:
            if fed <= 0:
                break
            if fed >= len(piece_ids):
                self._fed_template += template_text
            elif index is None:
                self._fed_template += self.tokenizer.decode(piece_ids[:fed])
            else:
                text = _whole_characters(self.tokenizer.decode(piece_ids[:fed]), messages[index]["content"])
                messages[index] = {**messages[index], "content": text}
                self._fed_template += template_text
            if index is not None:
                kept = index + 1
            fed -= len(piece_ids)
        self.messages = messages[:kept]

    def _decode(self, logits, limit, stop, started, prompt_tokens, prefill_seconds, settings) -> Iterator[str]:
        processors = self._logits_processors(settings)
        decoder = IncrementalDecoder(self.tokenizer)
        self.last_reply_ids = decoder.ids  # what the model generated this turn, end-of-turn token included
        reply: list[str] = []
        ttft, decode_started, new_tokens = 0.0, time.perf_counter(), 0
        reason = "stopped"  # also what a consumer closing this generator early means
        tokens = self._reply_tokens(logits, limit, stop, processors, settings)
        try:
            for token_id in tokens:
                new_tokens += 1
                if new_tokens == 1:
                    ttft = time.perf_counter() - started
                    decode_started = time.perf_counter()
                if token_id in self.end_of_turn_ids:
                    decoder.ids.append(token_id)
                    reason = "eos"
                    break
                text = decoder.push(token_id)
                if text:
                    reply.append(text)
                    yield text
                if new_tokens >= limit or stop.is_set():
                    reason = "max_new_tokens" if new_tokens >= limit else "stopped"
                    break
        finally:
            tokens.close()  # before the stats: nothing feeds this session after this
            decode_seconds = time.perf_counter() - decode_started
            index = len(self.messages)
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            self._note_message("assistant", self.messages[-1]["content"], self.cache.seen_tokens + len(self._pending))
            self._fed_template += _placeholder(index)
            if reason == "eos":
                self._fed_template += self.tokenizer.decode(self._pending)
            steps = max(new_tokens - 1, 0)  # the first token came from the prefill's logits
            rate = steps / decode_seconds if steps and decode_seconds > 0 else 0.0
            self._finish(prompt_tokens, prompt_tokens, new_tokens, reason, prefill_seconds, ttft, rate)

    def _reply_tokens(
        self,
        logits: torch.Tensor,
        limit: int,
        stop: threading.Event,
        processors: LogitsProcessorList,
        settings: Settings,
    ) -> Iterator[int]:
        """The reply's token ids, one at a time: each sampled from the logits of the one before (the first from the
        prefill's `logits`, fp32 [1, vocab]); a token is fed to the cache when the consumer asks for the next.
        `_pending` holds the last token while it is not fed: it goes first into the next turn's prefill. The
        consumer (`_decode`) ends the reply (end of turn, `limit`, `stop`) by not asking for more."""
        while True:
            token_id = self._sample(logits, processors, settings)
            self._pending = [token_id]
            yield token_id
            logits = self._forward([token_id])
            self._pending = []

    def _trim_history(self) -> None:
        """Forget the oldest messages' text so an endless conversation keeps bounded text and renders in bounded
        time. The placeholder-form stream is rebased onto the template of the kept messages; a template for
        which that is not exact (one that renders earlier turns differently) keeps its full history instead."""
        talk = [i for i, m in enumerate(self.messages) if m["role"] != "system"]
        if len(talk) <= HISTORY_LIMIT:
            return
        first = talk[-HISTORY_KEEP]
        while first < talk[-1] and self.messages[first]["role"] != "user":
            first += 1
        if _placeholder(first) not in self._fed_template:
            return
        dropped = {i for i in talk if i < first}
        kept = [m for i, m in enumerate(self.messages) if i not in dropped]
        renumber = {old: new for new, old in enumerate(i for i in range(len(self.messages)) if i not in dropped)}
        tail = self._fed_template[self._fed_template.index(_placeholder(first)) :]
        tail = _PLACEHOLDER.sub(lambda match: _placeholder(renumber[int(match.group(1))]), tail)
        rendered = self._render(kept, add_generation_prompt=False)
        new_first = _placeholder(renumber[first])
        rebased = rendered[: rendered.index(new_first)] + tail
        if rendered.startswith(rebased):
            self.messages, self._fed_template = kept, rebased

    def _finish(self, prompt_tokens, fed, new_tokens, reason, prefill_seconds, ttft, decode_rate) -> None:
        self._store_after_turn()
        self._trim_history()
        self.turns += 1
        self.last_turn = TurnStats(
            turn=self.turns,
            prompt_tokens=fed,
            prompt_tokens_requested=prompt_tokens,
            new_tokens=new_tokens,
            stop_reason=reason,
            ttft_s=ttft,
            prefill_tokens_per_s=fed / prefill_seconds if prefill_seconds > 0 else 0.0,
            decode_tokens_per_s=decode_rate,
            evicted_turn=self.evicted_last_turn,
            cache={**self.cache.stats(), **self.memory_stats()},
            rss_bytes=rss_bytes(),
            recalled=self._recalled_records(),
            recall_changed=self._recall_changed,
        )
        self._recall_changed = False

    def recall_note(self) -> str | None:
        """A sentence for the user when the last turn brought passages back into the cache (their turns and
        snippets), or when conversation memory stopped (told once)."""
        parts = []
        turn = self.last_turn
        if turn is not None and turn.recall_changed and turn.recalled:
            listed = "; ".join(f"turn {p['turn']} ({p['role']}) {snippet(p['text'])!r}" for p in turn.recalled)
            parts.append(
                f"recalled from memory into the cache ({turn.cache.get('recalled_tokens', 0)} tokens): {listed}"
            )
        if self.memory_note and self._memory_note_new:
            self._memory_note_new = False
            parts.append(self.memory_note)
        return " | ".join(parts) or None

    def eviction_note(self) -> str | None:
        """A sentence for the user when the last turn evicted tokens (evictions are never silent)."""
        if not self.last_turn or not self.last_turn.evicted_turn:
            return None
        cache = self.last_turn.cache
        recalled = cache.get("recalled_tokens", 0)
        kept = f"{cache['cache_tokens'] - cache['sink_tokens'] - recalled} recent"
        if "heavy_tokens" in cache:  # h2o
            kept = f"{cache['heavy_tokens']} heavy-hitter + {cache['recent_tokens']} recent"
        return (
            f"context window full: {self.last_turn.evicted_turn} earlier tokens evicted this turn "
            f"({cache['evicted_total']} in total); {cache['sink_tokens']} pinned/sink + "
            f"{f'{recalled} recalled + ' if recalled else ''}{kept} kept"
        )
