"""The fast decode path (issue 7): a flat, optionally compiled, optionally quantized single-token forward.

`ChatSession._forward` asks `decoder_for_step` before each single-token step; prefill and every case the fast
path cannot reproduce exactly (unsupported models, other caches) take the transformers path.
"""

from __future__ import annotations

import sys
import weakref

import torch

from streamchat import native
from streamchat.cache import BoundedCache
from streamchat.config import Settings
from streamchat.fastpath import choice
from streamchat.fastpath.choice import auto_kv_dtype, auto_weights_reason, cpu_class
from streamchat.fastpath.decoder import (
    FastDecoder,
    FastPathUnavailable,
    decoder_for,
    unsupported_reason,
)
from streamchat.packing import PACKED_ATTR
from streamchat.quant import resolve_weights

__all__ = [
    "FastDecoder",
    "FastPathUnavailable",
    "choice",
    "decode_summary",
    "decoder_for",
    "decoder_for_prefill",
    "decoder_for_step",
    "kv_dtype_for",
    "prepare_decoder",
    "unsupported_reason",
]

CPU_ONLY_WEIGHTS = ("int8", "int4", "int8_dynamic")  # torch's weight-only kernels used here are CPU kernels
_WARNED: set[str] = set()


def _note_once(message: str) -> None:
    """Fallbacks are never silent, but said once per reason, not once per token."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"streamchat: {message}", file=sys.stderr)


def kv_dtype_for(model: torch.nn.Module, settings: Settings) -> torch.dtype:
    """The dtype the bounded cache stores keys and values in (`kv_dtype`), for `BoundedCache(..., dtype=)`.

    `auto`, where the fast decode path will read the cache (a CPU, an fp32 model it supports): what
    `choice.auto_kv_dtype` picks for this CPU (fp32; bf16 on AMX CPUs, where bf16 attention is native).
    Elsewhere the model's own dtype, so the transformers path needs no conversion."""
    if settings.kv_dtype == "model":
        return model.dtype
    if settings.kv_dtype != "auto":
        return getattr(torch, settings.kv_dtype)
    fast = (
        settings.decode_path == "fast"
        and model.device.type == "cpu"
        and model.dtype == torch.float32
        and unsupported_reason(model) is None
    )
    return auto_kv_dtype(model.dtype)[0] if fast else model.dtype


def decoder_for_step(model: torch.nn.Module, cache: BoundedCache, settings: Settings) -> FastDecoder | None:
    """The fast decoder for the next single-token step under `settings`, or None for the transformers path."""
    if settings.decode_path == "transformers" or FastDecoder.refusal(cache):
        return None  # checked before building: a refused cache needs no (quantized) weights
    return prepare_decoder(model, settings)


def decoder_for_prefill(model: torch.nn.Module, cache: BoundedCache, settings: Settings) -> FastDecoder | None:
    """The fast decoder whose native step can feed a prefill chunk into `cache` (kernels.c's `sc_decode`, one row
    per token), or None for the transformers forward: the native step runs only where it runs decode (native int4
    weights, a policy that does not observe attention scores, a K/V dtype it reads)."""
    if settings.decode_path == "transformers" or not isinstance(cache, BoundedCache):
        return None
    decoder = prepare_decoder(model, settings)
    return decoder if decoder is not None and decoder.native_ready([cache], prefill=True) else None


def prepare_decoder(model: torch.nn.Module, settings: Settings) -> FastDecoder | None:
    """The model's fast decoder for `settings`, built now if it is not yet (quantizing weights takes up to a second:
    better at start-up than inside the first reply); None where the fast path is off or cannot run the model."""
    if settings.decode_path == "transformers":
        return None
    key = (settings.decode_weights, settings.decode_compile, native.active())
    chosen = _PREPARED.setdefault(model, {})
    if key not in chosen:  # asked for every row of every step: the model's device is looked up once
        chosen[key] = _prepare(model, settings)
    return chosen[key]


_PREPARED: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()


def _prepare(model: torch.nn.Module, settings: Settings) -> FastDecoder | None:
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


def decode_summary(model: torch.nn.Module, settings: Settings) -> str:
    """One line saying how single-token decode runs under `settings` on this machine and why `auto` chose so,
    e.g. "fast decode on AVX2: weights int8_dynamic (auto: ...), K/V float32 (auto: ...), 2 threads"."""
    threads = f"{torch.get_num_threads()} threads" + ("" if settings.threads else " (all cores)")
    if settings.decode_path == "transformers" or (model.device.type != "cpu" and settings.decode_weights == "auto"):
        where = "transformers decode" if settings.decode_path == "transformers" else f"fast decode on {model.device}"
        return f"{where}: K/V {str(kv_dtype_for(model, settings)).removeprefix('torch.')}, {threads}"
    reason = unsupported_reason(model)
    if reason:
        return f"transformers decode (the fast path does not support {reason}), {threads}"
    packed = getattr(model, PACKED_ATTR, None)
    blocks = packed is not None and packed.mode == "gguf"
    weights = "gguf" if blocks else resolve_weights(model.model.layers, settings.decode_weights)
    kv = str(kv_dtype_for(model, settings)).removeprefix("torch.")
    why_weights = f"auto: {auto_weights_reason(weights)}" if settings.decode_weights == "auto" else "set"
    if blocks:
        types = sorted({t for layer in packed.layers for t in layer.qkv.types() + layer.down.types()})
        weights, why_weights = "GGUF blocks", f"{', '.join(types)} read in place; head {packed.lm_head.types()[0]}"
    why_kv = f"auto: {auto_kv_dtype(model.dtype)[1]}" if settings.kv_dtype == "auto" else "set"
    kernels = ""
    if weights in ("int4", "int8", "GGUF blocks"):
        build = native.active()
        kernels = (
            f", kernels native {build} (streamchat/kernels.c)"
            if build
            else f", torch's kernels (native ones: {native.unavailable_reason()})"
        )
    return f"fast decode on {cpu_class()}: weights {weights} ({why_weights}), K/V {kv} ({why_kv}){kernels}, {threads}"
