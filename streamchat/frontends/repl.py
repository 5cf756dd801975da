"""The terminal front end: an interactive chat, or `--jsonl` for scripts (one user message or JSON object per
input line, one JSON object per output line).

Multi-line messages: a bracketed paste (xterm's mode 2004: the terminal wraps pasted text in ESC[200~ ... ESC[201~)
is one message, and so is a block between two lines of three double quotes. In `--jsonl` mode a line holding a
JSON object carries a message with newlines (`{"message": "line 1\nline 2"}`) or a command
(`{"command": "/save x"}`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stdout

from streamchat import persist
from streamchat.config import SettingsError
from streamchat.fastpath import decode_summary
from streamchat.model import ModelError, load_for_chat
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
Ctrl+C stops the reply being generated and keeps the conversation.
Multi-line messages: paste them (a pasted text is one message, newlines and all), or type a block:
  \"\"\"                a line of three double quotes starts the block
  line 1 ...         (Enter adds a line)
  \"\"\"                a line of three double quotes ends it and sends the block as one message"""

PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"  # xterm bracketed-paste mode
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # around pasted text while the mode is on
BLOCK = '"""'
PREVIEW_CHARS = 300


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """Text with control characters (newline and tab aside) shown as \\xNN, so neither a reply nor a loaded
    conversation can move the cursor, recolour or retitle the terminal (escape-sequence injection)."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jsonl",
        action="store_true",
        help='read one message (or a JSON object: {"message": ...} or {"command": "/..."}) per stdin line, '
        "write one JSON object per line",
    )


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """The last ~`limit` characters of `text`, starting at a word boundary (with "..." when cut)."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    cut = re.search(r"\s", tail)
    if cut and cut.end() < len(tail):
        tail = tail[cut.end() :]
    return "..." + tail.lstrip()


def read_message(read_line: Callable[[str], str], prompt: str = "\nyou> ", more: str = "...> ") -> str:
    """One user message from `read_line` (input()): a line, a bracketed paste (which may span lines when the
    line editor passes the markers through), or a block between lines of three double quotes. Line endings inside
    become LF. Raises EOFError at the end of input (an unfinished block is dropped) and KeyboardInterrupt from
    `read_line`."""
    original = read_line
    read_line = lambda text: original(text).removesuffix("\r")
    line = read_line(prompt)
    if PASTE_START in line:
        before, _, text = line.partition(PASTE_START)
        while PASTE_END not in text:
            text += "\n" + read_line("")
        pasted, _, after = text.partition(PASTE_END)
        line = before + pasted + after
    elif line.strip().startswith(BLOCK):
        first = line.strip()[len(BLOCK) :]
        if first.endswith(BLOCK):  # the block on one line
            return first[: -len(BLOCK)]
        lines = [first] if first else []
        while True:
            nxt = read_line(more)
            if nxt.rstrip().endswith(BLOCK):
                last = nxt.rstrip()[: -len(BLOCK)]
                if last:
                    lines.append(last)
                return "\n".join(lines)
            lines.append(nxt)
    return line.replace("\r\n", "\n").replace("\r", "\n")


@contextmanager
def bracketed_paste(enabled: bool):
    """Terminal bracketed-paste mode on for the chat, off again at exit. GNU readline (which input() uses) then
    takes a paste as one line, newlines and all; without readline the markers reach `read_message`."""
    if not enabled:
        yield
        return
    try:
        import readline

        readline.parse_and_bind("set enable-bracketed-paste on")  # CPython turns it off by default
    except ImportError:
        pass
    sys.stdout.write(PASTE_ON)
    sys.stdout.flush()
    try:
        yield
    finally:
        sys.stdout.write(PASTE_OFF)
        sys.stdout.flush()


@contextmanager
def quiet_control_echo(stream=None):
    """While a reply streams, the terminal does not echo control characters (Ctrl+C as `^C` in the reply line):
    termios ECHOCTL off, restored after. Nothing happens when the stream is not a terminal."""
    stream = stream or sys.stdin
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError, io.UnsupportedOperation):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] = saved[3] & ~termios.ECHOCTL
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def stats_line(stats: dict) -> str:
    """One line after each reply: speed, cache use, evictions, memory."""
    mb = 1024 * 1024
    held = f", {stats['heavy_tokens']} heavy, {stats['recent_tokens']} recent" if "heavy_tokens" in stats else ""
    if stats.get("recalled_tokens"):
        held += f", {stats['recalled_tokens']} recalled"
    memory = ""
    if stats.get("memory"):
        turns = sorted({p["turn"] for p in stats.get("recalled", [])})
        recalled = (
            f"recalled turn{'s' if len(turns) > 1 else ''} {', '.join(map(str, turns))}"
            if turns
            else "nothing recalled"
        )
        memory = f" | memory: {recalled}, store {stats['memory_passages']} passages, {stats['memory_file_bytes'] / 1024:.0f} KB"
    elif "memory" in stats:
        memory = " | memory: off (store error)"
    return (
        f"[{stats['new_tokens']} tokens, {stats['decode_tokens_per_s']:.1f} tok/s, ttft {stats['ttft_s']:.2f} s"
        f" | {stats['policy']} cache {stats['cache_tokens']}/{stats['cache_capacity']} ({stats['sink_tokens']} sink{held})"
        f" | evicted {stats['evicted_turn']} (total {stats['evicted_total']})"
        f"{memory} | KV {stats['kv_bytes'] / mb:.1f} MB | RSS {stats['rss_bytes'] / mb:.0f} MB]"
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
                print(f"{'you' if message['role'] == 'user' else 'bot'}> {terminal_safe(preview(message['content']))}")
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
        f'({session.pinned_tokens or s.sinks} pinned) | /help for commands, """ for a multi-line message'
    )
    print(f"streamchat: {decode_summary(session.model, s)}")
    with bracketed_paste(sys.stdin.isatty() and sys.stdout.isatty()):
        return _chat_loop(session)


def _chat_loop(session: ChatSession) -> int:
    while True:
        try:
            line = read_message(input)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl+D or /quit to leave)")
            continue
        if "\n" not in line.strip() and line.strip().startswith("/"):
            try:
                if not run_command(session, line.strip()):
                    return 0
            except (SettingsError, SessionError) as error:
                print(f"error: {error}")
            continue
        stop = threading.Event()
        print("bot> ", end="", flush=True)
        try:
            with stop_on_ctrl_c(stop), quiet_control_echo():
                for piece in session.send(line, stop):
                    print(terminal_safe(piece), end="", flush=True)
        except SessionError as error:
            print(f"error: {error}")
            continue
        turn = session.last_turn
        if turn.stop_reason.startswith("stopped"):
            print("\n(stopped)", end="")
        print("\n" + stats_line(turn.to_dict()))
        for note in (session.eviction_note(), session.recall_note()):
            if note:
                print(f"note: {note}")


def input_lines(stream) -> Iterator[str]:
    """Lines of `stream` without their line ending (LF or CRLF). Bytes that are not UTF-8 become U+FFFD, so any
    input goes on as text."""
    binary = getattr(stream, "buffer", None)
    for raw in binary if binary is not None else stream:
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        yield line.removesuffix("\n").removesuffix("\r")


def emit(record: dict) -> None:
    """Write one JSON object as one line of valid UTF-8 (a lone surrogate becomes a JSON \\uXXXX escape)."""
    data = json.dumps(record, ensure_ascii=False).encode("utf-8", errors="backslashreplace") + b"\n"
    binary = getattr(sys.stdout, "buffer", None)
    if binary is None:
        sys.stdout.write(data.decode("utf-8"))
        sys.stdout.flush()
        return
    sys.stdout.flush()
    binary.write(data)
    binary.flush()


def parse_request(line: str) -> dict:
    """What one `--jsonl` input line asks: {"message": text} or {"command": "/..."}. A line starting with `{` must
    be such a JSON object (ValueError otherwise); any other line is a message as it stands."""
    if not line.lstrip().startswith("{"):
        return {"message": line}
    try:
        request = json.loads(line)
    except ValueError as error:
        raise ValueError(f"invalid JSON object: {error}") from None
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object")
    kinds = [key for key in ("message", "command") if key in request]
    unknown = sorted(set(request) - {"message", "command"})
    if unknown or len(kinds) != 1:
        raise ValueError(
            'expected exactly one of "message" or "command" (and no other key), got keys: '
            + ", ".join(map(repr, request))
        )
    value = request[kinds[0]]
    if not isinstance(value, str):
        raise ValueError(f'"{kinds[0]}" must be a string, got {type(value).__name__}')
    if kinds[0] == "command" and not value.strip().startswith("/"):
        raise ValueError(f'"command" must start with "/", got {value!r}; /help lists them')
    return {kinds[0]: value}


def scripted(session: ChatSession, lines: Iterable[str] | None = None) -> int:
    """One JSON object per output line for each input line: the reply and the turn's figures, a command's output,
    or an error (the session goes on). A reader that closes the pipe early ends the program quietly. How decode
    runs (kernels, K/V dtype, threads) goes to stderr, as the interactive chat prints it at start-up."""
    print(f"streamchat: {decode_summary(session.model, session.settings)}", file=sys.stderr)
    try:
        _scripted(session, input_lines(sys.stdin) if lines is None else lines)
    except BrokenPipeError:
        try:  # nothing more can be written; keep the interpreter's own flush at exit quiet too
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
    return 0


def _scripted(session: ChatSession, lines: Iterable[str]) -> None:
    for line in lines:
        try:
            request = parse_request(line)
        except ValueError as error:
            emit({"input": line, "error": str(error)})
            continue
        if "command" in request:
            command = request["command"].strip()
            output = io.StringIO()
            try:
                with redirect_stdout(output):
                    going_on = run_command(session, command)
            except (SettingsError, SessionError) as error:
                emit({"command": command, "error": str(error)})
                continue
            emit({"command": command, "output": output.getvalue().rstrip("\n")})
            if not going_on:
                return
            continue
        message = request["message"]
        try:
            reply = "".join(session.send(message))
        except SessionError as error:
            emit({"user": message, "error": str(error)})
            continue
        record = {"user": message, "reply": reply, **session.last_turn.to_dict()}
        for key, note in (("eviction_note", session.eviction_note()), ("recall_note", session.recall_note())):
            if note:
                record[key] = note
        emit(record)


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)
    try:
        loaded = load_for_chat(settings)
        session = ChatSession(loaded, settings)
    except (ModelError, SessionError) as error:
        print(f"streamchat: {error}", file=sys.stderr)
        return 2
    return scripted(session) if args.jsonl else interactive(session)
