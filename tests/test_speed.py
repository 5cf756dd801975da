"""The speed command on the tiny model: every path and K/V dtype in the table, ratios from the medians, the
default configuration named, quality rows, and llama.cpp skipped or dropped with a note, never a crash."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from streamchat import cli, native
from streamchat.config import load_settings
from streamchat.evaluate import speed
from streamchat.fastpath.choice import auto_kv_dtype

from tiny import shuffled_story, tiny_loaded


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(seed=3)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(shuffled_story(repeats=4, seed=1), encoding="utf-8")
    return path


def test_command_reports_every_path_side_by_side(loaded, text, tmp_path, capsys):
    folder = tmp_path / "model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    argv = [
        "speed",
        "--model",
        str(folder),
        "--text",
        str(text),
        "--budget",
        "40",
        "--tokens",
        "5",
        "--weights",
        "auto,model,int8",
        "--kv-dtypes",
        "model,bfloat16",
        "--quality-tokens",
        "60",
        "--set",
        "slack=4",
        "--out",
        str(tmp_path / "speed"),
        "--json",
    ]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    figures = report["speed"]
    names = [row["path"] for row in figures["rows"]]
    # auto resolves to the model's own weights for this fp32 model: measured once, not twice
    assert names == [
        "transformers_dynamic",
        "transformers_bounded",
        "fast_model_kv_fp32",
        "fast_model_kv_bf16",
        "fast_int8_kv_fp32",
        "fast_int8_kv_bf16",
        "chat_session",  # ChatStepper: a ChatSession's reply, the REPL's and the server's work per token
    ]
    auto_kv = speed.KV_NAMES[auto_kv_dtype(loaded.model.dtype)[0]]  # fp32, bf16 on AMX CPUs
    assert figures["default_path"] == f"fast_model_kv_{auto_kv}"
    reference = figures["rows"][0]["tokens_per_s"]
    for row in figures["rows"]:
        assert row["ms_per_token"] > 0
        assert row["speedup_vs_transformers"] == pytest.approx(row["tokens_per_s"] / reference, abs=0.006)
    assert any("llama.cpp skipped" in note and "not a GGUF file" in note for note in figures["notes"])
    quality = {row["path"]: row for row in report["quality"]}
    assert set(quality) == set(names[2:-1])  # the fast variants (the chat row decodes as the default one)
    assert quality["fast_model_kv_fp32"]["change_pct"] == 0  # the reference
    assert all(np.isfinite(row["perplexity"]) and row["perplexity"] > 1 for row in quality.values())
    assert json.loads((tmp_path / "speed" / "speed.json").read_text())["speed"]["rows"] == figures["rows"]


def test_the_default_path_reads_are_set_against_the_machine(loaded, text):
    settings = load_settings("configs/default.yaml", {"window": 36, "slack": 4})
    figures = speed.measure_speed(
        loaded, settings, text.read_text(), 5, ["auto"], ["auto"], llama_cpp=False, show_progress=False
    )
    reads, config = figures["reads"], loaded.model.config
    if native.library() is None:
        assert reads is None  # no streaming-read yardstick without the kernels
        return
    # the default path's bytes a token: every weight matrix it multiplies, and the K/V of its full cache
    matrices = sum(p.numel() * p.element_size() for n, p in loaded.model.named_parameters() if "norm" not in n)
    embedding = loaded.model.get_input_embeddings().weight
    if loaded.model.get_output_embeddings().weight.data_ptr() != embedding.data_ptr():
        matrices -= embedding.numel() * embedding.element_size()  # rows looked up, not multiplied
    assert reads["weights_bytes"] == matrices
    head_dim = config.hidden_size // config.num_attention_heads
    element = 2 if figures["default_path"].endswith(("fp16", "bf16")) else 4
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element
    assert reads["kv_bytes"] % per_token == 0 and 30 <= reads["kv_bytes"] // per_token <= settings.budget
    default_row = next(row for row in figures["rows"] if row["path"] == figures["default_path"])
    assert reads["gb_s"] == pytest.approx(
        (reads["weights_bytes"] + reads["kv_bytes"]) * default_row["tokens_per_s"] / 1e9, rel=0.01, abs=0.01
    )
    assert reads["machine_read_gb_s"] > 0
    assert reads["share"] == pytest.approx(reads["gb_s"] / reads["machine_read_gb_s"], rel=0.01, abs=0.002)
    assert "of this machine's streaming read" in speed.format_report({"speed": figures})


def test_read_bandwidth_is_measured_or_refused():
    if native.library() is None:
        assert native.read_bandwidth() is None
        return
    assert native.read_bandwidth(megabytes=64, repeats=2) > 0.1  # GB/s: any machine reads faster than this


def test_bad_text_and_counts_are_refused(loaded, text, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(speed, "load_model", lambda *args: loaded)
    short = tmp_path / "short.txt"
    short.write_text("once upon a time")
    for argv, message in (
        (["--text", str(tmp_path / "missing.txt")], "--text file not found"),
        (["--text", str(tmp_path)], "cannot read --text file"),
        (["--text", str(short), "--budget", "40", "--set", "slack=4"], "the --text file has only"),
        (["--text", str(text), "--tokens", "0"], "--tokens must be at least 1"),
        (["--text", str(text), "--quality-tokens", "2"], "--quality-tokens 0 (off) or at least 3"),
    ):
        assert cli.main(["speed", *argv, "--no-llama-cpp", "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err


def test_bad_lists_are_refused(loaded, text, capsys):
    assert cli.main(["speed", "--text", str(text), "--weights", "int3"]) == 2
    assert "--weights: unknown int3; valid: auto, model, bf16, int8, int4, int8_dynamic" in capsys.readouterr().err
    assert cli.main(["speed", "--text", str(text), "--kv-dtypes", ","]) == 2
    assert "--kv-dtypes: empty list" in capsys.readouterr().err


class CrashingWorker(speed.LlamaCppStepper):
    """A llama.cpp process that starts, then dies on its first step, as a native crash would."""

    @staticmethod
    def command(gguf, budget, threads):
        script = "import os, sys; print('{\"ready\": true}', flush=True); sys.stdin.readline(); os.abort()"
        return [sys.executable, "-c", script]


def test_a_dying_llama_cpp_costs_its_row_only(loaded, text, tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(speed, "LlamaCppStepper", CrashingWorker)
    settings = load_settings(None, {"window": 36, "slack": 4, "model": str(gguf)})
    figures = speed.measure_speed(loaded, settings, text.read_text(), 3, ["model"], ["model"], show_progress=False)
    assert [row["path"] for row in figures["rows"]] == [
        "transformers_dynamic",
        "transformers_bounded",
        "fast_model_kv_fp32",
        "chat_session",
    ]
    assert any(note.startswith("llama.cpp dropped: its process exited with code") for note in figures["notes"])


def test_missing_llama_cpp_is_a_note(loaded, text, tmp_path):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    settings = load_settings(None, {"window": 36, "slack": 4, "model": str(gguf)})
    figures = speed.measure_speed(loaded, settings, text.read_text(), 2, ["model"], ["model"], show_progress=False)
    assert (
        "llama.cpp skipped: llama-cpp-python is not installed (optional: pip install llama-cpp-python)"
        in figures["notes"]
    )


@pytest.mark.parametrize("policy", ["sink_window", "h2o", "tova"])
def test_speed_measures_the_policy_it_is_given_at_its_budget(policy):
    """`speed --policy h2o` measured sink_window until 2026-12-01 (its H2O figures were sink_window's): the policy
    asked for is kept, and its cache holds the budget."""
    from streamchat.config import load_settings
    from streamchat.evaluate.speed import at_budget
    from streamchat.policies import get_policy_class

    settings = at_budget(load_settings(None, {"policy": policy}), 512)
    assert settings.policy == policy and get_policy_class(policy).budget(settings) == 512


def test_chat_memory_child_runs_the_model_measured(tmp_path, monkeypatch, footprint_children):
    """speed's chat-memory child measured the embedded default model even with `--model FILE` (~495 MB printed for
    a 1B file) until 2026-12-04: the child's command names the model the run measures, and a run on the default
    model names none."""
    from streamchat.evaluate import footprint

    commands = footprint_children
    model = str(tmp_path / "llama-1b.Q4_K_M.gguf")
    figures = speed.measure_chat_memory(load_settings(None, {"model": model}), 40)
    assert figures == {"rss_bytes": 2 * 2**20, "peak_rss_bytes": 3 * 2**20}
    assert commands[0][commands[0].index("--model") + 1] == model
    speed.measure_chat_memory(load_settings(None, {}), 40)
    assert "--model" not in commands[1]
    measured = []
    monkeypatch.setattr(footprint, "measure", lambda *args: measured.append(args) or {})
    assert footprint.main(["--prompt-tokens", "40", "--model", model]) == 0
    assert measured[0][-1] == model


def test_a_gguf_blocks_model_has_one_set_of_weights(loaded, monkeypatch):
    """fast_variants (so build_paths, default_variant and the quality rows alike) measures a GGUF run from its own
    blocks once per K/V dtype, with the file's weights, whatever --weights asks."""
    from types import SimpleNamespace

    from streamchat.packing import PACKED_ATTR

    settings = load_settings(None, {})
    monkeypatch.setattr(loaded.model, PACKED_ATTR, SimpleNamespace(mode="gguf"), raising=False)
    variants = speed.fast_variants(loaded, settings, ["int4", "int8", "auto"], ["model"])
    assert [option for option, _ in variants.values()] == ["model"]
    monkeypatch.undo()
    assert len(speed.fast_variants(loaded, settings, ["int8", "model"], ["model"])) == 2


def test_chat_stepper_times_a_chat_reply_token_by_token(loaded):
    """The chat row runs a ChatSession's greedy reply: each timed step feeds the session's cache, evicting as a
    chat does (a 40-token cache, so the reply runs at a full cache)."""
    settings = load_settings(None, {"window": 36, "slack": 4})
    stepper = speed.ChatStepper(loaded, settings)
    ids = loaded.tokenizer("It was a dark and stormy night; the rain fell in torrents.")["input_ids"]
    stepper.prefill(ids)
    session = stepper.session
    assert session.settings.temperature == 0.0 and session.cache.seen_tokens >= len(ids)
    seen = session.cache.seen_tokens
    times = [stepper.timed_step(0) for _ in range(12)]
    assert all(t > 0 for t in times)
    assert session.cache.seen_tokens > seen + 8  # the reply's tokens went through the cache
    assert session.cache.evicted_tokens > 0 and session.cache.length <= 40
    stepper.close()
