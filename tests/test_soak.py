"""The soak command on the tiny model: it pushes the tokens through, and its verdict can fail."""

import json

import pytest
from streamchat import cli
from streamchat.config import load_settings
from streamchat.evaluate import soak
from streamchat.session import ChatSession

TEXT = "It was a dreary night of November. " * 40 + "The rain pattered dismally against the panes. " * 40


def test_soak_pushes_the_tokens_through_one_conversation(tiny):
    session = ChatSession(tiny, load_settings(None, {"window": 60, "prefill_chunk": 32, "temperature": 0}))
    checkpoints = []
    result = soak.run_soak(
        session, tokens=4000, text=TEXT, paste_chars=300, reply_tokens=3, progress=False, checkpoint=checkpoints.append
    )
    summary = result["summary"]
    assert summary["passed"], summary
    assert summary["tokens_processed"] >= 4000 == summary["tokens_target"]
    assert summary["tokens_processed"] == session.cache.seen_tokens
    assert summary["kv_constant"] and summary["kv_bytes"] == session.cache.nbytes()
    assert summary["errors"] == 0 and summary["still_answering"]
    kinds = [r["kind"] for r in result["turns"]]
    assert "paste" in kinds and "question" in kinds and kinds[-1] == "final"
    assert max(r["cache_tokens"] for r in result["turns"]) <= session.cache.capacity
    assert len(checkpoints) == (len(result["turns"]) - 1) // 10 >= 1  # partial results every 10 turns


def test_passages_cycle_the_text_and_generated_text_never_ends():
    pieces = soak.passages("one two three four five six seven eight nine ten", 12)
    first = [next(pieces) for _ in range(8)]
    assert all(len(p) <= 12 and p == p.strip() for p in first)
    assert "one" in first[0] and "one" in " ".join(first[1:])  # it came round again
    generated = soak.passages(None, 200)
    assert all(len(next(generated)) >= 200 for _ in range(3))
    with pytest.raises(ValueError, match="empty"):
        next(soak.passages("   ", 10))


def record(**changes):
    base = {
        "kind": "paste",
        "seen_total": 100,
        "kv_bytes": 10,
        "rss_bytes": 1000,
        "error": None,
        "new_tokens": 2,
        "cache_tokens": 50,
        "evicted_total": 0,
        "prefill_tokens_per_s": 1.0,
        "decode_tokens_per_s": 1.0,
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    "records, target, failing",
    [
        ([record(), record(seen_total=200, kv_bytes=20), record(kind="final", seen_total=300)], 300, "kv_constant"),
        ([record(), record(seen_total=200, rss_bytes=2000), record(kind="final", seen_total=300)], 300, "rss_flat"),
        ([record(), record(error="RuntimeError: boom"), record(kind="final", seen_total=300)], 300, "errors"),
        ([record(), record(kind="final", seen_total=300, new_tokens=0)], 300, "still_answering"),
        ([record(), record(kind="final", seen_total=300)], 1000, "tokens_target"),
    ],
)
def test_verdict_fails_when_it_should(records, target, failing):
    summary = soak.summarize(records, capacity=64, rss_threshold=0.05, final_reply="", target=target)
    assert not summary["passed"]
    good = soak.summarize([record(), record(kind="final", seen_total=300)], 64, 0.05, "hi", 300)
    assert good["passed"] and summary[failing] != good[failing]


def test_soak_command(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(soak, "load_model", lambda *args: tiny)
    text = tmp_path / "book.txt"
    text.write_text(TEXT)
    config = tmp_path / "empty.yaml"
    config.write_text("")
    args = [
        "soak",
        "--config",
        str(config),
        "--window",
        "60",
        "--temperature",
        "0",
        "--tokens",
        "600",
        "--paste-chars",
        "300",
        "--reply-tokens",
        "2",
        "--text",
        str(text),
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    assert cli.main(args) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert headline["command"] == "soak" and headline["passed"] and headline["tokens_processed"] >= 600
    report = json.loads((tmp_path / "out" / "soak.json").read_text())
    assert report["summary"]["passed"] and report["machine"]["date"] and report["turns"]
    assert (tmp_path / "out" / "soak_turns.csv").is_file() and not (tmp_path / "out" / "soak.partial.json").exists()


def test_soak_command_bad_arguments(tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_text("")
    assert cli.main(["soak", "--config", str(config), "--tokens", "0"]) == 2
    assert cli.main(["soak", "--config", str(config), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
