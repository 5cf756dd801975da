"""The fast decode path (issue 7): a flat, optionally compiled, optionally quantized single-token forward.

`ChatSession._forward` asks `decoder_for_step` before each single-token step; prefill and every case the fast
path cannot reproduce exactly (unsupported models, other caches) take the transformers path.
"""

from __future__ import annotations

import sys

import torch

from streamchat.cache import BoundedCache
from streamchat.config import Settings
from streamchat.fastpath.decoder import (
    FastDecoder,
    FastPathUnavailable,
    decoder_for,
    unsupported_reason,
)

__all__ = [
    "FastDecoder", "FastPathUnavailable", "decoder_for", "decoder_for_step", "prepare_decoder", "unsupported_reason",
]

CPU_ONLY_WEIGHTS = ("int8", "int4")  # torch's weight-only kernels used here are CPU kernels
_WARNED: set[str] = set()


def _note_once(message: str) -> None:
    """Fallbacks are never silent, but said once per reason, not once per token."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"streamchat: {message}", file=sys.stderr)


def decoder_for_step(model: torch.nn.Module, cache: BoundedCache, settings: Settings) -> FastDecoder | None:
    """The fast decoder for the next single-token step under `settings`, or None for the transformers path."""
    if settings.decode_path == "transformers" or FastDecoder.refusal(cache):
        return None  # checked before building: a refused cache needs no (quantized) weights
    return prepare_decoder(model, settings)


def prepare_decoder(model: torch.nn.Module, settings: Settings) -> FastDecoder | None:
    """The model's fast decoder for `settings`, built now if it is not yet (quantizing weights takes up to a second:
    better at start-up than inside the first reply); None where the fast path is off or cannot run the model."""
    if settings.decode_path == "transformers":
        return None
    weights = settings.decode_weights
    if weights == "auto" and model.device.type != "cpu":
        weights = "model"
    if weights in CPU_ONLY_WEIGHTS and model.device.type != "cpu":
        _note_once(f"{weights} decode weights are CPU-only; decoding on {model.device} with the model's own weights")
        weights = "model"
    try:
        return decoder_for(model, weights, settings.decode_compile)
    except FastPathUnavailable as error:
        _note_once(f"{error}; decoding with transformers")
        return None
