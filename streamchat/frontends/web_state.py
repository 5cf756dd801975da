"""One browser session's chat: the ChatSession, its stop flag, what the page shows, and the memory history.

Kept free of Gradio so it can be tested without a browser: `stream_turn` yields the chat as Gradio "messages"
dicts, `stats` the numbers of the memory panel, `history` the points of its plots.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from streamchat.config import CONFIG_DIR, Settings
from streamchat.model import LoadedModel
from streamchat.prompts import endless_turns
from streamchat.session import ChatSession, SessionError

MB = 1024 * 1024
DEMO_PROMPTS = CONFIG_DIR / "demo_prompts.txt"  # the endless demo's script when prompts_file is not set
HISTORY_POINT_SECONDS = 0.25  # at most one plot point this often while a reply streams
PAGE_UPDATE_SECONDS = 0.08  # at most ~12 page updates a second, however fast the model: the browser keeps up


class MemoryHistory:
    """(tokens seen, KV MB, RSS MB, cache tokens, cache capacity) over a conversation, at most `limit` points.

    When full, every other point is dropped and the spacing doubles, so a conversation of any length keeps a
    bounded, evenly spread history.
    """

    def __init__(self, limit: int = 400):
        self.limit = limit
        self._points: list[tuple[int, float, float, int, int]] = []
        self._stride = 1
        self._skipped = 0
        self._lock = threading.Lock()

    def add(self, stats: dict[str, Any]) -> None:
        point = (
            stats["seen_total"],
            stats["kv_bytes"] / MB,
            stats["rss_bytes"] / MB,
            stats["cache_tokens"],
            stats["cache_capacity"],
        )
        with self._lock:
            if self._points and self._points[-1][0] == point[0]:
                self._points[-1] = point
                return
            self._skipped += 1
            if self._skipped < self._stride and self._points:
                return
            self._skipped = 0
            self._points.append(point)
            if len(self._points) > self.limit:
                self._points = self._points[::2]
                self._stride *= 2

    def points(self) -> list[tuple[int, float, float, int, int]]:
        with self._lock:
            return list(self._points)

    def clear(self) -> None:
        with self._lock:
            self._points, self._stride, self._skipped = [], 1, 0


class UISession:
    """A browser tab's conversation. The page shows at most `max_visible` messages (older ones are dropped
    from the page, not just hidden), so a conversation of any length keeps the page small too."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: Settings,
        max_visible: int = 60,
        make_chat: Callable[[], ChatSession] | None = None,
    ):
        """`make_chat`: builds the tab's ChatSession (the UI passes the batching engine's `new_session`, so every
        tab's reply decodes in the engine's shared batched steps); None: a plain ChatSession."""
        self.chat = make_chat() if make_chat is not None else ChatSession(loaded, settings)
        self.stop = threading.Event()
        self.history = MemoryHistory()
        self.max_visible = max_visible
        self.messages: deque[dict[str, Any]] = deque(maxlen=max_visible)
        self.dropped_messages = 0
        self.generating = False
        self.pending: str | None = None  # a message accepted by the page, waiting in the queue
        self.pending_label = ""  # how its bubble is marked (a retry)
        self.last_reply: dict[str, Any] | None = None  # the bubble of the latest reply
        self.demo_running = False
        self.demo_prompts: Iterator[str] | None = None
        self.notice: str | None = None  # one-off line for the status bar
        self.refused: str | None = None  # why the last message was not sent (None: it was)
        self.conversations = 1  # how many this tab has started (the panel redraws when it changes)
        self.rendered_key: tuple | None = None  # what the memory panel last showed, to skip unchanged refreshes
        self._turn_started = 0.0
        self._first_piece_at: float | None = None
        self._seen_at_first_piece = 0
        self.history.add(self.chat.stats())

    @property
    def busy(self) -> bool:
        return self.generating or self.pending is not None or self.demo_running

    # ----- conversation -------------------------------------------------------------------------------------

    def new_conversation(self, settings: Settings | None = None) -> bool:
        """Start afresh (with `settings` if given); returns True when the conversation was reset.

        Raises SessionError or SettingsError (the session unchanged) for settings it cannot use.
        """
        if self.busy:
            raise SessionError("a reply is being generated: press Stop first")
        reset = True
        if settings is None:
            self.chat.reset()
        else:
            reset = self.chat.apply_settings(settings)
        if reset:
            self.conversations += 1
            self.messages.clear()
            self.dropped_messages = 0
            self.history.clear()
            self.history.add(self.chat.stats())
        return reset

    def arm_stop(self) -> threading.Event:
        """A fresh stop flag for the next turn (or demo run); Stop sets the current one."""
        self.stop = threading.Event()
        return self.stop

    def request_stop(self) -> None:
        """Stop the running turn (at its next token) and the demo; forget a message still waiting to start."""
        self.demo_running = False
        if not self.generating:
            self.pending = None
        self.stop.set()

    def last_user_message(self) -> str | None:
        users = [m["content"] for m in self.chat.visible_messages if m["role"] == "user"]
        return users[-1] if users else None

    def start_demo(self) -> None:
        """Arm the endless demo; raises PromptsError (nothing started) if the prompts file is unusable."""
        if self.busy:
            raise SessionError("a reply is being generated: press Stop first")
        if self.demo_prompts is None:
            self.demo_prompts = endless_turns(self.demo_prompts_file)
        self.arm_stop()
        self.demo_running = True

    @property
    def demo_prompts_file(self) -> str | None:
        """settings.prompts_file, else configs/demo_prompts.txt, else (None) the built-in list."""
        if self.chat.settings.prompts_file:
            return self.chat.settings.prompts_file
        return str(DEMO_PROMPTS) if DEMO_PROMPTS.is_file() else None

    def next_demo_prompt(self) -> str:
        return next(self.demo_prompts)

    def _append(self, message: dict[str, Any]) -> dict[str, Any]:
        if len(self.messages) == self.max_visible:
            self.dropped_messages += 1
        self.messages.append(message)
        return message

    def page_messages(self) -> list[dict[str, Any]]:
        """What the chat box shows: the last `max_visible` messages, after a note when older ones were dropped."""
        shown = list(self.messages)
        if self.dropped_messages:
            note = {
                "role": "assistant",
                "content": (
                    f"The page keeps only the last {self.max_visible} messages so that it stays small in a long "
                    f"conversation; {self.dropped_messages} older ones were removed from this page. What the model "
                    "remembers is shown in the memory panel."
                ),
                "metadata": {"title": f"{self.dropped_messages} earlier messages not shown", "status": "done"},
            }
            shown.insert(0, note)
        return shown

    def stream_turn(self, text: str, label: str = "", max_new_tokens: int | None = None) -> Iterator[list[dict]]:
        """Send `text` with the current stop flag and yield the page's messages as the reply streams.

        `label` prefixes the user's bubble (e.g. for a retry or a scripted demo turn). Errors become a message;
        the session goes on. Never raises SessionError.
        """
        user = self._append({"role": "user", "content": f"{label}{text}"})
        reply = self.last_reply = self._append({"role": "assistant", "content": ""})
        self.generating = True
        self.refused = None
        self._turn_started = time.perf_counter()
        self._first_piece_at = None
        last_point = last_page = 0.0
        try:
            if self.stop.is_set():
                reply["content"] = "*(stopped before it started)*"
                yield self.page_messages()
                return
            yield self.page_messages()
            pieces = []
            for piece in self.chat.send(text, self.stop, max_new_tokens):
                if self._first_piece_at is None:
                    self._first_piece_at = time.perf_counter()
                    self._seen_at_first_piece = self.chat.cache.seen_tokens
                pieces.append(piece)
                reply["content"] = "".join(pieces)
                now = time.perf_counter()
                if now - last_point >= HISTORY_POINT_SECONDS:
                    self.history.add(self.chat.stats())
                    last_point = now
                if now - last_page >= PAGE_UPDATE_SECONDS:
                    last_page = now
                    yield self.page_messages()
        except SessionError as error:
            for message in (reply, user):  # nothing was sent: take the bubbles back off the page
                if self.messages and self.messages[-1] is message:
                    self.messages.pop()
            self.refused = str(error)
            self.notice = f"Not sent: {error}"
            yield self.page_messages()
            return
        finally:
            self.generating = False
            self.pending, self.pending_label = None, ""
            self.history.add(self.chat.stats())
        self._finish_reply(reply)
        yield self.page_messages()

    def _finish_reply(self, reply: dict[str, Any]) -> None:
        turn = self.chat.last_turn
        endings = {
            "stopped": "*(stopped)*",
            "stopped_in_prefill": "*(stopped while reading the message; no reply)*",
            "max_new_tokens": f"*(cut at {turn.new_tokens} new tokens: the max new tokens setting)*",
        }
        ending = endings.get(turn.stop_reason)
        if ending:
            reply["content"] = f"{reply['content']} {ending}".strip()
        elif not reply["content"].strip():
            reply["content"] = "*(empty reply)*"
        recall = self.chat.recall_note()
        if recall and turn.recalled and turn.recall_changed:
            self._append(
                {
                    "role": "assistant",
                    "content": f"{recall[0].upper()}{recall[1:]}.",
                    "metadata": {
                        "title": f"Memory: {len(turn.recalled)} passages of earlier turns recalled",
                        "status": "done",
                    },
                }
            )
        elif recall:  # the store failed: say so, the chat goes on
            self._append(
                {"role": "assistant", "content": recall, "metadata": {"title": "Memory off", "status": "done"}}
            )
        note = self.chat.eviction_note()
        if note:
            self._append(
                {
                    "role": "assistant",
                    "content": (
                        f"{note[0].upper()}{note[1:]}. The model no longer sees those tokens; memory stays at the "
                        "cache budget."
                    ),
                    "metadata": {
                        "title": f"Memory: {turn.evicted_turn:,} earlier tokens evicted this turn",
                        "status": "done",
                    },
                }
            )

    # ----- figures --------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The memory panel's numbers: live while a reply streams, the last turn's figures otherwise."""
        live = self.chat.stats()
        turn = self.chat.last_turn
        sinks = live["sink_tokens"]
        heavy = int(live.get("heavy_tokens", 0))
        ttft = turn.ttft_s if turn else 0.0
        decode_rate = turn.decode_tokens_per_s if turn else 0.0
        if self.generating and self._first_piece_at is not None:
            ttft = self._first_piece_at - self._turn_started
            elapsed = time.perf_counter() - self._first_piece_at
            decoded = live["seen_total"] - self._seen_at_first_piece
            decode_rate = decoded / elapsed if elapsed > 0 and decoded > 0 else decode_rate
        return {
            **live,
            "kv_mb": live["kv_bytes"] / MB,
            "rss_mb": live["rss_bytes"] / MB,
            "heavy_tokens": heavy,
            "recent_tokens": live["cache_tokens"] - sinks - heavy - live.get("recalled_tokens", 0),
            "ttft_s": ttft,
            "decode_tokens_per_s": decode_rate,
            "evicted_last_turn": turn.evicted_turn if turn else 0,
            "last_stop_reason": turn.stop_reason if turn else None,
            "last_new_tokens": turn.new_tokens if turn else 0,
            "generating": self.generating,
            "demo_running": self.demo_running,
            "page_messages": len(self.messages),
            "dropped_messages": self.dropped_messages,
        }
