"""The recall benchmark's design (fact distance, likelihood scoring, distractors) and message-aligned eviction, on the
tiny random-weight model."""

import random

import pytest
import torch
from streamchat import persist
from streamchat.config import SettingsError, load_settings
from streamchat.evaluate import recall
from streamchat.session import ChatSession

PROMPTS = list(recall.BUILTIN_PROMPTS)


def make(tiny, **changes) -> ChatSession:
    values = {
        "sinks": 4,
        "window": 1500,
        "slack": 4,
        "temperature": 0,
        "max_new_tokens": 8,
        "kv_dtype": "float32",
        "decode_path": "transformers",
        "prefill_chunk": 32,
    }
    return ChatSession(tiny, load_settings(None, {**values, **changes}))


def stream_token(session: ChatSession, origin: int) -> int:
    """The token id the session fed at stream index `origin` (it must be among the last `capacity` fed)."""
    recent = list(session._recent_ids)
    return recent[origin - (session.cache.seen_tokens - len(recent))]


def cache_state(session: ChatSession) -> list[torch.Tensor]:
    cache = session.cache
    tensors = [
        getattr(layer, name)[:, :, : layer.length].clone()
        for layer in cache.layers
        for name in ("keys", "raw_keys", "values", "origins")
    ]
    tensors += [t.clone() for t in cache.policy.state()[0].values()]
    return tensors + [torch.tensor([cache.length, cache.seen_tokens, cache.evicted_tokens, *cache.message_starts])]


def test_fact_is_planted_at_the_requested_distance(tiny):
    session = make(tiny)
    script = recall.facts_script(random.Random(3), 3, 4, PROMPTS)  # trial 3: a locker code
    records = recall.run_trial(session, script, [120, 400])
    tokenizer = tiny.tokenizer
    fed = tokenizer.decode(list(session._recent_ids))
    assert fed.count(script.plant[0]) == 1  # the fact sits in the stream once, as typed
    for record, distance in zip(records, (120, 400)):
        assert distance - 40 <= record["realized_distance"] <= distance  # the last filler is trimmed to fit
        assert record["retained"] == 1.0  # the window holds everything here
    # The realized distance is the token count between the planted exchange's end and the probe.
    plant_tokens = session.exchange_tokens(*script.plant)
    text_after_plant = tokenizer.decode(list(session._recent_ids)[-records[-1]["realized_distance"] :])
    assert script.plant[0] not in text_after_plant and script.plant[1] not in text_after_plant
    before = tokenizer.decode(list(session._recent_ids)[-records[-1]["realized_distance"] - plant_tokens :])
    assert before.count(script.plant[0]) == 1


def test_likelihood_scoring_matches_a_naive_forward(tiny):
    session = make(tiny)
    session.feed_exchange("Hello there! How are you today?", "I am fine, thank you.")
    session.feed_exchange("What is 2+2?", "The answer is 4.")
    history = list(session._recent_ids)
    candidates = [" 4", " 5 dragons", " castle by the sea"]
    scores = session.score_reply("Tell me a story", candidates, "Numbers")
    pieces, _ = session.encode_turn("Tell me a story")
    context = history + [i for ids, _, _ in pieces for i in ids] + session._tokenize("Numbers", True)
    for candidate, score in zip(candidates, scores):
        tail = session._tokenize("Numbers" + candidate, True)[len(session._tokenize("Numbers", True)) :]
        ids = torch.tensor([context + tail])
        with torch.inference_mode():
            logits = tiny.model(input_ids=ids).logits[0].double()
        logprobs = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
        naive = logprobs.gather(-1, torch.tensor(tail)[:, None]).sum()
        assert float(score) == pytest.approx(float(naive), abs=1e-3)
    assert len(set(scores.tolist())) == 3


@pytest.mark.parametrize("policy", ["sink_window", "h2o"])
def test_scoring_leaves_the_conversation_unchanged(tiny, policy):
    session = make(tiny, window=60, heavy=24, recent=36, policy=policy, evict_unit="message")
    for turn in PROMPTS[:3]:
        session.feed_exchange(turn, recall.ASSISTANT_FILLER[:80])
    assert session.cache.evicted_tokens > 0
    before, messages, template = cache_state(session), list(session.messages), session._fed_template
    session.score_reply("What is my name?" * 3, [" Alice", " Bruno and Chloe"], "Your name is")
    after = cache_state(session)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
    assert session.messages == messages and session._fed_template == template


def test_distractors_never_include_the_answer():
    rng = random.Random(0)
    for _ in range(200):
        values = [str(v) for v in rng.sample(range(100), 12)]
        answer = rng.choice(values)
        drawn = recall.draw_distractors(rng, values + [answer], answer, 6)
        assert answer not in drawn and len(set(drawn)) == 6
    for trial in range(8):
        for script in (
            recall.facts_script(random.Random(trial), trial, 4, PROMPTS),
            recall.lines_script(random.Random(trial), trial, 4, total_lines=40),
        ):
            true = script.candidates[script.answer]
            assert script.candidates.count(true) == 1 and len(set(script.candidates)) == 5
            assert true.strip() in script.plant[0]
    with pytest.raises(recall.RecallError):
        recall.draw_distractors(rng, ["a", "b"], "a", 2)


def test_message_eviction_never_starts_mid_message(tiny):
    session = make(tiny, window=72, evict_unit="message", prefill_chunk=16)
    start_id = tiny.tokenizer.convert_tokens_to_ids("<|im_start|>")
    rng = random.Random(1)
    starts_seen = 0
    for turn in range(14):
        words = recall.ASSISTANT_FILLER.split()[: rng.randint(2, 12)]
        if turn % 3 == 2:
            "".join(session.send(" ".join(words)))
        else:
            session.feed_exchange(rng.choice(PROMPTS)[:30], " ".join(words))
        cache = session.cache
        assert cache.length <= cache.capacity
        first = cache.protected
        if cache.evicted_tokens and cache.length > first:
            origin = int(cache.layers[0].origins[0, 0, first])
            assert stream_token(session, origin) == start_id  # a role header right after the pinned part
            starts_seen += 1
    assert starts_seen >= 5
    # The same conversation token by token does start mid-message (so the check above can fail).
    token_level = make(tiny, window=72, prefill_chunk=16)
    mid = 0
    for turn in range(8):
        token_level.feed_exchange(PROMPTS[turn % 8][:30], " ".join(recall.ASSISTANT_FILLER.split()[: 3 + turn]))
        origin = int(token_level.cache.layers[0].origins[0, 0, token_level.cache.protected])
        mid += stream_token(token_level, origin) != start_id
    assert mid > 0


def test_a_message_longer_than_the_window_streams_through(tiny):
    session = make(tiny, window=40, evict_unit="message", prefill_chunk=8)
    session.feed_exchange("Hi", "Hello")
    long_reply = " ".join(recall.ASSISTANT_FILLER.split()[:60])  # far longer than the window
    session.feed_exchange("Tell me a story", long_reply)
    cache = session.cache
    assert cache.length <= cache.capacity and cache.evicted_tokens > 60
    assert cache.length > cache.protected + 20  # the window was not emptied: it rolled token by token


@pytest.mark.parametrize("policy", ["sink_window", "h2o", "tova"])
def test_recall_run_keeps_the_cache_within_budget(tiny, tmp_path, policy, monkeypatch):
    peaks = []
    original = ChatSession._forward

    def watched(self, ids):
        logits = original(self, ids)
        peaks.append(self.cache.length)
        return logits

    monkeypatch.setattr(ChatSession, "_forward", watched)
    settings = load_settings(None, {"sinks": 4, "kv_dtype": "float32"})
    names = [policy, "sink_message"] if policy == "sink_window" else [policy]
    report = recall.run_recall(tiny, settings, [96], names, [60, 200], 2, 0, PROMPTS, out=tmp_path, show_progress=False)
    assert peaks and max(peaks) <= 96
    assert {row["policy"] for row in report["rows"]} == set(names)
    assert all(row["retained"] == 0 for row in report["rows"] if row["distance"] == 200)  # evicted by then
    assert (tmp_path / "recall.csv").exists() and (tmp_path / "recall.png").exists()


def test_saved_session_keeps_message_boundaries(tiny, tmp_path):
    values = {"sessions_dir": str(tmp_path), "window": 60, "evict_unit": "message"}
    original = make(tiny, **values)
    for turn in PROMPTS[:3]:
        original.feed_exchange(turn[:25], "Fine, thanks.")
    assert original.cache.evicted_tokens and original.cache.message_starts
    persist.save(original, "chat")
    fresh = make(tiny, sessions_dir=str(tmp_path))
    persist.load(fresh, "chat")
    assert fresh.cache.message_starts == original.cache.message_starts
    for session in (original, fresh):
        session.feed_exchange(PROMPTS[4], "A longer answer with several words in it.")
    a, b = cache_state(fresh), cache_state(original)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_evict_unit_is_validated():
    with pytest.raises(SettingsError, match="evict_unit"):
        load_settings(None, {"evict_unit": "paragraph"})


def test_ppl_paragraph_starts_mark_the_first_token_after_a_blank_line(tiny):
    from streamchat.evaluate.ppl import paragraph_starts

    text = "Hello there! How are you?\n\nTell me a story.\n\n\nWhat is 2+2?"
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = sorted(paragraph_starts(tiny.tokenizer, text, len(ids)))
    assert [tiny.tokenizer.decode(ids[i:]).startswith(("Tell", "What")) for i in starts] == [True, True]
    assert paragraph_starts(tiny.tokenizer, text, starts[0]) == frozenset()  # only among the first `count` tokens


def test_the_memory_row_reports_whether_the_probe_brought_the_fact_back(tiny, tmp_path):
    settings = load_settings(None, {"sinks": 4, "kv_dtype": "float32"})
    report = recall.run_recall(
        tiny, settings, [128], ["memory"], [400], 2, 0, PROMPTS, out=tmp_path, show_progress=False
    )
    records = [r for r in report["records"] if r["policy"] == "memory"]
    assert records and all(r["fact_recalled"] for r in records)  # the benchmark's probes name the fact's words
    assert report["rows"][0]["recalled"] == 1.0 and report["rows"][0]["retained"] == 0
