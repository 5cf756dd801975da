"""Edges of a turn and of the settings (issue 15 item 3): a stop in prefill inside a multi-byte character, what
prompt_tokens reports after such a stop, a too-small window's error, and what H2O/TOVA report as heavy hitters."""

import threading

import pytest
from streamchat.config import SettingsError, load_settings
from streamchat.session import ChatSession

MULTIBYTE = "Dragon 🐉 café 漢字 ü"


def stopped_after(session: ChatSession, calls: int, text: str) -> None:
    """Send `text`, setting the stop flag after `calls` forward passes (prefill_chunk 1: one token each)."""
    stop, count, forward = threading.Event(), [0], session._forward

    def counting(ids):
        count[0] += 1
        logits = forward(ids)
        if count[0] == calls:
            stop.set()
        return logits

    session._forward = counting
    try:
        "".join(session.send(text, stop))
    finally:
        session._forward = forward


def test_stop_in_prefill_inside_a_character_records_whole_characters(tiny):
    settings = load_settings(None, {"window": 200, "prefill_chunk": 1, "temperature": 0, "max_new_tokens": 2})
    header = len([i for piece, _, _ in ChatSession(tiny, settings).encode_turn("")[0] for i in piece])
    content = len(tiny.tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"])
    for fed in range(1, content):
        session = ChatSession(tiny, settings)
        stopped_after(session, header + fed, MULTIBYTE)
        assert session.last_turn.stop_reason == "stopped_in_prefill"
        recorded = session.messages[-1]
        assert recorded["role"] == "user" and MULTIBYTE.startswith(recorded["content"]), (fed, recorded)
        assert session.cache.seen_tokens == header + fed  # the cache keeps what was fed
        "".join(session.send("Go on."))  # and the conversation goes on
        assert session.last_turn.stop_reason in ("eos", "max_new_tokens")


def test_prompt_tokens_after_a_stop_in_prefill_counts_what_was_processed(tiny):
    settings = load_settings(None, {"window": 200, "prefill_chunk": 4, "temperature": 0, "max_new_tokens": 2})
    session = ChatSession(tiny, settings)
    asked = len([i for piece, _, _ in session.encode_turn(MULTIBYTE * 3)[0] for i in piece])
    stopped_after(session, 2, MULTIBYTE * 3)
    turn = session.last_turn.to_dict()
    assert turn["stop_reason"] == "stopped_in_prefill"
    assert turn["prompt_tokens"] == 8 == session.cache.seen_tokens
    assert turn["prompt_tokens_requested"] == asked > 8
    "".join(session.send("Hi"))
    turn = session.last_turn.to_dict()
    assert turn["prompt_tokens"] == turn["prompt_tokens_requested"] > 0


@pytest.mark.parametrize(
    "overrides,names",
    [
        ({"window": 10}, ["window", "slack", "17"]),
        ({"policy": "h2o", "heavy": 4, "recent": 8, "sinks": 4}, ["heavy", "recent", "slack"]),
    ],
)
def test_a_small_window_error_says_what_to_change(overrides, names):
    with pytest.raises(SettingsError) as error:
        load_settings(None, overrides)
    message = str(error.value)
    for name in names:
        assert name in message, message
    assert "larger" in message and "smaller slack" in message


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_heavy_tokens_are_the_tokens_the_policy_chose(tiny, policy):
    # slack 8 takes all 8 heavy places at an eviction: the policy keeps no heavy hitter, only the window
    settings = load_settings(
        None,
        {
            "policy": policy,
            "sinks": 4,
            "heavy": 8,
            "recent": 16,
            "slack": 8,
            "pin_system_prompt": False,
            "temperature": 0,
            "max_new_tokens": 6,
        },
    )
    session = ChatSession(tiny, settings)
    for text in ["Tell me a story about a dragon.", "What is 2+2?", "Hello there!"]:
        "".join(session.send(text))
        stats = session.cache.stats()
        assert stats["heavy_tokens"] == 0, stats
        assert stats["sink_tokens"] + stats["recent_tokens"] == stats["cache_tokens"]
    assert session.cache.evicted_tokens > 0
    # with room for heavy hitters, it reports the ones it kept at the last eviction
    session = ChatSession(tiny, settings.replace(heavy=12, slack=4))
    for text in ["Tell me a story about a dragon.", "What is 2+2?"]:
        "".join(session.send(text))
    stats = session.cache.stats()
    assert session.cache.evicted_tokens > 0 and stats["heavy_tokens"] == 8
