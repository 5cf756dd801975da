"""streamchat's native CPU kernels (streamchat/native.py, kernels.c) against plain torch on random data: the 4-bit
layout round-trips, the integer matmuls equal a float matmul up to 8-bit activation rounding for any number of rows,
the attention kernel equals SDPA, and bad sizes are refused instead of read out of bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from streamchat import native
from transformers import RepetitionPenaltyLogitsProcessor

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


def test_a_row_group_gives_the_same_bits_in_a_16_row_tile_as_alone():
    """A task of two 8-row groups runs one 16-row tile (512-bit vectors in the AVX-512 build), a lone group an 8-row
    one: the same arithmetic per output, so the same bits (16 outputs: one pair; 8: one group alone)."""
    generator = torch.Generator().manual_seed(3)
    weight4 = on_q4_grid(torch.randn(16, 96, generator=generator))
    weight8 = torch.randint(-127, 128, (16, 96), dtype=torch.int8, generator=generator)
    scales = torch.rand(16, generator=generator) * 0.01
    for rows in (1, 2, 4, 7):
        x = torch.randn(rows, 96, generator=generator)
        pair, alone = (
            native.q4_matmul(x, native.pack_q4(weight4), 16),
            native.q4_matmul(x, native.pack_q4(weight4[:8]), 8),
        )
        assert torch.equal(pair[:, :8], alone)
        pair = native.q8_matmul(x, *native.pack_q8(weight8, scales), 16)
        alone = native.q8_matmul(x, *native.pack_q8(weight8[:8], scales[:8]), 8)
        assert torch.equal(pair[:, :8], alone) and pair.abs().sum() > 0


def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernels quantize activations (Q8: per 32 inputs, scale max|x| / 127, round to nearest)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(scale > 0, scale, 1)) * scale).reshape_as(x)


@pytest.mark.parametrize(("rows", "outputs"), [(1, 48), (2, 41), (3, 8), (4, 7), (5, 1), (7, 77), (9, 130)])
def test_8bit_matmul_equals_the_float_matmul(rows, outputs):
    """Any number of activation rows (tiles of 4, 2, 1) against any number of outputs, also ones that leave the
    last 8-row group partial: equal to the float matmul of the quantized activations up to float rounding."""
    generator = torch.Generator().manual_seed(rows * 100 + outputs)
    weight = torch.randint(-127, 128, (outputs, 96), dtype=torch.int8, generator=generator)
    weight[0, :32] = 127  # extreme products: no int16 saturation on AVX2, no lost offset on VNNI
    scales = torch.rand(outputs, generator=generator) * 0.01
    x = torch.randn(rows, 96, generator=generator)
    x[0, :32] = torch.where(torch.arange(32) % 2 == 0, 3.0, -3.0)  # +-127 after quantization
    packed, padded_scales = native.pack_q8(weight, scales)
    assert packed.shape == (-(-outputs // 8), 3, 256) and padded_scales.shape == (packed.shape[0] * 8,)
    expected = quantized_rows(x).double() @ (weight.double() * scales.double()[:, None]).T
    got = native.q8_matmul(x, packed, padded_scales, outputs)
    assert got.shape == (rows, outputs)
    torch.testing.assert_close(got.double(), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    # and within activation rounding of the unquantized matmul
    exact = x @ (weight.float() * scales[:, None]).T
    assert (got - exact).norm() < 0.01 * exact.norm()


def test_8bit_groups_round_trip_and_give_rows_back():
    """pack_q8 interleaves 8 rows per block; unpack_q8 and q8_rows (the tied embedding's lookup) read the rows
    back exactly, from views of the groups (no row-major copy)."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (21, 64), dtype=torch.int8, generator=generator)
    packed, scales = native.pack_q8(weight, torch.ones(21))
    assert torch.equal(packed[0, 0, :4], weight[0, :4]) and torch.equal(packed[0, 0, 4:8], weight[1, :4])
    assert torch.equal(packed[0, 1, 36:40], weight[1, 36:40])  # block 1, chunk 1, row 1: elements 32 + 4..7
    assert torch.equal(native.unpack_q8(packed, 21), weight)
    assert torch.equal(
        packed[-1, :, :].view(2, 8, 8, 4)[:, :, 5:], torch.zeros(2, 8, 3, 4, dtype=torch.int8)
    )  # padding
    assert torch.equal(scales[21:], torch.zeros(3))
    ids = torch.tensor([[20, 0, 7], [8, 8, 13]])
    assert torch.equal(native.q8_rows(packed, ids), weight[ids])
    with pytest.raises(ValueError, match="32-input blocks"):
        native.pack_q8(torch.zeros(8, 40, dtype=torch.int8), torch.ones(8))


def test_8bit_linear_and_embedding_share_the_groups():
    """A native int8 PackedLinear stores the groups; QuantEmbedding over the same tensors (the tied embedding)
    gives each token's row times its scale, and row views of the linear cut on groups."""
    from streamchat.quant import PackedLinear, QuantEmbedding, quantize_int8

    weight = torch.randn(37, 64, generator=torch.Generator().manual_seed(4))
    linear = PackedLinear(weight, None, "int8")
    assert linear.kernel == "native" and linear.weight.shape == (5, 2, 256)
    rows, scales = quantize_int8(weight)
    reference = rows.float() * scales.float()[:, None]  # the dequantized rows
    embedding = QuantEmbedding(linear.weight, linear.scales, torch.float32, count=37)
    ids = torch.tensor([0, 36, 9, 9])
    assert embedding.num_embeddings == 37 and embedding.embedding_dim == 64
    assert torch.equal(embedding(ids), reference[ids])
    x = torch.randn(3, 64)
    expected = quantized_rows(x) @ reference.T
    torch.testing.assert_close(linear(x), expected, atol=1e-4, rtol=1e-4)
    view = linear.rows(16, 37)  # the last group partial
    torch.testing.assert_close(view(x), linear(x)[:, 16:37])
    assert view.weight.data_ptr() == linear.weight[2].data_ptr()
    assert linear.rows(4, 16) is None and linear.rows(8, 20) is None


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
        query.view(1, heads, 1, 64),
        keys[:, :, :length].float(),
        values[:, :, :length].float(),
        scale=0.125,
        enable_gqa=True,
    ).view(heads, 64)
    torch.testing.assert_close(native.attention(query, keys, values, length, 0.125), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "length"),
    [(16, 1, 64, 70), (10, 2, 40, 5), (7, 1, 24, 33), (12, 3, 128, 2), (9, 3, 64, 4)],
)
def test_attention_takes_any_group_and_head_size(dtype, heads, kv_heads, dim, length):
    """Groups larger than a slice of heads (and not multiples of it), head sizes not a multiple of the output
    vectors per pass, key counts not a multiple of 4."""
    generator = torch.Generator().manual_seed(heads * 1000 + length)
    keys = torch.randn(1, kv_heads, 80, dim, generator=generator).to(dtype)
    values = torch.randn(1, kv_heads, 80, dim, generator=generator).to(dtype)
    query = torch.randn(heads, dim, generator=generator)
    expected = F.scaled_dot_product_attention(
        query.view(1, heads, 1, dim),
        keys[:, :, :length].float(),
        values[:, :, :length].float(),
        scale=dim**-0.5,
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
            count,
            pointers(queries),
            pointers(keys),
            pointers(values),
            1,
            (ctypes.c_long * count)(*[capacity * dim] * count),
            (ctypes.c_int * count)(*lengths),
            heads,
            kv_heads,
            dim,
            ctypes.c_float(0.125),
            pointers(outs),
        )
    finally:
        torch.set_num_threads(previous)
    assert status == 0
    for query, k, v, length, out in zip(queries, keys, values, lengths, outs):
        expected = F.scaled_dot_product_attention(
            query.view(1, heads, 1, dim),
            k[None, :, :length].float(),
            v[None, :, :length].float(),
            scale=0.125,
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
    monkeypatch.delenv(native.LIBRARY_ENV, raising=False)  # builds here, also in .ci/sanitize's run
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


def test_a_prebuilt_library_is_loaded_as_given(monkeypatch, tmp_path):
    """$STREAMCHAT_KERNELS_LIB loads that file (no build); its sc_vnni() names its build; a path that does not
    load is a reason, not a crash."""
    if native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    built = native._built("avx2")
    for name, value in (("_LOADED", False), ("_LIBRARY", None), ("_ISA", None), ("_REASON", None)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.setenv(native.LIBRARY_ENV, str(built))
    monkeypatch.setattr(native, "_built", lambda target: pytest.fail("built although a library was given"))
    assert native.library() is not None and native.active() == "avx2"
    x, packed = torch.randn(2, 64), native.pack_q4(torch.randn(16, 64))
    expected = x @ native.unpack_q4(packed, 64).T
    assert (native.q4_matmul(x, packed, 16) - expected).norm() < 0.01 * expected.norm()
    monkeypatch.setattr(native, "_LOADED", False)
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv(native.LIBRARY_ENV, str(tmp_path / "missing.so"))
    assert native.library() is None
    assert native.unavailable_reason().startswith(f"could not load {native.LIBRARY_ENV}=")


@pytest.mark.parametrize(
    ("penalty", "temperature", "top_k", "top_p"),
    [(1.0, 1.0, 50, 1.0), (1.3, 0.7, 50, 0.9), (1.1, 1.5, 7, 0.5), (1.0, 0.3, 1, 0.9)],
)
def test_native_sampling_draws_from_what_the_processors_keep(penalty, temperature, top_k, top_p):
    """`native.sample` at a uniform u picks the candidate whose share of the cumulative probability holds u, over
    the candidates and probabilities transformers' processors give (repetition penalty, temperature, then
    `candidate_probabilities`' top-k and top-p): u at the middle of each kept candidate's share picks exactly it."""
    from streamchat.session import candidate_probabilities
    from transformers import TemperatureLogitsWarper

    generator = torch.Generator().manual_seed(top_k)
    logits = torch.randn(1, 3000, generator=generator) * 3
    history = torch.cat([torch.randint(0, 3000, (1, 40), generator=generator), torch.full((1, 8), 3000)], dim=1)
    reference = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    probabilities, candidates = candidate_probabilities(
        TemperatureLogitsWarper(temperature)(history, reference), top_k, top_p
    )
    kept = probabilities[0] > 0
    shares = probabilities[0][kept].double() / probabilities[0][kept].double().sum()
    ends = shares.cumsum(0)
    for index, (end, share) in enumerate(zip(ends.tolist(), shares.tolist())):
        uniform = torch.tensor([end - share / 2])
        got = native.sample(logits.clone(), history, penalty, temperature, top_k, top_p, uniform)
        assert got == [int(candidates[0][kept][index])], index
    assert len(ends) == 1 if top_k == 1 else 1 < len(ends) <= top_k  # top-p kept several of the top_k
    # several rows at once, each its own history and draw
    rows = torch.cat([logits, logits.flip(1)])
    twice = native.sample(
        rows, torch.cat([history, history]), penalty, temperature, top_k, top_p, torch.tensor([0.0, 0.0])
    )
    assert twice[0] == int(candidates[0][0])


def test_native_sampling_refuses_what_it_does_not_take():
    logits = torch.randn(1, 100)
    assert not native.can_sample(logits, 0.0, 50, 0.9) and not native.can_sample(logits, 0.7, 0, 0.9)
    assert not native.can_sample(logits, 0.7, native.MAX_TOP_K + 1, 0.9) and not native.can_sample(
        torch.randn(2, 200)[:, ::2], 0.7, 5, 0.9
    )
    with pytest.raises(ValueError, match="top_k"):
        native.sample(logits, torch.zeros(1, 4, dtype=torch.int64), 1.0, 0.7, 0, 0.9, torch.zeros(1))


def test_native_sampling_at_the_edges():
    """A tiny temperature draws the most likely token (the logits' differences are divided, not the logits: no
    overflow into NaN); NaN logits are never candidates; a row with no finite maximum is refused, as torch's
    multinomial refuses it, instead of a token drawn from NaN weights."""
    history = torch.full((1, 4), 5, dtype=torch.int64)  # padding only (ids >= V)
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0, 2.5]])
    for uniform in (0.0, 0.5, 0.999):
        assert native.sample(logits.clone(), history, 1.0, 1e-5, 5, 1.0, torch.tensor([uniform])) == [1]
    with_nan = torch.tensor([[0.0, float("nan"), 1.0, -2.0, 2.5]])
    assert native.sample(with_nan, history, 1.0, 1.0, 2, 1.0, torch.tensor([0.999])) == [2]  # of 2.5 and 1.0
    for bad in (
        torch.full((1, 5), float("-inf")),
        torch.tensor([[0.0, float("inf"), 1.0, 0.0, 0.0]]),
        torch.full((1, 5), float("nan")),
    ):
        with pytest.raises(ValueError, match="infinite or NaN"):
            native.sample(bad, history, 1.0, 0.7, 3, 0.9, torch.zeros(1))
    assert not native.can_sample(logits, 1e-46, 5, 0.9)  # 0 as a float32: torch's path (the settings refuse it)


@pytest.mark.parametrize("penalty", [1.0, 1.1, 1.5])
def test_a_greedy_turn_chooses_natively_what_the_processors_choose(tiny, penalty):
    """ChatSession._sample at temperature 0 takes `native.greedy` (one pass) where the kernels run: the token
    transformers' repetition penalty then torch.argmax gives, ties to the lower id, and the processors' path is not
    run."""
    from streamchat.config import load_settings
    from streamchat.session import ChatSession, native_greedy

    session = ChatSession(tiny, load_settings(None, {"temperature": 0, "repetition_penalty": penalty}))
    settings = session.settings
    processors = session._logits_processors(settings)
    generator = torch.Generator().manual_seed(int(penalty * 10))
    vocab = tiny.model.config.vocab_size
    session._recent_ids.extend(torch.randint(0, vocab, (60,), generator=generator).tolist())
    history = session._recent_ids.padded.unsqueeze(0)

    class NotRun(RepetitionPenaltyLogitsProcessor):
        def __call__(self, input_ids, scores):
            raise AssertionError("the processors' torch path ran")

    guarded = [NotRun(p.penalty) for p in processors]
    for _ in range(20):
        logits = torch.randn(1, vocab, generator=generator) * 4
        logits[0, 7] = logits[0, 3] = logits.max() + 1  # a tie: the lower id wins, as torch.argmax
        expected = logits.clone()
        for processor in processors:
            expected = processor(history, expected)
        assert native_greedy(processors, logits, settings)
        assert session._sample(logits.clone(), guarded, settings) == int(expected.argmax(dim=-1))
