"""H2O on the tiny model: scores against eager attention, the kept set, GQA, the budget over 10,000 tokens, RoPE
positions after per-head compaction, sessions sharing one model, stats and settings."""

import copy
import io
import json

import pytest
import torch
from streamchat import attention, policies
from streamchat.attention import SCORING_ATTENTION, attention_kwargs, attention_probabilities
from streamchat.cache import BoundedCache
from streamchat.config import CONFIG_DIR, SettingsError, load_settings
from streamchat.policies.base import EvictionPolicy
from streamchat.policies.h2o import H2OPolicy
from streamchat.rope import rotate_half
from streamchat.session import ChatSession

from tiny import tiny_loaded


@pytest.fixture(scope="module")
def loaded():
    """A tiny model of this module's own: scoring switches its attention function, which the shared one keeps."""
    return tiny_loaded(seed=1)


def h2o_settings(**overrides):
    """A small H2O cache in the model's dtype (fp32): these tests hold scores and keys to fp32 tolerances."""
    values = {"policy": "h2o", "sinks": 4, "heavy": 12, "recent": 10, "slack": 3, "kv_dtype": "model", **overrides}
    return load_settings(None, values)


def feed(model, cache, ids):
    """What the session does for each forward pass: make room, then run the model with the policy's observer."""
    cache.make_room(len(ids))
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, **attention_kwargs(cache))


def random_ids(count, vocab, seed=0):
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


# ----- scores ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cumulative", "normalized", "decayed"])
def test_scores_equal_naive_eager_attention(loaded, mode):
    """Prefill chunks of 10 and 7 tokens, then 3 decode steps: every layer's scores match what eager attention over
    the whole sequence gives, grouped by hand (query head q belongs to KV head q // group)."""
    model = loaded.model
    settings = h2o_settings(heavy=100, recent=100, h2o_score=mode, h2o_decay=0.9)  # no eviction
    cache = BoundedCache(model, settings)
    ids = random_ids(20, model.config.vocab_size)
    for start, end in ((0, 10), (10, 17), (17, 18), (18, 19), (19, 20)):
        feed(model, cache, ids[start:end])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    total = len(ids)
    query_heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    group = query_heads // kv_heads
    decay_weights = 0.9 ** torch.arange(total - 1, -1, -1, dtype=torch.float64)  # query t weighs decay^(T-1-t)
    for layer, probs in enumerate(attentions):
        probs = probs[0].double()  # [query heads, query, key]
        expected = torch.zeros(kv_heads, total, dtype=torch.float64)
        for head in range(kv_heads):
            members = [q for q in range(query_heads) if q // group == head]
            grouped = probs[members].mean(dim=0)  # [query, key]
            if mode == "decayed":
                expected[head] = (grouped * decay_weights[:, None]).sum(dim=0)
            else:
                expected[head] = grouped.sum(dim=0)
                if mode == "normalized":
                    expected[head] /= torch.arange(total, 0, -1, dtype=torch.float64)  # queries that saw each key
        got = cache.policy.ranking(layer, total)[0].double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_tova_ranks_by_the_newest_query(loaded):
    model = loaded.model
    cache = BoundedCache(model, h2o_settings(policy="tova", heavy=100, recent=100))
    ids = random_ids(18, model.config.vocab_size, seed=5)
    for start, end in ((0, 10), (10, 17), (17, 18)):
        feed(model, cache, ids[start:end])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, probs in enumerate(attentions):
        newest = probs[0, :, -1].view(-1, group, len(ids)).mean(dim=1)  # [kv heads, keys]
        torch.testing.assert_close(cache.policy.ranking(layer, len(ids))[0], newest, atol=1e-5, rtol=0)


def test_probabilities_follow_a_given_mask():
    """With the model's boolean mask the probabilities equal those of the built-in causal rule."""
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 7, 16)
    mask = torch.arange(7)[None, :] <= torch.arange(4, 7)[:, None]  # query i sees keys 0..4+i
    built_in = attention_probabilities(query, key, None, 0.25)
    masked = attention_probabilities(query, key, mask[None, None], 0.25)
    torch.testing.assert_close(built_in, masked)
    assert built_in[0, :, 0, 5:].abs().max() == 0  # the first new query cannot see the later ones


# ----- eviction ----------------------------------------------------------------------------------------------------


def expected_kept(ranking, length, keep, protected, heavy):
    """Per head: places 0..protected-1, the `heavy` best-ranked middle places, and the rest as the recent tail."""
    recent = keep - protected - heavy
    top = ranking[..., protected : length - recent].topk(heavy, dim=-1).indices + protected
    return [
        sorted({*range(protected), *top[0, head].tolist(), *range(length - recent, length)})
        for head in range(ranking.shape[1])
    ]


@pytest.mark.parametrize("policy, mode", [("h2o", "normalized"), ("h2o", "cumulative"), ("tova", "normalized")])
def test_kept_set_is_sinks_top_k_and_recent_per_layer_and_head(loaded, policy, mode):
    model = loaded.model
    settings = h2o_settings(policy=policy, h2o_score=mode)
    cache = BoundedCache(model, settings)
    ids = random_ids(120, model.config.vocab_size, seed=3)
    checked, differing_heads, position = 0, False, 0
    for size in [8, 9, 5] + [1] * 30 + [6, 1, 1, 7] + [1] * 40:
        chunk, position = ids[position : position + size], position + size
        length = cache.length
        if length + len(chunk) > cache.capacity:
            keep = cache.capacity - len(chunk) - settings.slack
            protected = cache.protected
            heavy = cache.policy.heavy_to_keep(keep, protected)
            assert heavy == settings.heavy - settings.slack
            before = [
                (cache.policy.ranking(i, length).clone(), layer.origins[0, :, :length].clone())
                for i, layer in enumerate(cache.layers)
            ]
            cache.make_room(len(chunk))
            for i, (layer, (ranking, origins)) in enumerate(zip(cache.layers, before)):
                places = expected_kept(ranking, length, keep, protected, heavy)
                assert layer.length == keep
                for head, kept in enumerate(places):
                    assert layer.origins[0, head, :keep].tolist() == origins[head, kept].tolist()
                    torch.testing.assert_close(cache.policy.ranking(i, keep)[0, head], ranking[0, head, kept])
                differing_heads |= places[0] != places[1]
            checked += 1
        feed(model, cache, chunk)
        newest, window = cache.seen_tokens - settings.recent, min(settings.recent, cache.seen_tokens)
        for layer in cache.layers:  # the whole recent window is held after every forward pass
            assert (layer.origins[0, :, : layer.length] >= newest).sum(-1).tolist() == [window, window]
    assert checked >= 5
    assert differing_heads, "KV heads should keep different heavy hitters"


def test_budget_and_positions_over_10000_tokens(loaded):
    """10,000 tokens in prefill chunks and decode steps: the cache never exceeds the budget, holds sinks + at most
    `heavy` heavy hitters + the recent window, and every cached key equals its k_proj output rotated afresh at its
    current cache place (no drift after hundreds of per-head compactions)."""
    model = loaded.model
    settings = h2o_settings(heavy=16, recent=12, slack=4)
    cache = BoundedCache(model, settings)
    raw = {i: [] for i in range(len(cache.layers))}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: raw[i].append(out[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        ids = random_ids(10_000, model.config.vocab_size, seed=7)
        sizes = [1, 1, 1, 2, 5, 13, 28, 20, 9, 17]  # decode steps and prefill chunks up to the room (28)
        position, forwards = 0, 0
        while position < len(ids):
            size = sizes[(forwards * 7) % len(sizes)]
            feed(model, cache, ids[position : position + size])
            position, forwards = position + size, forwards + 1
            assert cache.length <= settings.budget
            stats = cache.stats()
            assert stats["sink_tokens"] + stats["heavy_tokens"] + stats["recent_tokens"] == cache.length
            # heavy hitters: those chosen at the last eviction (at most heavy - slack), none before the first one;
            # the rest is the recent window: the newest tokens of the stream, at least `recent` of them
            assert stats["heavy_tokens"] <= (settings.heavy - settings.slack if cache.evicted_tokens else 0)
            recent = stats["recent_tokens"]
            assert recent >= min(settings.recent, max(cache.seen_tokens - settings.sinks, 0))
            newest = cache.layers[0].origins[..., cache.length - recent : cache.length]
            assert (newest == torch.arange(cache.seen_tokens - recent, cache.seen_tokens)).all()
    finally:
        for hook in hooks:
            hook.remove()
    assert cache.seen_tokens == 10_000 and cache.evicted_tokens == 10_000 - cache.length
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    length = cache.length
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, length, head_dim), torch.arange(length)[None])
    for i, layer in enumerate(cache.layers):
        keys_by_origin = torch.cat(raw[i]).view(10_000, -1, head_dim)  # [stream token, kv head, dim], unrotated
        for head in range(keys_by_origin.shape[1]):
            fresh = keys_by_origin[layer.origins[0, head, :length], head]
            expected = fresh * cos[0] + rotate_half(fresh) * sin[0]
            cached = layer.keys[0, head, :length]
            assert ((cached - expected).norm() / expected.norm()).item() <= 1e-5


def test_scores_without_the_observer_are_an_error(loaded):
    """A forward pass that skips the scoring path cannot silently leave tokens unscored."""
    model = loaded.model
    cache = BoundedCache(model, h2o_settings())
    feed(model, cache, [5, 6, 7])
    with torch.inference_mode():
        model(input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True)  # no observer
    with pytest.raises(RuntimeError, match="attention scores"):
        feed(model, cache, [9])


# ----- policies as plug-ins, sessions sharing one model ---------------------------------------------------------


def greedy_session(loaded, **overrides):
    values = {"temperature": 0, "repetition_penalty": 1.0, "max_new_tokens": 25, "slack": 3, **overrides}
    return ChatSession(loaded, load_settings(None, values))


def test_sink_window_stays_on_plain_sdpa():
    fresh = tiny_loaded(seed=1)
    session = greedy_session(fresh, sinks=4, window=40)
    "".join(session.send("Tell me a story about a dragon."))
    assert fresh.model.config._attn_implementation == "sdpa"
    assert attention_kwargs(session.cache) == {}


def test_two_policies_share_one_model():
    """An h2o session and a sink_window session take turns on one model: the sink_window replies equal those of a
    model that never scored, and the h2o session's scores cover exactly its own tokens."""
    shared, alone = tiny_loaded(seed=1), tiny_loaded(seed=1)
    window = greedy_session(shared, sinks=4, window=40)
    scoring = greedy_session(shared, policy="h2o", sinks=4, heavy=20, recent=20)
    reference = greedy_session(alone, sinks=4, window=40)
    assert shared.model.config._attn_implementation == SCORING_ATTENTION
    for text in ["Tell me a story about a dragon.", "What is 2+2?", "Hello there! How are you today?"]:
        assert "".join(window.send(text)) == "".join(reference.send(text))
        "".join(scoring.send(text))
        assert scoring.cache.policy.scored == [scoring.cache.length] * len(scoring.cache.layers)
    assert scoring.cache.evicted_tokens > 0 and window.cache.evicted_tokens > 0
    assert window.cache.stats()["policy"] == "sink_window" and "heavy_tokens" not in window.cache.stats()


class KeepOldest(EvictionPolicy):
    """A policy written only in its own module: keeps the oldest tokens (not useful, but different)."""

    name = "keep_oldest"

    @classmethod
    def budget(cls, settings):
        return settings.sinks + settings.window

    def keep_indices(self, layer_idx, length, keep, protected):
        return torch.arange(keep)


def test_a_new_policy_needs_nothing_outside_its_module(loaded, monkeypatch):
    monkeypatch.setitem(policies.POLICIES, KeepOldest.name, KeepOldest)
    session = greedy_session(loaded, policy="keep_oldest", sinks=4, window=30)
    for text in ["Tell me a story about a dragon.", "What is 2+2?"]:
        "".join(session.send(text))
    assert session.cache.evicted_tokens > 0
    assert session.cache.layers[0].origins[0, 0, :10].tolist() == list(range(10))  # it kept the oldest
    assert session.last_turn.to_dict()["policy"] == "keep_oldest"


# ----- stats, REPL output, settings, saved state ----------------------------------------------------------------


def test_jsonl_reports_policy_heavy_and_recent(loaded, monkeypatch, capsys):
    from streamchat.frontends import repl

    session = greedy_session(loaded, policy="h2o", sinks=4, heavy=20, recent=16)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nTell me a story.\nWhat is 2+2?\n"))
    assert repl.scripted(session) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3
    for record in records:
        assert record["policy"] == "h2o" and record["cache_tokens"] <= record["cache_capacity"] == 40
        assert record["sink_tokens"] + record["heavy_tokens"] + record["recent_tokens"] == record["cache_tokens"]
    assert records[-1]["recent_tokens"] == 16 and records[-1]["evicted_total"] > 0
    assert any("heavy-hitter" in record.get("eviction_note", "") for record in records)
    line = repl.stats_line(records[-1])
    assert "h2o cache" in line and f"{records[-1]['heavy_tokens']} heavy, 16 recent" in line


def test_settings():
    settings = h2o_settings(heavy=32, recent=28)
    assert settings.budget == H2OPolicy.budget(settings) == 4 + 32 + 28
    with pytest.raises(SettingsError, match="h2o_score"):
        h2o_settings(h2o_score="loudest")
    with pytest.raises(SettingsError, match="h2o_decay"):
        h2o_settings(h2o_decay=1.5)
    with pytest.raises(SettingsError, match="recent"):
        h2o_settings(recent=0)
    with pytest.raises(SettingsError, match="heavy"):
        h2o_settings(heavy=-1)
    assert load_settings(CONFIG_DIR / "h2o.yaml").policy == "h2o"


def test_state_round_trip(loaded):
    model = loaded.model
    cache = BoundedCache(model, h2o_settings())
    for chunk in ([1, 2, 3, 4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [22], [23]):
        feed(model, cache, chunk)
    tensors, meta = cache.policy.state()
    restored = H2OPolicy(cache.settings, len(cache.layers))
    restored.load_state(tensors, json.loads(json.dumps(meta)))
    for i in range(len(cache.layers)):
        torch.testing.assert_close(restored.ranking(i, cache.length), cache.policy.ranking(i, cache.length))
    with pytest.raises(ValueError, match="saved as 'normalized'"):
        H2OPolicy(h2o_settings(h2o_score="cumulative"), len(cache.layers)).load_state(tensors, meta)


def test_enable_scoring_refuses_other_attention():
    fresh = tiny_loaded(seed=1)
    fresh.model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="SDPA"):
        attention.enable_scoring(fresh.model)
