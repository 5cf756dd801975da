"""Weight options for the fast decode path: the model's own weights, bf16 copies, int8 or int4 weight-only.

Decode reads every weight once per token, so its speed is set by weight bytes and by how well the matmul kernel
streams them. torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are fast only
with bf16 activations, so quantized linears take bf16 in and give the caller's dtype back; everything else (norms,
RoPE, attention, the residual stream, the KV cache) stays in the model's dtype.

- int8: symmetric, one scale per output row.
- int4: asymmetric, a scale and an offset per group of 32 inputs. The embedded GGUF stores its linears as Q4_1
  (4-bit, per 32-block scale and minimum), so int4 with the block's own minimum and step recovers those weights
  up to the bf16 rounding of the scales: it is the GGUF's own precision, not a further loss. The output
  projection (Q8_0 in the GGUF) stays int8 with int4.
- int8_dynamic: fbgemm's dynamically quantized int8 linear (`torch.ao` dynamic quantization, the kernel of
  `torch.ao.nn.quantized.dynamic.Linear`): int8 weights with one scale per output row, and the fp32 activation
  quantized to 8 bits per call (per tensor). It takes and gives fp32, and it is the fastest CPU kernel alone on both
  x86 classes (SmolLM2-135M, 1 thread, all linears of a token: 5.3 ms AVX-512 / 7.0 ms AVX2, against 7.4 / 16.7 ms
  for int4 and 10.6 / 11.6 ms for int8; docs/speed-cpu.md), because it is a real int8 GEMV (VNNI or
  vpmaddubsw) where the weight-only kernels dequantize to bf16, which AVX2 has no arithmetic for. But rounding
  each activation vector to 7 bits costs quality: +6.7% perplexity on the embedded model (300 tokens of
  frankenstein.txt), and in a whole 2-thread step it is no faster than int4 (docs/speed-cpu.md), so it is
  opt-in, never chosen by `auto`.
- auto (the default): int4 when every layer linear is already on a 4-bit grid (a Q4 GGUF such as the embedded
  model), else the model's own weights, so a model loaded in full precision decodes in full precision.
These kernels are CPU kernels here: on other devices the fast path uses the model's own weights.

Kernels: int4 and int8 run on streamchat's native kernels (streamchat/native.py, kernels.c: 4-bit or 8-bit
weights times 8-bit activations as integer dot products, llama.cpp's method; fp32 in and out) where they build on
this CPU (x86 with AVX2), else on torch's weight-only kernels above (bf16 in and out). `PackedLinear.kernel` says
which; each stores its weights in its own layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from streamchat import native

INT4_GROUP = 32  # Q4_1's block size
INT4_ROW_BLOCK = 64  # torch's CPU int4 packing interleaves output rows in blocks of 64 (AVX-512 layout)
LINEAR_MODES = ("model", "bf16", "int8", "int4", "int8_dynamic")
DYNAMIC_MODES = ("int8_dynamic",)  # fp32 in and out; the others take bf16


class PackedLinear:
    """y = x W^T (+ b) over weights stored as `mode`: "model" (as loaded), "bf16", "int8", "int4" or
    "int8_dynamic".

    `x` must already be in `input_dtype` (the model's dtype for "model", fp32 for "int8_dynamic", bf16 otherwise)
    and `y` comes out in it: the caller converts once where a value crosses between the residual stream and the
    matmuls, not per call. Stored tensors: `weight` (and `scales`) as the mode's kernel wants them; for
    "int8_dynamic", `weight` is fbgemm's packed-weight object (`torch.ops.quantized.linear_prepack`, bias inside;
    it pickles as its int8 weight and scales) and `scales` is None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str):
        if mode not in LINEAR_MODES:
            raise ValueError(f"weights must be one of {', '.join(LINEAR_MODES)}, got {mode!r}")
        self.mode = mode
        self.scales: torch.Tensor | None = None
        weight = weight.detach()
        self.kernel = native_kernel(mode, weight.shape, weight.device)
        self.input_dtype = {"model": weight.dtype, "int8_dynamic": torch.float32}.get(mode, torch.bfloat16)
        if self.kernel == "native":
            self.input_dtype = torch.float32
        self.bias = None if bias is None else bias.detach().to(self.input_dtype)
        self._nbytes = 0
        if self.kernel == "native":
            if mode == "int4":
                self.weight = native.pack_q4(weight)
            else:
                rows, scales = quantize_int8(weight)
                self.weight, self.scales = native.pack_q8(rows, scales.float())
        elif mode == "int8_dynamic":
            self.weight, self._nbytes = prepack_int8_dynamic(weight, self.bias)
            self.bias = None  # inside the packed weight
        elif mode == "model":
            self.weight = weight
        elif mode == "bf16":
            self.weight = weight.to(torch.bfloat16).contiguous()
        elif mode == "int8":
            self.weight, self.scales = quantize_int8(weight)
        else:
            self.weight, self.scales = quantize_int4(weight)
        self.out_features = weight.shape[0]

    @classmethod
    def from_packed(
        cls,
        mode: str,
        weight: torch.Tensor,
        scales: torch.Tensor | None,
        bias: torch.Tensor | None,
        out_features: int,
        kernel: str = "torch",
    ) -> PackedLinear:
        """A linear over tensors packed before for `kernel` ("native" or "torch"; by `state()`, e.g. read back
        from the packed-weights cache)."""
        if mode not in ("int8", "int4"):
            raise ValueError(f"only int8/int4 linears are stored packed, got {mode!r}")
        linear = cls.__new__(cls)
        linear.mode, linear.weight, linear.scales, linear.bias, linear.kernel = mode, weight, scales, bias, kernel
        linear.input_dtype = torch.float32 if kernel == "native" else torch.bfloat16
        linear.out_features, linear._nbytes = out_features, 0
        return linear

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors under `prefix` (weight, scales, bias): what `from_packed` takes back."""
        tensors = {f"{prefix}.weight": self.weight, f"{prefix}.scales": self.scales, f"{prefix}.bias": self.bias}
        return {name: tensor for name, tensor in tensors.items() if tensor is not None}

    def rows(self, start: int, stop: int) -> PackedLinear | None:
        """Output rows start..stop as a linear sharing this one's weight storage (the packed weight's rows are
        a view; int4 scales, [in / 32, out, 2], are copied: a quarter of the weight bytes). None where the packed
        layout cannot be cut there (int4: rows must start and end on torch's 64-row packing blocks)."""
        bias = None if self.bias is None else self.bias[start:stop]
        if self.kernel == "native" and self.mode == "int4":
            if start % native.ROWS or stop % native.ROWS:
                return None
            weight = self.weight[start // native.ROWS : stop // native.ROWS]
            return PackedLinear.from_packed("int4", weight, None, bias, stop - start, "native")
        if self.kernel == "native":  # int8 in groups of 8 rows (the last may be partial)
            if start % native.ROWS or (stop % native.ROWS and stop != self.out_features):
                return None
            first, end = start // native.ROWS, -(-stop // native.ROWS)
            weight, scales = self.weight[first:end], self.scales[first * native.ROWS : end * native.ROWS]
            return PackedLinear.from_packed("int8", weight, scales, bias, stop - start, "native")
        if self.mode not in ("int8", "int4") or (self.mode == "int4" and not _int4_rows_cut_at(start, stop)):
            return None
        scales = self.scales[start:stop] if self.mode == "int8" else self.scales[:, start:stop].contiguous()
        return PackedLinear.from_packed(self.mode, self.weight[start:stop], scales, bias, stop - start, self.kernel)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] in `input_dtype` -> [..., out] in `input_dtype`; any number of rows (decode: 1, prefill:
        the chunk), since torch's weight-only kernels take M >= 1."""
        if self.mode in ("model", "bf16"):
            return F.linear(x, self.weight, self.bias)
        if self.mode == "int8_dynamic":
            return torch.ops.quantized.linear_dynamic(x, self.weight, True)  # reduce_range: no int16 saturation on AVX2
        leading = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.kernel == "native":
            x = x.contiguous()
            if self.mode == "int4":
                out = native.q4_matmul(x, self.weight, self.out_features, self.bias)
            else:
                out = native.q8_matmul(x, self.weight, self.scales, self.out_features)
                out = out if self.bias is None else out + self.bias
            return out.view(*leading, out.shape[-1])
        if self.mode == "int8":
            out = torch._weight_int8pack_mm(x, self.weight, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scales)
        out = out if self.bias is None else out + self.bias
        return out.view(*leading, out.shape[-1])

    def nbytes(self) -> int:
        tensors = [t for t in (self.weight, self.scales, self.bias) if isinstance(t, torch.Tensor)]
        return self._nbytes + sum(t.numel() * t.element_size() for t in tensors)


def native_kernel(mode: str, shape: tuple[int, ...], device: torch.device) -> str:
    """Which kernel an int4/int8 linear of this shape runs on here: "native" (streamchat/native.py; needs inputs
    in 32-blocks, int4 also outputs in 8-row groups) or "torch" (also for every other mode)."""
    if mode not in ("int4", "int8") or device.type != "cpu" or shape[-1] % native.BLOCK:
        return "torch"
    if mode == "int4" and shape[0] % native.ROWS:
        return "torch"
    return "native" if native.library() is not None else "torch"


def int8_dynamic_available() -> bool:
    """Whether fbgemm's dynamic int8 linear runs here (x86 builds of torch); elsewhere int4 stays the choice."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def prepack_int8_dynamic(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[object, int]:
    """fbgemm's packed int8 weight for `torch.ops.quantized.linear_dynamic`: symmetric per-output-row int8
    (scale = max|row| / 127, as `quantize_int8`), bias (fp32) inside. Returns it and its size in bytes.
    Raises RuntimeError where fbgemm is missing (see `int8_dynamic_available`)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    previous = torch.backends.quantized.engine
    try:
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; the kernel is what we use
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.quantize_per_channel(
                weight, scales.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0, torch.qint8
            )
            torch.backends.quantized.engine = "fbgemm"
            packed = torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.float())
    finally:
        torch.backends.quantized.engine = previous
    return packed, weight.numel() + 8 * weight.shape[0] + (0 if bias is None else 4 * bias.numel())


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: W ~ q * scale, scale = max|row| / 127 (bf16, as the kernel wants)."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return quantized, scales.to(torch.bfloat16)


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group` inputs: W ~ (q - 8) * scale + zero with q in 0..15, scale =
    (max - min) / 15 and zero = min + 8 * scale (exactly Q4_1's w = q * d + min). Packed for torch's CPU kernel;
    scales and zeros as [in / group, out, 2] bf16."""
    rows, columns = weight.shape
    if columns % group:
        raise ValueError(f"int4 needs input sizes that are multiples of {group}, got {columns}")
    blocks = weight.float().reshape(rows, columns // group, group)
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8)
    quantized = torch.round((blocks - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(quantized.reshape(rows, columns), 1)
    scales_and_zeros = torch.stack([scales, low + 8 * scales], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16)


def on_int4_grid(weight: torch.Tensor, group: int = INT4_GROUP, rows: int = 64) -> bool:
    """Whether a weight is already 4-bit per group of `group` inputs (16 evenly spaced levels from the group's
    minimum, as Q4_0/Q4_1/Q4_K dequantize to), judged on its first `rows` rows: then int4 loses nothing more."""
    if weight.dim() != 2 or weight.shape[1] % group:
        return False
    blocks = weight[:rows].detach().float().reshape(-1, group)
    low = blocks.amin(dim=-1, keepdim=True)
    step = (blocks.amax(dim=-1, keepdim=True) - low) / 15
    levels = (blocks - low) / step.clamp(min=1e-12)
    return bool(((levels - levels.round()).abs() <= 1e-3).all())


def resolve_weights(layers: torch.nn.Module, weights: str) -> str:
    """The linear mode that `weights` means for these decoder layers ("auto": `auto_weights` of their linears)."""
    if weights != "auto":
        return weights
    return auto_weights(p for p in layers.parameters() if p.dim() == 2)


def auto_weights(linears: Iterable[torch.Tensor]) -> str:
    """What `decode_weights: auto` means for these layer weights (or their first rows, which `on_int4_grid` reads):
    int4 when all are 4-bit already; else the model's own (not int8_dynamic, whose activation rounding costs
    perplexity)."""
    return "int4" if all(on_int4_grid(weight) for weight in linears) else "model"


def fuse(weights: list[torch.Tensor], biases: list[torch.Tensor | None], mode: str) -> PackedLinear:
    """One linear for several that read the same input (q/k/v, gate/up): fewer, larger matmuls per token."""
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        bias = bias.detach()
    return PackedLinear(torch.cat([w.detach() for w in weights]), bias, mode)


_INT4_ROWS_CUTTABLE: bool | None = None


def _int4_rows_cut_at(start: int, stop: int) -> bool:
    """Whether rows start..stop of an int4-packed weight are exactly the packing of those rows alone. Checked once
    per process on a small probe (torch's packing layout is its own and may change), then by block alignment."""
    global _INT4_ROWS_CUTTABLE
    if _INT4_ROWS_CUTTABLE is None:
        probe = torch.randint(
            0, 16, (3 * INT4_ROW_BLOCK, 2 * INT4_GROUP), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
        )
        whole = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
        _INT4_ROWS_CUTTABLE = all(
            torch.equal(whole[a:b], torch._convert_weight_to_int4pack_for_cpu(probe[a:b].contiguous(), 1))
            for a, b in ((0, INT4_ROW_BLOCK), (INT4_ROW_BLOCK, 3 * INT4_ROW_BLOCK))
        )
    return _INT4_ROWS_CUTTABLE and start % INT4_ROW_BLOCK == 0 and stop % INT4_ROW_BLOCK == 0


class QuantLinear(torch.nn.Module):
    """An `nn.Linear` stand-in over a `PackedLinear` (int8/int4): the transformers forward (prefill, and the
    transformers decode path) runs on the same packed weights as the fast decode step, so no full-precision copy
    stays resident. Input and output are in the caller's dtype; the matmul runs on bf16 activations."""

    def __init__(self, packed: PackedLinear, in_features: int):
        super().__init__()
        self.packed, self.in_features, self.out_features = packed, in_features, packed.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x.to(self.packed.input_dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.packed.mode}"


class QuantEmbedding(torch.nn.Module):
    """An `nn.Embedding` stand-in over int8 rows with one scale per row: the same tensors as the int8 output
    projection when the embedding is tied to it (SmolLM2), so the 49152 x 576 table is held once, in 8 bits.
    The rows are row-major [count, hidden] (torch's kernels), or the native kernels' 8-row groups
    [ceil(count / 8), hidden / 32, 256] (`native.pack_q8`; then `count` must be given), gathered per call.
    forward: ids [...] -> [..., hidden] in `dtype`."""

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        dtype: torch.dtype,
        padding_idx: int | None = None,
        count: int | None = None,
    ):
        super().__init__()
        self.weight_int8, self.scales, self.dtype, self.padding_idx = weight, scales, dtype, padding_idx
        self.grouped = weight.dim() == 3
        if self.grouped and count is None:
            raise ValueError("an embedding over 8-row groups needs its row count")
        self.num_embeddings = weight.shape[0] if count is None else count
        self.embedding_dim = weight.shape[-1] if not self.grouped else weight.shape[1] * native.BLOCK

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            rows = native.q8_rows(self.weight_int8, ids).to(self.dtype)
        else:
            rows = F.embedding(ids, self.weight_int8).to(self.dtype)
        return rows * F.embedding(ids, self.scales.view(-1, 1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weights=int8"
