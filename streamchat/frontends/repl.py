"""The terminal front end: an interactive chat, or `--jsonl` for scripts (one user message per input line)."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from contextlib import contextmanager

from streamchat import persist
from streamchat.config import SettingsError
from streamchat.fastpath import decode_summary
from streamchat.model import ModelError, load_model
from streamchat.session import ChatSession, SessionError

HELP = """commands:
  /help              this help
  /stats             cache and memory figures now
  /reset             start a new conversation
  /system TEXT       set the system prompt (starts a new conversation)
  /set key=value     change a setting (sampling applies at once; cache settings start a new conversation)
  /save NAME         save the conversation, settings and cache (NAME: letters, digits, . _ -)
  /load NAME         resume a saved conversation exactly where it was
  /sessions          list saved conversations
  /quit              leave (also Ctrl+D)
Ctrl+C stops the reply being generated and keeps the conversation."""


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """Text with control characters (newline and tab aside) shown as \\xNN, so neither a reply nor a loaded
    conversation can move the cursor, recolour or retitle the terminal (escape-sequence injection)."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jsonl", action="store_true", help="read one message per stdin line, write one JSON per turn")


def stats_line(stats: dict) -> str:
    """One line after each reply: speed, cache use, evictions, memory."""
    mb = 1024 * 1024
    held = f", {stats['heavy_tokens']} heavy, {stats['recent_tokens']} recent" if "heavy_tokens" in stats else ""
    return (
        f"[{stats['new_tokens']} tokens, {stats['decode_tokens_per_s']:.1f} tok/s, ttft {stats['ttft_s']:.2f} s"
        f" | {stats['policy']} cache {stats['cache_tokens']}/{stats['cache_capacity']} ({stats['sink_tokens']} sink{held})"
        f" | evicted {stats['evicted_turn']} (total {stats['evicted_total']})"
        f" | KV {stats['kv_bytes'] / mb:.1f} MB | RSS {stats['rss_bytes'] / mb:.0f} MB]"
    )


def live_stats_text(session: ChatSession) -> str:
    stats = session.stats()
    mb = 1024 * 1024
    lines = [f"{key}: {value}" for key, value in stats.items() if not key.endswith("bytes")]
    lines += [f"kv_mb: {stats['kv_bytes'] / mb:.2f}", f"rss_mb: {stats['rss_bytes'] / mb:.0f}"]
    return "\n".join(lines)


@contextmanager
def stop_on_ctrl_c(stop: threading.Event):
    """While a reply is generated, Ctrl+C sets the stop flag instead of killing the program."""
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_command(session: ChatSession, line: str) -> bool:
    """Handle a /command; returns False when the user wants to quit."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit"):
        return False
    if name == "help":
        print(HELP)
    elif name == "stats":
        print(live_stats_text(session))
    elif name == "reset":
        session.reset()
        print("(new conversation)")
    elif name == "system":
        session.reset(system_prompt=rest or None)
        print("(system prompt set; new conversation)" if rest else "(default system prompt; new conversation)")
    elif name == "set":
        key, sep, value = rest.partition("=")
        if not sep:
            print("usage: /set key=value")
        elif session.apply_settings(session.settings.replace(**{key.strip(): value.strip()})):
            print(f"({key.strip()} = {value.strip()}: cache settings changed, new conversation)")
        else:
            print(f"({key.strip()} = {value.strip()})")
    elif name in ("save", "load"):
        if not rest:
            saved = ", ".join(persist.saved_names(session.settings.sessions_dir)) or "none"
            print(f"usage: /{name} NAME   (saved: {saved})")
        elif name == "save":
            print(f"(saved to {persist.save(session, rest)})")
        else:
            persist.load(session, rest)
            print(f"(loaded {rest}: {len(session.visible_messages)} messages, turn {session.turns})")
            for message in session.visible_messages[-2:]:
                print(f"{'you' if message['role'] == 'user' else 'bot'}> {terminal_safe(message['content'][-300:])}")
    elif name == "sessions":
        names = persist.saved_names(session.settings.sessions_dir)
        print(f"{persist.sessions_dir(session.settings.sessions_dir)}: {', '.join(names) or 'no saved sessions'}")
    else:
        print(f"unknown command /{name}; /help lists them")
    return True


def interactive(session: ChatSession) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    s = session.settings
    print(
        f"streamchat: {session.loaded.source} | policy {s.policy}, budget {session.cache.capacity} tokens "
        f"({session.pinned_tokens or s.sinks} pinned) | /help for commands"
    )
    print(f"streamchat: {decode_summary(session.model, s)}")
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl+D or /quit to leave)")
            continue
        if line.strip().startswith("/"):
            try:
                if not run_command(session, line.strip()):
                    return 0
            except (SettingsError, SessionError) as error:
                print(f"error: {error}")
            continue
        stop = threading.Event()
        print("bot> ", end="", flush=True)
        try:
            with stop_on_ctrl_c(stop):
                for piece in session.send(line, stop):
                    print(terminal_safe(piece), end="", flush=True)
        except SessionError as error:
            print(f"error: {error}")
            continue
        turn = session.last_turn
        if turn.stop_reason.startswith("stopped"):
            print("\n(stopped)", end="")
        print("\n" + stats_line(turn.to_dict()))
        note = session.eviction_note()
        if note:
            print(f"note: {note}")


def scripted(session: ChatSession) -> int:
    """One JSON object per input line: the reply and the turn's figures (or an error; the session goes on)."""
    for line in sys.stdin:
        message = line.rstrip("\n")
        try:
            reply = "".join(session.send(message))
        except SessionError as error:
            print(json.dumps({"user": message, "error": str(error)}), flush=True)
            continue
        record = {"user": message, "reply": reply, **session.last_turn.to_dict()}
        note = session.eviction_note()
        if note:
            record["eviction_note"] = note
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)
    try:
        loaded = load_model(settings.model, settings.device, settings.dtype)
        session = ChatSession(loaded, settings)
    except (ModelError, SessionError) as error:
        print(f"streamchat: {error}", file=sys.stderr)
        return 2
    return scripted(session) if args.jsonl else interactive(session)
