"""The web UI without a browser: the session registry, a tab's chat state, and the API through gradio_client.

The server runs the tiny random model on 127.0.0.1 with a free port, in this process.
"""

from __future__ import annotations

import time

import pytest
import torch
from streamchat.config import load_settings
from streamchat.frontends.web_sessions import SessionLimitError, SessionRegistry
from streamchat.frontends.web_state import MemoryHistory, UISession

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # from gradio's queue
SETTINGS = {"sinks": 4, "window": 60, "max_new_tokens": 30, "seed": 0}


def endless_talker():
    """The tiny model, made never to end a reply by itself (a large negative output bias on its special tokens),
    so a test can stop a reply in the middle for sure."""
    from tiny import SPECIALS, tiny_loaded

    loaded = tiny_loaded()
    head = loaded.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[[loaded.tokenizer.convert_tokens_to_ids(token) for token in SPECIALS]] = -1e4
    loaded.model.lm_head = biased
    return loaded


# ----- session registry -------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Thing:
    def __init__(self, name: str):
        self.name, self.busy, self.freed = name, False, False


def registry(max_sessions=3, idle_seconds=100.0):
    clock = Clock()
    made = []

    def factory():
        made.append(Thing(f"s{len(made)}"))
        return made[-1]

    reg = SessionRegistry(
        factory,
        max_sessions,
        idle_seconds,
        is_busy=lambda t: t.busy,
        on_free=lambda t: setattr(t, "freed", True),
        clock=clock,
    )
    return reg, clock, made


def test_registry_gives_each_key_its_own_session():
    reg, _, _ = registry()
    a, created_a = reg.get("a")
    b, created_b = reg.get("b")
    again, created_again = reg.get("a")
    assert created_a and created_b and not created_again
    assert again is a and a is not b
    assert len(reg) == 2


def test_registry_cap_frees_the_least_recently_used_idle_session():
    reg, clock, made = registry(max_sessions=2)
    reg.get("a")
    clock.now = 1
    reg.get("b")
    clock.now = 2
    reg.get("a")  # a is now the most recently used
    clock.now = 3
    reg.get("c")
    assert "b" not in reg and "a" in reg and "c" in reg
    assert made[1].freed and not made[0].freed
    assert reg.was_freed_idle("b")


def test_registry_never_frees_a_busy_session_and_says_when_full():
    reg, _, made = registry(max_sessions=2)
    reg.get("a")[0].busy = True
    reg.get("b")
    reg.get("c")  # frees b (a is busy although older)
    assert "a" in reg and "b" not in reg
    reg.peek("c").busy = True
    with pytest.raises(SessionLimitError, match="2 chat sessions"):
        reg.get("d")
    assert len(reg) == 2


def test_registry_sweep_frees_idle_sessions_only():
    reg, clock, made = registry(idle_seconds=10)
    reg.get("old")
    reg.get("busy")[0].busy = True
    clock.now = 8
    reg.get("recent")
    clock.now = 15
    assert reg.peek("old") is made[0]  # peek does not refresh
    assert reg.sweep() == ["old"]
    assert made[0].freed and "busy" in reg and "recent" in reg
    assert reg.get("old")[1]  # a new one, and the registry knows the old one was freed
    assert reg.was_freed_idle("old")


def test_registry_release_and_close_free_sessions():
    reg, _, made = registry()
    reg.get("a")
    reg.get("b")
    assert reg.release("a") and not reg.release("a")
    assert made[0].freed and not made[1].freed
    reg.close()
    assert made[1].freed and len(reg) == 0


# ----- one tab's chat state ---------------------------------------------------------------------------------


def test_memory_history_stays_bounded_and_spread():
    history = MemoryHistory(limit=50)
    for seen in range(10_000):
        history.add({"seen_total": seen, "kv_bytes": 1, "rss_bytes": 2, "cache_tokens": 3, "cache_capacity": 4})
    points = history.points()
    assert 25 <= len(points) <= 50
    xs = [p[0] for p in points]
    assert xs == sorted(xs) and xs[0] == 0 and xs[-1] > 9_000


def test_ui_session_streams_a_reply_and_notes_evictions(tiny):
    session = UISession(tiny, load_settings(overrides=SETTINGS), max_visible=60)
    story = "Tell me a story about a dragon who lived in a castle by the sea."
    pages = list(session.stream_turn(story))
    assert len(pages) >= 3
    assert pages[-1][0] == {"role": "user", "content": story}
    assert pages[-1][1]["role"] == "assistant" and pages[-1][1]["content"]
    for _ in range(3):
        pages = list(session.stream_turn("Hello there! How are you today?"))
    stats = session.stats()
    assert stats["evicted_total"] > 0 and stats["cache_tokens"] <= stats["cache_capacity"] == 64
    notes = [m for m in pages[-1] if m.get("metadata", {}).get("title", "").startswith("Memory:")]
    assert notes, "a turn that evicts tokens must say so in the chat"
    assert "evicted" in notes[-1]["content"]


def test_ui_session_page_stays_bounded(tiny):
    session = UISession(tiny, load_settings(overrides={**SETTINGS, "max_new_tokens": 2}), max_visible=6)
    for i in range(5):
        list(session.stream_turn(f"message {i}"))
    page = session.page_messages()
    assert session.dropped_messages > 0
    assert len(page) == 7 and "not shown" in page[0]["metadata"]["title"]
    assert [m["content"] for m in page if m["role"] == "user"][-1] == "message 4"


def test_ui_session_stop_before_start_and_bad_input(tiny):
    session = UISession(tiny, load_settings(overrides=SETTINGS))
    session.arm_stop().set()
    page = list(session.stream_turn("Hello"))[-1]
    assert "stopped before it started" in page[-1]["content"]
    assert session.chat.turns == 0
    session.arm_stop()
    page = list(session.stream_turn("   "))[-1]
    assert page == [m for m in page if m["content"] != "   "]  # the refused message leaves no bubble
    assert "empty message" in session.notice
    assert not session.busy
    session.pending = "waiting in the queue"
    session.request_stop()  # Stop before the turn started: the waiting message is dropped, the tab is free
    assert session.pending is None and not session.busy


def test_ui_session_demo_reads_the_prompts_file(tiny, tmp_path):
    from streamchat.prompts import PromptsError

    script = tmp_path / "script.txt"
    script.write_text("first line\n\nsecond line\n", encoding="utf-8")
    session = UISession(tiny, load_settings(overrides={**SETTINGS, "prompts_file": str(script)}))
    session.start_demo()
    assert session.demo_running and session.busy
    assert [session.next_demo_prompt() for _ in range(3)] == ["first line", "second line", "first line"]
    session.request_stop()
    assert not session.demo_running and session.stop.is_set()
    missing = UISession(tiny, load_settings(overrides={**SETTINGS, "prompts_file": str(tmp_path / "nope.txt")}))
    with pytest.raises(PromptsError, match="not found"):
        missing.start_demo()
    assert not missing.demo_running


def test_chat_app_frees_idle_sessions_and_says_so(tiny):
    import gradio as gr
    from streamchat.frontends.web import ChatApp

    app = ChatApp(tiny, load_settings(overrides=SETTINGS), max_sessions=2, idle_seconds=60)
    app.sessions.clock = clock = Clock()
    first, second = gr.Request(session_hash="first"), gr.Request(session_hash="second")
    session = app.session(first)
    list(session.stream_turn("Hello there!"))
    assert app.session(first) is session and session.chat.turns == 1
    clock.now = 61
    app.session(second)  # any lookup sweeps
    assert app.sessions.peek("first") is None and len(app.sessions) == 1
    renewed = app.session(first)
    assert renewed is not session and renewed.chat.turns == 0
    assert "freed after" in app._status(renewed, "")
    assert session.stop.is_set(), "a freed session is told to stop"


# ----- the API, through gradio_client -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    gradio_client = pytest.importorskip("gradio_client")
    from streamchat.frontends.web import build_app, launch

    blocks = build_app(endless_talker(), load_settings(overrides=SETTINGS), max_sessions=4)
    _, url, _ = launch(blocks, port=None, prevent_thread_lock=True, quiet=True)
    yield blocks, url, gradio_client.Client
    blocks.close()
    blocks.chat_app.sessions.close()


def client(server):
    _, url, Client = server
    return Client(url, verbose=False)


def test_api_chat_round_trip_and_stats(server):
    c = client(server)
    reply = c.predict("Hello there! How are you today?", api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
    stats = c.predict(api_name="/stats")
    for key in (
        "kv_bytes",
        "kv_mb",
        "cache_tokens",
        "cache_capacity",
        "sink_tokens",
        "heavy_tokens",
        "recent_tokens",
        "seen_total",
        "evicted_total",
        "rss_mb",
        "decode_tokens_per_s",
        "ttft_s",
        "turns",
    ):
        assert key in stats, key
    assert stats["turns"] == 1 and stats["cache_capacity"] == 64
    assert stats["kv_bytes"] > 0 and stats["rss_mb"] > 10
    assert 0 < stats["cache_tokens"] <= 64 and stats["seen_total"] >= stats["cache_tokens"]
    assert stats["sink_tokens"] + stats["heavy_tokens"] + stats["recent_tokens"] == stats["cache_tokens"]
    assert stats["ttft_s"] > 0 and stats["decode_tokens_per_s"] > 0


def test_api_streams_chunks(server):
    c = client(server)
    job = c.submit("Tell me a story about a dragon.", 300, api_name="/chat")
    chunks = list(job)
    assert len(chunks) >= 3, chunks
    growing = [chunk for chunk in chunks if "*(" not in chunk]
    assert all(b.startswith(a) for a, b in zip(growing, growing[1:])), "each chunk extends the reply so far"
    assert chunks[-1] == job.result()


def test_api_stop_mid_reply_then_chat_again(server):
    c = client(server)
    job = c.submit("Tell me a very long story.", 100_000, api_name="/chat")
    deadline = time.monotonic() + 30
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "no streamed output before the deadline"
    assert c.predict(api_name="/stop") == "stopping"
    assert job.result().endswith("*(stopped)*")
    stats = c.predict(api_name="/stats")
    assert stats["last_stop_reason"] == "stopped" and stats["last_new_tokens"] < 100_000
    assert stats["evicted_total"] >= 0 and not stats["generating"]
    reply = c.predict("Hello there!", 5, api_name="/chat")
    assert reply.strip() and "stopped" not in reply
    assert c.predict(api_name="/stats")["turns"] == 2
    assert c.predict(api_name="/stop") == "nothing is running"
    with pytest.raises(Exception, match="empty message"):
        c.predict("   ", api_name="/chat")
    assert c.predict(api_name="/stats")["turns"] == 2


def test_api_clients_have_separate_conversations(server):
    a, b = client(server), client(server)
    a.predict("Hello there!", 10, api_name="/chat")
    a.predict("What is 2+2?", 10, api_name="/chat")
    stats_a, stats_b = a.predict(api_name="/stats"), b.predict(api_name="/stats")
    assert stats_a["turns"] == 2 and stats_b["turns"] == 0
    assert stats_b["seen_total"] == 0 < stats_a["seen_total"]
    assert stats_a["live_sessions"] >= 2


def test_api_cache_settings_start_a_new_conversation(server):
    c = client(server)
    c.predict("Hello there!", 5, api_name="/chat")
    kept = c.predict({"temperature": 0.5}, api_name="/configure")
    assert kept["reset"] is False and c.predict(api_name="/stats")["turns"] == 1
    reset = c.predict({"window": 40}, api_name="/configure")
    assert reset["reset"] is True and reset["settings"]["window"] == 40
    stats = c.predict(api_name="/stats")
    assert stats["turns"] == 0 and stats["cache_capacity"] == 44
    with pytest.raises(Exception, match="window"):
        c.predict({"window": 0}, api_name="/configure")
    assert c.predict(api_name="/stats")["cache_capacity"] == 44  # a refused change leaves the session as it was


def test_api_h2o_policy_splits_the_cache(server):
    c = client(server)
    reset = c.predict({"policy": "h2o", "sinks": 4, "heavy": 32, "recent": 24}, api_name="/configure")
    assert reset["reset"] is True
    c.predict("Tell me a story about a dragon.", 120, api_name="/chat")
    stats = c.predict(api_name="/stats")
    assert stats["policy"] == "h2o" and stats["cache_capacity"] == 60
    assert stats["evicted_total"] > 0 and stats["heavy_tokens"] > 0
    assert stats["sink_tokens"] + stats["heavy_tokens"] + stats["recent_tokens"] == stats["cache_tokens"]
