"""ggml block types on the native kernels: dequantization equals gguf-py's, matmuls equal the fp32 product."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from streamchat import ggml_blocks, native

pytestmark = pytest.mark.skipif(native.library() is None, reason="native kernels unavailable on this CPU")

# byte offsets of each block's fp16 scale fields (ggml-common.h)
SCALE_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
QUANTIZED = tuple(SCALE_FIELDS)
FLOATS = (T.F32, T.F16, T.BF16)


def random_tensor(kind: T, rows: int, columns: int, seed: int = 0) -> ggml_blocks.BlockTensor:
    """Random blocks of `kind`: random bytes, with every fp16 scale set to a finite value of a plausible size."""
    generator = np.random.default_rng(seed)
    if kind in FLOATS:
        values = generator.standard_normal((rows, columns)).astype(np.float32)
        if kind == T.F16:
            data = values.astype(np.float16).view(np.uint8)
        elif kind == T.BF16:
            data = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            data = values.view(np.uint8)
    else:
        weights, size = ggml_blocks.block_size(kind)
        blocks = generator.integers(0, 256, (rows * columns // weights, size), dtype=np.uint8)
        for offset in SCALE_FIELDS[kind]:
            scales = generator.uniform(0.001, 0.05, len(blocks)) * generator.choice([-1, 1], len(blocks))
            blocks[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(-1, 2)
        data = blocks
    data = torch.from_numpy(np.ascontiguousarray(data).reshape(rows, -1))
    return ggml_blocks.BlockTensor("test", int(kind), rows, columns, data)


@pytest.mark.parametrize("kind", QUANTIZED + FLOATS, ids=lambda k: k.name)
def test_dequantize_equals_gguf(kind):
    tensor = random_tensor(kind, 8, 512)
    ours = tensor.dequantize()
    theirs = torch.from_numpy(gguf_dequantize(tensor.data.numpy(), kind).astype(np.float32)).view(8, 512)
    assert torch.isfinite(theirs).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], ours[1])  # random rows differ: a kernel reading one row twice would fail


@pytest.mark.parametrize("rows_in", [1, 3, 9])
@pytest.mark.parametrize("kind", QUANTIZED + FLOATS, ids=lambda k: k.name)
def test_matmul_equals_fp32_product(kind, rows_in):
    tensor = random_tensor(kind, 40, 512, seed=1)
    x = torch.randn(rows_in, 512, generator=torch.Generator().manual_seed(2))
    exact = x @ tensor.dequantize().T
    ours = ggml_blocks.matmul(x, [tensor])
    # the activations are quantized to 8 bits per block, as llama.cpp does: error ~ 1% of the product's scale
    scale = exact.abs().mean()
    tolerance = 1e-5 if kind in FLOATS else 0.03
    assert (ours - exact).abs().max() <= tolerance * scale * 10
    assert (ours - exact).abs().mean() <= tolerance * scale


def test_parts_side_by_side_and_bias():
    q, k = random_tensor(T.Q4_K, 16, 256, seed=3), random_tensor(T.Q6_K, 8, 256, seed=4)
    x = torch.randn(2, 256)
    bias = torch.randn(24)
    together = ggml_blocks.matmul(x, [q, k], bias)
    torch.testing.assert_close(together[:, :16], ggml_blocks.matmul(x, [q]) + bias[:16])
    torch.testing.assert_close(together[:, 16:], ggml_blocks.matmul(x, [k]) + bias[16:])


def test_refused_sizes_raise():
    tensor = random_tensor(T.Q4_K, 4, 256)
    with pytest.raises(ValueError, match="width 512 for weights of width 256"):
        ggml_blocks.matmul(torch.randn(1, 512), [tensor])  # whole blocks, but not this tensor's width
    with pytest.raises(RuntimeError):
        native.ggml_matmul(int(T.Q4_K), torch.randn(1, 128), tensor.data, 4)  # K not whole blocks
    with pytest.raises(ggml_blocks.BlockTypeError, match="whole blocks"):
        ggml_blocks.row_bytes(T.Q4_K, 300)


def test_unsupported_type_is_converted_or_named():
    tensor = random_tensor(T.Q8_0, 4, 256)
    tensor.kind = int(T.Q8_1)  # not native; no gguf-py dequantization either -> a clear error names it
    tensor.name = "blk.0.attn_q.weight"
    with pytest.raises(Exception, match="Q8_1|blk.0"):
        ggml_blocks.convert_tensor(tensor)
    tensor.kind = int(T.TQ1_0)
    with pytest.raises(ggml_blocks.BlockTypeError, match="blk.0.attn_q.weight.*TQ1_0"):
        ggml_blocks.convert_tensor(tensor)


@pytest.mark.parametrize("rows_in", [1, 5])
def test_q4_K_8_row_layout_equals_the_file_layout(rows_in):
    tensor = random_tensor(T.Q4_K, 48, 512, seed=7)
    repacked = ggml_blocks.repack(tensor)
    assert repacked.data.numel() == 48 // 8 * 2 * ggml_blocks.Q4_KX8_BYTES
    x = torch.randn(rows_in, 512, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ggml_blocks.matmul(x, [repacked]), ggml_blocks.matmul(x, [tensor]), rtol=1e-5, atol=1e-4)
    q, k = ggml_blocks.matmul(x, [repacked.row_slice(8, 24)]), ggml_blocks.matmul(x, [tensor.row_slice(8, 24)])
    torch.testing.assert_close(q, k, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 8"):
        repacked.row_slice(4, 8)


@pytest.mark.parametrize("rows_in", [1, 6])
def test_q6_K_8_row_layout_equals_the_file_layout(rows_in):
    tensor = random_tensor(T.Q6_K, 40, 512, seed=9)
    repacked = ggml_blocks.repack(tensor)
    assert repacked.data.numel() == tensor.data.numel()
    x = torch.randn(rows_in, 512, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(ggml_blocks.matmul(x, [repacked]), ggml_blocks.matmul(x, [tensor]), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(
        ggml_blocks.matmul(x, [repacked.row_slice(16, 40)]),
        ggml_blocks.matmul(x, [tensor.row_slice(16, 40)]),
        rtol=1e-4,
        atol=1e-3,
    )


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q6_K], ids=lambda k: k.name)
def test_native_repack_equals_numpy_repack(kind, monkeypatch):
    tensor = random_tensor(kind, 24, 768, seed=11)
    fast = ggml_blocks.repack(tensor)
    monkeypatch.setattr(ggml_blocks, "_NUMPY_REPACK", True)
    reference = ggml_blocks.repack(tensor)
    assert torch.equal(fast.data, reference.data)


def test_repack_refuses_other_types_and_row_counts():
    with pytest.raises(ValueError, match="Q4_K or Q6_K with rows a multiple of 8, got Q8_0"):
        ggml_blocks.repack(random_tensor(T.Q8_0, 8, 256))
    with pytest.raises(ValueError, match="got Q6_K x12"):
        ggml_blocks.repack(random_tensor(T.Q6_K, 12, 256))
