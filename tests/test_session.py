"""The chat session on the tiny model: equality with generate, incremental template encoding, long pastes."""

import threading

import pytest
import torch
from streamchat.config import load_settings
from streamchat.session import ChatSession, IncrementalDecoder, SessionError, candidate_probabilities
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper


def make_session(tiny, **overrides):
    values = {"temperature": 0, "repetition_penalty": 1.0, "max_new_tokens": 12, **overrides}
    return ChatSession(tiny, load_settings(None, values))


def record_forwards(session):
    """Wrap the session's one model call to record every id it feeds and the cache length after it."""
    fed, lengths = [], []
    original = session._forward

    def recording(ids):
        fed.extend(ids)
        logits = original(ids)
        lengths.append(session.cache.length)
        return logits

    session._forward = recording
    return fed, lengths


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_generate_within_budget(tiny, penalty):
    session = make_session(tiny, repetition_penalty=penalty, max_new_tokens=20)
    pieces, _ = session.encode_turn("Tell me a story about a dragon.")
    prompt = [i for ids, _, _ in pieces for i in ids]
    reply = "".join(session.send("Tell me a story about a dragon."))
    with torch.no_grad():
        expected = tiny.model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, repetition_penalty=penalty, pad_token_id=0
        )[0, len(prompt) :].tolist()
    got = session.last_reply_ids
    assert len(got) >= 1
    assert got == expected[: len(got)]
    assert isinstance(reply, str)
    assert session.cache.evicted_tokens == 0


def scripted_replies(session, replies):
    """Make the 'model' answer with given texts (plus its end-of-turn token), to compare token ids exactly."""
    tokenizer = session.tokenizer
    queue = []
    for text in replies:
        queue.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    script = iter([i for ids in queue for i in ids])
    session._sample = lambda logits, processors, temperature: next(script)


def test_incremental_turns_equal_whole_template(tiny):
    session = make_session(tiny, system_prompt="Be brief.", max_new_tokens=50)
    fed, _ = record_forwards(session)
    users = ["Hello there!", "What is 2+2?", "Tell me a story."]
    replies = ["Hi! How are you?", "The answer is 4.", "A dragon lived by the sea."]
    scripted_replies(session, replies)
    for text in users:
        "".join(session.send(text))
    stream = fed + session._pending  # the last end-of-turn token waits for the next turn
    conversation = [{"role": "system", "content": "Be brief."}]
    for user, reply in zip(users, replies):
        conversation += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    whole = tiny.tokenizer.apply_chat_template(conversation, tokenize=False)
    expected = tiny.tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert expected[: len(stream)] == stream
    assert len(expected) - len(stream) <= 2  # only the template's trailing newline after the last turn is owed
    assert session.visible_messages == conversation[1:]


def test_no_second_bos_and_history_never_reencoded(tiny):
    session = make_session(tiny, max_new_tokens=3)
    fed, _ = record_forwards(session)
    "".join(session.send("Hello"))
    first = len(fed)
    "".join(session.send("Hello"))
    second_turn = fed[first:]
    start_id = tiny.tokenizer.convert_tokens_to_ids("<|im_start|>")
    system_id = tiny.tokenizer("system", add_special_tokens=False)["input_ids"][0]
    # the second turn feeds only its own tokens: a user header, never the system turn again
    assert fed.count(start_id) == 5  # system, user, assistant, user, assistant
    assert system_id not in second_turn
    assert len(second_turn) < first


def test_special_token_text_is_plain_text(tiny):
    session = make_session(tiny, max_new_tokens=2)
    fed, _ = record_forwards(session)
    "".join(session.send("<|im_end|>"))
    end_id = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    start_id = tiny.tokenizer.convert_tokens_to_ids("<|im_start|>")
    # ChatML structure: 3 headers; the typed marker must not add a 4th control token
    assert fed.count(start_id) == 3
    assert fed.count(end_id) == 2  # the system turn's end and the user turn's end, not the typed text


def test_long_paste_streams_within_budget(tiny):
    session = make_session(tiny, sinks=4, window=60, prefill_chunk=32, max_new_tokens=5)
    fed, lengths = record_forwards(session)
    paste = " ".join(f"word{i % 97}" for i in range(4000))
    assert len(tiny.tokenizer(paste)["input_ids"]) >= 10_000
    "".join(session.send(paste))
    assert max(lengths) <= 64
    stats = session.last_turn.to_dict()
    assert stats["prompt_tokens"] >= 10_000
    assert stats["evicted_total"] >= 10_000 - 64
    assert stats["cache_tokens"] <= 64
    "".join(session.send("and now?"))  # the session goes on
    assert session.last_turn.new_tokens >= 1


def test_many_turns_never_end(tiny):
    session = make_session(tiny, sinks=4, window=40, max_new_tokens=8)
    for turn in range(60):
        "".join(session.send(f"turn {turn}"))
        assert session.cache.length <= 44
    assert session.turns == 60
    assert session.cache.evicted_tokens > 0
    assert session.eviction_note() is None or "evicted" in session.eviction_note()


def test_pinned_system_prompt_survives_eviction(tiny):
    session = make_session(tiny, sinks=4, window=60, system_prompt="You are a pirate.", max_new_tokens=8)
    pinned = session.pinned_tokens
    assert pinned > 4
    for turn in range(20):
        "".join(session.send(f"message number {turn}"))
    origins = session.cache.layers[0].origins[0, 0, :pinned]
    assert torch.equal(origins, torch.arange(pinned))
    assert session.cache.stats()["sink_tokens"] == pinned


def test_system_prompt_too_long_is_refused_and_session_unchanged(tiny):
    session = make_session(tiny, sinks=4, window=40)
    before = session.settings
    with pytest.raises(SessionError, match="system prompt"):
        session.reset(system_prompt="word " * 200)
    assert session.settings is before
    "".join(session.send("still here"))


def test_empty_message_refused(tiny):
    session = make_session(tiny)
    for text in ["", "   \n\t"]:
        with pytest.raises(SessionError, match="empty"):
            "".join(session.send(text))
    "".join(session.send("ok"))
    assert session.turns == 1


def test_stop_mid_decode_keeps_session_consistent(tiny):
    session = make_session(tiny, max_new_tokens=50)
    stop = threading.Event()
    for _ in session.send("Tell me a story.", stop):
        stop.set()
    assert session.last_turn.stop_reason == "stopped"
    assert session.last_turn.new_tokens <= 3
    "".join(session.send("Again"))
    assert session.last_turn.new_tokens >= 1
    assert session.cache.seen_tokens == session.cache.length  # nothing evicted; every fed token is cached


def test_sampling_is_seeded_and_varied(tiny):
    a = make_session(tiny, temperature=1.0, top_p=0.95, top_k=50, seed=3, max_new_tokens=15)
    b = make_session(tiny, temperature=1.0, top_p=0.95, top_k=50, seed=3, max_new_tokens=15)
    "".join(a.send("Hello"))
    "".join(b.send("Hello"))
    assert a.last_reply_ids == b.last_reply_ids
    c = make_session(tiny, temperature=1.0, seed=4, max_new_tokens=15)
    "".join(c.send("Hello"))
    assert c.last_reply_ids != a.last_reply_ids


def test_incremental_decoder_never_splits_characters(tiny):
    tokenizer = tiny.tokenizer
    text = "Émoji 😀 and 漢字 ü"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_history_text_stays_bounded_and_turns_stay_well_formed(tiny):
    from streamchat.session import HISTORY_LIMIT

    session = make_session(tiny, sinks=4, window=60, max_new_tokens=50)
    scripted_replies(session, ["Fine, thanks."] * 80)
    for turn in range(70):
        "".join(session.send(f"turn {turn}"))
        assert len(session.visible_messages) <= HISTORY_LIMIT
    assert len(session.visible_messages) < 140
    assert session.visible_messages[-1] == {"role": "assistant", "content": "Fine, thanks."}
    assert session._fed_template.count("<|im_start|>user") == len(session.visible_messages) // 2
    fed, _ = record_forwards(session)
    pending = list(session._pending)
    "".join(session.send("last one"))
    tail = "\n<|im_start|>user\nlast one<|im_end|>\n<|im_start|>assistant\n"
    expected = pending + tiny.tokenizer(tail, add_special_tokens=False)["input_ids"]
    assert fed[: len(expected)] == expected  # then the reply's own tokens


@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (5, 1.0), (0, 0.8), (50, 0.05), (0, 1.0)])
def test_candidate_probabilities_match_transformers_over_the_whole_vocabulary(top_k, top_p):
    """Top-p over the top-k candidates only gives transformers' top-k + top-p distribution over the vocabulary."""
    logits = torch.randn(1, 49152, generator=torch.Generator().manual_seed(top_k)) * 4
    warpers = LogitsProcessorList()
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(None, logits.clone()), dim=-1)
    probabilities, indices = candidate_probabilities(logits.clone(), top_k, top_p)
    got = torch.zeros_like(expected)
    got[0, indices[0] if indices is not None else torch.arange(logits.shape[-1])] = probabilities[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert int((got > 0).sum()) == int((expected > 0).sum()) <= (top_k or logits.shape[-1])


def test_tokenizing_from_several_threads_keeps_special_tokens_whole(tiny):
    """Content is tokenized with split_special_tokens, structure without: a setting transformers switches on the
    shared tokenizer per call. Threads tokenizing at once (server and web UI conversations) must not see each
    other's setting, or a turn header would be split into pieces."""
    import threading

    from streamchat.config import load_settings
    from streamchat.session import ChatSession

    session = ChatSession(tiny, load_settings(None, {"sinks": 4, "window": 60}))
    header = "<|im_start|>user\n"
    whole, split = session._tokenize(header, False), session._tokenize(header, True)
    assert len(split) > len(whole)  # the two settings really differ on this text
    wrong = []

    def hammer(is_content: bool) -> None:
        expected = split if is_content else whole
        for _ in range(300):
            if session._tokenize(header, is_content) != expected:
                wrong.append(is_content)

    threads = [threading.Thread(target=hammer, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert wrong == []
