"""The browser chat (Gradio 6): streaming replies, Stop, retry, settings, a live memory panel and an endless demo.

Every browser tab gets its own `UISession` (its own ChatSession and KV cache; the model weights are loaded once
and shared) from a `SessionRegistry` that caps how many live at once and frees idle ones. With the batching engine
(`python -m streamchat ui` / app.py: streamchat/batching.py) tabs reply at the same time, their decode steps batched
into one (up to `--max-sessions` replies at once); without it (build_app(engine=None)) generation runs in one queue
slot (`concurrency_id="generate"`, limit 1). Everything light (Stop, the memory panel's 1 s timer, settings)
bypasses that slot so it answers while a reply streams. The same process serves the OpenAI-compatible API at /v1
(`serve_with_api`, frontends/server.py) over the same engine.

The endless demo is driven by a timer whose every tick runs one scripted turn as its own queued job, so a demo
left running still lets other tabs take their turn.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import pandas as pd

from streamchat import persist
from streamchat.batching import Engine
from streamchat.config import Settings, SettingsError
from streamchat.frontends.web_sessions import SessionLimitError, SessionRegistry
from streamchat.frontends.web_state import UISession
from streamchat.model import LoadedModel, load_for_chat
from streamchat.policies import POLICIES
from streamchat.prompts import PromptsError
from streamchat.session import SessionError, snippet

# Which cache fields each policy reads (the others are hidden); a policy not listed shows them all.
CACHE_FIELDS = ("sinks", "window", "heavy", "recent")
GENERATE = {"concurrency_id": "generate", "concurrency_limit": 1}
LIGHT = {"concurrency_limit": None, "show_progress": "hidden", "api_visibility": "private"}
RETRY_LABEL = "↻ *retry: sent again as a new turn (the model still remembers its earlier answer)*\n\n"
DEMO_LABEL = "*demo:* "

THEME = gr.themes.Soft(
    primary_hue="indigo",
    neutral_hue="slate",
    font=["Inter", "ui-sans-serif", "system-ui", "sans-serif"],  # local fonts only: the page needs no network
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
)
CSS = """
.gradio-container { max-width: 1500px !important; }
#title h1 { margin-bottom: 0; }
#title p { margin-top: 2px; color: var(--body-text-color-subdued); }
#status { min-height: 1.6em; }
.sc-panel { font-size: 14px; }
.sc-state { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 12px;
  background: var(--neutral-200); color: var(--neutral-700); margin-bottom: 8px; }
.sc-state.live { background: #dcfce7; color: #166534; }
.sc-state.demo { background: #e0e7ff; color: #3730a3; }
.sc-grid { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 8px; }
.sc-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px 10px;
  background: var(--background-fill-secondary); }
.sc-card .v { font-size: 20px; font-weight: 700; line-height: 1.25; font-variant-numeric: tabular-nums;
  white-space: nowrap; }
.sc-card .k { font-size: 11px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--body-text-color-subdued); }
.sc-card .s { font-size: 11px; color: var(--body-text-color-subdued); }
.sc-card.wide { grid-column: 1 / -1; }
.sc-bar { display: flex; height: 12px; border-radius: 6px; overflow: hidden; background: var(--neutral-200);
  margin: 6px 0 4px; }
.sc-bar span { display: block; height: 100%; }
.sc-sink { background: #f59e0b; } .sc-heavy { background: #ef4444; } .sc-recent { background: #6366f1; } .sc-recall { background: #10b981; }
.sc-dot { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin: 0 3px 0 8px; }
.sc-note { font-size: 12px; color: var(--body-text-color-subdued); margin-top: 6px; }
"""


def _mb(value: float) -> str:
    if value < 1:
        return f"{value * 1024:,.0f} KB"
    return f"{value:,.1f} MB" if value < 100 else f"{value:,.0f} MB"


def memory_panel_html(stats: dict[str, Any] | None, live_sessions: int, max_sessions: int) -> str:
    """The numbers of the memory panel as a grid of cards, with the cache's sink/heavy/recent split as a bar."""
    if stats is None:
        return (
            '<div class="sc-panel"><span class="sc-state">no conversation</span>'
            '<div class="sc-note">This tab\'s conversation was freed after being idle. Send a message to start a '
            "new one.</div></div>"
        )
    capacity = max(stats["cache_capacity"], 1)
    used, sinks = stats["cache_tokens"], stats["sink_tokens"]
    heavy, recent, recalled = stats["heavy_tokens"], stats["recent_tokens"], stats.get("recalled_tokens", 0)
    if stats["demo_running"]:
        state = '<span class="sc-state demo">● endless demo running</span>'
    elif stats["generating"]:
        state = '<span class="sc-state live">● generating</span>'
    else:
        state = '<span class="sc-state">idle</span>'
    bar = "".join(
        f'<span class="{css}" style="width:{100 * count / capacity:.2f}%"></span>'
        for css, count in (("sc-sink", sinks), ("sc-recall", recalled), ("sc-heavy", heavy), ("sc-recent", recent))
        if count
    )
    pinned, attention_sinks = stats.get("pinned_tokens", 0), stats.get("sinks", sinks)
    if pinned > attention_sinks:  # the pinned system prompt holds the sink places: say which part is which
        named = f"{sinks:,} pinned (system prompt; its first {attention_sinks} are the attention sinks)"
    else:
        named = f"{sinks:,} attention sinks"
    split = f'<span class="sc-dot sc-sink"></span>{named}'
    if stats.get("memory"):
        split += f'<span class="sc-dot sc-recall"></span>{recalled:,} recalled'
    if stats["policy"] != "sink_window" or heavy:
        split += f'<span class="sc-dot sc-heavy"></span>{heavy:,} heavy'
    split += f'<span class="sc-dot sc-recent"></span>{recent:,} recent · {capacity - used:,} free'

    def card(key: str, value: str, sub: str, stat: str, wide: bool = False) -> str:
        return (
            f'<div class="sc-card{" wide" if wide else ""}"><div class="k">{key}</div>'
            f'<div class="v" data-stat="{stat}">{value}</div><div class="s">{sub}</div></div>'
        )

    cards = [
        card("KV cache", _mb(stats["kv_mb"]), f"{stats['kv_dtype']} tensors, fixed at the budget", "kv_mb"),
        card("Process RSS", _mb(stats["rss_mb"]), "whole server, model included", "rss_mb"),
        card("Turns", f"{stats['turns']:,}", f"policy {stats['policy']}", "turns"),
        card(
            "Cache tokens used",
            f"{used:,} / {capacity:,}",
            f'<div class="sc-bar">{bar}</div>{split}',
            "cache_tokens",
            wide=True,
        ),
        card("Tokens seen", f"{stats['seen_total']:,}", "fed to the model in total", "seen_total"),
        card("Evicted", f"{stats['evicted_total']:,}", f"{stats['evicted_last_turn']:,} last turn", "evicted_total"),
        card("Decode", f"{stats['decode_tokens_per_s']:.1f} tok/s", "live while generating", "decode_tokens_per_s"),
        card("First token", f"{stats['ttft_s']:.2f} s", "time to first token", "ttft_s"),
        card("Sessions", f"{live_sessions} / {max_sessions}", "live browser tabs", "sessions"),
        *([memory_card(stats, card)] if "memory" in stats else []),
        card("Page", f"{stats['page_messages']:,} msgs", f"{stats['dropped_messages']:,} older ones dropped", "page"),
    ]
    return f'<div class="sc-panel">{state}<div class="sc-grid">{"".join(cards)}</div></div>'


def memory_card(stats: dict[str, Any], card) -> str:
    """The conversation memory's card: what this turn recalled (turns and snippets) and the store's size."""
    if not stats["memory"]:
        note = html.escape(stats.get("memory_note", "off"))
        return card("Conversation memory", "off", note, "memory", wide=True)
    recalled = stats.get("recalled") or []
    listed = "".join(
        f"<div>turn {p['turn']} ({html.escape(p['role'])}): {html.escape(snippet(p['text']))}</div>" for p in recalled
    )
    found_by = "words and meaning" if stats.get("memory_semantic") else "words"
    kept = f"{stats['memory_passages']:,} passages, {_mb(stats['memory_file_bytes'] / (1 << 20))} on disk, found by {found_by}"
    note = f"<div>{html.escape(stats['memory_note'])}</div>" if stats.get("memory_note") else ""
    sub = f"{listed or 'nothing recalled yet: evicted messages come back when a new message needs them'}{kept}{note}"
    value = f"{len(recalled)} recalled" if recalled else "on"
    return card("Conversation memory", value, sub, "memory", wide=True)


def history_frames(session: UISession | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The plots' data against tokens processed: process RSS (MB), the KV cache (MB, its own plot: at 35 MB it
    would lie flat against RSS's scale) and cache tokens."""
    points = session.history.points() if session else []
    memory = [(seen, rss, "RSS") for seen, _, rss, _, _ in points]
    kv = [(seen, value, "KV cache") for seen, value, _, _, _ in points]
    tokens = [
        (seen, value, name)
        for seen, _, _, used, capacity in points
        for value, name in ((used, "cache tokens used"), (capacity, "cache capacity"))
    ]
    return _frame(memory, "MB"), _frame(kv, "MB"), _frame(tokens, "tokens")


def _frame(rows: list[tuple], value: str) -> pd.DataFrame:
    """Typed columns even when empty: an untyped empty frame would make the plot's axes categorical for good."""
    frame = pd.DataFrame(rows, columns=["tokens processed", value, "series"])
    return frame.astype({"tokens processed": "int64", value: "float64" if value == "MB" else "int64", "series": "str"})


def refuse(message: str) -> str:
    """Show `message` as a warning toast and return it for the status line; the session goes on."""
    gr.Warning(message)
    return message


def turn_summary(session: UISession) -> str:
    """The status line after a turn."""
    turn = session.chat.last_turn
    if turn is None:
        return ""
    reasons = {
        "eos": "finished",
        "max_new_tokens": "cut at max new tokens",
        "stopped": "stopped",
        "stopped_in_prefill": "stopped before replying",
    }
    text = (
        f"Turn {turn.turn}: {turn.new_tokens} new tokens at {turn.decode_tokens_per_s:.1f} tok/s, first token after "
        f"{turn.ttft_s:.2f} s; {reasons.get(turn.stop_reason, turn.stop_reason)}."
    )
    if turn.evicted_turn:
        text += f" {turn.evicted_turn:,} old tokens evicted."
    return text


class ChatApp:
    """The sessions and the event handlers of one running UI (one loaded model, many browser tabs)."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: Settings,
        max_sessions: int = 8,
        idle_seconds: float = 1800.0,
        max_visible: int = 60,
        engine: Engine | None = None,
    ):
        self.idle_seconds = idle_seconds
        self.engine = engine  # tabs' replies decode in its shared batched steps (None: each tab on its own)
        make_chat = engine.new_session if engine is not None else None
        # One file per tab, replaced at each save; the folder goes when the app does (at exit at the latest).
        self._save_folder = tempfile.TemporaryDirectory(prefix="streamchat-saves-")
        self.save_dir = Path(self._save_folder.name)
        self.sessions: SessionRegistry[UISession] = SessionRegistry(
            lambda: UISession(loaded, settings, max_visible, make_chat),
            max_sessions=max_sessions,
            idle_seconds=idle_seconds,
            is_busy=lambda session: session.generating,  # a demo marks its session used at every turn
            on_free=lambda session: session.request_stop(),
        )

    # ----- sessions -------------------------------------------------------------------------------------------

    def session(self, request: gr.Request) -> UISession:
        """This tab's session (created on first use), or a gr.Error the page shows."""
        try:
            session, created = self.sessions.get(request.session_hash)
        except SessionLimitError as error:
            raise gr.Error(str(error)) from None
        if created and self.sessions.was_freed_idle(request.session_hash):
            session.notice = (
                f"Your earlier conversation was freed after {self.idle_seconds / 60:.0f} min idle (or to make room "
                "for other tabs); this is a new one."
            )
        return session

    def free(self, request: gr.Request) -> None:
        """The tab was closed: stop its generation and free its cache."""
        self.sessions.release(request.session_hash)

    @staticmethod
    def _apply_sampling(session: UISession, temperature, top_p, top_k, max_new_tokens) -> None:
        """Raises SettingsError for a value the sliders should not have let through."""
        session.chat.apply_settings(
            session.chat.settings.replace(
                temperature=temperature, top_p=top_p, top_k=int(top_k), max_new_tokens=int(max_new_tokens)
            )
        )

    def _status(self, session: UISession, text: str) -> str:
        notice, session.notice = session.notice, None
        return " ".join(part for part in (notice, text) if part)

    # ----- chat -----------------------------------------------------------------------------------------------

    def accept(self, message: str, request: gr.Request) -> tuple[Any, str]:
        """Take a typed message off the box and into the queue (fast, outside the generation slot).

        A refusal is a toast and a status line, not a gr.Error (that would mark the chat box as failed); the
        generation step that follows then finds nothing pending and does nothing."""
        session = self.session(request)
        if not message or not message.strip():
            return gr.skip(), refuse("Type a message first.")
        if session.busy:
            return gr.skip(), refuse("A reply is still being generated: press Stop first.")
        session.arm_stop()
        session.pending, session.pending_label = message, ""
        return "", "Waiting for the model…"

    def accept_retry(self, request: gr.Request) -> str:
        session = self.session(request)
        if session.busy:
            return refuse("A reply is still being generated: press Stop first.")
        last = session.last_user_message()
        if last is None:
            return refuse("Nothing to retry yet.")
        session.arm_stop()
        session.pending, session.pending_label = last, RETRY_LABEL
        return "Retrying: the last message is sent again as a new turn."

    def generate(self, temperature, top_p, top_k, max_new_tokens, request: gr.Request) -> Iterator[tuple]:
        """Stream the reply to the pending message (in the single generation slot)."""
        session = self.session(request)
        if session.pending is None or session.generating:  # the message was refused
            yield gr.skip(), gr.skip()
            return
        text, label = session.pending, session.pending_label
        try:
            self._apply_sampling(session, temperature, top_p, top_k, max_new_tokens)
        except SettingsError as error:
            session.pending = None
            yield gr.skip(), refuse(f"Not sent: {error}")
            return
        status = self._status(session, "Generating… (Stop ends it at the next token)")
        for messages in session.stream_turn(text, label):
            yield messages, status
        yield session.page_messages(), self._status(session, turn_summary(session))

    def stop_clicked(self, request: gr.Request) -> tuple[Any, str]:
        session = self.sessions.peek(request.session_hash)
        if session is None:
            return gr.Timer(active=False), ""
        if session.generating:  # the turn's own last update says how it ended; writing here too would race
            status = gr.skip()
        elif session.demo_running:
            status = "Endless demo stopped."
        elif session.pending is not None:
            status = "Stopped: the message waiting for the model was not sent."
        else:
            status = "Nothing is running."
        session.request_stop()
        return gr.Timer(active=False), status

    def new_clicked(self, request: gr.Request) -> tuple[list, str]:
        session = self.session(request)
        if session.busy:  # keep the page as it is (the chat box's own clear button empties it at once)
            return session.page_messages(), "A reply is being generated: press Stop first."
        session.new_conversation()
        return session.page_messages(), self._status(session, "New conversation: the cache is empty again.")

    def apply_settings(
        self,
        system_prompt,
        policy,
        sinks,
        window,
        heavy,
        recent,
        temperature,
        top_p,
        top_k,
        max_new_tokens,
        request: gr.Request,
        memory=None,  # the memory checkbox (last, after the request gradio fills in: older callers pass none)
    ) -> tuple[Any, str]:
        """Use the settings boxes; cache settings or a new system prompt start a new conversation (and say so)."""
        session = self.session(request)
        try:
            settings = session.chat.settings.replace(
                system_prompt=system_prompt or None,
                policy=policy,
                sinks=int(sinks),
                window=int(window),
                heavy=int(heavy),
                recent=int(recent),
                temperature=temperature,
                top_p=top_p,
                top_k=int(top_k),
                max_new_tokens=int(max_new_tokens),
                **({} if memory is None else {"memory": bool(memory)}),
            )
            reset = session.new_conversation(settings)
        except (SettingsError, SessionError) as error:
            return gr.skip(), refuse(f"Settings not applied: {error}")
        if not reset:
            return gr.skip(), self._status(session, "Sampling settings applied; the conversation goes on.")
        budget = session.chat.cache.capacity
        return session.page_messages(), self._status(
            session,
            f"New conversation: the cache or system prompt changed (policy {settings.policy}, budget {budget:,} "
            "tokens). A cache cannot be resized in place.",
        )

    # ----- save and resume (a download and an upload: nothing is kept on the server by name) ------------------

    def save_clicked(self, request: gr.Request) -> tuple[Any, str]:
        """This tab's conversation (messages, settings, cache) as a .streamchat file to download."""
        session = self.session(request)
        if session.busy:
            return gr.skip(), refuse("A reply is being generated: press Stop first.")
        tab = hashlib.sha256(request.session_hash.encode()).hexdigest()[:16]  # the client picks session_hash
        try:
            path = persist.save_file(session.chat, self.save_dir / tab / "conversation.streamchat")
        except SessionError as error:
            return gr.skip(), refuse(f"Not saved: {error}")
        return gr.update(value=str(path), visible=True), self._status(
            session, "Saved: download the file below; Load it later (here or in `/load`) to continue exactly here."
        )

    def load_uploaded(self, path: str | None, request: gr.Request) -> tuple:
        """Resume an uploaded .streamchat file in this tab; the settings boxes show its settings."""
        session = self.session(request)
        skip = (gr.skip(),) * 10
        if not path:
            return gr.skip(), refuse("No file was uploaded."), *skip
        if session.busy:
            return gr.skip(), refuse("A reply is being generated: press Stop first."), *skip
        try:
            persist.load_file(session.chat, path)
        except SessionError as error:
            return gr.skip(), refuse(f"Not loaded: {error}"), *skip
        visible = session.chat.visible_messages
        session.messages.clear()
        session.messages.extend(dict(m) for m in visible[-session.max_visible :])
        session.dropped_messages = max(len(visible) - session.max_visible, 0)
        session.last_reply, session.conversations = None, session.conversations + 1
        session.history.clear()
        session.history.add(session.chat.stats())
        s = session.chat.settings
        status = self._status(session, f"Loaded: {len(visible)} messages, the cache as it was ({s.policy}).")
        return (
            session.page_messages(),
            status,
            s.system_prompt or "",
            s.temperature,
            s.top_p,
            s.top_k,
            gr.update(value=s.max_new_tokens, maximum=max(2048, s.max_new_tokens)),
            s.policy,
            s.sinks,
            s.window,
            s.heavy,
            s.recent,
        )

    # ----- endless demo ---------------------------------------------------------------------------------------

    def start_demo(self, request: gr.Request) -> tuple[Any, str]:
        session = self.session(request)
        try:
            session.start_demo()
        except (SessionError, PromptsError) as error:
            return gr.skip(), refuse(f"Endless demo not started: {error}")
        source = session.demo_prompts_file or "the built-in prompts"
        return gr.Timer(active=True), f"Endless demo: scripted turns from {source}, one after another, until Stop."

    def demo_turn(self, temperature, top_p, top_k, max_new_tokens, request: gr.Request) -> Iterator[tuple]:
        """One scripted turn per timer tick, each a separate job in the generation slot."""
        session = self.sessions.peek(request.session_hash)
        if session is None or not session.demo_running or session.generating:
            yield gr.skip(), gr.skip(), gr.Timer(active=bool(session and session.demo_running))
            return
        self.sessions.get(request.session_hash)  # mark it used
        try:
            self._apply_sampling(session, temperature, top_p, top_k, max_new_tokens)
            prompt = session.next_demo_prompt()
        except SettingsError as error:
            session.demo_running = False
            yield gr.skip(), f"Endless demo stopped: {error}", gr.Timer(active=False)
            return
        status = f"Endless demo: turn {session.chat.turns + 1}… (Stop ends it)"
        for messages in session.stream_turn(prompt, DEMO_LABEL):
            yield messages, status, gr.skip()
        if session.stop.is_set():
            session.demo_running = False
            status = self._status(session, "Endless demo stopped. " + turn_summary(session))
            yield session.page_messages(), status, gr.Timer(active=False)
        else:
            yield session.page_messages(), f"Endless demo: {turn_summary(session)}", gr.skip()

    # ----- memory panel ---------------------------------------------------------------------------------------

    def panel(self, request: gr.Request, create: bool = False) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        session = self.session(request) if create else self.sessions.peek(request.session_hash)
        stats = session.stats() if session else None
        memory, kv, tokens = history_frames(session)
        return memory_panel_html(stats, len(self.sessions), self.sessions.max_sessions), memory, kv, tokens

    def opened(self, request: gr.Request) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """A tab was opened: give it its session and show the panel."""
        return self.panel(request, create=True)

    def panel_tick(self, request: gr.Request) -> tuple:
        """The 1 s refresh; sends nothing when nothing changed, so an idle page costs nothing."""
        session = self.sessions.peek(request.session_hash)
        key = None
        if session is not None:
            key = (
                session.conversations,
                session.chat.cache.seen_tokens,
                session.chat.turns,
                session.busy,
                len(self.sessions),
            )
            if key == session.rendered_key:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            session.rendered_key = key
        return self.panel(request)

    # ----- API (gradio_client) --------------------------------------------------------------------------------

    def api_chat(self, message: str, max_new_tokens: int = 0, request: gr.Request = None) -> Iterator[str]:
        """Send a message in this client's conversation; yields the reply so far (marked if stopped or cut)."""
        session = self.session(request)
        if session.busy:
            raise gr.Error("A reply is still being generated: call /stop first.")
        session.arm_stop()
        session.pending = message
        for _ in session.stream_turn(message, max_new_tokens=max_new_tokens or None):
            if session.refused:
                session.notice = None
                raise gr.Error(f"Not sent: {session.refused}")
            yield session.last_reply["content"]

    def api_stop(self, request: gr.Request = None) -> str:
        """Stop the reply being generated in this client's conversation (it keeps what was said so far)."""
        session = self.sessions.peek(request.session_hash)
        if session is None or not session.busy:
            return "nothing is running"
        session.request_stop()
        return "stopping"

    def api_stats(self, request: gr.Request = None) -> dict:
        """The memory panel's numbers for this client's conversation."""
        stats = self.session(request).stats()
        return {**stats, "live_sessions": len(self.sessions), "max_sessions": self.sessions.max_sessions}

    def api_new_conversation(self, system_prompt: str = "", request: gr.Request = None) -> str:
        """Start a new conversation, with `system_prompt` if given (else the model's default)."""
        session = self.session(request)
        try:
            if not session.new_conversation(session.chat.settings.replace(system_prompt=system_prompt or None)):
                session.new_conversation()
        except (SettingsError, SessionError) as error:
            raise gr.Error(str(error)) from None
        return "new conversation"

    def api_configure(self, changes: dict, request: gr.Request = None) -> dict:
        """Change settings ({key: value}); returns {"reset": true} when that started a new conversation."""
        session = self.session(request)
        try:
            reset = session.new_conversation(session.chat.settings.replace(**changes))
        except (SettingsError, SessionError) as error:
            raise gr.Error(str(error)) from None
        return {"reset": reset, "settings": session.chat.settings.to_dict()}


def _cache_field_visibility(policy: str) -> list[Any]:
    shown = POLICIES[policy].settings_keys if policy in POLICIES else CACHE_FIELDS
    return [gr.update(visible=name in shown) for name in CACHE_FIELDS]


def conversation_plot(y: str, title: str, colors: dict[str, str], elem_id: str) -> gr.LinePlot:
    """A line per series against tokens processed, as the memory panel draws them."""
    return gr.LinePlot(
        x="tokens processed",
        y=y,
        color="series",
        title=title,
        color_map=colors,
        color_title=" ",
        height=210,
        elem_id=elem_id,
        show_label=False,
    )


def build_app(
    loaded: LoadedModel,
    settings: Settings,
    max_sessions: int = 8,
    idle_seconds: float = 1800.0,
    max_visible: int = 60,
    engine: Engine | None = None,
) -> gr.Blocks:
    """The UI around an already loaded model (tests pass a tiny one). Launch it with `launch`, or `serve_with_api`.

    With an `engine` (streamchat.batching), tabs reply at the same time, batched in its decode steps (up to
    `max_sessions` at once); without one, replies take turns in one queue slot."""
    app = ChatApp(loaded, settings, max_sessions, idle_seconds, max_visible, engine)
    generate = {**GENERATE, "concurrency_limit": max_sessions} if engine is not None else GENERATE
    s = settings
    with gr.Blocks(title="streamchat") as blocks:
        blocks.chat_app = app
        gr.Markdown(
            f"# streamchat\nEndless chat in constant memory: the KV cache keeps attention sinks and a rolling window, "
            f"so memory stays flat however long the conversation gets. Model: `{loaded.source or loaded.identity}`.",
            elem_id="title",
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=420):
                chatbot = gr.Chatbot(
                    height=560,
                    show_label=False,
                    elem_id="chat",
                    buttons=["copy"],
                    feedback_options=None,
                    placeholder="Say hello, or press **Endless demo** and watch the memory panel stay flat.",
                )
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Type a message and press Enter",
                        show_label=False,
                        scale=6,
                        elem_id="message",
                        autofocus=True,
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                with gr.Row():
                    stop = gr.Button("■ Stop", variant="stop", size="md", elem_id="stop")
                    retry = gr.Button("↻ Retry", size="md", elem_id="retry")
                    new = gr.Button("New chat", size="md", elem_id="new")
                    demo = gr.Button("▶ Endless demo", size="md", elem_id="demo", scale=2)
                with gr.Row():
                    save = gr.Button("Save conversation", size="md", elem_id="save")
                    load = gr.UploadButton(
                        "Load conversation", file_types=[persist.SUFFIX], type="filepath", size="md", elem_id="load"
                    )
                saved_file = gr.File(label="Saved conversation", visible=False, interactive=False, elem_id="saved")
                status = gr.Markdown("", elem_id="status")
                gr.Markdown(
                    "*Retry sends your last message again as a new turn: a cache cannot un-read tokens, so the model "
                    f"still remembers its earlier answer. The page shows the last {max_visible} messages.*"
                )
            with gr.Column(scale=2, min_width=380):
                panel = gr.HTML(memory_panel_html(None, 0, max_sessions), elem_id="memory-panel", label="Memory")
                memory_plot = conversation_plot(
                    "MB", "Process memory (RSS): flat while the token count climbs", {"RSS": "#64748b"}, "memory-plot"
                )
                kv_plot = conversation_plot(
                    "MB", "KV cache: allocated once at the budget, then flat", {"KV cache": "#6366f1"}, "kv-plot"
                )
                token_plot = conversation_plot(
                    "tokens",
                    "Cache tokens: climb, then flat when full",
                    {"cache tokens used": "#f59e0b", "cache capacity": "#64748b"},
                    "token-plot",
                )
        with gr.Accordion("Settings", open=False, elem_id="settings"), gr.Row():
            with gr.Column():
                system_prompt = gr.Textbox(
                    s.system_prompt or "", label="System prompt (empty: the model's default)", lines=3
                )
                gr.Markdown("**Sampling** (applies to the next reply)")
                temperature = gr.Slider(0, 2, s.temperature, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, s.top_p, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, s.top_k, step=1, label="Top-k (0: off)")
                max_new = gr.Slider(1, max(2048, s.max_new_tokens), s.max_new_tokens, step=1, label="Max new tokens")
            with gr.Column():
                gr.Markdown("**Cache** (changing it starts a new conversation)")
                policy = gr.Dropdown(sorted(POLICIES), value=s.policy, label="Eviction policy")
                shown = POLICIES[s.policy].settings_keys
                sinks = gr.Number(s.sinks, label="Attention sinks", precision=0, visible="sinks" in shown)
                window = gr.Number(s.window, label="Window (recent tokens)", precision=0, visible="window" in shown)
                heavy = gr.Number(s.heavy, label="Heavy hitters (H2O)", precision=0, visible="heavy" in shown)
                recent = gr.Number(s.recent, label="Recent tokens (H2O)", precision=0, visible="recent" in shown)
                memory = gr.Checkbox(
                    s.memory,
                    label=f"Conversation memory: recall evicted messages ({s.recall_tokens} more cache places)",
                    elem_id="memory-setting",
                )
                apply = gr.Button("Apply settings", variant="secondary", elem_id="apply")
        stats_timer = gr.Timer(1.0)
        demo_timer = gr.Timer(0.3, active=False)

        sampling = [temperature, top_p, top_k, max_new]
        for trigger in (message.submit, send.click):
            trigger(app.accept, message, [message, status], queue=False, api_visibility="private").then(
                app.generate, sampling, [chatbot, status], api_visibility="private", show_progress="minimal", **generate
            )
        retry.click(app.accept_retry, None, status, queue=False, api_visibility="private").then(
            app.generate, sampling, [chatbot, status], api_visibility="private", show_progress="minimal", **generate
        )
        stop.click(app.stop_clicked, None, [demo_timer, status], queue=False, api_visibility="private")
        new.click(app.new_clicked, None, [chatbot, status], **LIGHT)
        chatbot.clear(app.new_clicked, None, [chatbot, status], **LIGHT)
        apply.click(
            app.apply_settings,
            [system_prompt, policy, sinks, window, heavy, recent, *sampling, memory],
            [chatbot, status],
            **LIGHT,
        )
        policy.change(_cache_field_visibility, policy, [sinks, window, heavy, recent], **LIGHT)
        save.click(app.save_clicked, None, [saved_file, status], **LIGHT)
        load.upload(
            app.load_uploaded,
            load,
            [chatbot, status, system_prompt, *sampling, policy, sinks, window, heavy, recent],
            **LIGHT,
        )
        demo.click(app.start_demo, None, [demo_timer, status], **LIGHT)
        demo_timer.tick(
            app.demo_turn,
            sampling,
            [chatbot, status, demo_timer],
            api_visibility="private",
            show_progress="hidden",
            **generate,
        )
        stats_timer.tick(app.panel_tick, None, [panel, memory_plot, kv_plot, token_plot], **LIGHT)
        blocks.load(app.opened, None, [panel, memory_plot, kv_plot, token_plot], **LIGHT)
        blocks.unload(app.free)

        gr.api(app.api_chat, api_name="chat", **generate)
        gr.api(app.api_stop, api_name="stop", concurrency_limit=None)
        gr.api(app.api_stats, api_name="stats", concurrency_limit=None)
        gr.api(app.api_new_conversation, api_name="new_conversation", concurrency_limit=None)
        gr.api(app.api_configure, api_name="configure", concurrency_limit=None)
    blocks.queue(default_concurrency_limit=1, max_size=64)
    return blocks


def launch(blocks: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any):
    """Serve the UI (blocking unless prevent_thread_lock=True); returns what gr.Blocks.launch returns."""
    blocks.chat_app.sessions.start_sweeper()
    kwargs.setdefault("max_file_size", "1gb")  # uploads are session files: a full 8k-token cache is ~0.6 GB
    return blocks.launch(
        server_name=host, server_port=port, theme=THEME, css=CSS, ssr_mode=False, show_error=True, **kwargs
    )


def serve_with_api(
    blocks: gr.Blocks,
    engine: Engine,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
) -> None:
    """One process, one port: the OpenAI-compatible API (frontends/server.py) at /v1, /health and /metrics, and
    the UI mounted at / (gr.mount_gradio_app); both use `engine`. Blocks until interrupted."""
    import uvicorn

    from streamchat.frontends.server import create_app

    api = create_app(engine, model_name, api_key)
    app = gr.mount_gradio_app(
        api, blocks, path="/", theme=THEME, css=CSS, ssr_mode=False, show_error=True, max_file_size="1gb"
    )
    blocks.chat_app.sessions.start_sweeper()
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--max-sessions", type=int, default=8, help="live browser sessions at most (default: 8)")
    parser.add_argument("--idle-minutes", type=float, default=30.0, help="free a session idle this long (default: 30)")
    parser.add_argument("--max-visible", type=int, default=60, help="messages the page shows at most (default: 60)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on the OpenAI API at /v1 (default: $STREAMCHAT_API_KEY, else no key)",
    )


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)
    if args.max_sessions < 1 or args.idle_minutes <= 0 or args.max_visible < 2:
        print(
            "streamchat: --max-sessions must be 1 or more, --idle-minutes above 0, --max-visible 2 or more",
            file=sys.stderr,
        )
        return 2
    from streamchat.frontends.server import api_key_for

    api_key = api_key_for(args)
    loaded = load_for_chat(settings)
    engine = Engine(loaded, settings, args.max_sessions)
    blocks = build_app(loaded, settings, args.max_sessions, args.idle_minutes * 60, args.max_visible, engine)
    print(
        f"streamchat: {loaded.source} loaded in {loaded.load_seconds:.1f} s; open http://{args.host}:{args.port} "
        f"(OpenAI API at http://{args.host}:{args.port}/v1)"
    )
    try:
        serve_with_api(blocks, engine, loaded.identity, args.host, args.port, api_key)
    finally:
        engine.close()
    return 0
