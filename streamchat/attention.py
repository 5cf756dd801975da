"""Attention that also reports what each new query attended to, for policies that score cached tokens (H2O).

The output is transformers' own SDPA, unchanged. When a forward call carries an observer (the `OBSERVER_KWARG`
keyword, which transformers passes down to the attention function of every layer), the attention probabilities
of the new queries only are computed once more: q·Kᵀ over the cached keys, [new tokens, cache length] per head,
which is small in decode. They are averaged over the query heads of each GQA group and handed to the observer as
[batch, kv_heads, new tokens, cache length], layer by layer. Nothing attends over the whole sequence eagerly and
no `output_attentions` is involved.

A model is switched to this function once, by `enable_scoring` (the cache does it when its policy needs scores).
A call without an observer goes straight to SDPA, so a session whose policy needs no scores, sharing the model
with one that does (the web UI), computes nothing more and never feeds another session's policy: the observer
travels with each forward call, not with the model. A model no scoring policy ever touched stays on plain SDPA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SCORING_ATTENTION = "streamchat_scoring"
OBSERVER_KWARG = "attention_observer"

# (layer index, probabilities [batch, kv_heads, new tokens, cache length]) -> None
Observer = Callable[[int, torch.Tensor], None]


def grouped_probabilities(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax(q·Kᵀ) of the new queries [batch, heads, q, dim] over the keys [batch, kv_heads, length, dim]
    (new ones last), per query head and grouped by the KV head it reads: [batch, kv_heads, group, q, length], fp32.

    Without a mask, query i (0-based among the q new ones) sees keys 0..length-q+i, the causal rule of a cache
    that appends; a mask from the model (bool: True attends; float: added) takes precedence.
    """
    batch, heads, count, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = (query.float() * scaling).reshape(batch, kv_heads, group * count, dim)
    logits = torch.matmul(grouped, key.float().transpose(-1, -2)).view(batch, kv_heads, group, count, length)
    if attention_mask is not None:
        mask = attention_mask[:, :, None, -count:, -length:]  # [batch, 1, 1, q, length]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    elif count > 1:
        places = torch.arange(length, device=key.device)
        last_visible = torch.arange(length - count, length, device=key.device)[:, None]
        logits = logits.masked_fill(places > last_visible, float("-inf"))
    return torch.softmax(logits, dim=-1)


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """What a scoring policy observes: `grouped_probabilities` averaged over each GQA group,
    [batch, kv_heads, q, length]."""
    return grouped_probabilities(query, key, attention_mask, scaling).mean(dim=2)


def scoring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA's output; with an observer in the call, also the new queries' probabilities (see module docstring)."""
    observer: Observer | None = kwargs.pop(OBSERVER_KWARG, None)
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if observer is not None:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        observer(module.layer_idx, attention_probabilities(query, key, attention_mask, scaling))
    return output


def register() -> None:
    """Make `SCORING_ATTENTION` a valid attention implementation (with SDPA's masks); idempotent."""
    AttentionInterface.register(SCORING_ATTENTION, scoring_attention_forward)
    AttentionMaskInterface.register(SCORING_ATTENTION, sdpa_mask)


def enable_scoring(model: PreTrainedModel) -> None:
    """Route the model's attention through `scoring_attention_forward` (a no-op if it already is).

    Only SDPA models are switched: anything else (eager, flash) would change the model's numerics.
    """
    current = model.config._attn_implementation
    if current == SCORING_ATTENTION:
        return
    if current != "sdpa":
        raise ValueError(f"attention scores need a model on SDPA attention, this one uses {current!r}")
    register()
    model.set_attn_implementation(SCORING_ATTENTION)


def attention_kwargs(cache: Any) -> dict[str, Observer]:
    """The keyword arguments a forward call over `cache` needs: its policy's observer, or nothing."""
    policy = getattr(cache, "policy", None)
    if policy is None or not getattr(policy, "needs_attention_scores", False):
        return {}
    return {OBSERVER_KWARG: policy.observe}
