"""The terminal front end at its edges (issue 15 items 2 and 3): multi-line messages (bracketed paste, \"\"\" blocks),
JSON objects in --jsonl mode, CRLF and non-UTF-8 input, a reader closing the pipe, ^C echo, the /load preview."""

import io
import json
import os

import pytest
from streamchat.config import load_settings
from streamchat.frontends import repl
from streamchat.session import ChatSession

SMALL = {"window": 200, "temperature": 0, "max_new_tokens": 3}


@pytest.fixture()
def session(tiny, tmp_path):
    return ChatSession(tiny, load_settings(None, {**SMALL, "sessions_dir": str(tmp_path)}))


def lines_from(*lines):
    feed = iter(lines)

    def read_line(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read_line


def run_scripted(session, monkeypatch, capsysbinary, data: bytes) -> list[dict]:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert repl.scripted(session) == 0
    out = capsysbinary.readouterr().out
    return [json.loads(line.decode("utf-8")) for line in out.splitlines()]  # strict UTF-8, one object a line


# ----- interactive: multi-line messages ---------------------------------------------------------------------------


def test_bracketed_paste_is_one_message():
    read = lines_from("\x1b[200~Dear Ann,", "the meeting: Tuesday # room 4", "- bring notes\x1b[201~", "next")
    assert repl.read_message(read) == "Dear Ann,\nthe meeting: Tuesday # room 4\n- bring notes"
    assert repl.read_message(read) == "next"
    one_line = lines_from("\x1b[200~pasted\x1b[201~ and typed")
    assert repl.read_message(one_line) == "pasted and typed"
    readline_paste = lines_from("line 1\r\nline 2\rline 3")  # readline hands a whole paste over as one line
    assert repl.read_message(readline_paste) == "line 1\nline 2\nline 3"
    assert repl.read_message(lines_from("piped CRLF line\r")) == "piped CRLF line"


def test_triple_quote_block_is_one_message():
    read = lines_from('"""', "def f(x):", "    return x  # id", "", '"""', "after")
    assert repl.read_message(read) == "def f(x):\n    return x  # id\n"
    assert repl.read_message(read) == "after"
    assert repl.read_message(lines_from('"""first', 'last"""')) == "first\nlast"
    assert repl.read_message(lines_from('"""just one"""')) == "just one"
    with pytest.raises(EOFError):
        repl.read_message(lines_from('"""', "never closed"))


def test_help_tells_how_to_send_several_lines(session, capsys):
    repl.run_command(session, "/help")
    text = capsys.readouterr().out
    assert '"""' in text and "paste" in text


def test_bracketed_paste_mode_is_switched_on_and_off(capsys):
    with repl.bracketed_paste(True):
        print("chat")
    assert capsys.readouterr().out == "\x1b[?2004hchat\n\x1b[?2004l"
    with repl.bracketed_paste(False):
        pass
    assert capsys.readouterr().out == ""


def test_ctrl_c_is_not_echoed_while_a_reply_streams():
    termios = pytest.importorskip("termios")
    leader, follower = os.openpty()
    try:
        with open(follower, "rb", buffering=0, closefd=False) as tty:
            termios.tcsetattr(follower, termios.TCSANOW, _with_echoctl(termios.tcgetattr(follower), termios))
            before = termios.tcgetattr(follower)
            with repl.quiet_control_echo(tty):
                assert not termios.tcgetattr(follower)[3] & termios.ECHOCTL
            assert termios.tcgetattr(follower) == before
        with repl.quiet_control_echo(io.StringIO()):  # not a terminal: nothing to do
            pass
    finally:
        os.close(leader)
        os.close(follower)


def _with_echoctl(attrs, termios):
    attrs = list(attrs)
    attrs[3] |= termios.ECHOCTL
    return attrs


def test_load_previews_from_a_word_boundary(session, capsys):
    long_reply = " ".join(f"word{i}" for i in range(200))
    text = repl.preview(long_reply)
    assert len(text) <= 303 and text.startswith("...word") and long_reply.endswith(text[3:])
    assert repl.preview("short text") == "short text"
    session.messages = [{"role": "user", "content": long_reply}]
    repl.run_command(session, "/save long")
    repl.run_command(session, "/load long")
    shown = capsys.readouterr().out.splitlines()[-1]
    assert shown.startswith("you> ...word") and long_reply.endswith(shown[len("you> ...") :])


# ----- --jsonl ------------------------------------------------------------------------------------------------------


def test_jsonl_objects_carry_multi_line_messages_and_commands(session, monkeypatch, capsysbinary, tmp_path):
    data = "\n".join(
        [
            json.dumps({"message": "line 1\nline 2: x # y"}),
            json.dumps({"command": "/save scripted"}),
            json.dumps({"command": "/set temperature=0.5"}),
            "plain text: still a message",
            json.dumps({"command": "/quit"}),
            "never read",
        ]
    )
    records = run_scripted(session, monkeypatch, capsysbinary, data.encode())
    assert [r.get("user", r.get("command")) for r in records] == [
        "line 1\nline 2: x # y",
        "/save scripted",
        "/set temperature=0.5",
        "plain text: still a message",
        "/quit",
    ]
    assert records[0]["reply"] is not None and records[0]["turn"] == 1
    assert (tmp_path / "scripted.streamchat").is_file() and "saved to" in records[1]["output"]
    assert session.settings.temperature == 0.5 and records[3]["turn"] == 2
    assert session.messages[0] == {"role": "user", "content": "line 1\nline 2: x # y"}


@pytest.mark.parametrize(
    "bad",
    [
        '{"message": ',
        '{"mesage": "hi"}',
        '{"message": 3}',
        '{"command": "save x"}',
        '{"message": "a", "command": "/help"}',
        '{"command": "/set window=0"}',
        '{"message": "   "}',
    ],
)
def test_jsonl_bad_objects_get_an_error_line_and_the_session_goes_on(session, monkeypatch, capsysbinary, bad):
    records = run_scripted(session, monkeypatch, capsysbinary, f"{bad}\nHello\n".encode())
    assert len(records) == 2 and "error" in records[0] and "reply" not in records[0]
    assert records[1]["user"] == "Hello" and records[1]["turn"] == 1


def test_jsonl_crlf_and_invalid_utf8_input(session, monkeypatch, capsysbinary):
    data = b"Hello\r\nbad \xff\xfe bytes\r\n\xc3\r\nlast"
    records = run_scripted(session, monkeypatch, capsysbinary, data)
    assert [r["user"] for r in records] == ["Hello", "bad \ufffd\ufffd bytes", "\ufffd", "last"]
    assert all("reply" in r for r in records) and records[-1]["turn"] == 4


def test_jsonl_output_is_valid_utf8_whatever_the_reply(session, monkeypatch, capsysbinary):
    original = session.send

    def surrogate_reply(text, *args, **kwargs):
        yield from original(text, *args, **kwargs)
        yield "\udcff lone surrogate"

    monkeypatch.setattr(session, "send", surrogate_reply)
    records = run_scripted(session, monkeypatch, capsysbinary, b"Hi\n")
    assert records[0]["reply"].endswith("\udcff lone surrogate")  # escaped as \udcff in the JSON text


def test_jsonl_reader_closing_the_pipe_ends_quietly(session, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation("no fd")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    sent, original = [], session.send

    def counting_send(text, *args, **kwargs):
        sent.append(text)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(session, "send", counting_send)
    assert repl.scripted(session, ["one", "two", "three"]) == 0
    assert sent == ["one"]  # it stopped at the first write that failed
