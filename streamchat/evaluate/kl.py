"""`ppl --kl-reference REF.npz`: how far streamchat's logits are from another engine's on the same tokens.

The check GGUF users know from llama.cpp's `llama-perplexity --kl-divergence`: REF.npz holds `tokens` (int32 [P])
and `logits` (float16/32 [P, vocab]), another engine's logits at each position, teacher-forced from an empty cache.
streamchat feeds the same tokens one at a time through its chat path (the weights as a chat process holds them,
the bounded cache, the native step where it runs) and compares: KL(reference || streamchat) per position (nats;
mean and 99th percentile), the share of positions whose most likely next token agrees (where the reference's best
logits are equal as stored, in float16 say, any of them counts as its top 1: the stored logits cannot tell them
apart), and both perplexities of the tokens themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from streamchat.config import Settings


class ReferenceError(ValueError):
    """REF.npz is missing, unreadable, or does not fit the model; the message says what is wrong."""


def read_reference(path: str | Path, vocab: int) -> tuple[list[int], torch.Tensor]:
    """(tokens [P], logits fp32 [P, vocab]) from REF.npz; ReferenceError naming the problem."""
    try:
        with np.load(path) as data:
            if "tokens" not in data or "logits" not in data:
                raise ReferenceError(f"{path} needs arrays 'tokens' and 'logits' (it has {', '.join(data.files)})")
            tokens, logits = data["tokens"].astype(np.int64), data["logits"].astype(np.float32)
    except (OSError, ValueError) as error:
        if isinstance(error, ReferenceError):
            raise
        raise ReferenceError(f"cannot read {path}: {error}") from error
    if tokens.ndim != 1 or logits.ndim != 2 or logits.shape[0] != len(tokens) or len(tokens) < 2:
        raise ReferenceError(
            f"{path}: tokens [P] and logits [P, vocab] expected, got {tokens.shape} and {logits.shape}"
        )
    if logits.shape[1] != vocab:
        raise ReferenceError(f"{path}: logits over {logits.shape[1]} tokens, but the model's vocabulary has {vocab}")
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ReferenceError(f"{path}: token ids outside the model's vocabulary (0..{vocab - 1})")
    return tokens.tolist(), torch.from_numpy(logits)


def chat_path_logits(model: torch.nn.Module, settings: Settings, tokens: list[int]) -> torch.Tensor:
    """fp32 [P, vocab]: the logits after each token, fed one at a time into a fresh bounded cache as a chat
    process feeds them (native step where it runs, else the transformers forward)."""
    from streamchat.cache import BoundedCache
    from streamchat.fastpath import decoder_for_prefill, kv_dtype_for
    from streamchat.scoring import feed

    cache = BoundedCache(model, settings, kv_dtype_for(model, settings))
    rows = []
    with torch.inference_mode():
        for token in tokens:
            cache.make_room(1)
            decoder = decoder_for_prefill(model, cache, settings)
            if decoder is not None:
                rows.append(decoder.native_feed([[token]], [cache])[0].float())
            else:
                rows.append(feed(model, cache, [token], 1)[0].float())
    return torch.stack(rows)


def top1_agreement(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions [P] where our most likely token is one of the reference's (ties as stored count alike)."""
    best = reference.gather(-1, ours.argmax(-1, keepdim=True))[:, 0]
    return float((best == reference.max(-1).values).double().mean())


def compare(ours: torch.Tensor, reference: torch.Tensor, tokens: list[int]) -> dict[str, float]:
    """KL and agreement of logits [P, vocab] against the reference's (see the module's note)."""
    log_p, log_q = torch.log_softmax(reference.double(), -1), torch.log_softmax(ours.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)
    targets = torch.tensor(tokens[1:])
    nll_ours = -log_q[:-1].gather(-1, targets[:, None])[:, 0]
    nll_reference = -log_p[:-1].gather(-1, targets[:, None])[:, 0]
    return {
        "positions": len(tokens),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "top1_agreement": top1_agreement(ours, reference),
        "ppl": float(nll_ours.mean().exp()),
        "ppl_reference": float(nll_reference.mean().exp()),
    }


def run_kl(loaded, settings: Settings, path: str | Path) -> dict[str, float]:
    """The comparison for REF.npz `path` on the loaded model. Raises ReferenceError for a bad REF.npz."""
    model = loaded.model
    vocab = model.get_output_embeddings().out_features if model.get_output_embeddings() else model.config.vocab_size
    tokens, reference = read_reference(path, vocab)
    return compare(chat_path_logits(model, settings, tokens), reference, tokens)
