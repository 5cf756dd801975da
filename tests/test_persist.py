"""Saving and resuming a session: exact continuation, and refusal of anything that does not fit, unchanged."""

import gc
import json
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from streamchat import persist
from streamchat.config import load_settings
from streamchat.model import LoadedModel
from streamchat.persist import SessionFileError
from streamchat.session import ChatSession, SessionError

TURNS = ["Hello there! How are you today?", "Tell me a story about a dragon", "What is 2+2?"]
NEXT = ["Numbers and symbols +-*/", "And the castle by the sea?"]


def settings(tmp_path, **changes):
    values = {"window": 60, "sinks": 4, "temperature": 0, "max_new_tokens": 12, "prefill_chunk": 16}
    return load_settings(None, {**values, "sessions_dir": str(tmp_path), **changes})


def talk(session: ChatSession, messages: list[str]) -> list[list[int]]:
    replies = []
    for message in messages:
        "".join(session.send(message))
        replies.append(list(session.last_reply_ids))
    return replies


def snapshot(session: ChatSession) -> str:
    """A digest of every bit of the session's state (conversation, settings, cache, sampler)."""
    return persist._read_header(persist.dumps(session))["sha256"]


def test_a_cache_saved_under_another_auto_choice_resumes_as_saved(tiny, tmp_path, monkeypatch):
    """`kv_dtype: auto` may choose another dtype on another machine or version (fp32 before the native kernels,
    fp16 with them): a saved conversation resumes with the K/V dtype it was saved in, token for token."""
    from streamchat import fastpath

    monkeypatch.setattr(fastpath, "auto_kv_dtype", lambda dtype: (torch.float32, "as before"))
    original = ChatSession(tiny, settings(tmp_path, kv_dtype="auto"))
    talk(original, TURNS)
    assert original.cache.layers[0].keys.dtype == torch.float32
    persist.save(original, "older")
    replies_a = talk(original, NEXT)
    monkeypatch.setattr(fastpath, "auto_kv_dtype", lambda dtype: (torch.float16, "native kernels"))
    assert ChatSession(tiny, settings(tmp_path, kv_dtype="auto")).cache.dtype == torch.float16
    fresh = ChatSession(tiny, settings(tmp_path, kv_dtype="auto"))
    persist.load(fresh, "older")
    assert fresh.cache.layers[0].keys.dtype == torch.float32 and fresh.settings.kv_dtype == "float32"
    assert talk(fresh, NEXT) == replies_a


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 7}], ids=["greedy", "sampled"])
def test_resumed_session_continues_token_for_token(tiny, tmp_path, sampling):
    original = ChatSession(tiny, settings(tmp_path, **sampling))
    talk(original, TURNS)
    assert original.cache.evicted_tokens > 0  # the saved cache has been compacted already
    path = persist.save(original, "chat-1")
    assert path == tmp_path / "chat-1.streamchat"
    stats_at_save = original.stats()
    replies_a = talk(original, NEXT)

    fresh = ChatSession(tiny, load_settings(None, {"sessions_dir": str(tmp_path), "window": 100}))
    persist.load(fresh, "chat-1")
    assert {k: v for k, v in fresh.stats().items() if k != "rss_bytes"} == {
        k: v for k, v in stats_at_save.items() if k != "rss_bytes"
    }
    assert fresh.settings.window == 60 and fresh.messages == original.messages[: len(fresh.messages)]
    replies_b = talk(fresh, NEXT)
    assert replies_a == replies_b
    assert all(replies_a)
    assert fresh.messages == original.messages
    assert fresh.cache.stats() == original.cache.stats()


def test_h2o_scores_travel_with_the_session(tiny, tmp_path):
    """H2O ranks tokens by accumulated attention: a resumed session evicts, and so answers, the same."""
    h2o = {"policy": "h2o", "heavy": 16, "recent": 40}
    original = ChatSession(tiny, settings(tmp_path, **h2o))
    talk(original, TURNS)
    assert original.cache.evicted_tokens > 0
    data = persist.dumps(original)
    assert any(name.startswith("cache.policy.scores") for name in load_tensors(data))
    replies_a = talk(original, NEXT)
    fresh = ChatSession(tiny, settings(tmp_path))
    persist.loads(fresh, data)
    assert talk(fresh, NEXT) == replies_a and fresh.cache.stats() == original.cache.stats()


def test_file_is_safetensors_with_versioned_checksummed_header(tiny, tmp_path):
    session = ChatSession(tiny, settings(tmp_path))
    talk(session, TURNS[:1])
    path = persist.save(session, "s")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header = persist._read_header(path.read_bytes())
    assert header["format"] == persist.FORMAT and header["version"] == str(persist.VERSION)
    assert len(header["sha256"]) == 64
    meta = json.loads(header["session"])
    assert meta["identity"] == tiny.identity and meta["messages"] == session.messages
    assert meta["cache"]["seen_tokens"] == session.cache.seen_tokens


def test_empty_session_round_trips(tiny, tmp_path):
    session = ChatSession(tiny, settings(tmp_path))
    persist.save(session, "empty")
    other = ChatSession(tiny, settings(tmp_path))
    talk(other, TURNS[:1])
    persist.load(other, "empty")
    assert other.cache.length == 0 and other.turns == 0 and other.visible_messages == []
    talk(other, TURNS[:1])  # and it goes on


def refused(session: ChatSession, data: bytes, match: str) -> None:
    before = snapshot(session)
    with pytest.raises(SessionFileError, match=match):
        persist.loads(session, data)
    assert snapshot(session) == before


@pytest.fixture()
def saved(tiny, tmp_path):
    """A saved session's bytes, and a different live session to load them into."""
    source = ChatSession(tiny, settings(tmp_path))
    talk(source, TURNS)
    target = ChatSession(tiny, settings(tmp_path, window=40))
    talk(target, TURNS[:1])
    return persist.dumps(source), target


def forge(data: bytes, edit_meta=None, edit_tensors=None, header_changes=None) -> bytes:
    """A file re-signed after an edit: what passes the checksum but must still be refused."""
    header = persist._read_header(data)
    meta, tensors = json.loads(header["session"]), load_tensors(data)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    session_json = json.dumps(meta)
    header = {**header, "session": session_json, "sha256": persist._digest(session_json, tensors)}
    return save_tensors(tensors, metadata={**header, **(header_changes or {})})


def test_refuses_truncated_file(saved):
    data, target = saved
    for size in (0, 5, 100, len(data) // 2, len(data) - 1):
        refused(target, data[:size], "cannot load")


def test_refuses_tampered_tensor_bytes(saved):
    data, target = saved
    tampered = bytearray(data)
    tampered[-3] ^= 0x40  # inside the last tensor's bytes
    refused(target, bytes(tampered), "checksum mismatch")


def test_refuses_edited_conversation(saved):
    data, target = saved
    header = persist._read_header(data)
    meta = json.loads(header["session"])
    meta["messages"][1]["content"] = "something I never said"
    edited = save_tensors(load_tensors(data), metadata={**header, "session": json.dumps(meta)})
    refused(target, edited, "checksum mismatch")


def test_refuses_other_model(saved, tiny):
    data, _ = saved
    other = LoadedModel(tiny.model, tiny.tokenizer, "another-model", "other", 0.0, False)
    session = ChatSession(other, load_settings(None, {"window": 60}))
    refused(session, data, "saved with model 'tiny-llama'")


def test_refuses_wrong_shapes_and_dtypes(saved):
    data, target = saved

    def narrow(tensors):
        tensors["cache.layer0.keys"] = tensors["cache.layer0.keys"][..., :8].contiguous()

    def half(tensors):
        tensors["cache.layer1.values"] = tensors["cache.layer1.values"].double()

    def drop(tensors):
        del tensors["cache.layer1.raw_keys"]

    def extra(tensors):
        tensors["cache.layer7.keys"] = torch.zeros(1)

    refused(target, forge(data, edit_tensors=narrow), r"layer0.keys: expected \(1, 2, \d+, 16\)")
    refused(target, forge(data, edit_tensors=half), f"layer1.values: expected .* {target.cache.dtype}, found .*float64")
    refused(target, forge(data, edit_tensors=drop), "layer1.raw_keys: .* found missing")
    refused(target, forge(data, edit_tensors=extra), "unexpected cache tensors: layer7.keys")


def test_refuses_inconsistent_fields(saved):
    data, target = saved
    cases = {
        "seen": (lambda m: m["cache"].update(seen_tokens=m["cache"]["seen_tokens"] + 1), "do not add up"),
        "vocab": (lambda m: m["pending"].append(10**6), "malformed"),
        "template": (lambda m: m.update(fed_template=m["fed_template"] + "\ue00099\ue001"), "malformed"),
        "settings": (lambda m: m["settings"].update(window=-3), "window: must be at least 1"),
        "unknown setting": (lambda m: m["settings"].update(bogus=1), "unknown key 'bogus'"),
        "policy": (lambda m: m["cache"]["policy_state"].update(scores=1), "keeps no state"),
        "missing": (lambda m: m.pop("turns"), "lacks 'turns'"),
        "dtype": (lambda m: m["settings"].update(dtype="bfloat16"), "dtype bfloat16"),
    }
    for edit, match in cases.values():
        refused(target, forge(data, edit_meta=edit), match)


def test_paths_in_a_session_file_are_ignored(saved):
    """A session file cannot point this run at files: path and machine settings stay this run's own."""
    data, target = saved
    persist.loads(target, forge(data, edit_meta=lambda m: m["settings"].update(prompts_file="/etc/passwd", threads=64)))
    assert target.settings.prompts_file is None and target.settings.threads is None


def test_refuses_other_formats_and_versions(saved):
    data, target = saved
    refused(target, b"\x00" * 64, "cannot load")
    refused(target, save_tensors({"x": torch.zeros(2)}), "no streamchat metadata")
    refused(target, forge(data, header_changes={"version": "2"}), "format version 2")
    refused(target, forge(data, header_changes={"format": "other"}), "not a streamchat session")


def test_names_cannot_leave_the_sessions_folder(tiny, tmp_path):
    session = ChatSession(tiny, settings(tmp_path / "sessions"))
    for name in ("../escape", "a/b", "/etc/passwd", ".hidden", "", "x" * 65, "nul\x00", "..", "~root", "a b", "é"):
        with pytest.raises(SessionFileError, match="invalid session name"):
            persist.save(session, name)
        with pytest.raises(SessionFileError, match="invalid session name"):
            persist.load(session, name)
    assert not (tmp_path / "escape.streamchat").exists() and list(tmp_path.iterdir()) == []
    assert persist.session_path("ok_name-2.v1", str(tmp_path)).parent == tmp_path


def test_unknown_name_lists_saved_ones(tiny, tmp_path):
    session = ChatSession(tiny, settings(tmp_path))
    persist.save(session, "alpha")
    with pytest.raises(SessionFileError, match=r"no saved session named 'beta'.*alpha"):
        persist.load(session, "beta")
    assert persist.saved_names(str(tmp_path)) == ["alpha"]


def test_default_sessions_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert persist.sessions_dir(None) == tmp_path / "streamchat" / "sessions"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert persist.sessions_dir(None) == tmp_path / ".local" / "share" / "streamchat" / "sessions"
    assert persist.sessions_dir("~/s") == tmp_path / "s"


def test_cannot_save_or_load_while_generating(tiny, tmp_path):
    session = ChatSession(tiny, settings(tmp_path))
    data = persist.dumps(session)
    reply = session.send(TURNS[0])
    next(reply)
    with pytest.raises(SessionError, match="still being generated"):
        persist.dumps(session)
    with pytest.raises(SessionFileError, match="still being generated"):
        persist.loads(session, data)
    reply.close()


def test_unwritable_folder_is_a_clear_error(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    session = ChatSession(tiny, settings(blocker / "sessions"))
    with pytest.raises(SessionFileError, match="cannot save"):
        persist.save(session, "x")


def test_policy_state_travels_with_the_cache(tiny, tmp_path, monkeypatch):
    """The generic hook an attention-score policy (H2O) uses: its tensors and JSON come back as saved."""
    from streamchat.policies.sink_window import SinkWindowPolicy

    received = {}
    monkeypatch.setattr(
        SinkWindowPolicy, "state", lambda self: ({"scores": torch.arange(6.0).reshape(2, 3)}, {"steps": 5})
    )
    monkeypatch.setattr(SinkWindowPolicy, "load_state", lambda self, tensors, meta: received.update(tensors, **meta))
    session = ChatSession(tiny, settings(tmp_path))
    talk(session, TURNS[:1])
    other = ChatSession(tiny, settings(tmp_path))
    persist.loads(other, persist.dumps(session))
    assert received["steps"] == 5 and torch.equal(received["scores"], torch.arange(6.0).reshape(2, 3))


def test_repl_save_load_and_list(tiny, tmp_path, capsys):
    from streamchat.frontends.repl import run_command

    session = ChatSession(tiny, settings(tmp_path))
    talk(session, TURNS[:2])
    before = {k: v for k, v in session.stats().items() if k != "rss_bytes"}
    assert run_command(session, "/save evening")
    assert "saved to" in capsys.readouterr().out
    run_command(session, "/reset")
    run_command(session, "/sessions")
    assert "evening" in capsys.readouterr().out
    run_command(session, "/load evening")
    out = capsys.readouterr().out
    assert "(loaded evening: 4 messages, turn 2)" in out and f"you> {TURNS[1]}" in out
    assert {k: v for k, v in session.stats().items() if k != "rss_bytes"} == before
    run_command(session, "/load")
    assert "usage: /load NAME   (saved: evening)" in capsys.readouterr().out
    with pytest.raises(SessionFileError, match="invalid session name"):
        run_command(session, "/load ../../etc/passwd")


# ----- the browser UI: save as a download, load from an upload ------------------------------------------------


@pytest.mark.filterwarnings("ignore:Not loaded:UserWarning", "ignore:A reply is being generated:UserWarning")
def test_ui_save_download_and_load_upload(tiny, tmp_path):
    gr = pytest.importorskip("gradio")
    from streamchat.frontends.web import ChatApp, build_app

    base = settings(tmp_path, temperature=0.0)
    saver, loader = ChatApp(tiny, base), ChatApp(tiny, settings(tmp_path, window=100, temperature=0.9))
    tab = gr.Request(session_hash="../../escape")
    session = saver.session(tab)
    for text in TURNS:
        list(session.stream_turn(text))
    update, status = saver.save_clicked(tab)
    path = update["value"]
    assert "Saved" in status and path.endswith("conversation.streamchat")
    assert saver.save_dir in Path(path).resolve().parents  # the client's session hash is not used as a path
    replies_a = talk(session.chat, NEXT)

    other = gr.Request(session_hash="other")
    page, status, system, temperature, top_p, top_k, max_new, policy, sinks, window, heavy, recent = (
        loader.load_uploaded(path, other)
    )
    resumed = loader.session(other)
    assert "Loaded: 6 messages" in status and window == 60 and temperature == 0.0 and max_new["value"] == 12
    assert [(m["role"], m["content"]) for m in page] == [
        (m["role"], m["content"]) for m in resumed.chat.visible_messages
    ]
    assert talk(resumed.chat, NEXT) == replies_a

    garbage = tmp_path / "bad.streamchat"
    garbage.write_bytes(b"\x00" * 100)
    before = snapshot(resumed.chat)
    result = loader.load_uploaded(str(garbage), other)
    assert "Not loaded: cannot load" in result[1] and "not a streamchat session file" in result[1]
    assert snapshot(resumed.chat) == before
    resumed.generating = True
    assert "press Stop first" in loader.load_uploaded(path, other)[1]
    assert "press Stop first" in loader.save_clicked(other)[1]
    resumed.generating = False
    build_app(tiny, base)  # the buttons are wired
    folder = saver.save_dir
    del saver, update
    gc.collect()
    assert not folder.exists()  # the saved downloads go with the app
