import csv
import json

import pytest
import torch
from streamchat import cli
from streamchat.config import load_settings
from streamchat.evaluate import bench, speed
from streamchat.fastpath.choice import auto_kv_dtype
from streamchat.prompts import demo_token_ids

BUDGET = 48  # the tiny template's system prompt (17 tokens) must fit in half the budget


@pytest.fixture(scope="module")
def settings():
    return load_settings(None, {"sinks": 4, "window": 44, "slack": 4})


def test_paths_hold_the_tokens_they_should(tiny, settings):
    ids = demo_token_ids(tiny.tokenizer, 70)
    assert len(ids) == 70
    bounded = bench.BoundedPath(tiny, bench.budget_settings(settings, BUDGET))
    dense = bench.DensePath(tiny, settings)
    at_length = bench.DenseAtLengthPath(tiny, settings, length=20)
    recompute = bench.RecomputePath(tiny, bench.budget_settings(settings, BUDGET))
    for token in ids:
        for path in (bounded, dense, at_length, recompute):
            path.step(token)
    assert BUDGET - settings.slack - 1 <= bounded.cache_tokens <= BUDGET
    assert dense.cache_tokens == 70 and at_length.cache_tokens == 20 and recompute.cache_tokens == BUDGET
    filled = bench.BoundedPath(tiny, bench.budget_settings(settings, BUDGET))
    filled.prefill(ids)  # in chunks of at most the room, evicting between them
    assert filled.cache.stats()["seen_total"] == 70 and filled.cache_tokens <= BUDGET


def test_decode_curve_rows_per_path_and_bin(tiny, settings):
    rows = bench.measure_decode_curve(tiny, settings, [BUDGET], tokens=60, bin_size=20, show_progress=False)
    assert [(r["path"], r["budget"], r["tokens_processed"]) for r in rows] == [
        ("sink_window", BUDGET, 20),
        ("dense", None, 20),
        ("sink_window", BUDGET, 40),
        ("dense", None, 40),
        ("sink_window", BUDGET, 60),
        ("dense", None, 60),
    ]
    assert rows[-2]["cache_tokens"] <= BUDGET < rows[-1]["cache_tokens"] == 60
    assert all(r["ms_per_token"] > 0 for r in rows)


def test_overhead_and_recompute_compare_at_the_same_budget(tiny, settings):
    overhead = bench.measure_overhead(tiny, settings, BUDGET, rounds=8, show_progress=False)
    assert overhead["cache_tokens"] == BUDGET - 2 and overhead["steps"] == 8
    assert overhead["ratio"] == pytest.approx(overhead["ms_per_token"] / overhead["baseline_ms_per_token"], abs=0.01)
    speedup = bench.measure_recompute_speedup(tiny, settings, BUDGET, rounds=2, show_progress=False)
    assert speedup["steps"] == 2 * settings.slack and speedup["baseline_steps"] == 2
    assert speedup["speedup"] == pytest.approx(speedup["baseline_ms_per_token"] / speedup["ms_per_token"], abs=0.01)


def test_ttft_short_and_long_prompt(tiny, settings):
    rows = bench.measure_ttft(tiny, settings, BUDGET, long_tokens=120, repeats=1, show_progress=False)
    short, long = rows
    assert (short["prompt"], long["prompt"]) == ("short", "long")
    assert short["prompt_tokens"] + 60 < 120 <= long["prompt_tokens"]
    assert short["ttft_s"] > 0 and long["ttft_s"] > 0


def test_load_time_uses_a_temporary_model_cache_and_restores_it(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "tiny-model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    monkeypatch.setenv("STREAMCHAT_CACHE", "/somewhere/else")
    row = bench.measure_load_time(load_settings(None, {"model": str(folder)}))
    assert row["cold_s"] > 0 and row["cached_s"] > 0 and row["cold_converted"] is False
    import os

    assert os.environ["STREAMCHAT_CACHE"] == "/somewhere/else"


def test_command_writes_results_and_a_json_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "load_model", lambda *args: tiny)
    status = cli.main(
        [
            "bench",
            "--budget",
            str(BUDGET),
            "--tokens",
            "40",
            "--only",
            "curve,overhead,recompute",
            "--rounds",
            "4",
            "--recompute-rounds",
            "1",
            "--window",
            "44",
            "--sinks",
            "4",
            "--set",
            "slack=4",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert status == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["command"] == "bench" and f"overhead_sink_window@{BUDGET}" in last
    assert f"recompute_speedup_sink_window@{BUDGET}" in last and "curve_dense" in last
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["budgets"] == [BUDGET] and len(saved["summary"]) == 2
    with (tmp_path / "bench_curve.csv").open() as handle:
        assert {row["path"] for row in csv.DictReader(handle)} == {"sink_window", "dense"}
    with (tmp_path / "bench_summary.csv").open() as handle:
        assert [row["measure"] for row in csv.DictReader(handle)] == ["overhead", "recompute_speedup"]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_speed_measure_reports_every_decode_path(tiny, tmp_path, monkeypatch, capsys):
    """`bench` also reports the decode paths' tokens/s side by side (the `speed` measurement)."""
    monkeypatch.setattr(bench, "load_model", lambda *args: tiny)

    def no_llama_cpp(*args):
        raise speed.LlamaCppFailed("not in this test")

    monkeypatch.setattr(speed, "LlamaCppStepper", no_llama_cpp)
    status = cli.main(
        [
            "bench",
            "--budget",
            str(BUDGET),
            "--only",
            "speed",
            "--rounds",
            "3",
            "--set",
            "slack=4",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out.strip().splitlines()
    last = json.loads(printed[-1])
    for path in ("transformers_dynamic", "transformers_bounded", "fast_model_kv_fp32", "fast_int4_kv_bf16"):
        figures = last[f"speed_{path}@{BUDGET}"]
        assert figures["tokens_per_s"] > 0 and figures["speedup"] > 0
    assert last[f"speed_transformers_dynamic@{BUDGET}"]["speedup"] == 1.0
    default = (
        f"fast_model_kv_{speed.KV_NAMES[auto_kv_dtype(torch.float32)[0]]}"  # fp16 (native kernels), else fp32 or bf16
    )
    assert any("(default)" in line and default in line for line in printed)
    assert f"decode speed @{BUDGET}: llama.cpp skipped: not in this test" in printed


def test_command_refuses_bad_lists(tmp_path, capsys):
    assert cli.main(["bench", "--only", "curve,nope", "--out", str(tmp_path)]) == 2
    assert "unknown nope" in capsys.readouterr().err


def test_bench_memory_children_measure_the_model_the_run_measures(tmp_path, footprint_children):
    """bench's memory rows ran the default model whatever --model said (until 2026-12-04)."""
    from streamchat.config import load_settings
    from streamchat.evaluate import bench

    commands = footprint_children
    model = str(tmp_path / "llama-1b.Q4_K_M.gguf")
    rows = bench.measure_memory(load_settings(None, {"model": model}), 40)
    assert rows and len(commands) == len(rows)
    assert all(command[command.index("--model") + 1] == model for command in commands)
