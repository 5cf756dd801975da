"""The bounded cache: budget, exact cache-relative RoPE (no drift), sinks, and logits equal to a naive reference."""

import pytest
import torch
from streamchat.cache import BoundedCache
from streamchat.config import load_settings
from streamchat.fastpath import kv_dtype_for
from streamchat.rope import rotate

from tiny import tiny_model


def settings(**overrides):
    """The cache in the model's dtype (fp32): these tests hold it to fp32 tolerances."""
    return load_settings(None, {"kv_dtype": "model", **overrides})


def rope_tables(model, positions):
    """cos/sin written out from the RoPE definition, independent of the cache's own tables."""
    head_dim = model.config.head_dim
    inv_freq = 1.0 / (model.config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=400)


def stream_random_keys(model, cache, total, chunk, seed=0):
    """Feed the cache `total` tokens of random keys (rotated at their cache place, as the model would)."""
    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    raw_history = []
    for start in range(0, total, chunk):
        count = min(chunk, total - start)
        cache.make_room(count)
        place = cache.length
        cos, sin = rope_tables(model, torch.arange(place, place + count))
        raw = torch.randn(1, heads, count, head_dim, generator=gen)
        values = torch.randn(1, heads, count, head_dim, generator=gen)
        raw_history.append(raw)
        for layer_idx in range(len(cache.layers)):
            cache.update(rotate(raw, cos, sin), values, layer_idx)
        assert cache.length <= cache.capacity
    return torch.cat(raw_history, dim=2)


def test_no_drift_after_20000_tokens(model):
    cache = BoundedCache(model, settings(sinks=4, window=28, slack=3))
    raw_history = stream_random_keys(model, cache, total=20_000, chunk=1)
    assert cache.seen_tokens == 20_000
    assert cache.evicted_tokens == 20_000 - cache.length
    for layer in cache.layers:
        length = layer.length
        origins = layer.origins[0, :, :length]
        expected_raw = torch.stack([raw_history[0, h, origins[h]] for h in range(origins.shape[0])])
        cos, sin = rope_tables(model, torch.arange(length))
        fresh = rotate(expected_raw, cos, sin)
        error = (layer.keys[0, :, :length] - fresh).norm() / fresh.norm()
        assert error <= 1e-5, f"relative error {error:.2e}"
        # sinks first, then the most recent tokens in stream order
        recent = torch.arange(20_000 - (length - 4), 20_000)
        assert torch.equal(origins[0], torch.cat((torch.arange(4), recent)))


def test_bf16_cache_does_not_drift_either(model):
    """In bf16 every kept key is its raw key (rounded to bf16 once, when it arrived) rotated at its current place
    in fp32 and rounded once more: two roundings (2**-8 each), however often it moved."""
    cache = BoundedCache(model, settings(sinks=4, window=28, slack=3, kv_dtype="bfloat16"))
    raw_history = stream_random_keys(model, cache, total=5_000, chunk=1)
    for layer in cache.layers:
        assert layer.keys.dtype == layer.raw_keys.dtype == layer.values.dtype == torch.bfloat16
        length = layer.length
        origins = layer.origins[0, :, :length]
        raw = torch.stack([raw_history[0, h, origins[h]] for h in range(origins.shape[0])])
        torch.testing.assert_close(layer.raw_keys[0, :, :length].float(), raw, atol=0, rtol=2**-8)
        cos, sin = rope_tables(model, torch.arange(length))
        fresh = rotate(raw, cos, sin)
        error = (layer.keys[0, :, :length].float() - fresh).norm() / fresh.norm()
        assert error <= 2**-7, f"relative error {error:.2e}"


@pytest.mark.parametrize("kv_dtype", ["model", "bfloat16"])
def test_sinks_unchanged_across_10000_evictions(model, kv_dtype):
    cache = BoundedCache(model, settings(sinks=4, window=12, slack=0, kv_dtype=kv_dtype))
    stream_random_keys(model, cache, total=16, chunk=8)
    before = [(layer.keys[:, :, :4].clone(), layer.values[:, :, :4].clone()) for layer in cache.layers]
    stream_random_keys(model, cache, total=10_000, chunk=1, seed=1)
    assert cache.evicted_tokens == 10_000
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.keys[:, :, :4], keys)
        assert torch.equal(layer.values[:, :, :4], values)
        assert torch.equal(layer.origins[0, 0, :4], torch.arange(4))


def test_capacity_is_never_exceeded_and_overflow_is_refused(model):
    cache = BoundedCache(model, settings(sinks=4, window=20, slack=5))
    stream_random_keys(model, cache, total=500, chunk=7)
    with pytest.raises(ValueError, match="at most"):
        cache.make_room(cache.capacity)
    heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    cache.make_room(cache.capacity - cache.protected)
    big = torch.zeros(1, heads, cache.capacity - cache.length + 1, head_dim)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.update(big, big, 0)


def test_pinned_prefix_is_protected(model):
    cache = BoundedCache(model, settings(sinks=2, window=30, slack=0))
    cache.pin(10)
    stream_random_keys(model, cache, total=300, chunk=5)
    assert torch.equal(cache.layers[0].origins[0, 0, :10], torch.arange(10))
    assert cache.stats()["sink_tokens"] == 10


def test_stats_report_state(model):
    cache = BoundedCache(model, settings(sinks=4, window=28, slack=0))
    stream_random_keys(model, cache, total=100, chunk=1)
    stats = cache.stats()
    assert stats["cache_tokens"] == 32 and stats["cache_capacity"] == 32 and stats["sink_tokens"] == 4
    assert stats["seen_total"] == 100 and stats["evicted_total"] == 68
    layer = cache.layers[0]
    per_layer = 3 * layer.keys.numel() * 4 + layer.origins.numel() * 8  # keys, raw keys, values (fp32) + origins
    assert stats["kv_bytes"] == per_layer * len(cache.layers)
    light = BoundedCache(model, settings(sinks=4, window=28, slack=0, kv_dtype="bfloat16"))
    stream_random_keys(model, light, total=100, chunk=1)
    assert light.stats()["kv_bytes"] == (3 * layer.keys.numel() * 2 + layer.origins.numel() * 8) * len(cache.layers)


def test_kv_dtype_auto_is_the_cpu_choice_only_where_the_fast_path_decodes(model, monkeypatch):
    from streamchat.fastpath import choice

    def resolved(**overrides):
        return kv_dtype_for(model, load_settings(None, overrides))

    monkeypatch.setattr(choice.native, "active", lambda: "avx2")  # native attention reads fp16: auto picks it
    assert resolved() == torch.float16 and resolved(decode_path="transformers") == torch.float32
    monkeypatch.setattr(choice.native, "active", lambda: None)  # torch's SDPA instead
    monkeypatch.setattr(choice, "cpu_class", lambda: "AMX")  # where bf16 is native, auto picks it
    assert resolved() == torch.bfloat16  # fp32 model on the CPU, sink_window, fast decode path
    assert resolved(decode_path="transformers") == torch.float32  # no conversion per transformers step
    assert resolved(policy="h2o") == torch.bfloat16  # the fast path scores attention too
    gelu = tiny_model(vocab_size=400, hidden_act="gelu")
    assert kv_dtype_for(gelu, load_settings(None, {})) == torch.float32  # a model the fast path cannot run
    half = tiny_model(vocab_size=400).to(torch.bfloat16)
    assert kv_dtype_for(half, load_settings(None, {})) == torch.bfloat16  # the model's own
    assert resolved(kv_dtype="float16") == torch.float16 and resolved(kv_dtype="model") == torch.float32


class NaiveStreamingLLM:
    """Reference StreamingLLM written from scratch: keeps every kept token's raw (pre-RoPE) key and value per
    layer and, at every step, rotates all of them afresh at places 0..L-1 and attends with plain softmax."""

    def __init__(self, model, sinks, window, slack):
        self.model, self.sinks, self.capacity, self.slack = model, sinks, sinks + window, slack
        self.raw_keys = [[] for _ in model.model.layers]  # per layer: list of [kv_heads, head_dim]
        self.values = [[] for _ in model.model.layers]

    def make_room(self, incoming):
        length = len(self.raw_keys[0])
        if length + incoming <= self.capacity:
            return
        keep = max(self.sinks, self.capacity - incoming - self.slack)
        for store in (*self.raw_keys, *self.values):
            store[:] = store[: self.sinks] + store[length - (keep - self.sinks) :]

    @torch.no_grad()
    def step(self, token_id):
        m, config = self.model, self.model.config
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        hidden = m.model.embed_tokens(torch.tensor([[token_id]]))
        place = len(self.raw_keys[0])
        for index, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(heads, head_dim)
            self.raw_keys[index].append(attn.k_proj(x).view(kv_heads, head_dim))
            self.values[index].append(attn.v_proj(x).view(kv_heads, head_dim))
            cos, sin = rope_tables(m, torch.arange(place + 1))
            keys = rotate(torch.stack(self.raw_keys[index], dim=1), cos, sin)  # [kv_heads, L+1, D]
            values = torch.stack(self.values[index], dim=1)
            q = rotate(q, cos[place], sin[place])
            group = heads // kv_heads
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            weights = torch.softmax((keys @ q[:, :, None]).squeeze(-1) * head_dim**-0.5, dim=-1)
            out = (weights[:, None, :] @ values).reshape(1, 1, heads * head_dim)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return m.lm_head(m.model.norm(hidden))[0, -1]


@pytest.mark.parametrize("slack,chunk", [(0, 1), (3, 1), (2, 5)])
def test_logits_match_naive_streaming_reference(model, slack, chunk):
    sinks, window, total = 4, 20, 90
    ids = torch.randint(3, 400, (total,), generator=torch.Generator().manual_seed(7)).tolist()
    cache = BoundedCache(model, settings(sinks=sinks, window=window, slack=slack))
    reference = NaiveStreamingLLM(model, sinks, window, slack)
    worst = 0.0
    for start in range(0, total, chunk):
        part = ids[start : start + chunk]
        cache.make_room(len(part))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([part]), past_key_values=cache, use_cache=True).logits[0]
        reference.make_room(len(part))
        for offset, token_id in enumerate(part):
            expected = reference.step(token_id)
            worst = max(worst, (logits[offset] - expected).abs().max().item())
    assert cache.evicted_tokens > 0
    assert worst <= 1e-4, f"max logit difference {worst:.2e}"


def test_reference_is_sensitive_to_positions(model):
    """Guard for the test above: shifting every key by one place changes the logits well beyond 1e-4."""
    ids = list(range(10, 40))
    reference = NaiveStreamingLLM(model, 4, 100, 0)
    for token_id in ids[:-1]:
        reference.step(token_id)
    expected = reference.step(ids[-1])
    shifted = NaiveStreamingLLM(model, 4, 100, 0)
    shifted.raw_keys = [[torch.zeros_like(k[0])] for k in reference.raw_keys]  # one extra place at the front
    shifted.values = [[torch.zeros_like(v[0])] for v in reference.values]
    for token_id in ids[:-1]:
        shifted.step(token_id)
    assert (shifted.step(ids[-1]) - expected).abs().max() > 1e-3


@pytest.mark.parametrize(("kv_dtype", "window"), [("model", 60), ("float16", 60), ("float16", 150)])
def test_native_compaction_equals_torch_bit_for_bit(model, kv_dtype, window, monkeypatch):
    """sink_window's compaction (one contiguous run of places moved down, keys re-rotated) through kernels.c, all
    layers in one call, equals the torch path exactly, in fp32 and in fp16, over many evictions."""
    from streamchat import native

    if native.library() is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    calls = []  # what each native.compact_layers / native.compact call returned
    for name in ("compact", "compact_layers"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, f=original: calls.append(f(*args)) or calls[-1])
    dtype = model.dtype if kv_dtype == "model" else torch.float16
    native_cache = BoundedCache(model, settings(sinks=4, window=window, slack=8), dtype)
    stream_random_keys(model, native_cache, 400, 7)
    done = list(calls)
    with native.torch_kernels():
        torch_cache = BoundedCache(model, settings(sinks=4, window=window, slack=8), dtype)
        stream_random_keys(model, torch_cache, 400, 7)
    assert native_cache.evicted_tokens == torch_cache.evicted_tokens > 400 - window - 20
    assert len(done) > 10 and all(done)  # every compaction of the first cache went through the kernel
    assert calls[len(done) :] and not any(calls[len(done) :])  # and none of the second's
    for a, b in zip(native_cache.layers, torch_cache.layers):
        assert a.length == b.length
        for name in ("keys", "raw_keys", "values", "origins"):
            assert torch.equal(getattr(a, name)[:, :, : a.length], getattr(b, name)[:, :, : b.length]), name
