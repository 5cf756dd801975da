"""Likelihood of a given continuation under a bounded cache: the scoring step of multiple-choice evaluation
(as lm-evaluation-harness scores small models: compare log P(answer | context) across candidate answers).

Both functions feed tokens into the cache they are given, evicting through `make_room` exactly as a chat does;
to score without disturbing a conversation, pass `BoundedCache.fork()` (`ChatSession.score_reply` does).
"""

from __future__ import annotations

import torch

from streamchat.attention import attention_kwargs


@torch.inference_mode()
def feed(model: torch.nn.Module, cache, ids: list[int], chunk: int, last_only: bool = False) -> torch.Tensor:
    """Feed `ids` into `cache` in forward passes of at most `chunk` tokens (and the cache's room), evicting first.

    Returns the logits of every fed token, fp32 [len(ids), vocab]: row i predicts the token after ids[i]; with
    `last_only`, those of the last token only, [1, vocab].
    Raises ValueError for no ids or chunk < 1.
    """
    if not ids or chunk < 1:
        raise ValueError("feed needs at least one token and chunk >= 1")
    device = next(model.parameters()).device
    step = min(chunk, cache.room)
    logits = []
    for start in range(0, len(ids), step):
        piece = ids[start : start + step]
        cache.make_room(len(piece))
        out = model(
            input_ids=torch.tensor([piece], device=device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
            **attention_kwargs(cache),
        )
        logits.append(out.logits[0].float())
    return logits[-1][-1:] if last_only else torch.cat(logits)


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module, cache, next_logits: torch.Tensor, ids: list[int], chunk: int = 256
) -> torch.Tensor:
    """Natural-log probability of each token of `ids` [n] following what `cache` holds.

    `next_logits` [vocab] or [1, vocab]: the logits the last fed token gave (they predict ids[0]). ids[:-1] are fed
    into `cache` (changing it: pass a fork). Returns fp64 [n]; its sum is log P(ids | context).
    """
    if not ids:
        raise ValueError("an empty continuation has no likelihood")
    logits = next_logits.reshape(1, -1).float()
    if len(ids) > 1:
        logits = torch.cat((logits, feed(model, cache, ids[:-1], chunk)))
    targets = torch.tensor(ids, device=logits.device)
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None])[:, 0]
