"""Integration: a short real conversation on the embedded SmolLM2-135M-Instruct, in-process and via the REPL."""

import json
import subprocess
import sys
from pathlib import Path

from streamchat.config import load_settings
from streamchat.session import ChatSession

ROOT = Path(__file__).resolve().parent.parent


def test_real_conversation_with_evictions(embedded):
    settings = load_settings(None, {"sinks": 4, "window": 60, "temperature": 0, "max_new_tokens": 40})
    session = ChatSession(embedded, settings)
    first = "".join(session.send("What is the capital of France?"))
    assert "Paris" in first
    second = "".join(session.send("And what is 2+2?"))
    assert second.strip()
    assert session.cache.length <= 64
    assert session.cache.evicted_tokens > 0
    assert session.last_turn.decode_tokens_per_s > 0


def test_repl_jsonl_three_turns():
    result = subprocess.run(
        [sys.executable, "-m", "streamchat", "chat", "--jsonl", "--sinks", "4", "--window", "60"],
        input="Hi\nWhat is 2+2?\nTell me a story.\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3
    assert all(r["reply"].strip() for r in records)
    assert all(r["cache_tokens"] <= 64 and r["cache_capacity"] == 64 for r in records)
    for key in ("sink_tokens", "evicted_total", "kv_bytes", "rss_bytes", "decode_tokens_per_s"):
        assert key in records[-1]
    assert records[-1]["evicted_total"] > records[0]["evicted_total"]


def test_repl_reports_a_missing_model_clearly():
    result = subprocess.run(
        [sys.executable, "-m", "streamchat", "chat", "--jsonl", "--model", "/nonexistent/model.gguf"],
        input="Hi\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model path not found: /nonexistent/model.gguf" in result.stderr


def test_a_chat_process_freezes_its_startup_objects():
    """load_for_chat (REPL, web UI, server) puts the ~400,000 objects of torch, transformers and the model out of
    the garbage collector's full collections, which otherwise stalled a reply by 90-170 ms at random."""
    code = (
        "import gc; from streamchat.config import load_settings; from streamchat.model import load_for_chat; "
        "before = gc.get_freeze_count(); load_for_chat(load_settings()); print(before, gc.get_freeze_count())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    assert before == 0 and after > 100_000
