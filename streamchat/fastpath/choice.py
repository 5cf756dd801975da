"""What `decode_weights: auto` and `kv_dtype: auto` mean on the CPU this process runs on, and why.

Chosen by CPU capability (measured per op on both x86 classes, docs/speed-cpu.md):
- Weights: for a model whose layer weights are already 4-bit (a Q4 GGUF), int4 (the GGUF's own precision) on
  every CPU. fbgemm's dynamic int8 linear (`int8_dynamic`) is 1.4x (AVX-512) to 2.4x (AVX2) faster per linear
  alone, but no faster in a whole 2-thread step (0.89x / 0.97x of int4) and its 7-bit activations cost +6.7%
  perplexity, so it stays opt-in.
- K/V cache: fp16 where streamchat's native kernels run (x86 with AVX2: streamchat/native.py), whose attention
  converts fp16 in hardware (F16C) and reads half the bytes of fp32. Elsewhere (torch's SDPA) the model's dtype
  (fp32), except bf16 on CPUs with AMX tiles. SDPA at one query over a bf16 cache
  converts every element in software on AVX2 (and still costs 7x fp32 on Zen 4's AVX-512 BF16: 1.0 ms against
  0.13 ms a layer at 1,024 tokens, 1 thread); the AMX machine the fast path was first measured on decoded 18%
  faster with bf16.
`torch.backends.cpu.get_cpu_capability()` honours ATEN_CPU_CAPABILITY, so a process forced to AVX2
(`speed --isa avx2`) chooses as an AVX2-only CPU would.
"""

from __future__ import annotations

import torch

from streamchat import native
from streamchat.quant import int8_dynamic_available


def cpu_class() -> str:
    """The kernel class torch runs on this CPU: "AMX" (AVX-512 with AMX tiles), "AVX512", "AVX2", or torch's
    own capability name elsewhere (e.g. "DEFAULT" on ARM, "ZVECTOR")."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") and torch.cpu._is_amx_tile_supported():
        return "AMX"
    return "AVX512" if capability.startswith("AVX512") else capability


def auto_kv_dtype(model_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """The K/V dtype `auto` stores for the fast path on this CPU over a model in `model_dtype`, and why."""
    if model_dtype != torch.float32:
        return model_dtype, "the model's dtype"
    if native.active():
        return torch.float16, (
            f"native attention kernel ({native.active()}) reads fp16 K/V with F16C: half the "
            "bytes of fp32, 12-16% faster decode, perplexity within 0.2%"
        )
    if cpu_class() == "AMX":
        return torch.bfloat16, "AMX CPU: bf16 attention is native and halves the bytes read"
    if cpu_class() == "AVX2":
        return torch.float32, "AVX2 CPU: bf16 is converted in software, fp32 attention is faster"
    return torch.float32, f"{cpu_class()} CPU without AMX: fp32 attention is faster than bf16"


def auto_weights_reason(resolved: str) -> str:
    """Why `decode_weights: auto` resolved to `resolved` (see `quant.resolve_weights`)."""
    if resolved == "int4":
        return "4-bit model: the GGUF's own precision" + (
            "; int8_dynamic is no faster in a whole step and costs perplexity" if int8_dynamic_available() else ""
        )
    return "weights not 4-bit: decode in the model's own precision"
