"""The perplexity command on the tiny model: result files, the --json line, and each policy's NLLs checked against
an independent computation."""

import json

import numpy as np
import pytest
import torch
from streamchat import cli
from streamchat.config import load_settings
from streamchat.evaluate.ppl import POLICY_NAMES, PplError, policy_settings, run_ppl

from tiny import shuffled_story, tiny_loaded


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(seed=2)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text("\ufeff" + shuffled_story(repeats=6), encoding="utf-8")  # with a byte-order mark
    return path


def test_command_writes_table_plot_and_json_line(loaded, text, tmp_path, capsys):
    folder = tmp_path / "model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    out = tmp_path / "ppl"
    argv = [
        "ppl",
        "--model",
        str(folder),
        "--text",
        str(text),
        "--tokens",
        "240",
        "--budget",
        "40",
        "--recompute-every",
        "5",
        "--set",
        "slack=4",
        "--out",
        str(out),
        "--json",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(printed[-1])
    assert figures["command"] == "ppl" and figures["tokens"] == 240 and figures["budget"] == 40
    assert set(figures["ppl"]) == set(POLICY_NAMES)
    assert all(np.isfinite(value) and value > 1 for value in figures["ppl"].values())
    assert figures["vs_recompute"]["recompute"] == 1.0
    assert figures["h2o_time_overhead"] > -1
    for name in ("ppl.csv", "ppl.json", "nll.csv", "ppl.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "ppl.json").read_text())
    assert [row["policy"] for row in report["rows"]] == list(POLICY_NAMES)
    assert report["policy_settings"]["h2o"] == {
        "policy": "h2o",
        "sinks": 4,
        "heavy": 18,
        "recent": 18,
        "h2o_score": "normalized",
    }
    assert report["policy_settings"]["window"]["sinks"] == 0
    assert max(report["peak_cache_tokens"].values()) == 40
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("sink_window") for line in printed)  # the table


def test_nlls_against_direct_forwards(loaded, text, tmp_path):
    """dense = one causal forward; recompute = a forward over exactly the `budget` tokens before each target; a
    bounded cache that never fills = dense; once it evicts, sink_window and window differ from dense."""
    settings = load_settings(None, {"slack": 4})
    rows, report = run_ppl(
        loaded,
        settings,
        text.read_text(encoding="utf-8-sig"),
        tokens=120,
        budget=32,
        recompute_every=7,
        out=tmp_path,
        show_progress=False,
    )
    nll = {row["policy"]: None for row in rows}
    table = np.genfromtxt(tmp_path / "nll.csv", delimiter=",", names=True)
    ids = torch.tensor(
        loaded.tokenizer(text.read_text(encoding="utf-8-sig"), add_special_tokens=False)["input_ids"][:120]
    )
    with torch.no_grad():
        logits = loaded.model(input_ids=ids[None]).logits[0, :-1].double()
    dense = -torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0].numpy()
    np.testing.assert_allclose(table["dense"], dense, atol=1e-4)
    for name in ("window", "sink_window", "h2o"):  # the cache holds everything up to the budget: same as dense
        np.testing.assert_allclose(table[name][:31], dense[:31], atol=1e-4)
        assert np.abs(table[name][40:] - dense[40:]).max() > 1e-3
    sampled = np.flatnonzero(~np.isnan(table["recompute"]))
    assert list(sampled[31:]) == [target - 1 for target in range(32, 120, 7)]
    with torch.no_grad():
        for target in (32, 60, 116):
            window_logits = loaded.model(input_ids=ids[None, target - 32 : target]).logits[0, -1].double()
            expected = -torch.log_softmax(window_logits, -1)[ids[target]].item()
            assert table["recompute"][target - 1] == pytest.approx(expected, abs=1e-4)
    assert set(nll) == set(POLICY_NAMES)
    dense_row = next(row for row in rows if row["policy"] == "dense")
    recompute_tokens = [target - 1 for target in range(32, 120, 7)]
    assert dense_row["ppl_at_recompute_tokens"] == pytest.approx(np.exp(dense[recompute_tokens].mean()), rel=1e-4)
    assert dense_row["ppl"] == pytest.approx(np.exp(dense.mean()), rel=1e-4)
    assert dense_row["ppl_after_budget"] == pytest.approx(np.exp(dense[31:].mean()), rel=1e-4)
    assert report["peak_cache_tokens"] == {"window": 32, "sink_window": 32, "h2o": 32}


def test_every_bounded_policy_gets_the_same_budget():
    settings = load_settings(None, {})
    for name in ("window", "sink_window", "h2o", "tova"):
        assert policy_settings(settings, name, 256).budget == 256
    assert policy_settings(settings, "window", 256).sinks == 0
    halves = policy_settings(settings, "h2o", 256)
    assert (halves.sinks, halves.heavy, halves.recent) == (4, 126, 126)
    assert policy_settings(settings, "h2o", 256, heavy=200).recent == 52
    with pytest.raises(PplError, match="--heavy"):
        policy_settings(settings, "h2o", 256, heavy=252)
