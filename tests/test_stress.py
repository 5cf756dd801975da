import csv
import json

import pytest
from streamchat import cli
from streamchat.config import load_settings
from streamchat.evaluate import stress
from streamchat.evaluate.stress import DenseSession, headline, memory_verdict, run_stress

MB = 1024 * 1024


def records(kv, rss, tokens_per_turn=100):
    return [
        {"turn": i + 1, "tokens_total": (i + 1) * tokens_per_turn, "kv_bytes": k, "rss_bytes": r}
        for i, (k, r) in enumerate(zip(kv, rss))
    ]


def test_verdict_passes_when_kv_constant_and_rss_flat_after_warmup():
    # budget 250: warm-up ends at turn 3 (300 tokens); growth before it does not count
    verdict = memory_verdict(records([10, 20, 30, 30, 30], [500, 800, 1000, 1010, 1015]), budget=250)
    assert verdict.passed and verdict.status == "pass"
    assert verdict.warmup_turn == 3 and verdict.rss_baseline == 1000 and verdict.rss_max == 1015
    assert verdict.rss_growth == pytest.approx(0.015)


def test_verdict_fails_when_kv_bytes_change_after_warmup():
    verdict = memory_verdict(records([30, 30, 30, 31, 30], [1000] * 5), budget=250)
    assert not verdict.passed and verdict.status == "kv_growth"
    assert "turn 4" in verdict.message and "MEMORY GROWS" in verdict.message


def test_verdict_fails_when_rss_grows_past_threshold():
    rss = [1000, 1000, 1000, 1010, 1030]
    assert memory_verdict(records([30] * 5, rss), budget=250, rss_threshold=0.02).status == "rss_growth"
    assert memory_verdict(records([30] * 5, rss), budget=250, rss_threshold=0.05).passed


def test_verdict_too_short_when_cache_never_fills_or_nothing_after_warmup():
    assert memory_verdict(records([30] * 3, [1000] * 3), budget=1000).status == "too_short"
    too_short = memory_verdict(records([30] * 3, [1000] * 3), budget=250)
    assert not too_short.passed and too_short.status == "too_short" and too_short.warmup_turn == 3


@pytest.fixture(scope="module")
def tiny_settings():
    return load_settings(None, {"sinks": 4, "window": 44, "slack": 4, "max_new_tokens": 6, "temperature": 0, "seed": 0})


def test_tiny_run_writes_results_and_passes_while_dense_fails(tiny, tiny_settings, tmp_path):
    report = run_stress(
        tiny,
        tiny_settings,
        tmp_path,
        turns=8,
        reply_tokens=6,
        rss_threshold=1.0,
        compare_dense=True,
        dense_tokens=10_000,
        show_progress=False,
    )
    bounded, dense = report["runs"]["sink_window"], report["runs"]["dense"]
    assert bounded["verdict"]["passed"], bounded["verdict"]["message"]
    assert dense["verdict"]["status"] == "kv_growth"
    assert len(bounded["records"]) == len(dense["records"]) == 8
    assert max(r["cache_tokens"] for r in bounded["records"]) <= tiny_settings.budget
    assert bounded["records"][-1]["tokens_total"] > 2 * tiny_settings.budget  # the stream outgrew the cache
    kv = [r["kv_bytes"] for r in dense["records"]]
    assert kv == sorted(kv) and kv[-1] > kv[0]
    assert dense["records"][-1]["cache_tokens"] == dense["records"][-1]["tokens_total"]  # nothing evicted

    saved = json.loads((tmp_path / "stress.json").read_text())
    assert saved["primary"] == "sink_window" and set(saved["runs"]) == {"sink_window", "dense"}
    with (tmp_path / "stress.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16 and {"tokens_total", "kv_bytes", "rss_bytes", "decode_tokens_per_s"} <= set(rows[0])
    assert (tmp_path / "stress.png").read_bytes()[:4] == b"\x89PNG"

    figures = headline(report)
    assert figures["passed"] is True and figures["dense"]["passed"] is False
    assert figures["dense"]["kv_mb_max"] > figures["sink_window"]["kv_mb_max"]


def test_dense_mode_is_the_primary_verdict_and_stops_at_its_token_limit(tiny, tiny_settings, tmp_path):
    report = run_stress(
        tiny,
        tiny_settings,
        tmp_path,
        mode="dense",
        turns=50,
        reply_tokens=6,
        dense_tokens=150,
        show_progress=False,
    )
    run = report["runs"]["dense"]
    assert report["primary"] == "dense" and not headline(report)["passed"]
    assert len(run["records"]) < 50 and run["records"][-1]["tokens_total"] >= 150
    assert run["records"][-2]["tokens_total"] < 150


def test_dense_session_cache_grows_without_evicting(tiny, tiny_settings):
    session = DenseSession(tiny, tiny_settings, token_limit=10_000)
    for text in ("hello there", "tell me a story", "what is 2+2?"):
        "".join(session.send(text, max_new_tokens=5))
    stats = session.last_turn.cache
    assert stats["evicted_total"] == 0 and stats["cache_tokens"] == stats["seen_total"] > tiny_settings.budget // 2
    session.reset()
    assert session.cache.stats()["cache_tokens"] == 0 and session.cache.nbytes() == 0


TINY_FLAGS = ["--window", "44", "--sinks", "4", "--set", "slack=4", "--temperature", "0", "--max-new-tokens", "6"]


def test_command_passes_bounded_and_fails_dense_with_exit_status_1(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stress, "load_model", lambda *args: tiny)
    bounded = cli.main(
        ["stress", "--turns", "6", "--rss-threshold", "1", "--out", str(tmp_path), "--json", *TINY_FLAGS]
    )
    out = capsys.readouterr().out
    assert bounded == 0 and "verdict: PASS" in out
    assert json.loads(out.strip().splitlines()[-1])["sink_window"]["passed"] is True

    dense = cli.main(["stress", "--policy", "dense", "--turns", "6", "--out", str(tmp_path), "--json", *TINY_FLAGS])
    out = capsys.readouterr().out
    assert dense == 1 and "verdict: FAIL: MEMORY GROWS" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["primary"] == "dense" and last["passed"] is False and last["dense"]["status"] == "kv_growth"


def test_command_reports_a_missing_prompts_file(tmp_path, capsys):
    status = cli.main(["stress", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path)])
    assert status == 2 and "prompts file not found" in capsys.readouterr().err
