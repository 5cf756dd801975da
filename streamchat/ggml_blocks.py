"""ggml's block types, as a GGUF file stores them: which ones the native kernels take, their sizes, and tensors
over their bytes.

A GGUF tensor of ggml type T and shape [N, K] (rows, inputs; ggml lists it as ne = [K, N]) is N rows, each K / B
blocks of S bytes (B weights per block: 32 for Q4_0..Q8_0, 256 for the K-quants, 1 for F32/F16/BF16). The layouts
are ggml-common.h's; kernels_ggml.c reads them in place (dequantization and matmuls), so a weight keeps its file's
bytes, in the file's memory map, for the life of the process. Types outside `NATIVE` (IQ*, Q2_K, Q3_K, TQ*,
MXFP4...) are converted by `convert_tensor` to the nearest native one, tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from streamchat import native

T = GGMLQuantizationType
NATIVE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
# where a type the kernels do not take goes (at about its precision): lower bits -> Q4_K, else Q6_K or Q8_0
CONVERT_TO = {
    T.Q2_K: T.Q4_K,
    T.Q3_K: T.Q4_K,
    T.IQ1_S: T.Q4_K,
    T.IQ1_M: T.Q4_K,
    T.IQ2_XXS: T.Q4_K,
    T.IQ2_XS: T.Q4_K,
    T.IQ2_S: T.Q4_K,
    T.IQ3_XXS: T.Q4_K,
    T.IQ3_S: T.Q4_K,
    T.IQ4_NL: T.Q4_K,
    T.IQ4_XS: T.Q4_K,
    T.Q8_1: T.Q8_0,
    T.Q8_K: T.Q8_0,
    T.F64: T.F32,
}


class BlockTypeError(ValueError):
    """A tensor's type or size does not fit the kernels (the message names the tensor and its type)."""


def block_size(kind: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of ggml type `kind`; KeyError for a type gguf does not know."""
    return GGML_QUANT_SIZES[T(kind)]


def row_bytes(kind: int, columns: int) -> int:
    """Bytes of one row of `columns` weights; BlockTypeError when the row is not whole blocks."""
    weights, size = block_size(kind)
    if columns % weights:
        raise BlockTypeError(f"{T(kind).name} rows hold whole blocks of {weights}; {columns} inputs is not")
    return columns // weights * size


@dataclass
class BlockTensor:
    """A GGUF tensor's bytes as the kernels read them: `data` uint8 [rows, row_bytes] (a view of the file's memory
    map, or of a converted copy), ggml type `kind`, logical shape [rows, columns]."""

    name: str
    kind: int
    rows: int
    columns: int
    data: torch.Tensor

    @property
    def type_name(self) -> str:
        if self.kind in LAYOUTS:
            return f"{LAYOUTS[self.kind][0]} (8-row layout)"
        return T(self.kind).name

    def nbytes(self) -> int:
        return self.data.numel()

    def row_slice(self, start: int, stop: int) -> BlockTensor:
        """Rows start..stop, sharing the bytes (rows are independent in every ggml type; a tensor re-laid 8 rows
        at a time is cut at multiples of 8, ValueError otherwise)."""
        if self.kind in LAYOUTS:
            if start % 8 or stop % 8:
                raise ValueError(f"{self.name}: an 8-row layout is cut at multiples of 8, not {start}..{stop}")
            return BlockTensor(self.name, self.kind, stop - start, self.columns, self.data[start // 8 : stop // 8])
        return BlockTensor(self.name, self.kind, stop - start, self.columns, self.data[start:stop])

    def gather_rows(self, order: torch.Tensor) -> BlockTensor:
        """The rows in `order` (a permutation), copied: lossless, since each row is its own blocks."""
        return BlockTensor(self.name, self.kind, len(order), self.columns, self.data[order].contiguous())

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """fp32 [rows, columns] (or of the rows `rows` picks: ids, or a slice): the native kernel where it takes
        the type, else gguf-py's dequantization."""
        data = self.data if rows is None else self.data[rows]
        count = data.shape[0]
        if self.kind in NATIVE and native.library() is not None:
            flat = data.contiguous()
            return native.ggml_dequantize(self.kind, flat, count * self.columns).view(count, self.columns)
        array = gguf_dequantize(data.numpy(), T(self.kind))
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).view(count, self.columns)


_NUMPY_REPACK = False  # tests: the numpy re-layout (the reference) instead of the kernel's
Q4_KX8 = 112  # kernels_ggml.c's block_q4_Kx8: Q4_K re-laid 8 rows at a time (lossless)
Q4_KX8_BYTES = 1184  # per 8 rows x 256 inputs
Q6_KX8 = 114  # kernels_ggml.c's block_q6_Kx8: Q6_K re-laid 8 rows at a time (lossless, the same bytes)
Q6_KX8_BYTES = 1680


def _row_slices(rows: int, step: int) -> Iterator[slice]:
    """Rows 0..rows as slices of at most `step` rows (work done a row block at a time bounds its temporaries)."""
    return (slice(start, min(rows, start + step)) for start in range(0, rows, step))


def _repack_q4_rows(data: np.ndarray, nb: int) -> np.ndarray:
    n = data.shape[0]
    groups = n // 8
    raw = data.reshape(n, nb, 144)
    d, dmin, q, qs = raw[..., 0:2], raw[..., 2:4], raw[..., 4:16], raw[..., 16:144]
    scales = np.empty((n, nb, 8), np.uint8)
    mins = np.empty((n, nb, 8), np.uint8)
    for j in range(4):  # ggml's get_scale_min_k4
        scales[..., j], mins[..., j] = q[..., j] & 63, q[..., j + 4] & 63
        scales[..., j + 4] = (q[..., j + 8] & 0xF) | ((q[..., j] >> 6) << 4)
        mins[..., j + 4] = (q[..., j + 8] >> 4) | ((q[..., j + 4] >> 6) << 4)
    elements = np.empty((n, nb, 8, 32), np.uint8)  # [row, block, sub-block, element]
    for j in range(4):
        elements[:, :, 2 * j] = qs[..., 32 * j : 32 * j + 32] & 0xF
        elements[:, :, 2 * j + 1] = qs[..., 32 * j : 32 * j + 32] >> 4
    # [G, r, b, s, g, i] -> [G, b, s, g, r, i]: per sub-block, the 8 rows' 4-element groups side by side
    e = elements.reshape(groups, 8, nb, 8, 8, 4).transpose(0, 2, 3, 4, 1, 5).reshape(groups, nb, 8, 8, 32)
    nibbles = e[:, :, :, :4] | (e[:, :, :, 4:] << 4)  # [G, b, s, 4, 32]

    def by_group(a: np.ndarray, width: int) -> np.ndarray:  # [n, nb, width] -> [G, nb, 8 * width], rows inner
        return a.reshape(groups, 8, nb, width).transpose(0, 2, 1, 3).reshape(groups, nb, 8 * width)

    def by_sub(a: np.ndarray) -> np.ndarray:  # [n, nb, 8 sub] -> [G, nb, 64]: [sub][row]
        return a.reshape(groups, 8, nb, 8).transpose(0, 2, 3, 1).reshape(groups, nb, 64)

    parts = [by_group(d, 2), by_group(dmin, 2), by_sub(scales), by_sub(mins), nibbles.reshape(groups, nb, 1024)]
    return np.concatenate(parts, axis=-1).reshape(groups, nb * Q4_KX8_BYTES)


def _repack_q6_rows(data: np.ndarray, nb: int) -> np.ndarray:
    n = data.shape[0]
    groups = n // 8
    raw = data.reshape(n, nb, 210)
    ql, qh, scales, d = raw[..., :128], raw[..., 128:192], raw[..., 192:208], raw[..., 208:210]
    values = np.empty((n, nb, 256), np.uint8)  # 0..63, ggml's dequantize_row_q6_K order
    for half in range(2):
        low, high, base = ql[..., 64 * half : 64 * half + 64], qh[..., 32 * half : 32 * half + 32], 128 * half
        values[..., base : base + 32] = (low[..., :32] & 0xF) | ((high & 3) << 4)
        values[..., base + 32 : base + 64] = (low[..., 32:] & 0xF) | (((high >> 2) & 3) << 4)
        values[..., base + 64 : base + 96] = (low[..., :32] >> 4) | (((high >> 4) & 3) << 4)
        values[..., base + 96 : base + 128] = (low[..., 32:] >> 4) | (((high >> 6) & 3) << 4)
    # [G, r, b, s, g, i] -> [G, b, s, g, r, i]
    e = values.reshape(groups, 8, nb, 8, 8, 4).transpose(0, 2, 3, 4, 1, 5).reshape(groups, nb, 8, 8, 32)
    first, last = e[:, :, :, :4], e[:, :, :, 4:]  # [G, b, s, 4 chunks, 32]
    low4 = (first & 0xF) | ((last & 0xF) << 4)
    top = (first >> 4) | ((last >> 4) << 2)  # a chunk's 4 top bits
    top2 = top[:, :, :, 0::2] | (top[:, :, :, 1::2] << 4)  # [G, b, s, 2, 32]
    by_part = scales.reshape(groups, 8, nb, 16).transpose(0, 2, 3, 1).reshape(groups, nb, 128)
    dd = d.reshape(groups, 8, nb, 2).transpose(0, 2, 1, 3).reshape(groups, nb, 16)
    parts = [dd, by_part, low4.reshape(groups, nb, 1024), top2.reshape(groups, nb, 512)]
    return np.concatenate(parts, axis=-1).reshape(groups, nb * Q6_KX8_BYTES)


@dataclass(frozen=True)
class Layout:
    """One of streamchat's 8-row layouts of a ggml type: its type number (kernels_ggml.c's), the bytes of 8 rows x
    256 inputs, and the numpy re-layout of whole row groups (uint8 [rows, row bytes], blocks a row -> uint8
    [rows / 8, blocks x bytes]: the reference the kernel's is tested against)."""

    kind: int
    block_bytes: int
    reference: Callable[[np.ndarray, int], np.ndarray]


# Q4_K: every bit of d, dmin, the 6-bit scales and minimums and the nibbles kept, 2.8% more bytes (the scales
# unpacked); Q6_K: every bit kept, the same size
REPACKED = {
    T.Q4_K: Layout(Q4_KX8, Q4_KX8_BYTES, _repack_q4_rows),
    T.Q6_K: Layout(Q6_KX8, Q6_KX8_BYTES, _repack_q6_rows),
}
LAYOUTS = {layout.kind: (source.name, layout.block_bytes) for source, layout in REPACKED.items()}  # by layout type


def repack(tensor: BlockTensor) -> BlockTensor:
    """A Q4_K or Q6_K tensor (rows a multiple of 8) re-laid for its 8-row kernel (`REPACKED`'s layout: the same
    values, every bit kept), by the native kernel, or row group by row group in numpy; the copy is what the process
    holds (the file's pages are then not read again). ValueError for another type or row count."""
    layout = REPACKED.get(tensor.kind)
    if layout is None or tensor.rows % 8:
        raise ValueError(
            f"{tensor.name}: repack takes {' or '.join(t.name for t in REPACKED)} with rows a multiple of 8, got "
            f"{tensor.type_name} x{tensor.rows}"
        )
    rows, nb = tensor.rows, tensor.columns // 256
    out = torch.empty(rows // 8, nb * layout.block_bytes, dtype=torch.uint8)
    if native.library() is not None and not _NUMPY_REPACK:
        native.ggml_repack(tensor.kind, tensor.data.contiguous(), rows, nb, out)
    else:
        for part in _row_slices(rows, 512):
            out[part.start // 8 : part.stop // 8] = torch.from_numpy(layout.reference(tensor.data[part].numpy(), nb))
    return BlockTensor(tensor.name, layout.kind, tensor.rows, tensor.columns, out)


def convert_tensor(tensor: BlockTensor) -> BlockTensor:
    """A tensor of a type the kernels do not take, re-encoded as `CONVERT_TO`'s type one row block at a time (never
    the whole tensor in fp32: at most 64 rows at once). BlockTypeError where there is no conversion."""
    from gguf.quants import quantize as gguf_quantize

    target = CONVERT_TO.get(T(tensor.kind))
    if target is None:
        raise BlockTypeError(
            f"tensor {tensor.name!r} has ggml type {tensor.type_name}, which streamchat cannot run or convert "
            f"(native: {', '.join(t.name for t in NATIVE)})"
        )
    quantizable = target if target in (T.F32, T.Q8_0) else T.Q8_0  # what gguf-py can encode
    out = torch.empty(tensor.rows, row_bytes(quantizable, tensor.columns), dtype=torch.uint8)
    for part in _row_slices(tensor.rows, 64):
        encoded = gguf_quantize(tensor.dequantize(part).numpy().astype(np.float32), quantizable)
        out[part] = torch.from_numpy(np.ascontiguousarray(encoded).view(np.uint8).reshape(part.stop - part.start, -1))
    return BlockTensor(tensor.name, int(quantizable), tensor.rows, tensor.columns, out)


def matmul(x: torch.Tensor, parts: list[BlockTensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32 times the parts' rows side by side, transposed: [..., sum of rows] fp32 (+ bias).
    The native kernels for every type in `NATIVE`; RuntimeError without them; ValueError where K is not the parts'
    width (the kernels would read other rows' bytes)."""
    if any(part.columns != x.shape[-1] for part in parts):
        raise ValueError(f"input of width {x.shape[-1]} for weights of width {parts[0].columns}")
    leading = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    total = sum(part.rows for part in parts)
    out = torch.empty(x.shape[0], total)
    column = 0
    for part in parts:
        native.ggml_matmul(part.kind, x, part.data, part.rows, out, column)
        column += part.rows
    if bias is not None:
        out += bias
    return out.view(*leading, total)


class BlockLinear:
    """y = x W^T (+ b) where W is row-parts side by side (q, k, v; gate, up), each a GGUF tensor of its own type,
    read in place by the native kernels. The interface of `quant.PackedLinear` that the engine uses (`mode`
    "gguf", `kernel`, `input_dtype`, `out_features`, `bias`, `rows`, `nbytes`, called on x [..., in] fp32)."""

    mode = "gguf"
    kernel = "native"
    input_dtype = torch.float32
    scales = None

    def __init__(self, parts: list[BlockTensor], bias: torch.Tensor | None = None):
        self.parts, self.bias = parts, bias
        self.out_features = sum(part.rows for part in parts)
        self.in_features = parts[0].columns

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.parts, self.bias)

    def rows(self, start: int, stop: int) -> BlockLinear:
        """Output rows start..stop (within one part, or whole parts) sharing the bytes."""
        parts, offset = [], 0
        for part in self.parts:
            low, high = max(start, offset), min(stop, offset + part.rows)
            if low < high:
                parts.append(part.row_slice(low - offset, high - offset))
            offset += part.rows
        bias = None if self.bias is None else self.bias[start:stop]
        return BlockLinear(parts, bias)

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self.parts)

    def types(self) -> list[str]:
        return [part.type_name for part in self.parts]


class BlockEmbedding(torch.nn.Module):
    """An `nn.Embedding` stand-in over a GGUF token_embd tensor [vocab, hidden] of any native type: rows are
    dequantized per lookup (ids [...] -> [..., hidden] fp32), the table stays in its file's blocks."""

    def __init__(self, table: BlockTensor):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.rows, table.columns
        self.padding_idx = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if native.library() is None:
            rows = self.table.dequantize(flat.cpu())
        else:
            rows = torch.empty(len(flat), self.embedding_dim)
            lib, data, kind, width = native.library(), self.table.data, self.table.kind, self.embedding_dim
            for n, token in enumerate(flat.tolist()):
                if lib.sc_ggml_dequantize(kind, data[token].data_ptr(), width, rows[n].data_ptr()):
                    raise RuntimeError(f"cannot dequantize embedding rows of type {self.table.type_name}")
        return rows.view(*ids.shape, self.embedding_dim).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weights={self.table.type_name} (GGUF blocks)"
