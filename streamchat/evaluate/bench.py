"""`python -m streamchat bench`: decode speed of the bounded cache against the alternatives, measured side by side.

Each measurement is one function returning rows that carry a "path" column (a way to decode, see `PATHS`), so a
new decode path is benchmarked by registering it. Paths that must be compared are stepped in turns, token by
token, in alternating order: on a shared machine, load changes hit every path alike and the ratios hold.

- decode curve: ms/token vs tokens processed, from an empty cache (bounded paths flatten once full, dense grows);
- overhead: the bounded cache vs a plain transformers DynamicCache kept at the same length;
- recompute speedup: vs a sliding window re-computed from scratch for every token (no cache) at the same budget;
- time to first token for a short and a long prompt (through ChatSession);
- model load time: cold GGUF conversion into a temporary STREAMCHAT_CACHE, then the cached load;
- decode speed of every decode path at a full cache: plain transformers, the fast path with each weight option and
  K/V dtype, and llama.cpp when installed (`streamchat.evaluate.speed`, also its own command: `speed`).
Forced tokens (text tokens fed one at a time, logits computed but ignored) stand in for generated ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from streamchat import memory, reporting
from streamchat.cache import BoundedCache
from streamchat.cli import add_list_argument
from streamchat.config import Settings
from streamchat.evaluate import footprint, speed
from streamchat.fastpath import decoder_for_step, kv_dtype_for
from streamchat.model import CACHE_ENV, LoadedModel, load_model
from streamchat.prompts import demo_token_ids
from streamchat.quant import LINEAR_MODES
from streamchat.session import ChatSession

MEASURES = ("curve", "overhead", "recompute", "ttft", "load", "speed", "memory")
SPEED_KV_DTYPES = ("model", "float16", "bfloat16")
SHORT_PROMPT = "What is the capital of France?"


# ----- decode paths ------------------------------------------------------------------------------------------------


class DecodePath:
    """One way to decode: feed one token per `step`, the model's forward pass included."""

    name = ""
    bounded = False  # whether the path holds at most `budget` tokens

    def __init__(self, loaded: LoadedModel, settings: Settings):
        self.model = loaded.model
        self.settings = settings
        self.device = next(self.model.parameters()).device
        self.budget = settings.budget if self.bounded else None

    def _run(self, ids: list[int], cache: Any, use_cache: bool = True) -> None:
        with torch.inference_mode():
            self.model(
                input_ids=torch.tensor([ids], device=self.device),
                past_key_values=cache,
                use_cache=use_cache,
                logits_to_keep=1,
            )

    def step(self, token_id: int) -> None:
        raise NotImplementedError

    def prefill(self, ids: list[int]) -> None:
        """Feed `ids` fast (whole chunks) to bring the cache to a measured state; not timed."""
        self._run(ids, self.cache)

    @property
    def cache_tokens(self) -> int:
        raise NotImplementedError


class BoundedPath(DecodePath):
    """What ChatSession does per token: make room (evicting `slack` extra at once), then one forward pass."""

    name = "sink_window"
    bounded = True
    decode_path = "transformers"  # this path's steps; with `kv_dtype: auto` it also sets the cache's dtype

    def __init__(self, loaded: LoadedModel, settings: Settings):
        super().__init__(loaded, settings)
        path_settings = settings.replace(decode_path=self.decode_path)
        self.cache = BoundedCache(self.model, path_settings, kv_dtype_for(self.model, path_settings))

    def step(self, token_id: int) -> None:
        self.cache.make_room(1)
        self._run([token_id], self.cache)

    def prefill(self, ids: list[int]) -> None:
        for start in range(0, len(ids), self.cache.room):
            chunk = ids[start : start + self.cache.room]
            self.cache.make_room(len(chunk))
            self._run(chunk, self.cache)

    @property
    def cache_tokens(self) -> int:
        return self.cache.length


class FastPath(BoundedPath):
    """What a chat does per token by default: the same bounded cache, stepped by the fast decode path
    (streamchat/fastpath, with the configured decode_weights); transformers where the fast path cannot run."""

    name = "fast"
    decode_path = "fast"

    def step(self, token_id: int) -> None:
        self.cache.make_room(1)
        decoder = decoder_for_step(self.model, self.cache, self.settings)
        if decoder is None:
            self._run([token_id], self.cache)
        else:
            decoder.decode(token_id, self.cache)


class DensePath(DecodePath):
    """A plain transformers DynamicCache that keeps every token (grows without bound)."""

    name = "dense"

    def __init__(self, loaded: LoadedModel, settings: Settings):
        super().__init__(loaded, settings)
        self.cache = DynamicCache()

    def step(self, token_id: int) -> None:
        self._run([token_id], self.cache)

    @property
    def cache_tokens(self) -> int:
        return self.cache.get_seq_length()


class DenseAtLengthPath(DensePath):
    """A DynamicCache cropped back after every token, so each step decodes at the same cache length (the
    reference for the bounded cache's overhead)."""

    name = "dynamic_cache"

    def __init__(self, loaded: LoadedModel, settings: Settings, length: int):
        super().__init__(loaded, settings)
        self.length = length

    def step(self, token_id: int) -> None:
        super().step(token_id)
        if self.cache_tokens > self.length:
            self.cache.crop(self.length - self.cache_tokens)


class RecomputePath(DecodePath):
    """Sliding window with re-computation: every token runs a fresh forward pass over the last `budget` tokens."""

    name = "recompute"
    bounded = True

    def __init__(self, loaded: LoadedModel, settings: Settings):
        super().__init__(loaded, settings)
        self.window: deque[int] = deque(maxlen=self.budget)

    def step(self, token_id: int) -> None:
        self.window.append(token_id)
        self._run(list(self.window), None, use_cache=False)

    def prefill(self, ids: list[int]) -> None:
        self.window.extend(ids)

    @property
    def cache_tokens(self) -> int:
        return len(self.window)


# Paths the decode curve, the overhead and the recompute comparison can run; register new ones here.
PATHS: dict[str, type[DecodePath]] = {
    BoundedPath.name: BoundedPath,
    DensePath.name: DensePath,
    FastPath.name: FastPath,
}


# ----- helpers -----------------------------------------------------------------------------------------------------


def budget_settings(settings: Settings, budget: int) -> Settings:
    """The settings with a sink_window cache of `budget` tokens in all (sinks included)."""
    return settings.replace(policy="sink_window", window=budget - settings.sinks)


def interleaved_seconds(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    per_round: dict[str, int] | None = None,
    desc: str = "",
    show_progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds of each step call, the named steps taking turns (`per_round[name]` calls each round), in an order
    reversed every round so that drift in machine load falls on all of them alike."""
    per_round = per_round or {}
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in tqdm(range(rounds), desc=desc, disable=not show_progress, file=sys.stderr, leave=False):
        for name in names if index % 2 == 0 else reversed(names):
            for _ in range(per_round.get(name, 1)):
                started = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - started)
    return times


def _ms(seconds: list[float]) -> float:
    return 1000 * sum(seconds) / len(seconds)


# ----- measurements ------------------------------------------------------------------------------------------------


def measure_decode_curve(
    loaded: LoadedModel,
    settings: Settings,
    budgets: list[int],
    tokens: int,
    paths: list[str] = ("sink_window", "dense"),
    bin_size: int | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """ms/token vs tokens processed from an empty cache, all paths stepped token by token in turns.

    A bounded path runs once per budget; an unbounded one once. Rows are medians over bins of `bin_size` tokens.
    """
    runners: dict[str, DecodePath] = {}
    for name in paths:
        cls = PATHS[name]
        for budget in budgets if cls.bounded else budgets[:1]:
            path = cls(loaded, budget_settings(settings, budget))
            runners[f"{name}@{budget}" if cls.bounded else name] = path
    ids = demo_token_ids(loaded.tokenizer, tokens)
    bin_size = bin_size or max(1, tokens // 48)
    rows = []
    window: dict[str, list[float]] = {key: [] for key in runners}
    keys = list(runners)
    bar = tqdm(total=tokens, desc="decode curve", unit="tok", disable=not show_progress, file=sys.stderr)
    for index, token in enumerate(ids):
        for key in keys if index % 2 == 0 else reversed(keys):  # alternate the order: load drift hits all alike
            started = time.perf_counter()
            runners[key].step(token)
            window[key].append(time.perf_counter() - started)
        bar.update(1)
        if (index + 1) % bin_size == 0 or index + 1 == tokens:
            for key, path in runners.items():
                rows.append(
                    {
                        "path": path.name,
                        "budget": path.budget,
                        "tokens_processed": index + 1,
                        "cache_tokens": path.cache_tokens,
                        "ms_per_token": round(1000 * statistics.median(window[key]), 3),
                    }
                )
                window[key] = []
    bar.close()
    return rows


def measure_overhead(
    loaded: LoadedModel,
    settings: Settings,
    budget: int,
    rounds: int = 64,
    path: str = "sink_window",
    show_progress: bool = True,
) -> dict[str, Any]:
    """The bounded path vs a DynamicCache at the same cache length, per token, interleaved.

    The bounded cache swings between `budget - slack - 1` and `budget` tokens (it compacts every `slack` tokens,
    and that cost counts), so the reference is kept at the mean of that range; `rounds` should span several
    compactions. Overhead = mean bounded time / mean DynamicCache time - 1.
    """
    budgeted = budget_settings(settings, budget)
    bounded = PATHS[path](loaded, budgeted)
    length = budget - (budgeted.slack + 1) // 2
    reference = DenseAtLengthPath(loaded, budgeted, length)
    ids = demo_token_ids(loaded.tokenizer, budget + rounds + 8)
    bounded.prefill(ids[:budget])  # the bounded cache is now full
    reference.prefill(ids[:length])
    ours_feed, theirs_feed = iter(ids[budget:]), iter(ids[budget:])
    steps = {path: lambda: bounded.step(next(ours_feed)), "dynamic_cache": lambda: reference.step(next(theirs_feed))}
    times = interleaved_seconds(steps, rounds, desc=f"overhead @{budget}", show_progress=show_progress)
    ours, theirs = _ms(times[path]), _ms(times["dynamic_cache"])
    return {
        "measure": "overhead",
        "path": path,
        "baseline": "dynamic_cache",
        "budget": budget,
        "cache_tokens": length,
        "steps": rounds,
        "ms_per_token": round(ours, 3),
        "baseline_ms_per_token": round(theirs, 3),
        "ratio": round(ours / theirs, 4),
        "overhead": round(ours / theirs - 1, 4),
        "median_ratio": round(statistics.median(times[path]) / statistics.median(times["dynamic_cache"]), 4),
    }


def measure_recompute_speedup(
    loaded: LoadedModel,
    settings: Settings,
    budget: int,
    rounds: int = 6,
    path: str = "sink_window",
    show_progress: bool = True,
) -> dict[str, Any]:
    """The bounded path vs sliding-window re-computation at the same budget, both with a full window.

    Each round times one re-computed token and `slack` bounded tokens (a whole compaction cycle).
    Speedup = mean re-computation time / mean bounded time.
    """
    budgeted = budget_settings(settings, budget)
    bounded, recompute = PATHS[path](loaded, budgeted), RecomputePath(loaded, budgeted)
    per_round = max(1, budgeted.slack)
    ids = demo_token_ids(loaded.tokenizer, budget + rounds * (per_round + 1) + 8)
    bounded.prefill(ids[:budget])
    recompute.prefill(ids[:budget])
    ours_feed, theirs_feed = iter(ids[budget:]), iter(ids[budget:])
    steps = {path: lambda: bounded.step(next(ours_feed)), "recompute": lambda: recompute.step(next(theirs_feed))}
    times = interleaved_seconds(
        steps, rounds, per_round={path: per_round}, desc=f"recompute @{budget}", show_progress=show_progress
    )
    ours, theirs = _ms(times[path]), _ms(times["recompute"])
    return {
        "measure": "recompute_speedup",
        "path": path,
        "baseline": "recompute",
        "budget": budget,
        "steps": len(times[path]),
        "baseline_steps": len(times["recompute"]),
        "ms_per_token": round(ours, 3),
        "baseline_ms_per_token": round(theirs, 3),
        "speedup": round(theirs / ours, 3),
    }


def long_prompt(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of text for the long time-to-first-token prompt."""
    return tokenizer.decode(demo_token_ids(tokenizer, tokens))


def measure_ttft(
    loaded: LoadedModel,
    settings: Settings,
    budget: int,
    long_tokens: int = 1000,
    repeats: int = 3,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Time to first token of a fresh conversation (ChatSession.send), short and long prompt, median of `repeats`."""
    session = ChatSession(loaded, budget_settings(settings, budget))
    rows = []
    prompts = {"short": SHORT_PROMPT, "long": long_prompt(loaded.tokenizer, long_tokens)}
    bar = tqdm(total=2 * repeats, desc=f"ttft @{budget}", disable=not show_progress, file=sys.stderr, leave=False)
    for kind, text in prompts.items():
        seconds = []
        for _ in range(repeats):
            session.reset()
            for _ in session.send(text, max_new_tokens=1):
                pass
            seconds.append(session.last_turn.ttft_s)
            bar.update(1)
        rows.append(
            {
                "measure": "ttft",
                "path": session.cache.policy.name,
                "budget": budget,
                "prompt": kind,
                "prompt_tokens": session.last_turn.prompt_tokens,
                "ttft_s": round(statistics.median(seconds), 4),
                "prefill_tokens_per_s": round(session.last_turn.prefill_tokens_per_s, 1),
            }
        )
    bar.close()
    return rows


def measure_load_time(settings: Settings) -> dict[str, Any]:
    """Cold load (a GGUF is converted into an empty temporary STREAMCHAT_CACHE) and the cached load after it."""
    previous = os.environ.get(CACHE_ENV)
    with tempfile.TemporaryDirectory(prefix="streamchat-bench-") as folder:
        os.environ[CACHE_ENV] = folder
        try:
            cold = load_model(settings.model, settings.device, settings.dtype)
            del cold.model
            cached = load_model(settings.model, settings.device, settings.dtype)
        finally:
            if previous is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = previous
    return {
        "measure": "load",
        "path": "",
        "model": cached.source,
        "cold_s": round(cold.load_seconds, 3),
        "cold_converted": cold.converted,
        "cached_s": round(cached.load_seconds, 3),
    }


def measure_memory(settings: Settings, long_tokens: int, new_tokens: int = 64) -> list[dict[str, Any]]:
    """A chat process's time to the first prompt and RSS after a `long_tokens` prompt and `new_tokens` new tokens,
    each resident form in a fresh process of its own, one after the other (evaluate/footprint.py): packed (what
    `streamchat chat` holds), full (the model as loaded, beside the decode weights) and llama.cpp when installed;
    all of the model the run measures (`settings.model`)."""
    rows = []
    for resident in footprint.RESIDENT:
        threads = settings.threads or torch.get_num_threads()
        result = footprint.run_child(resident, long_tokens, new_tokens, threads, model=settings.model)
        rows.append({"measure": "memory", "path": resident, **{k: v for k, v in result.items() if k != "resident"}})
    return rows


def measure_path_speeds(
    loaded: LoadedModel, settings: Settings, budget: int, tokens: int, show_progress: bool = True
) -> list[dict[str, Any]]:
    """Decode tokens/s of every decode path at a full cache of `budget` tokens, side by side (see `speed`)."""
    figures = speed.measure_speed(
        loaded,
        budget_settings(settings, budget),
        None,
        tokens,
        list(LINEAR_MODES),
        list(SPEED_KV_DTYPES),
        show_progress=show_progress,
    )
    rows = [
        {"measure": "speed", "budget": budget, **row, "default": row["path"] == figures["default_path"]}
        for row in figures["rows"]
    ]
    rows += [{"measure": "speed", "budget": budget, "path": "note", "note": note} for note in figures["notes"]]
    llama_memory = figures["llama_cpp_memory"]
    if llama_memory:  # llama.cpp's process beside this one's (bench's RSS rows)
        rows.append(
            {
                "measure": "speed",
                "budget": budget,
                "path": "note",
                "note": f"llama.cpp RSS {llama_memory['rss_bytes'] / 2**20:.0f} MB "
                f"(peak {llama_memory['peak_rss_bytes'] / 2**20:.0f} MB), streamchat {memory.rss_bytes() / 2**20:.0f} MB "
                "(this process: every path's weights)",
            }
        )
    return rows


# ----- the whole benchmark -----------------------------------------------------------------------------------------


def run_bench(
    loaded: LoadedModel,
    settings: Settings,
    out: str | Path,
    budgets: list[int],
    tokens: int = 1024,
    measures: tuple[str, ...] = MEASURES,
    paths: list[str] = ("sink_window", "dense"),
    rounds: int = 64,
    recompute_rounds: int = 6,
    long_tokens: int = 1000,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen measurements on an already loaded model; write bench.json, bench_curve.csv,
    bench_summary.csv and bench.png into `out`."""
    folder = reporting.output_dir(out)
    bounded_paths = [name for name in paths if PATHS[name].bounded]
    report: dict[str, Any] = {
        "command": "bench",
        "machine": reporting.machine_info(),
        "model": loaded.source,
        "settings": settings.to_dict(),
        "budgets": budgets,
        "tokens": tokens,
        "curve": [],
        "summary": [],
    }
    if "curve" in measures:
        report["curve"] = measure_decode_curve(loaded, settings, budgets, tokens, paths, show_progress=show_progress)
    for budget in budgets:
        for name in bounded_paths:
            if "overhead" in measures:
                report["summary"].append(measure_overhead(loaded, settings, budget, rounds, name, show_progress))
            if "recompute" in measures:
                report["summary"].append(
                    measure_recompute_speedup(loaded, settings, budget, recompute_rounds, name, show_progress)
                )
        if "ttft" in measures:
            report["summary"].extend(measure_ttft(loaded, settings, budget, long_tokens, show_progress=show_progress))
        if "speed" in measures:
            report["summary"].extend(measure_path_speeds(loaded, settings, budget, rounds, show_progress))
    if "load" in measures:
        report["summary"].append(measure_load_time(settings))
    if "memory" in measures:
        report["summary"].extend(measure_memory(settings, long_tokens))
    reporting.write_json(folder / "bench.json", report)
    reporting.write_csv(folder / "bench_curve.csv", report["curve"])
    reporting.write_csv(folder / "bench_summary.csv", _uniform(report["summary"]))
    plot_bench(report, folder / "bench.png")
    return report


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the union of all keys, so measurements of different kinds share one CSV."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key, "") for key in keys} for row in rows]


def plot_bench(report: dict[str, Any], path: Path) -> Path:
    """Left: ms/token vs tokens processed per path. Right: ms/token with a full cache, one group per budget of
    paths measured side by side (compare within a group). A panel without data is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for row in report["curve"]:
        label = row["path"] if row["budget"] is None else f"{row['path']} (budget {row['budget']})"
        series.setdefault(label, []).append(row)
    groups: list[tuple[str, float, float, str]] = []  # (label, ours ms, theirs ms, baseline)
    for row in report["summary"]:
        if row["measure"] in ("overhead", "recompute_speedup"):
            groups.append(
                (f"{row['path']} @{row['budget']}", row["ms_per_token"], row["baseline_ms_per_token"], row["baseline"])
            )
    reference = next(iter(series), None)
    panels = [kind for kind, present in (("curve", series), ("ratio", len(series) > 1), ("bars", groups)) if present]
    if not panels:
        panels = ["curve"]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for axis, kind in zip(axes[0], panels):
        if kind == "curve":
            for label, rows in series.items():
                axis.plot(
                    [r["tokens_processed"] for r in rows], [r["ms_per_token"] for r in rows], marker=".", label=label
                )
            for budget in report["budgets"]:
                axis.axvline(budget, color="grey", linestyle=":", linewidth=1)
            axis.set_xlabel("tokens processed")
            axis.set_ylabel("decode ms/token (median per bin)")
            axis.set_title("decode time vs stream length (dotted: cache budgets)")
            axis.set_ylim(bottom=0)
            if series:
                axis.legend(fontsize=8)
        elif kind == "ratio":
            base = {r["tokens_processed"]: r["ms_per_token"] for r in series[reference]}
            for label, rows in list(series.items())[1:]:
                axis.plot(
                    [r["tokens_processed"] for r in rows],
                    [r["ms_per_token"] / base[r["tokens_processed"]] for r in rows],
                    marker=".",
                    label=label,
                )
            axis.axhline(1, color="grey", linewidth=1)
            for budget in report["budgets"]:
                axis.axvline(budget, color="grey", linestyle=":", linewidth=1)
            axis.set_xlabel("tokens processed")
            axis.set_ylabel(f"ms/token relative to {reference}")
            axis.set_title("same bins, measured side by side (load cancels)")
            axis.legend(fontsize=8)
        else:
            for index, (_label, ours, theirs, baseline) in enumerate(groups):
                axis.bar(index - 0.2, ours, width=0.4, color="tab:blue", label="bounded cache" if index == 0 else None)
                axis.bar(
                    index + 0.2,
                    theirs,
                    width=0.4,
                    color="tab:orange" if baseline == "dynamic_cache" else "tab:red",
                    label=baseline,
                )
                axis.text(index, max(ours, theirs) * 1.08, f"x{theirs / ours:.2f}", ha="center", fontsize=8)
            handles, labels = axis.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            axis.legend(unique.values(), unique.keys(), fontsize=8)
            axis.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
            axis.set_yscale("log")
            axis.set_ylabel("ms/token with a full cache (log)")
            axis.set_title("measured side by side (label: baseline ms / bounded ms)")
        axis.grid(alpha=0.3)
    machine = report["machine"]
    figure.suptitle(
        f"streamchat bench, {machine['date']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ----- command line ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_list_argument(
        parser,
        "--budget",
        type=int,
        default=None,
        metavar="N",
        help="cache budgets in tokens, sinks included (default: the configured sinks + window)",
    )
    parser.add_argument("--tokens", type=int, default=1024, help="length of the decode curve in tokens (default 1024)")
    add_list_argument(
        parser,
        "--only",
        default=list(MEASURES),
        choices=MEASURES,
        metavar="NAME",
        help=f"measurements to run (default all: {' '.join(MEASURES)})",
    )
    add_list_argument(
        parser,
        "--paths",
        default=["sink_window", "dense"],
        choices=list(PATHS),
        metavar="NAME",
        help="decode paths to compare (default: sink_window dense)",
    )
    parser.add_argument("--rounds", type=int, default=64, help="interleaved tokens for the overhead (default 64)")
    parser.add_argument("--recompute-rounds", type=int, default=6, help="re-computed tokens timed (default 6)")
    parser.add_argument("--long-prompt", type=int, default=1000, metavar="N", help="tokens of the long TTFT prompt")
    parser.add_argument("--out", default="out/bench", metavar="DIR", help="output folder (default out/bench)")
    parser.add_argument(
        "--json", action="store_true", help="last stdout line: one JSON object with the headline figures"
    )


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of the `--json` line and the printed summary, keyed by measurement and budget."""
    figures: dict[str, Any] = {"command": "bench"}
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in report["curve"]:
        by_path.setdefault(f"{row['path']}@{row['budget']}" if row["budget"] else row["path"], []).append(row)
    for key, rows in by_path.items():
        full = [r["ms_per_token"] for r in rows if r["budget"] and r["tokens_processed"] > 2 * r["budget"]]
        figures[f"curve_{key}"] = {
            "first_ms": rows[0]["ms_per_token"],
            "last_ms": rows[-1]["ms_per_token"],
            **({"full_cache_min_ms": min(full), "full_cache_max_ms": max(full)} if full else {}),
        }
    for row in report["summary"]:
        tag = f"{row['path']}@{row.get('budget')}"
        if row["measure"] == "overhead":
            figures[f"overhead_{tag}"] = row["overhead"]
        elif row["measure"] == "recompute_speedup":
            figures[f"recompute_speedup_{tag}"] = row["speedup"]
        elif row["measure"] == "ttft":
            figures[f"ttft_{row['prompt']}_s@{row['budget']}"] = row["ttft_s"]
        elif row["measure"] == "load":
            figures["load_cold_s"], figures["load_cached_s"] = row["cold_s"], row["cached_s"]
        elif row["measure"] == "memory" and "error" not in row:
            figures[f"rss_mb_{row['path']}"] = row["rss_mb"]
        elif row["measure"] == "speed" and "note" not in row:
            figures[f"speed_{tag}"] = {"tokens_per_s": row["tokens_per_s"], "speedup": row["speedup_vs_transformers"]}
    return figures


def print_summary(report: dict[str, Any]) -> None:
    for key, value in headline(report).items():
        if key.startswith("curve_"):
            flat = ""
            if "full_cache_min_ms" in value:
                flat = f", full cache {value['full_cache_min_ms']:.1f}-{value['full_cache_max_ms']:.1f}"
            print(
                f"decode {key[6:]}: {value['first_ms']:.1f} ms/token at start{flat}, {value['last_ms']:.1f} at the end"
            )
    for row in report["summary"]:
        if row["measure"] == "overhead":
            print(
                f"overhead {row['path']} @{row['budget']}: {row['ms_per_token']:.1f} vs DynamicCache "
                f"{row['baseline_ms_per_token']:.1f} ms/token at {row['cache_tokens']} tokens: {row['overhead']:+.1%}"
            )
        elif row["measure"] == "recompute_speedup":
            print(
                f"speedup vs re-computation @{row['budget']}: {row['speedup']:.1f}x "
                f"({row['ms_per_token']:.1f} vs {row['baseline_ms_per_token']:.1f} ms/token)"
            )
        elif row["measure"] == "ttft":
            print(
                f"time to first token @{row['budget']}, {row['prompt']} prompt ({row['prompt_tokens']} tokens): "
                f"{row['ttft_s']:.3f} s"
            )
        elif row["measure"] == "load":
            print(
                f"model load: cold {row['cold_s']:.1f} s (converted: {row['cold_converted']}), cached {row['cached_s']:.2f} s"
            )
        elif row["measure"] == "memory" and "error" in row:
            print(f"memory, {row['path']}: not measured ({row['error']})")
        elif row["measure"] == "memory":
            print(
                f"memory, {row['path']} ({row['weights']}): RSS {row['rss_mb']:.0f} MB (peak {row['peak_rss_mb']:.0f}) "
                f"after {row['prompt_tokens']} prompt + {row['new_tokens']} new tokens; first prompt after "
                f"{row['ready_s']:.1f} s; prefill {row['prefill_tokens_per_s']:.0f} tok/s"
            )
        elif row["measure"] == "speed" and "note" in row:
            print(f"decode speed @{row['budget']}: {row['note']}")
        elif row["measure"] == "speed":
            print(
                f"decode speed @{row['budget']}, {row['path']}{' (default)' if row['default'] else ''}: "
                f"{row['tokens_per_s']:.1f} tok/s, {row['speedup_vs_transformers']:.2f}x plain transformers"
            )


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)
    try:
        measures, paths = tuple(args.only), list(args.paths)
        budgets = args.budget or [settings.budget]
        for budget in budgets:
            if budget <= settings.sinks + settings.slack + 1:
                raise ValueError(
                    f"--budget {budget} is too small for {settings.sinks} sinks and slack {settings.slack}"
                )
        if args.tokens < 1 or args.rounds < 1 or args.recompute_rounds < 1 or args.long_prompt < 1:
            raise ValueError("--tokens, --rounds, --recompute-rounds and --long-prompt must be at least 1")
    except ValueError as error:
        print(f"streamchat bench: {error}", file=sys.stderr)
        return 2
    loaded = load_model(settings.model, settings.device, settings.dtype)
    report = run_bench(
        loaded,
        settings,
        args.out,
        budgets,
        args.tokens,
        measures,
        paths,
        args.rounds,
        args.recompute_rounds,
        args.long_prompt,
    )
    print_summary(report)
    print(f"results: {Path(args.out) / 'bench.json'}, bench_curve.csv, bench_summary.csv, bench.png")
    if args.json:
        reporting.print_json_line(headline(report))
    return 0
