"""The fast decode path (streamchat/fastpath) against the transformers path, on the tiny model.

Same logits (fp32, 1e-4) token for token past the budget with evictions, the same cache contents, the same greedy
chat, the same choices of the scoring policies (H2O, TOVA); fallbacks (unsupported models, a failing compiler)
decode exactly like transformers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from streamchat.attention import attention_kwargs
from streamchat.cache import BoundedCache
from streamchat.config import SettingsError, load_settings
from streamchat.fastpath import (
    FastDecoder,
    FastPathUnavailable,
    choice,
    decoder_for,
    kv_dtype_for,
)
from streamchat.model import LoadedModel
from streamchat.quant import int8_dynamic_available
from streamchat.session import ChatSession

from tiny import tiny_model

SMALL = {
    "sinks": 2,
    "window": 46,
    "slack": 4,
    "kv_dtype": "model",
    "temperature": 0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 24,
}


def small_settings(**overrides):
    return load_settings(None, {**SMALL, **overrides})


def stream(loaded: LoadedModel, count: int) -> list[int]:
    text = "Tell me a story about a dragon who lived in a castle by the sea. " * 12
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:count]


@torch.inference_mode()
def transformers_step(model, cache: BoundedCache, ids: list[int]) -> torch.Tensor:
    cache.make_room(len(ids))
    return model(
        input_ids=torch.tensor([ids]),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **attention_kwargs(cache),
    ).logits[:, -1]


def assert_same_cache(a: BoundedCache, b: BoundedCache, tolerance: float = 1e-5) -> None:
    assert (a.length, a.seen_tokens, a.evicted_tokens) == (b.length, b.seen_tokens, b.evicted_tokens)
    for layer_a, layer_b in zip(a.layers, b.layers):
        end = layer_a.length
        assert torch.equal(layer_a.origins[..., :end], layer_b.origins[..., :end])
        for name in ("keys", "raw_keys", "values"):
            expected = getattr(layer_b, name)[:, :, :end]
            torch.testing.assert_close(
                getattr(layer_a, name)[:, :, :end],
                expected,
                atol=tolerance * max(1.0, expected.abs().max().item()),
                rtol=tolerance,
            )


# K/V dtype -> tolerance on the cache contents, relative to the largest value: fp32 to float rounding; in bf16 two
# fp32 keys a rounding apart may round to neighbouring bf16 values (a step is up to 2**-7 of a value), and a raw
# key a step apart moves both elements of its pair when re-rotated. The logits differ more in bf16: the fast path
# attends in bf16 (q rounded to bf16) where transformers upcasts the same bf16 K/V to fp32.
KV_TOLERANCE = {"model": 1e-5, "bfloat16": 2**-6}


@pytest.mark.parametrize("kv_dtype", KV_TOLERANCE)
def test_fast_step_matches_transformers_past_the_budget(tiny, kv_dtype, kernel):
    settings, tolerance = small_settings(kv_dtype=kv_dtype), KV_TOLERANCE[kv_dtype]
    reference, fast = BoundedCache(tiny.model, settings), BoundedCache(tiny.model, settings)
    assert fast.layers[0].dtype == getattr(torch, kv_dtype, torch.float32)
    decoder = FastDecoder(tiny.model)
    ids = stream(tiny, 64)
    transformers_step(tiny.model, reference, ids[:10])  # prefill: the transformers path for both
    transformers_step(tiny.model, fast, ids[:10])
    for token in ids[10:]:
        expected = transformers_step(tiny.model, reference, [token])
        fast.make_room(1)
        got = decoder.decode(token, fast)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        if kv_dtype == "model":
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        else:  # bf16 rounding moves the tiny random model's logits by up to ~1.3% (by norm); a bug moves them ~100%
            assert (got - expected).norm() < 3e-2 * expected.norm()
        assert_same_cache(reference, fast, tolerance)
    assert fast.evicted_tokens > 0 and fast.seen_tokens == 64  # evictions happened along the way


@pytest.fixture
def fast_steps(monkeypatch) -> list[int]:
    """The tokens decoded through the fast path from now on in this test."""
    steps = []
    original = FastDecoder.decode
    monkeypatch.setattr(
        FastDecoder, "decode", lambda self, token, cache: steps.append(token) or original(self, token, cache)
    )
    return steps


def test_greedy_chat_is_identical(tiny, fast_steps, kernel):
    fast = ChatSession(tiny, small_settings(decode_path="fast", decode_weights="model"))
    plain = ChatSession(tiny, small_settings(decode_path="transformers"))
    decoded = 0
    for message in ("Hello there! How are you today?", "Tell me a story about a dragon."):
        assert "".join(fast.send(message)) == "".join(plain.send(message))
        decoded += fast.last_turn.new_tokens - 1
        assert fast.last_reply_ids == plain.last_reply_ids
        assert fast.last_turn.new_tokens == plain.last_turn.new_tokens
        assert_same_cache(fast.cache, plain.cache)
    assert fast.cache.evicted_tokens > 0
    assert len(fast_steps) == decoded > 0  # every reply token after the first went through the fast path


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_scoring_policies_decode_on_the_fast_path_with_the_same_choices(tiny, fast_steps, policy):
    """H2O and TOVA rank cached tokens by the attention they receive: the fast path hands their observer the same
    probabilities as the transformers path's scoring attention, so they keep the same tokens, token for token."""
    settings = small_settings(policy=policy, heavy=16, recent=30, decode_path="fast", decode_weights="model")
    session = ChatSession(tiny, settings)
    reference = ChatSession(tiny, settings.replace(decode_path="transformers"))
    for message in ("Hello there!", "Tell me a story about a dragon.", "And then?"):
        assert "".join(session.send(message)) == "".join(reference.send(message))
        assert session.last_reply_ids == reference.last_reply_ids
    assert session.cache.stats() == reference.cache.stats() and session.cache.evicted_tokens > 0
    assert len(fast_steps) > 0  # replies went through the fast path
    for fast_layer, reference_layer in zip(session.cache.layers, reference.cache.layers):
        used = fast_layer.length
        assert torch.equal(fast_layer.origins[..., :used], reference_layer.origins[..., :used])  # the same tokens kept
    for fast_scores, reference_scores in zip(session.cache.policy.scores, reference.cache.policy.scores):
        torch.testing.assert_close(fast_scores, reference_scores, atol=1e-5, rtol=1e-4)


def test_refuses_what_it_cannot_reproduce(tiny):
    cache = BoundedCache(tiny.model, small_settings())
    decoder = FastDecoder(tiny.model)
    with pytest.raises(FastPathUnavailable, match="prefill first"):
        decoder.decode(5, cache)
    ids = stream(tiny, 48)
    transformers_step(tiny.model, cache, ids[:46])
    transformers_step(tiny.model, cache, ids[46:])  # 48 of 48: full
    with pytest.raises(FastPathUnavailable, match="full"):
        decoder.decode(5, cache)  # no make_room: the step would overflow the buffers


def test_unsupported_model_chats_through_transformers(tiny):
    gelu = LoadedModel(
        tiny_model(len(tiny.tokenizer), hidden_act="gelu"), tiny.tokenizer, "tiny-gelu", "tiny", 0.0, False
    )
    with pytest.raises(FastPathUnavailable, match="activation"):
        decoder_for(gelu.model, "model")
    session = ChatSession(gelu, small_settings(decode_path="fast"))
    reference = ChatSession(gelu, small_settings(decode_path="transformers"))
    assert "".join(session.send("Hello there!")) == "".join(reference.send("Hello there!"))


def test_compiler_failure_falls_back_to_eager(tiny, capsys):
    settings = small_settings()
    decoder = FastDecoder(tiny.model, compile=True)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    decoder._step = no_compiler
    fast, reference = BoundedCache(tiny.model, settings), BoundedCache(tiny.model, settings)
    ids = stream(tiny, 12)
    transformers_step(tiny.model, fast, ids[:8])
    transformers_step(tiny.model, reference, ids[:8])
    for token in ids[8:]:
        fast.make_room(1)
        torch.testing.assert_close(
            decoder.decode(token, fast), transformers_step(tiny.model, reference, [token]), atol=1e-4, rtol=1e-4
        )
    assert not decoder.compiled and decoder.compile_seconds is not None
    assert "compilation failed" in capsys.readouterr().err


def on_q4_1_grid(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose layer linears lie on a Q4_1 grid (per 32 inputs: min + k * (max - min) / 15, k in 0..15), as
    the embedded GGUF's do."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for _name, parameter in model.model.layers.named_parameters():
            if parameter.dim() == 2:
                blocks = parameter.view(parameter.shape[0], -1, 32)
                low = blocks.amin(-1, keepdim=True)
                step = (blocks.amax(-1, keepdim=True) - low) / 15
                blocks.copy_(low + torch.round((blocks - low) / step) * step)
    return model


LIGHT_WEIGHTS = ["bf16", "int8", "int4"] + (["int8_dynamic"] if int8_dynamic_available() else [])
# Relative logit error per step: int8_dynamic also rounds each activation vector to 7 bits per tensor, which the
# tiny random model (no trained scale structure, 2 layers of noise) feels far more than a real model does
# (docs/speed-cpu.md gives the real model's perplexity change).
LIGHT_TOLERANCE = {"int8_dynamic": 0.3}


@pytest.mark.parametrize("policy", ["sink_window", "h2o", "tova"])
@pytest.mark.parametrize("weights", LIGHT_WEIGHTS)
def test_lighter_weights_stay_close(tiny, weights, policy, kernel):
    """Lighter weights change logits by rounding only (int4 on Q4_1-grid weights, where it is exact up to bf16
    scales; int8_dynamic also rounds each activation to 8 bits), and leave the cache's places and origins as they
    are, with every policy. H2O and TOVA score on the fast path's own attention, so once they evict, rounding may
    tip which token they drop: from then on the same budget and mostly the same next tokens."""
    settings = small_settings(policy=policy, heavy=16, recent=30)
    model = on_q4_1_grid(tiny.model) if weights in ("int4", "int8_dynamic") else tiny.model
    reference, light = BoundedCache(model, settings), BoundedCache(model, settings)
    exact, decoder = FastDecoder(model), FastDecoder(model, weights)
    assert decoder.nbytes() < exact.nbytes()
    ids = stream(tiny, 60)
    transformers_step(model, reference, ids[:8])
    transformers_step(model, light, ids[:8])
    agree = 0
    for token in ids[8:]:
        reference.make_room(1)
        light.make_room(1)
        scored_evictions = policy != "sink_window" and reference.evicted_tokens > 0
        expected, got = exact.decode(token, reference), decoder.decode(token, light)
        assert torch.isfinite(got).all()
        assert (reference.length, reference.evicted_tokens) == (light.length, light.evicted_tokens)
        agree += int(got.argmax() == expected.argmax())
        if not scored_evictions:
            tolerance = LIGHT_TOLERANCE.get(weights, 0.1)
            if kernel == "native" and weights in ("int4", "int8"):
                tolerance *= 2  # 8-bit activations per 32 inputs (llama.cpp's Q8_1) where torch's kernels take bf16
            assert (got - expected).norm() < tolerance * expected.norm()
            used = reference.length  # places past it are never read (left uninitialized)
            assert torch.equal(reference.layers[0].origins[..., :used], light.layers[0].origins[..., :used])
    assert reference.evicted_tokens > 0
    assert agree >= (0.8 if policy == "sink_window" and weights != "int8_dynamic" else 0.6) * len(ids[8:])


def test_decode_settings_are_validated():
    assert load_settings(None, {"decode_weights": "int4"}).decode_weights == "int4"
    with pytest.raises(SettingsError, match="decode_weights"):
        load_settings(None, {"decode_weights": "int3"})
    with pytest.raises(SettingsError, match="decode_path"):
        load_settings(None, {"decode_path": "turbo"})


def test_auto_weights_are_quantized_only_for_4bit_models(tiny):
    assert FastDecoder(tiny.model, "auto").weights == "model"  # full-precision weights decode as they are
    assert FastDecoder(on_q4_1_grid(tiny.model), "auto").weights == "int4"  # a Q4 GGUF's weights: no further loss


@pytest.mark.parametrize(
    ("cpu", "native_build", "expected"),
    [
        ("AVX2", None, torch.float32),
        ("AVX512", None, torch.float32),
        ("AMX", None, torch.bfloat16),
        ("AVX2", "avx2", torch.float16),
        ("AVX512", "avx512vnni", torch.float16),
        ("AMX", "avx512vnni", torch.float16),
    ],
)
def test_auto_kv_dtype_follows_the_cpu(tiny, monkeypatch, cpu, native_build, expected):
    """`kv_dtype: auto` on the fast path: fp16 where the native attention kernel runs (F16C converts in hardware);
    on torch's SDPA, fp32 where bf16 attention is emulated (AVX2, Zen 4's AVX-512), bf16 on AMX; the model's dtype
    off the fast path."""
    monkeypatch.setattr(choice, "cpu_class", lambda: cpu)
    monkeypatch.setattr(choice.native, "active", lambda: native_build)
    assert kv_dtype_for(tiny.model, small_settings(kv_dtype="auto")) == expected
    assert kv_dtype_for(tiny.model, small_settings(kv_dtype="auto", decode_path="transformers")) == torch.float32
    assert choice.auto_kv_dtype(torch.float16)[0] == torch.float16


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_native_whole_step_matches_the_step_op_by_op(tiny, kv_dtype):
    """kernels.c's `sc_decode` (the whole step in one call, for one or several sequences at their own places) gives
    the logits and cache contents of `FastDecoder._forward` over the same packed weights, layer by layer in Python."""
    from streamchat import native
    from streamchat.fastpath.batched import decode_batch

    if native.library() is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    model = on_q4_1_grid(tiny.model)
    decoder = FastDecoder(model, "int4")
    assert decoder._native_layers is not None
    settings = small_settings(kv_dtype=kv_dtype)
    ids = stream(tiny, 120)
    whole, op_by_op = [], []
    for offset, prompt in zip((0, 5, 11), (6, 20, 40)):  # three conversations at different cache lengths
        for caches in (whole, op_by_op):
            cache = BoundedCache(model, settings, getattr(torch, kv_dtype))
            transformers_step(model, cache, ids[offset : offset + prompt])
            caches.append(cache)
    plan, steps, errors = decoder._native_layers, 0, []
    for token in ids[40:92]:  # past the budget: evictions between steps
        for cache in whole + op_by_op:
            cache.make_room(1)
        got = (
            decode_batch(decoder, [token, token + 1, token + 2], whole)
            if steps % 2
            else torch.cat([decoder.decode(token + b, cache) for b, cache in enumerate(whole)])
        )
        decoder._native_layers = None  # the Python step (native matmuls and attention, op by op)
        try:
            expected = torch.cat([decoder.decode(token + b, cache) for b, cache in enumerate(op_by_op)])
        finally:
            decoder._native_layers = plan
        errors.extend(((got - expected).norm(dim=-1) / expected.norm(dim=-1)).tolist())
        for a, b in zip(whole, op_by_op):
            assert_same_cache(a, b, 2e-2)
        steps += 1
    # The same computation up to float summation order (RMSNorm), which can flip an 8-bit activation rounding near
    # a tie now and then (one step of ~150 moved 1-3% on this random model); a real bug moves every step.
    errors.sort()
    assert errors[len(errors) // 2] < 1e-5 and errors[-1] < 5e-2
    assert all(cache.evicted_tokens > 0 for cache in whole)


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_native_prefill_chunks_equal_feeding_token_by_token(tiny, kv_dtype):
    """A prefill chunk through the native step (`native_feed`: one row per token, causal), alone or in the same call
    as other conversations' decode rows, gives the logits and cache contents of feeding its tokens one at a time
    (from an empty cache: the step allocates the buffers), and stays close to the transformers forward over the
    same weights (which does not quantize activations to 8 bits)."""
    from streamchat import native

    if native.library() is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    model = on_q4_1_grid(tiny.model)
    decoder = FastDecoder(model, "int4")
    settings = load_settings(None, {**SMALL, "window": 120, "kv_dtype": kv_dtype})
    dtype = getattr(torch, kv_dtype)
    chunked, single, reference, other = (BoundedCache(model, settings, dtype) for _ in range(4))
    ids = stream(tiny, 100)
    transformers_step(model, other, ids[50:60])
    position, errors = 0, []
    for size, with_decode in ((9, False), (1, True), (16, True), (30, False), (25, True)):
        chunk = ids[position : position + size]
        position += size
        for cache in (chunked, single, reference):
            cache.make_room(size)
        if with_decode:
            other.make_room(1)
            got = decoder.native_feed([[ids[position]], chunk], [other, chunked])[1:]
        else:
            got = decoder.native_feed([chunk], [chunked])
        for token in chunk:
            expected = decoder.native_decode([token], [single])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert_same_cache(chunked, single, 1e-5 if kv_dtype == "float32" else 1e-3)
        errors.append(((got - transformers_step(model, reference, chunk)).norm() / got.norm()).item())
    assert chunked.seen_tokens == position and max(errors) < 5e-2


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_the_native_step_hands_scoring_policies_their_attention_probabilities(tiny, policy):
    """H2O and TOVA decode on the native whole step too: it writes each layer's GQA-averaged attention probabilities
    (kernels.c `probs_task`) for the policy's observer. The scores they accumulate equal those of the Python step
    (`_scored_attention`, torch's softmax) over the same int4 weights, up to float rounding."""
    from streamchat import native

    native_decoder, python_decoder = FastDecoder(tiny.model, "int4"), FastDecoder(tiny.model, "int4")
    if native_decoder._native_layers is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    python_decoder._native_layers = None  # the op-by-op step: torch's attention and softmax
    settings = small_settings(policy=policy, heavy=16, recent=40)
    caches = [BoundedCache(tiny.model, settings), BoundedCache(tiny.model, settings)]
    ids = stream(tiny, 48)  # below the budget of 60: no eviction, every place comparable
    for cache in caches:
        transformers_step(tiny.model, cache, ids[:8])
    for token in ids[8:]:
        for cache in caches:
            cache.make_room(1)
        torch.testing.assert_close(
            native_decoder.decode(token, caches[0]), python_decoder.decode(token, caches[1]), atol=1e-3, rtol=1e-3
        )
    assert caches[0].length == caches[1].length == 48
    for native_scores, python_scores in zip(caches[0].policy.scores, caches[1].policy.scores):
        assert native_scores is not None and native_scores.abs().sum() > 0
        torch.testing.assert_close(native_scores, python_scores, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_scoring_policies_batch_on_the_native_step_as_alone(tiny, policy):
    """Two H2O/TOVA caches decoded in one batched native step get the same logits and the same scores, bit for bit,
    as each decoded alone: every row's attention and probabilities are its own."""
    from streamchat import native
    from streamchat.fastpath.batched import decode_batch

    decoder = FastDecoder(tiny.model, "int4")
    if decoder._native_layers is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    settings = small_settings(policy=policy, heavy=12, recent=20)
    ids = stream(tiny, 70)
    batched = [BoundedCache(tiny.model, settings) for _ in range(2)]
    alone = [BoundedCache(tiny.model, settings) for _ in range(2)]
    for index, cache in enumerate(batched + alone):
        transformers_step(tiny.model, cache, ids[index % 2 : index % 2 + 6])
    for step in range(40):  # past the budget of 36: scores decide evictions on the way
        tokens = [ids[10 + step], ids[20 + step]]
        for cache in batched + alone:
            cache.make_room(1)
        together = decode_batch(decoder, tokens, batched)
        for row, cache in enumerate(alone):
            assert torch.equal(together[row : row + 1], decoder.decode(tokens[row], cache))
    for a, b in zip(batched, alone):
        assert a.evicted_tokens == b.evicted_tokens > 0
        for scores_a, scores_b in zip(a.policy.scores, b.policy.scores):
            assert torch.equal(scores_a, scores_b)


def test_a_scoring_row_after_a_prefill_chunk_in_one_native_call_gets_its_own_probabilities(tiny):
    """Rows are tokens, not caches: an H2O decode row that follows another conversation's prefill chunk in one
    native call receives the probabilities of its own row (the same scores as decoded alone)."""
    from streamchat import native
    from streamchat.fastpath.batched import feed_batch

    decoder = FastDecoder(tiny.model, "int4")
    if decoder._native_layers is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    ids = stream(tiny, 30)
    scoring = [BoundedCache(tiny.model, small_settings(policy="h2o", heavy=12, recent=20)) for _ in range(2)]
    plain = BoundedCache(tiny.model, small_settings())
    for cache in scoring:
        transformers_step(tiny.model, cache, ids[:6])
    transformers_step(tiny.model, plain, ids[:4])
    for cache in (*scoring, plain):
        cache.make_room(5)
    feed_batch(decoder, [ids[10:15], [ids[20]]], [plain, scoring[0]])
    decoder.decode(ids[20], scoring[1])
    for mixed, alone in zip(scoring[0].policy.scores, scoring[1].policy.scores):
        assert torch.equal(mixed, alone)
