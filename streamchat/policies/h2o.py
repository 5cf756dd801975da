"""H2O (Zhang et al., 2023, "Heavy-Hitter Oracle"): keep the attention sinks, the tokens that received the most
attention (heavy hitters) and a window of recent tokens.

Each layer and KV head ranks its own tokens: the score of a cached token is the attention probability it received
from the queries of every forward pass since it arrived (prefill chunks and decode alike), averaged over the query
heads of the KV head's GQA group. `streamchat.attention` computes those probabilities next to SDPA and calls
`observe`. Three rankings (`h2o_score`):

- `cumulative`: the raw sum, as in the paper. Old tokens were seen by more queries, so it favours them.
- `normalized`: the sum divided by the number of queries that could see the token: mean attention received.
- `decayed`: a sum in which each past query's share fades by `h2o_decay` per new token.

At an eviction the recent window stays whole: the `recent` newest stream tokens are in the cache after the next
forward pass. The heavy-hitter share gives up the `slack` places (and whatever a pinned prompt takes beyond the
sinks), so between evictions it holds from `heavy - slack` up to `heavy` tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from streamchat.policies.base import CacheView, EvictionPolicy, PolicySettings

H2O_SCORES = ("normalized", "cumulative", "decayed")


class H2OPolicy(EvictionPolicy):
    name = "h2o"
    settings_keys = ("sinks", "heavy", "recent")
    needs_attention_scores = True

    def __init__(self, settings: PolicySettings, num_layers: int):
        super().__init__(settings, num_layers)
        self.capacity = self.budget(settings) + settings.recall_budget
        self.mode = settings.h2o_score
        self.reset()

    @classmethod
    def budget(cls, settings: PolicySettings) -> int:
        return settings.sinks + settings.heavy + settings.recent

    def reset(self) -> None:
        # Per layer, [batch, kv_heads, capacity] fp32, allocated at the first forward pass:
        self.scores: list[torch.Tensor | None] = [None] * self.num_layers  # attention received (summed or decayed)
        self.queries: list[torch.Tensor | None] = [None] * self.num_layers  # queries that saw each place
        self.scored = [0] * self.num_layers  # places whose scores are up to date
        self.heavy_kept = 0  # heavy hitters chosen at the last eviction (the same count in every layer and head)

    # ----- scoring ------------------------------------------------------------------------------------------

    def observe(self, layer_idx: int, probs: torch.Tensor) -> None:
        batch, heads, count, length = probs.shape
        if self.scores[layer_idx] is None:
            shape = (batch, heads, self.capacity)
            self.scores[layer_idx] = torch.zeros(shape, dtype=torch.float32, device=probs.device)
            self.queries[layer_idx] = torch.zeros(shape, dtype=torch.float32, device=probs.device)
        scores, queries = self.scores[layer_idx], self.queries[layer_idx]
        start = length - count  # the new tokens' places
        if self.scored[layer_idx] != start:
            raise RuntimeError(
                f"h2o layer {layer_idx}: {start - self.scored[layer_idx]} cached tokens were added without "
                "attention scores; every forward pass must carry streamchat.attention.attention_kwargs(cache)"
            )
        scores[..., start:length] = 0
        if self.mode == "decayed":
            decay = self.settings.h2o_decay
            weights = decay ** torch.arange(count - 1, -1, -1, device=probs.device, dtype=torch.float32)
            scores[..., :length].mul_(decay**count).add_(torch.einsum("bhql,q->bhl", probs, weights))
        else:
            scores[..., :length].add_(probs[:, :, 0] if count == 1 else probs.sum(dim=2))
        queries[..., :start].add_(count)
        queries[..., start:length] = torch.arange(count, 0, -1, device=probs.device, dtype=torch.float32)
        self.scored[layer_idx] = length

    def ranking(self, layer_idx: int, length: int) -> torch.Tensor:
        """The score each cached place is ranked by, [batch, kv_heads, length]."""
        scores = self.scores[layer_idx]
        if scores is None or self.scored[layer_idx] != length:
            raise RuntimeError(
                f"h2o layer {layer_idx} has scores for {self.scored[layer_idx]} of {length} cached tokens: the "
                "model must run through streamchat.attention (pass attention_kwargs(cache) to each forward call)"
            )
        if self.mode == "normalized":
            return scores[..., :length] / self.queries[layer_idx][..., :length]
        return scores[..., :length]

    # ----- eviction -----------------------------------------------------------------------------------------

    def heavy_to_keep(self, keep: int, protected: int) -> int:
        """Heavy hitters kept at an eviction: `heavy` less the slack and any pinned places beyond the sinks, so
        that the recent window stays whole."""
        beyond_sinks = max(protected - self.settings.sinks, 0)
        return min(max(self.settings.heavy - self.settings.slack - beyond_sinks, 0), keep - protected)

    def keep_indices(self, layer_idx: int, length: int, keep: int, protected: int) -> torch.Tensor:
        heavy = self.heavy_to_keep(keep, protected)
        self.heavy_kept = heavy
        recent = keep - protected - heavy
        candidates = self.ranking(layer_idx, length)[..., protected : length - recent]
        top = candidates.topk(heavy, dim=-1, sorted=False).indices.sort(dim=-1).values + protected
        batch, heads = top.shape[:2]
        device = top.device
        sinks = torch.arange(protected, device=device).expand(batch, heads, protected)
        window = torch.arange(length - recent, length, device=device).expand(batch, heads, recent)
        return torch.cat((sinks, top, window), dim=-1)

    def on_compact(self, layer_idx: int, kept: torch.Tensor) -> None:
        for buffer in (self.scores[layer_idx], self.queries[layer_idx]):
            if buffer is None:
                continue
            kept_places = kept.expand(buffer.shape[:2] + kept.shape[-1:])
            buffer[..., : kept.shape[-1]] = torch.gather(buffer, 2, kept_places)
        self.scored[layer_idx] = kept.shape[-1]

    def take_places(self, layer_idx: int, start: int, end: int) -> Any:
        if self.scores[layer_idx] is None:
            return None
        return self.scores[layer_idx][..., start:end].clone(), self.queries[layer_idx][..., start:end].clone()

    def put_places(self, layer_idx: int, state: Any, at: int) -> None:
        if state is None:
            return
        scores, queries = state
        end = at + scores.shape[-1]
        self.scores[layer_idx][..., at:end] = scores
        self.queries[layer_idx][..., at:end] = queries
        self.scored[layer_idx] = end

    # ----- reporting and saving -----------------------------------------------------------------------------

    def stats(self, cache: CacheView) -> dict[str, Any]:
        """Heavy hitters and recent tokens held: the heavy hitters are the tokens the ranking chose at the last
        eviction (none before the first one, and none when slack and a pinned prompt take all `heavy` places);
        everything else beyond the sinks is the recent window, which holds `recent` tokens after an eviction and
        grows by the tokens fed until the next."""
        beyond = max(cache.length - min(cache.protected, cache.length), 0)
        heavy = min(self.heavy_kept, beyond)
        return {"heavy_tokens": heavy, "recent_tokens": beyond - heavy, "h2o_score": self.mode}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        for index, (scores, queries) in enumerate(zip(self.scores, self.queries)):
            if scores is not None:
                tensors[f"scores.{index}"], tensors[f"queries.{index}"] = scores, queries
        return tensors, {"h2o_score": self.mode, "scored": list(self.scored), "heavy_kept": self.heavy_kept}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("h2o_score") != self.mode:
            raise ValueError(f"h2o scores were saved as {meta.get('h2o_score')!r}, the settings say {self.mode!r}")
        scored = meta.get("scored")
        if not (isinstance(scored, list) and len(scored) == self.num_layers and all(type(n) is int for n in scored)):
            raise ValueError(f"h2o state needs {self.num_layers} scored counts")
        scores, queries = [None] * self.num_layers, [None] * self.num_layers
        for name, tensor in tensors.items():
            kind, _, index = name.partition(".")
            if kind not in ("scores", "queries") or not index.isdigit() or int(index) >= self.num_layers:
                raise ValueError(f"unexpected h2o state tensor {name!r}")
            if tensor.dim() != 3 or tensor.shape[-1] != self.capacity or tensor.dtype != torch.float32:
                raise ValueError(f"h2o state tensor {name}: expected [batch, kv_heads, {self.capacity}] float32")
            (scores if kind == "scores" else queries)[int(index)] = tensor.clone()
        if any((s is None) != (q is None) or (s is None and n) for s, q, n in zip(scores, queries, scored)):
            raise ValueError("h2o state lacks the scores of some layers")
        heavy_kept = meta.get("heavy_kept", 0)  # files saved before it was recorded: none
        if type(heavy_kept) is not int or not 0 <= heavy_kept <= self.settings.heavy:
            raise ValueError(f"h2o state: heavy_kept must be a count from 0 to {self.settings.heavy}")
        self.scores, self.queries, self.scored, self.heavy_kept = scores, queries, list(scored), heavy_kept
