"""The bounded KV cache: fixed-size buffers, cache-relative RoPE positions, eviction delegated to a policy.

`BoundedCache` is a transformers `Cache`, so it plugs into `model(..., past_key_values=cache)` with the SDPA
attention path. Because `get_seq_length()` is the number of cached tokens, the model places new tokens right after
the cache (positions L, L+1, ...) by itself. Eviction runs only in `make_room`, between forward passes; afterwards
the kept keys are rotated afresh at their new places from their raw form (see `rope.py`), so positions stay
0..L-1 in cache order with no drift.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from streamchat import native
from streamchat.attention import enable_scoring
from streamchat.config import Settings
from streamchat.policies import EvictionPolicy, get_policy_class
from streamchat.rope import RopeTable

LAYER_BUFFERS = ("keys", "raw_keys", "values", "origins")


def stored_dtype(model: torch.nn.Module, settings: Settings) -> torch.dtype:
    """The K/V dtype `settings.kv_dtype` names when it names one; `model` and `auto` give the model's dtype here.
    What `auto` picks for the fast decode path is the fast path's to say: `streamchat.fastpath.kv_dtype_for`."""
    if settings.kv_dtype in ("model", "auto"):
        return model.dtype
    return getattr(torch, settings.kv_dtype)


def one_run(kept: torch.Tensor, fixed: int) -> tuple[int, int] | None:
    """(start, count) where `kept` [k] (the same places for every head) is 0..fixed-1 followed by one run of
    places start..start+count-1 (start >= fixed, count >= 1), as sink_window keeps; else None."""
    if kept.dim() != 1 or kept.numel() <= fixed:
        return None
    moved = kept[fixed:]
    start, count = int(moved[0]), moved.numel()
    if (
        start < fixed
        or int(moved[-1]) != start + count - 1
        or not torch.equal(moved, torch.arange(start, start + count))
    ):
        return None
    return start, count


class BoundedLayer(CacheLayerMixin):
    """One layer's buffers: rotated keys (what attention reads), raw keys (for exact re-rotation), values, and the
    stream index each cached place came from. All are [batch, kv_heads, capacity, ...]: GQA heads are never
    repeated here, and the buffers are allocated once, at the first update, in `dtype` (keys and values)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, capacity: int, rope: RopeTable, dtype: torch.dtype):
        super().__init__()
        self.capacity = capacity
        self.rope = rope
        self.dtype = dtype
        self.length = 0
        self.raw_keys: torch.Tensor | None = None
        self.origins: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers at the budget, once. Left uninitialized: nothing reads a place before it is written
        (attention, compaction and saving stop at `length`), and a new conversation then costs no 35 MB memset
        (the pages are touched as the cache fills)."""
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, self.capacity, head_dim)
        self.device = key_states.device
        self.keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.raw_keys = torch.empty_like(self.keys)
        self.values = torch.empty(shape[:3] + value_states.shape[-1:], dtype=self.dtype, device=self.device)
        self.origins = torch.empty(shape[:3], dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, first_origin: int = 0, *args, **kwargs):
        """Append new keys (rotated by the model at places L, L+1, ...) that are stream tokens first_origin, ....
        Returns the cached keys and values for attention, in the dtype of the new ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, count = self.length, key_states.shape[-2]
        end = start + count
        if end > self.capacity:
            raise RuntimeError(
                f"bounded cache overflow: {start} cached + {count} new > capacity {self.capacity}; "
                "call BoundedCache.make_room before the forward pass"
            )
        self.keys[:, :, start:end] = key_states
        self.raw_keys[:, :, start:end] = self.rope.unrotate_at(key_states, start, end)
        self.values[:, :, start:end] = value_states
        self.origins[:, :, start:end] = torch.arange(first_origin, first_origin + count, device=self.device)
        self.length = end
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        if self.dtype != key_states.dtype:  # a lighter cache than the model (kv_dtype): attend in the model's dtype
            keys, values = keys.to(key_states.dtype), values.to(value_states.dtype)
        return keys, values

    def compact(self, kept: torch.Tensor, fixed: int = 0) -> None:
        """Keep places `kept` ([k] for all heads or [batch, heads, k] per head), in that order, at places 0..k-1.

        The first `fixed` entries of `kept` must be 0..fixed-1 (the protected prefix): those places do not move, so
        they are neither copied nor re-rotated and stay bit for bit as they were.
        """
        length = self.length
        moved = kept[..., fixed:]
        run = one_run(kept, fixed) if self.device.type == "cpu" else None
        if run is not None and native.compact(self, run[0], fixed, run[1]):  # kernels.c: copy, re-rotate in place
            self.length = fixed + run[1]
            return
        if moved.dim() == 1:
            gather = lambda buffer: buffer[:, :, :length].index_select(2, moved)
        else:
            gather = lambda buffer: torch.gather(
                buffer[:, :, :length],
                2,
                moved.reshape(moved.shape + (1,) * (buffer.dim() - 3)).expand(moved.shape + buffer.shape[3:]),
            )
        raw_keys, values, origins = gather(self.raw_keys), gather(self.values), gather(self.origins)
        count = fixed + raw_keys.shape[2]
        self.raw_keys[:, :, fixed:count] = raw_keys
        self.values[:, :, fixed:count] = values
        self.origins[:, :, fixed:count] = origins
        self.keys[:, :, fixed:count] = self.rope.rotate_at(raw_keys, fixed, count)
        self.length = count

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0

    def restore(self, buffers: dict[str, torch.Tensor]) -> None:
        """Fill the buffers from a saved session's (already checked) `LAYER_BUFFERS` tensors [1, heads, length, ...]."""
        self.lazy_initialization(buffers["keys"], buffers["values"])
        length = buffers["keys"].shape[2]
        for name in LAYER_BUFFERS:
            getattr(self, name)[:, :, :length] = buffers[name]
        self.length = length

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.raw_keys, self.values, self.origins))


class BoundedCache(Cache):
    """A KV cache that never holds more than `capacity` tokens, whatever the length of the stream.

    The first `protected` tokens (the attention sinks, or the whole pinned system prompt) are never evicted;
    the policy picks which of the others stay. Counters tell the front ends what happened.
    """

    def __init__(self, model: torch.nn.Module, settings: Settings, dtype: torch.dtype | None = None):
        """`dtype`: the K/V dtype, chosen by the caller (the session asks `streamchat.fastpath.kv_dtype_for`);
        None: `stored_dtype(model, settings)`."""
        config = model.config
        self.settings = settings
        self.capacity = settings.budget
        self.sinks = settings.sinks
        self.pinned = 0
        self.recall_length = 0  # places after the pinned/sink part holding recalled passages (memory on)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        device = next(model.parameters()).device
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.dtype = dtype or stored_dtype(model, settings)
        self.buffer_shape, self.buffer_device = (1, kv_heads, head_dim), device  # for load_state
        rope = RopeTable(model.model.rotary_emb, self.capacity, head_dim, device)
        layers = [BoundedLayer(self.capacity, rope, self.dtype) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.policy: EvictionPolicy = get_policy_class(settings.policy)(settings, len(layers))
        if self.policy.needs_attention_scores:
            enable_scoring(model)  # forward calls then pass the policy's observer: attention.attention_kwargs
        self.seen_tokens = 0
        self.evicted_tokens = 0
        self.message_starts: list[int] = []  # stream indices where a message's role header begins (evict_unit)

    @property
    def protected(self) -> int:
        """Places never evicted: the sinks, or the pinned prefix if that is longer, then the recalled region."""
        return max(self.sinks, self.pinned) + self.recall_length

    @property
    def sink_places(self) -> int:
        """The sinks or the pinned prefix: the places before the recalled region."""
        return max(self.sinks, self.pinned)

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def room(self) -> int:
        """Most tokens one forward pass may add: the capacity less the protected places."""
        return self.capacity - self.protected

    def pin(self, count: int) -> None:
        """Protect the first `count` tokens of the stream (e.g. the system prompt) from eviction."""
        if count >= self.capacity:
            raise ValueError(f"cannot pin {count} tokens in a cache of {self.capacity}")
        self.pinned = count

    def mark_message_start(self, stream_index: int) -> None:
        """Record that the stream token `stream_index` (not yet fed, or the next one) begins a message (its role
        header). Only `evict_unit: message` reads these: sink_window then evicts whole messages."""
        if stream_index < self.seen_tokens or (self.message_starts and stream_index <= self.message_starts[-1]):
            raise ValueError(f"message start {stream_index} is not after the tokens already fed or marked")
        self.message_starts.append(stream_index)

    def drop_message_starts(self, from_stream: int) -> None:
        """Forget marked starts at stream index `from_stream` or later (tokens never fed: a stopped prefill)."""
        self.message_starts = [start for start in self.message_starts if start < from_stream]

    def message_places(self) -> torch.Tensor:
        """Cache places [n] (ascending, within 0..length) where a marked message begins; `length` itself when the
        next token fed begins one. Read from layer 0's first KV head: sink_window keeps the same places everywhere."""
        length = self.length
        marked = torch.tensor(self.message_starts, dtype=torch.long)
        origins = self.layers[0].origins[0, 0, :length].cpu() if length else torch.zeros(0, dtype=torch.long)
        places = torch.nonzero(torch.isin(origins, marked)).flatten()
        if self.seen_tokens in self.message_starts:
            places = torch.cat((places, torch.tensor([length])))
        return places

    def window_start(self) -> int:
        """Stream index of the oldest token of the unbroken run of recent tokens the cache holds (read from layer 0's
        first KV head): every stream token from it on is cached, and a message that ended before it has left the
        window (sink_window: fully evicted; h2o/tova may keep some of its tokens as heavy hitters)."""
        length, first = self.length, min(self.protected, self.length)
        if length <= first:
            return self.seen_tokens
        origins = self.layers[0].origins[0, 0, first:length].cpu()
        breaks = torch.nonzero(origins[1:] - origins[:-1] != 1).flatten()
        return int(origins[int(breaks[-1]) + 1] if breaks.numel() else origins[0])

    def replace_recall(self, count: int, feed, keep: int = 0) -> int:
        """Make the recalled region `count` places: the current region's first `keep` places stay (the new region
        begins with the same tokens: its frame, a passage recalled again), the rest written by `feed()`, which must
        run the model forward over exactly `count - keep` tokens into this cache (positions right after the kept
        places). The window moves first, in place and one layer at a time, to where it will sit behind them (raw
        keys, values, origins; keys re-rotated there; the policy's per-place state taken and put back), and waits
        past the layers' length while the feed writes the region, so positions stay 0..length-1 in cache order.
        The window tokens are not recomputed, as StreamingLLM keeps them after any eviction. Recalled places are no stream tokens: their
        origins are -1 and `seen_tokens` does not count them. Evicts first (by the policy) if the new region
        needs room; returns the tokens so evicted. `count` 0 just removes the region. Raises ValueError if
        `count` exceeds the reserved `recall_budget`, or `keep` the current region or `count`."""
        if count > self.settings.recall_budget:
            raise ValueError(f"{count} recalled tokens exceed the {self.settings.recall_budget} reserved for them")
        if not 0 <= keep <= min(count, self.recall_length):
            raise ValueError(f"cannot keep {keep} places of a recalled region of {self.recall_length} ({count} new)")
        base = self.sink_places
        if self.length < base:
            raise ValueError("nothing to recall into: the sinks/pinned part is not cached yet")
        evicted = self.make_room(count - self.recall_length) if count > self.recall_length else 0
        seen, start = self.seen_tokens, base + self.recall_length
        window = self.length - start
        scores = self._move_window(start, base + count, window, truncate_to=base + keep)
        self.recall_length = 0
        try:
            if count > keep:
                feed()  # outside inference mode: the caller's own forward decides (its tensors may outlive this call)
            if self.length - base != count:
                raise RuntimeError(f"the recall feed wrote {self.length - base - keep} tokens, expected {count - keep}")
        except BaseException:  # the window goes back behind no recalled region: the conversation is kept
            self.seen_tokens = seen
            for layer_idx, layer in enumerate(self.layers):
                self._truncate(layer_idx, layer, base)
            self._move_window(base + count, base, window)
            self._end_move(scores, base, window)
            raise
        self.seen_tokens = seen
        with torch.inference_mode():
            for layer in self.layers:
                layer.origins[:, :, base + keep : base + count] = -1
        self._end_move(scores, base + count, window)
        self.recall_length = count
        return evicted

    @torch.inference_mode()
    def _move_window(self, start: int, at: int, count: int, truncate_to: int | None = None) -> list:
        """Move every layer's places start..start+count-1 to at.. (raw keys, values, origins; keys re-rotated at
        their new places), one layer at a time (a copy of one layer's window at most). With `truncate_to`, the
        layers are then cut back to that many places, the policy told (`on_compact`) after its per-place state of
        the window was taken (returned, for `_end_move`); the moved window waits beyond the cut."""
        taken = []
        for layer_idx, layer in enumerate(self.layers):
            if truncate_to is not None:
                taken.append(self.policy.take_places(layer_idx, start, start + count))
            if count and start != at and not native.compact(layer, start, at, count):  # kernels.c: in place
                for name in ("raw_keys", "values", "origins"):
                    buffer = getattr(layer, name)
                    buffer[:, :, at : at + count] = buffer[:, :, start : start + count].clone()
                layer.keys[:, :, at : at + count] = layer.rope.rotate_at(
                    layer.raw_keys[:, :, at : at + count], at, at + count
                )
            if truncate_to is not None:
                self._truncate(layer_idx, layer, truncate_to)
        return taken

    @torch.inference_mode()
    def _truncate(self, layer_idx: int, layer: BoundedLayer, length: int) -> None:
        """Cut one layer back to its first `length` places (the policy told, as after a compaction)."""
        layer.length = length
        self.policy.on_compact(layer_idx, torch.arange(length, device=layer.device))

    @torch.inference_mode()
    def _end_move(self, taken: list, at: int, count: int) -> None:
        """Make the moved window (at..at+count-1) cached again, with the policy's per-place state put back there."""
        for layer_idx, (layer, state) in enumerate(zip(self.layers, taken)):
            layer.length = at + count
            self.policy.put_places(layer_idx, state, at)

    def _forget_evicted_starts(self) -> None:
        """Drop marks of messages whose start is no longer cached (bounded bookkeeping for an endless chat)."""
        length, first = self.length, min(self.protected, self.length)
        oldest = int(self.layers[0].origins[0, 0, first]) if length > first else self.seen_tokens
        self.message_starts = [start for start in self.message_starts if start >= oldest]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.layers[layer_idx].update(key_states, value_states, self.seen_tokens)
        if layer_idx == len(self.layers) - 1:
            self.seen_tokens += key_states.shape[-2]
        return keys, values

    def allocate(self, kv_heads: int, head_dim: int, device: torch.device) -> None:
        """Allocate every layer's buffers now ([1, kv_heads, capacity, head_dim]), as the first forward pass would:
        for a writer that is not the transformers forward (the native decode step feeding an empty cache)."""
        empty = torch.empty(1, kv_heads, 0, head_dim, device=device)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(empty, empty)

    @torch.inference_mode()
    def make_room(self, incoming: int) -> int:
        """Evict so that `incoming` tokens fit; returns how many were evicted (0 if they already fit).

        Evicts `slack` tokens more than needed so that decode compacts once every `slack` tokens, not every token.
        Under `evict_unit: message` the policy is told the message starts (`EvictionPolicy.message_starts`) and
        may evict more than that, up to the start of a message.
        """
        if incoming > self.room:
            raise ValueError(f"{incoming} tokens cannot fit at once: at most {self.room} per forward pass")
        length = self.length
        if length + incoming <= self.capacity:
            return 0
        keep = max(self.protected, self.capacity - incoming - self.settings.slack)
        fixed = min(self.protected, length)
        by_message = self.settings.evict_unit == "message"
        self.policy.message_starts = self.message_places() if by_message else None
        kept = self.policy.keep_indices(0, length, keep, fixed) if self.policy.same_places_every_layer else None
        run = one_run(kept, fixed) if kept is not None and self.layers[0].device.type == "cpu" else None
        if run is not None and native.compact_layers(self.layers, run[0], fixed, run[1]):  # one call, all layers
            for layer_idx, layer in enumerate(self.layers):
                layer.length = fixed + run[1]
                self.policy.on_compact(layer_idx, kept)
        else:
            for layer_idx, layer in enumerate(self.layers):
                kept = self.policy.keep_indices(layer_idx, length, keep, fixed).to(layer.device)
                layer.compact(kept, fixed)
                self.policy.on_compact(layer_idx, kept)
        evicted = length - self.length
        self.evicted_tokens += evicted
        if by_message:
            self._forget_evicted_starts()
        return evicted

    def reset(self) -> None:
        super().reset()
        self.policy.reset()
        self.seen_tokens = self.evicted_tokens = 0
        self.pinned = self.recall_length = 0
        self.message_starts = []

    def fork(self) -> BoundedCache:
        """An independent copy (buffers, counters, message marks, policy state) sharing only the settings and the
        RoPE table: feed it freely (e.g. to score a candidate continuation) and this cache stays as it is."""
        twin = copy.copy(self)
        rope = self.layers[0].rope
        twin.layers = copy.deepcopy(self.layers, memo={id(rope): rope})
        twin.policy = copy.deepcopy(self.policy, memo={id(self.settings): self.settings})
        twin.message_starts = list(self.message_starts)
        return twin

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (allocated once, at the budget)."""
        return sum(layer.nbytes() for layer in self.layers)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to resume exactly (for saving a session): each layer's buffers up to its length, the
        counters, the pinned count, and the policy's own state (its tensors are prefixed `policy.`)."""
        tensors = {}
        for index, layer in enumerate(self.layers):
            for name in LAYER_BUFFERS if layer.length else ():
                tensors[f"layer{index}.{name}"] = getattr(layer, name)[:, :, : layer.length]
        policy_tensors, policy_meta = self.policy.state()
        tensors.update({f"policy.{name}": tensor for name, tensor in policy_tensors.items()})
        meta = {
            "length": self.length,
            "pinned": self.pinned,
            "seen_tokens": self.seen_tokens,
            "evicted_tokens": self.evicted_tokens,
            "recall_length": self.recall_length,
            "policy": self.policy.name,
            "policy_state": policy_meta,
        }
        if self.message_starts:  # they steer future evictions under evict_unit: message
            meta["message_starts"] = list(self.message_starts)
        return tensors, meta

    @torch.inference_mode()
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take `state()` output into this new, empty cache; raises ValueError naming what does not fit (shape,
        dtype, counts) before filling anything."""
        length, pinned, seen, evicted = (meta.get(key) for key in ("length", "pinned", "seen_tokens", "evicted_tokens"))
        if not all(type(value) is int and value >= 0 for value in (length, pinned, seen, evicted)):
            raise ValueError("cache counters are missing or not whole numbers")
        recall = meta.get("recall_length", 0)  # files from before conversation memory: none
        if type(recall) is not int or not 0 <= recall <= self.settings.recall_budget:
            raise ValueError(f"recall_length must be a count from 0 to {self.settings.recall_budget}")
        if length > self.capacity or seen - evicted + recall != length or pinned >= self.capacity:
            raise ValueError(f"cache counters do not add up (length {length}, capacity {self.capacity})")
        starts = meta.get("message_starts", [])
        if not (
            isinstance(starts, list)
            and all(type(s) is int and 0 <= s <= seen for s in starts)
            and all(a < b for a, b in zip(starts, starts[1:]))
        ):
            raise ValueError("message_starts must be ascending stream indices up to seen_tokens")
        if meta.get("policy") != self.policy.name or not isinstance(meta.get("policy_state"), dict):
            raise ValueError(f"cache policy {meta.get('policy')!r} does not match the settings' {self.policy.name!r}")
        batch, heads, head_dim = self.buffer_shape
        layers = []
        for index in range(len(self.layers)):
            buffers = {name: tensors.get(f"layer{index}.{name}") for name in LAYER_BUFFERS} if length else {}
            for name, tensor in buffers.items():
                shape = (batch, heads, length) + (() if name == "origins" else (head_dim,))
                dtype = torch.long if name == "origins" else self.dtype
                if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    found = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
                    raise ValueError(f"cache tensor layer{index}.{name}: expected {shape} {dtype}, found {found}")
            layers.append(buffers)
        expected = {f"layer{index}.{name}" for index, buffers in enumerate(layers) for name in buffers}
        unknown = sorted(name for name in tensors if name not in expected and not name.startswith("policy."))
        if unknown:
            raise ValueError(f"unexpected cache tensors: {', '.join(unknown[:5])}")
        device = self.buffer_device
        policy_tensors = {k[len("policy.") :]: v.to(device) for k, v in tensors.items() if k.startswith("policy.")}
        self.policy.load_state(policy_tensors, meta["policy_state"])
        for layer, buffers in zip(self.layers, layers):
            if buffers:
                layer.restore({name: tensor.to(device) for name, tensor in buffers.items()})
        self.pinned, self.seen_tokens, self.evicted_tokens = pinned, seen, evicted
        self.recall_length = recall
        self.message_starts = list(starts)

    def stats(self) -> dict[str, Any]:
        length = self.length
        return {
            "policy": self.policy.name,
            "cache_tokens": length,
            "cache_capacity": self.capacity,
            "sink_tokens": min(self.sink_places, length),
            "pinned_tokens": self.pinned,
            "sinks": self.sinks,
            "recalled_tokens": self.recall_length,
            "seen_total": self.seen_tokens,
            "evicted_total": self.evicted_tokens,
            "kv_bytes": self.nbytes(),
            "kv_dtype": str(self.dtype).removeprefix("torch."),
            **self.policy.stats(self),
        }
