"""streamchat's native CPU kernels (streamchat/native.py, kernels.c) against plain torch on random data: the 4-bit
layout round-trips, the integer matmuls equal a float matmul up to 8-bit activation rounding for any number of rows,
the attention kernel equals SDPA, and bad sizes are refused instead of read out of bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamchat import native

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels: {native.unavailable_reason()}")


def on_q4_grid(weight: torch.Tensor) -> torch.Tensor:
    blocks = weight.reshape(weight.shape[0], -1, 32)
    low = blocks.amin(-1, keepdim=True).half().float()
    step = ((blocks.amax(-1, keepdim=True) - low) / 15).half().float()
    return (((blocks - low) / step).round().clamp(0, 15) * step + low).reshape_as(weight)


def test_4bit_blocks_round_trip_exactly_on_the_grid():
    weight = on_q4_grid(torch.randn(24, 96, generator=torch.Generator().manual_seed(0)))
    packed = native.pack_q4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (24 // 8, 96 // 32 * native.GROUP_BYTES)
    torch.testing.assert_close(native.unpack_q4(packed, 96), weight, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="8-row groups"):
        native.pack_q4(torch.randn(12, 96))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 37])
def test_4bit_matmul_equals_the_float_matmul(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = on_q4_grid(torch.randn(40, 160, generator=generator))
    bias = torch.randn(40, generator=generator)
    x = torch.randn(rows, 160, generator=generator)
    expected = x @ weight.T + bias
    got = native.q4_matmul(x, native.pack_q4(weight), 40, bias)
    assert got.shape == (rows, 40)
    # the activations are rounded to 8 bits per 32 inputs: about 0.5% of a random vector's norm
    assert (got - expected).norm() < 0.01 * expected.norm()
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_8bit_matmul_equals_the_float_matmul(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=generator)
    scales = torch.rand(48, generator=generator) * 0.01
    x = torch.randn(rows, 64, generator=generator)
    expected = x @ (weight.float() * scales[:, None]).T
    got = native.q8_matmul(x, weight, scales)
    assert (got - expected).norm() < 0.01 * expected.norm()


def test_bad_sizes_are_refused():
    with pytest.raises(RuntimeError, match="sc_q4_matmul"):
        native.q4_matmul(torch.randn(1, 40), torch.zeros(1, 160, dtype=torch.uint8), 8)  # 40 inputs: not 32-blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "length"), [(9, 3, 1), (9, 3, 300), (4, 4, 129), (8, 2, 1000)])
def test_attention_equals_sdpa(dtype, heads, kv_heads, length):
    generator = torch.Generator().manual_seed(length)
    keys = torch.randn(1, kv_heads, 1024, 64, generator=generator).to(dtype)
    values = torch.randn(1, kv_heads, 1024, 64, generator=generator).to(dtype)
    query = torch.randn(heads, 64, generator=generator)
    expected = F.scaled_dot_product_attention(
        query.view(1, heads, 1, 64), keys[:, :, :length].float(), values[:, :, :length].float(), scale=0.125,
        enable_gqa=True,
    ).view(heads, 64)
    torch.testing.assert_close(native.attention(query, keys, values, length, 0.125), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "length"),
                         [(16, 1, 64, 70), (10, 2, 40, 5), (7, 1, 24, 33), (12, 3, 128, 2), (9, 3, 64, 4)])
def test_attention_takes_any_group_and_head_size(dtype, heads, kv_heads, dim, length):
    """Groups larger than a slice of heads (and not multiples of it), head sizes not a multiple of the output
    vectors per pass, key counts not a multiple of 4."""
    generator = torch.Generator().manual_seed(heads * 1000 + length)
    keys = torch.randn(1, kv_heads, 80, dim, generator=generator).to(dtype)
    values = torch.randn(1, kv_heads, 80, dim, generator=generator).to(dtype)
    query = torch.randn(heads, dim, generator=generator)
    expected = F.scaled_dot_product_attention(
        query.view(1, heads, 1, dim), keys[:, :, :length].float(), values[:, :, :length].float(), scale=dim**-0.5,
        enable_gqa=True,
    ).view(heads, dim)
    torch.testing.assert_close(native.attention(query, keys, values, length, dim**-0.5), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_attention_of_many_sequences_equals_one_at_a_time(threads):
    """sc_attention_many over sequences of different lengths (some split into chunks and merged, some not) gives
    each sequence what SDPA gives it alone, whatever the thread count (it plans its chunks by it)."""
    import ctypes

    generator = torch.Generator().manual_seed(threads)
    lengths, heads, kv_heads, dim, capacity = [1, 40, 100, 129, 300, 7], 9, 3, 64, 320
    keys = [torch.randn(kv_heads, capacity, dim, generator=generator).half() for _ in lengths]
    values = [torch.randn(kv_heads, capacity, dim, generator=generator).half() for _ in lengths]
    queries = [torch.randn(heads, dim, generator=generator) for _ in lengths]
    outs = [torch.full((heads, dim), float("nan")) for _ in lengths]
    count = len(lengths)

    def pointers(tensors):
        return (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        status = native.library().sc_attention_many(
            count, pointers(queries), pointers(keys), pointers(values), 1, (ctypes.c_long * count)(*[capacity * dim] * count),
            (ctypes.c_int * count)(*lengths), heads, kv_heads, dim, ctypes.c_float(0.125), pointers(outs))
    finally:
        torch.set_num_threads(previous)
    assert status == 0
    for query, k, v, length, out in zip(queries, keys, values, lengths, outs):
        expected = F.scaled_dot_product_attention(
            query.view(1, heads, 1, dim), k[None, :, :length].float(), v[None, :, :length].float(), scale=0.125,
            enable_gqa=True,
        ).view(heads, dim)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_attention_refuses_mismatched_buffers():
    keys = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="laid out alike"):
        native.attention(torch.randn(9, 64), keys, keys.transpose(2, 3), 10, 0.125)


def test_build_falls_back_to_avx2_then_to_torch(monkeypatch, capsys):
    """A compiler without AVX-512 VNNI still gives the AVX2 build; with no build at all, torch's kernels, said once."""
    for name, value in (("_LOADED", False), ("_LIBRARY", None), ("_ISA", None), ("_REASON", None)):
        monkeypatch.setattr(native, name, value)  # restored after the test: the process keeps its own library
    real = native._built

    def without(*refused):
        def built(target):
            if target in refused:
                raise RuntimeError(f"cc: unrecognized option for {target}")
            return real(target)
        return built

    monkeypatch.setattr(native, "_built", without("avx512vnni"))
    assert native.library() is not None and native.active() == "avx2"
    x, packed = torch.randn(2, 64), native.pack_q4(torch.randn(16, 64))
    expected = x @ native.unpack_q4(packed, 64).T
    assert (native.q4_matmul(x, packed, 16) - expected).norm() < 0.01 * expected.norm()  # the AVX2 build computes
    monkeypatch.setattr(native, "_LOADED", False)
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setattr(native, "_built", without("avx512vnni", "avx2"))
    assert native.library() is None and native.active() is None
    assert "could not build" in native.unavailable_reason() and "torch's kernels" in capsys.readouterr().err
