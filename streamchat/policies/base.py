"""The interface between the bounded cache (which owns the tensors) and a policy (which picks what stays)."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class CacheView(Protocol):
    """What a policy reads of its cache for `stats` (`streamchat.cache.BoundedCache` has it): the policies never
    import the cache module, which imports them."""

    length: int  # tokens cached
    protected: int  # leading places no policy evicts (pinned prompt and sinks)


class PolicySettings(Protocol):
    """The settings a policy reads. `streamchat.config.Settings` has them; the config module imports the policies to
    validate names, so the policies never import it."""

    sinks: int
    window: int
    heavy: int
    recent: int
    h2o_score: str
    h2o_decay: float
    slack: int
    evict_unit: str
    recall_budget: int  # cache places reserved for recalled passages beyond the policy's own budget


class EvictionPolicy:
    """Chooses, per layer and KV head, which cached places survive an eviction.

    The cache calls `keep_indices` between forward passes, compacts its tensors to the chosen places (in the
    order given, which becomes the new cache order and so the new RoPE positions) and then calls `on_compact`
    so the policy can gather any per-token state of its own.

    A policy that ranks tokens by the attention they receive sets `needs_attention_scores`: its cache then runs the
    model's attention through `streamchat.attention` and every forward pass calls `observe` once per layer.
    """

    name: str = ""
    needs_attention_scores: bool = False
    # keep_indices returns the same places for every layer (the cache may then compact all layers in one call)
    same_places_every_layer: bool = False
    settings_keys: tuple[str, ...] = ("sinks",)  # the size settings this policy reads (front ends show these)
    # Places [n] (ascending, within 0..length; `length` when the next token begins a message) where a message's
    # role header begins; set by the cache before `keep_indices` under `evict_unit: message`, else None.
    message_starts: torch.Tensor | None = None

    def __init__(self, settings: PolicySettings, num_layers: int):
        self.settings = settings
        self.num_layers = num_layers

    @classmethod
    def budget(cls, settings: PolicySettings) -> int:
        """Tokens the cache may hold under this policy."""
        raise NotImplementedError

    def keep_indices(self, layer_idx: int, length: int, keep: int, protected: int) -> torch.Tensor:
        """Ascending places to keep, `keep` of them, always including places 0..protected-1.

        Returns shape [keep] (same for every head) or [batch, kv_heads, keep] (per head). A policy may keep fewer
        (sink_window under `evict_unit: message` does, to evict up to a message start), never more.
        """
        raise NotImplementedError

    def on_compact(self, layer_idx: int, kept: torch.Tensor) -> None:
        """The layer kept places `kept` (as returned by `keep_indices`); drop state of the others."""

    def take_places(self, layer_idx: int, start: int, end: int) -> Any:
        """Per-token state of places start..end-1 (the window, set aside while the cache's recalled region is
        rewritten: `BoundedCache.replace_recall`); the cache then truncates the layer to `start` (`on_compact`)."""
        return None

    def put_places(self, layer_idx: int, state: Any, at: int) -> None:
        """Put back what `take_places` gave, now at places at, at+1, ... (after the new recalled region)."""

    def observe(self, layer_idx: int, probs: torch.Tensor) -> None:
        """Attention probabilities of a forward pass's new queries, [batch, kv_heads, new tokens, cache length]
        (GQA groups averaged; the new tokens are the last places). Called only if `needs_attention_scores`."""

    def reset(self) -> None:
        """Forget all per-token state (a new conversation)."""

    def stats(self, cache: CacheView) -> dict[str, Any]:
        """Figures for the front ends, such as how many heavy hitters `cache` holds."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Per-token state to save with a session, so a resumed one evicts exactly as this one would: tensors
        (e.g. accumulated scores) and a JSON-able dict. A stateless policy has none."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take back what `state()` gave (on a fresh policy with the same settings, tensors already on the cache's
        device); raise ValueError naming what does not fit, before changing anything."""
        if tensors or meta:
            found = ", ".join(sorted(tensors) + sorted(meta))
            raise ValueError(f"policy {self.name} keeps no state, but the saved session has some: {found}")
