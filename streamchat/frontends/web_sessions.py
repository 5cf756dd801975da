"""Per-browser-session state for the web UI, bounded in number and in idle time, so server memory stays bounded.

Each browser tab (a Gradio session hash) gets its own object, created by a factory (for the UI: a chat session
with its own KV cache; the model weights are shared). At most `max_sessions` live at once: making room frees the
least recently used idle one. A session unused for `idle_seconds` is freed by `sweep`, which runs on every
lookup and, once `start_sweeper` is called, in the background. Busy sessions (generating) are never freed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SessionLimitError(RuntimeError):
    """Every session slot is taken by a session that is generating right now."""


class SessionRegistry(Generic[T]):
    """Key -> session object, least recently used first; thread-safe."""

    def __init__(
        self,
        factory: Callable[[], T],
        max_sessions: int = 8,
        idle_seconds: float = 1800.0,
        is_busy: Callable[[T], bool] = lambda session: False,
        on_free: Callable[[T], None] = lambda session: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if idle_seconds <= 0:
            raise ValueError("idle_seconds must be above 0")
        self.factory = factory
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.is_busy = is_busy
        self.on_free = on_free
        self.clock = clock
        self._sessions: OrderedDict[str, tuple[T, float]] = OrderedDict()  # key -> (session, last used)
        self._freed_idle: deque[str] = deque(maxlen=1000)  # recently freed keys, to tell their owners why
        self._lock = threading.RLock()
        self._sweeper_stop = threading.Event()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._sessions

    def get(self, key: str) -> tuple[T, bool]:
        """The session for `key`, marked as just used; created if missing. Returns (session, created).

        Raises SessionLimitError when a new session is needed but every slot is busy.
        """
        with self._lock:
            self.sweep()
            if key in self._sessions:
                session = self._sessions[key][0]
                self._sessions[key] = (session, self.clock())
                self._sessions.move_to_end(key)
                return session, False
            while len(self._sessions) >= self.max_sessions:
                if not self._free_least_recent_idle():
                    raise SessionLimitError(
                        f"all {self.max_sessions} chat sessions are generating right now; try again in a moment"
                    )
            session = self.factory()
            self._sessions[key] = (session, self.clock())
            return session, True

    def peek(self, key: str) -> T | None:
        """The session for `key` if it is alive, without marking it used (for status polling)."""
        with self._lock:
            entry = self._sessions.get(key)
            return entry[0] if entry else None

    def was_freed_idle(self, key: str) -> bool:
        """Whether `key` had a session that was freed for being idle (or to make room)."""
        with self._lock:
            return key in self._freed_idle

    def release(self, key: str) -> bool:
        """Free the session for `key` now (the tab was closed); returns whether there was one."""
        with self._lock:
            entry = self._sessions.pop(key, None)
        if entry:
            self.on_free(entry[0])
        return entry is not None

    def sweep(self) -> list[str]:
        """Free sessions idle longer than `idle_seconds`; returns their keys."""
        freed: list[tuple[str, T]] = []
        with self._lock:
            now = self.clock()
            for key, (session, last_used) in list(self._sessions.items()):
                if now - last_used > self.idle_seconds and not self.is_busy(session):
                    del self._sessions[key]
                    self._freed_idle.append(key)
                    freed.append((key, session))
        for _, session in freed:
            self.on_free(session)
        return [key for key, _ in freed]

    def _free_least_recent_idle(self) -> bool:
        for key, (session, _) in self._sessions.items():
            if not self.is_busy(session):
                del self._sessions[key]
                self._freed_idle.append(key)
                self.on_free(session)
                return True
        return False

    def start_sweeper(self, interval: float = 30.0) -> threading.Thread:
        """Sweep every `interval` seconds in a daemon thread until `close`."""

        def loop() -> None:
            while not self._sweeper_stop.wait(interval):
                self.sweep()

        thread = threading.Thread(target=loop, name="streamchat-session-sweeper", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the sweeper and free every session."""
        self._sweeper_stop.set()
        with self._lock:
            sessions = [session for session, _ in self._sessions.values()]
            self._sessions.clear()
        for session in sessions:
            self.on_free(session)
