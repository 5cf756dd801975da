"""Stopping a turn (Ctrl+C in the REPL, Stop in the UI) during prefill or decode leaves the session consistent:
the cache holds exactly the tokens fed, the recorded conversation says what the cache holds, and the next turn
works."""

import os
import signal
import threading

import pytest
from streamchat.config import load_settings
from streamchat.frontends.repl import stop_on_ctrl_c
from streamchat.session import _PLACEHOLDER, ChatSession

LONG = "Tell me a story about a dragon who lived in a castle by the sea. " * 6


class FeedRecorder:
    """Wraps session._forward: records every id fed and sets the stop event after forward call `stop_at`."""

    def __init__(self, session: ChatSession, stop: threading.Event, stop_at: int | None = None):
        self.fed: list[int] = []
        self.calls = 0
        self.stop_at = stop_at
        forward = session._forward

        def recording_forward(ids):
            self.calls += 1
            self.fed.extend(ids)
            logits = forward(ids)
            if self.calls == self.stop_at:
                stop.set()
            return logits

        session._forward = recording_forward


def expand(session: ChatSession) -> str:
    """The stream the session believes it fed: its placeholder-form template with the contents put back."""
    return _PLACEHOLDER.sub(lambda m: session.messages[int(m.group(1))]["content"], session._fed_template)


def decode(session: ChatSession, ids: list[int]) -> str:
    return session.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def assert_consistent(session: ChatSession, recorder: FeedRecorder) -> None:
    assert session.cache.seen_tokens == len(recorder.fed)
    assert 0 < session.cache.length <= session.cache.capacity
    assert list(session._recent_ids) == recorder.fed[-len(session._recent_ids) :]
    origins = session.cache.layers[0].origins[0, 0, : session.cache.length].tolist()
    assert origins == sorted(origins) and origins[-1] == len(recorder.fed) - 1  # the newest token is the last fed
    # (U+FFFD aside: the random tiny model emits byte tokens that are not valid UTF-8, which a reply's text drops)
    fed_text = decode(session, recorder.fed + session._pending)
    assert expand(session).replace("\ufffd", "") == fed_text.replace("\ufffd", "")
    full = session._render(session.messages, add_generation_prompt=False)
    assert full.startswith(session._fed_template) or session._fed_template.startswith(full)


@pytest.fixture()
def session(tiny):
    settings = load_settings(None, {"window": 60, "temperature": 0, "max_new_tokens": 12, "prefill_chunk": 8})
    return ChatSession(tiny, settings)


@pytest.mark.parametrize("stop_at", [1, 3, 7])
def test_stop_during_prefill(session, stop_at):
    stop = threading.Event()
    recorder = FeedRecorder(session, stop)
    "".join(session.send("Hello there!"))
    calls_before = recorder.stop_at = recorder.calls
    recorder.stop_at += stop_at
    assert "".join(session.send(LONG, stop)) == ""
    assert session.last_turn.stop_reason == "stopped_in_prefill"
    assert recorder.calls - calls_before == stop_at
    assert_consistent(session, recorder)
    stop.clear()
    "".join(session.send("What is 2+2?"))
    assert session.last_turn.stop_reason == "max_new_tokens" and session.last_turn.new_tokens == 12
    assert_consistent(session, recorder)


@pytest.mark.parametrize("decode_steps", [1, 5])
def test_stop_during_decode(session, decode_steps):
    stop = threading.Event()
    prefill_calls = -(-len([i for p in session.encode_turn(LONG)[0] for i in p[0]]) // 8)
    recorder = FeedRecorder(session, stop, prefill_calls + decode_steps)
    "".join(session.send(LONG, stop))
    assert session.last_turn.stop_reason == "stopped"
    assert session.last_turn.new_tokens == decode_steps + 1  # the token sampled after the stop is kept pending
    assert len(session._pending) == 1
    assert session.messages[-1]["role"] == "assistant"
    assert_consistent(session, recorder)
    stop.clear()
    "".join(session.send("Go on.", stop))
    assert session.last_turn.stop_reason == "max_new_tokens"
    assert_consistent(session, recorder)


def test_stop_before_anything_was_fed(session):
    stop = threading.Event()
    recorder = FeedRecorder(session, stop)
    stop.set()
    assert "".join(session.send(LONG, stop)) == ""
    assert recorder.fed == [] and session.visible_messages == [] and session.cache.seen_tokens == 0
    stop.clear()
    "".join(session.send("Hello there!", stop))
    assert_consistent(session, recorder)


def test_stop_from_another_thread(session):
    """The UI's way: a Stop button sets the event from another thread while the reply streams."""
    stop = threading.Event()
    recorder = FeedRecorder(session, threading.Event())
    pieces = session.send(LONG, stop)
    next(pieces)  # decoding has started
    threading.Thread(target=stop.set).start()
    rest = list(pieces)
    assert session.last_turn.stop_reason == "stopped" and len(rest) < 12
    assert_consistent(session, recorder)
    stop.clear()
    "".join(session.send("Go on.", stop))
    assert_consistent(session, recorder)


def test_closing_the_stream_early_keeps_the_cache_consistent(session):
    """A client that disconnects mid-reply closes the generator: same as a stop."""
    stop = threading.Event()
    recorder = FeedRecorder(session, stop)
    pieces = session.send(LONG)
    next(pieces)
    pieces.close()
    assert session.last_turn.stop_reason == "stopped" and not session.busy
    assert_consistent(session, recorder)
    "".join(session.send("Go on."))
    assert_consistent(session, recorder)


def test_ctrl_c_sets_the_stop_flag_and_is_restored():
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    with stop_on_ctrl_c(stop):
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.is_set()
    assert signal.getsignal(signal.SIGINT) is previous
