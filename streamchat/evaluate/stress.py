"""`python -m streamchat stress`: an endless scripted conversation that checks memory stays bounded.

Each turn records tokens processed, cache tokens, KV bytes, process RSS and decode speed. The verdict
(`memory_verdict`, a pure function) asks that once the cache has first filled, KV bytes never change and RSS grows
less than a threshold. `--policy dense` runs the same conversation on a plain growing transformers DynamicCache
(a mode of this tool, not an eviction policy) and is expected to fail; `--compare-dense` runs both and plots them
together.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import DynamicCache

from streamchat import reporting
from streamchat.config import Settings
from streamchat.memory import peak_rss_bytes, tensor_bytes
from streamchat.model import LoadedModel, ModelError, load_model
from streamchat.prompts import PromptsError, endless_turns, load_turns
from streamchat.session import ChatSession, SessionError

DENSE = "dense"
DEFAULT_TURNS = 100
DEFAULT_REPLY_TOKENS = 64
DEFAULT_DENSE_TOKENS = 4096
MB = 1024 * 1024


class DenseCache(DynamicCache):
    """A plain growing transformers DynamicCache behind the interface ChatSession drives (make_room, room, pin,
    stats): nothing is ever evicted, so memory grows with the conversation."""

    def __init__(self, settings: Settings, token_limit: int):
        super().__init__()
        self.settings = settings
        self.capacity = token_limit  # only bounds one forward pass and the session's recent-token window
        self.pinned = 0
        self.seen_tokens = 0

    @property
    def length(self) -> int:
        return self.get_seq_length()

    @property
    def room(self) -> int:
        return self.capacity

    def pin(self, count: int) -> None:
        self.pinned = count

    def make_room(self, incoming: int) -> int:
        self.seen_tokens += incoming
        return 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def nbytes(self) -> int:
        return sum(tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in self.layers)

    def stats(self) -> dict[str, Any]:
        length = self.length
        return {
            "policy": DENSE,
            "cache_tokens": length,
            "cache_capacity": None,
            "sink_tokens": 0,
            "seen_total": self.seen_tokens,
            "evicted_total": 0,
            "kv_bytes": self.nbytes(),
        }


class DenseSession(ChatSession):
    """ChatSession on a DenseCache: the unbounded baseline."""

    def __init__(self, loaded: LoadedModel, settings: Settings, token_limit: int = DEFAULT_DENSE_TOKENS):
        self.token_limit = token_limit
        super().__init__(loaded, settings)

    def make_cache(self, settings: Settings) -> DenseCache:
        return DenseCache(settings, self.token_limit)


# ----- the verdict (pure) ----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    passed: bool
    status: str  # "pass", "kv_growth", "rss_growth", "too_short"
    message: str
    warmup_turn: int | None  # the turn that ended the warm-up (stream first longer than the budget)
    kv_bytes: int | None  # at the end of the warm-up
    kv_bytes_max: int | None  # after it
    rss_baseline: int | None
    rss_max: int | None
    rss_growth: float | None  # (rss_max - rss_baseline) / rss_baseline

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_verdict(records: list[dict[str, Any]], budget: int, rss_threshold: float = 0.02) -> Verdict:
    """Whether memory stayed bounded after the warm-up.

    The warm-up ends with the first turn whose stream (`tokens_total`) exceeds the cache budget: by then the
    bounded cache has filled and evicted at least once. Every later turn must report the same `kv_bytes`, and
    the largest later `rss_bytes` may exceed the RSS at the end of the warm-up by at most `rss_threshold`.
    """
    warmup = next((i for i, record in enumerate(records) if record["tokens_total"] > budget), None)
    if warmup is None or warmup == len(records) - 1:
        return Verdict(
            False,
            "too_short",
            f"run too short to judge: need at least one turn after the stream first exceeds the budget "
            f"({budget} tokens); run more turns or tokens",
            None if warmup is None else records[warmup]["turn"],
            None,
            None,
            None,
            None,
            None,
        )
    base, after = records[warmup], records[warmup + 1 :]
    kv_max = max(record["kv_bytes"] for record in after)
    rss_max = max(record["rss_bytes"] for record in after)
    growth = (rss_max - base["rss_bytes"]) / base["rss_bytes"]
    figures = (base["turn"], base["kv_bytes"], kv_max, base["rss_bytes"], rss_max, growth)
    changed = [record for record in after if record["kv_bytes"] != base["kv_bytes"]]
    if changed:
        first = changed[0]
        return Verdict(
            False,
            "kv_growth",
            f"MEMORY GROWS: KV cache went from {base['kv_bytes'] / MB:.2f} MB (turn {base['turn']}, end of warm-up) "
            f"to {first['kv_bytes'] / MB:.2f} MB at turn {first['turn']} and {kv_max / MB:.2f} MB at most",
            *figures,
        )
    if growth > rss_threshold:
        return Verdict(
            False,
            "rss_growth",
            f"MEMORY GROWS: RSS rose {growth:.1%} after the warm-up ({base['rss_bytes'] / MB:.0f} -> "
            f"{rss_max / MB:.0f} MB), above the {rss_threshold:.1%} threshold",
            *figures,
        )
    return Verdict(
        True,
        "pass",
        f"memory bounded: KV {base['kv_bytes'] / MB:.2f} MB constant over {len(after)} turns after the warm-up, "
        f"RSS growth {growth:+.2%} (threshold {rss_threshold:.1%})",
        *figures,
    )


# ----- running a conversation --------------------------------------------------------------------------------------


def turn_record(session: ChatSession, mode: str, started: float) -> dict[str, Any]:
    """The figures the stress test keeps for one finished turn."""
    turn = session.last_turn
    cache = turn.cache
    return {
        "mode": mode,
        "turn": turn.turn,
        "tokens_total": cache["seen_total"],
        "cache_tokens": cache["cache_tokens"],
        "kv_bytes": cache["kv_bytes"],
        "rss_bytes": turn.rss_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "prompt_tokens": turn.prompt_tokens,
        "new_tokens": turn.new_tokens,
        "decode_tokens_per_s": round(turn.decode_tokens_per_s, 2),
        "evicted_total": cache["evicted_total"],
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def run_conversation(
    session: ChatSession,
    turns: Iterator[str],
    mode: str,
    max_turns: int | None,
    max_tokens: int | None,
    reply_tokens: int,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Send scripted turns until `max_turns` turns or `max_tokens` tokens processed; one record per turn."""
    records: list[dict[str, Any]] = []
    total, unit = (max_tokens, "tok") if max_tokens is not None else (max_turns, "turn")
    started = time.perf_counter()
    with tqdm(total=total, unit=unit, desc=f"stress {mode}", disable=not show_progress, file=sys.stderr) as bar:
        while (max_turns is None or len(records) < max_turns) and (
            max_tokens is None or not records or records[-1]["tokens_total"] < max_tokens
        ):
            for _ in session.send(next(turns), max_new_tokens=reply_tokens):
                pass
            record = turn_record(session, mode, started)
            bar.update(record["tokens_total"] - bar.n if unit == "tok" else 1)
            bar.set_postfix(
                cache=record["cache_tokens"],
                kv_mb=f"{record['kv_bytes'] / MB:.1f}",
                rss_mb=f"{record['rss_bytes'] / MB:.0f}",
                tok_s=record["decode_tokens_per_s"],
            )
            records.append(record)
    return records


def run_stress(
    loaded: LoadedModel,
    settings: Settings,
    out: str | Path,
    mode: str = "bounded",
    turns: int | None = DEFAULT_TURNS,
    tokens: int | None = None,
    reply_tokens: int = DEFAULT_REPLY_TOKENS,
    rss_threshold: float = 0.02,
    compare_dense: bool = False,
    dense_tokens: int = DEFAULT_DENSE_TOKENS,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the stress test on an already loaded model; write stress.json, stress.csv and stress.png into `out`.

    `mode` is "bounded" (the configured policy) or "dense". The verdict is about `mode`; with `compare_dense`
    a dense run over the same turns (stopped at `dense_tokens`) follows and is judged and plotted beside it.
    """
    folder = reporting.output_dir(out)
    budget = settings.budget
    runs = [mode] + ([DENSE] if compare_dense and mode != DENSE else [])
    results: dict[str, Any] = {}
    for run in runs:
        session = DenseSession(loaded, settings, dense_tokens) if run == DENSE else ChatSession(loaded, settings)
        limit = tokens if run != DENSE else min(tokens or dense_tokens, dense_tokens)
        name = DENSE if run == DENSE else settings.policy
        records = run_conversation(
            session, endless_turns(settings.prompts_file), name, turns, limit, reply_tokens, show_progress
        )
        if run == DENSE and turns is not None and len(records) < turns:
            print(f"(dense run stopped at its token limit, {dense_tokens} tokens, after {len(records)} turns)")
        results[name] = {"records": records, "verdict": memory_verdict(records, budget, rss_threshold).to_dict()}
        del session
    primary = DENSE if mode == DENSE else settings.policy
    report = {
        "command": "stress",
        "machine": reporting.machine_info(),
        "model": loaded.source,
        "settings": {**settings.to_dict(), "budget": budget},
        "reply_tokens": reply_tokens,
        "rss_threshold": rss_threshold,
        "primary": primary,
        "runs": results,
    }
    reporting.write_json(folder / "stress.json", report)
    reporting.write_csv(folder / "stress.csv", [r for run in results.values() for r in run["records"]])
    plot_stress(results, budget, folder / "stress.png")
    return report


def plot_stress(results: dict[str, Any], budget: int, path: Path) -> Path:
    """Tokens processed vs KV MB, RSS MB and decode tokens/s, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    panels = (
        ("kv_bytes", "KV cache (MB)", MB),
        ("rss_bytes", "process RSS (MB)", MB),
        ("decode_tokens_per_s", "decode tokens/s", 1),
    )
    for name, run in results.items():
        records = run["records"]
        x = [r["tokens_total"] for r in records]
        label = f"{name} ({'pass' if run['verdict']['passed'] else 'fail: ' + run['verdict']['status']})"
        for axis, (key, _, scale) in zip(axes, panels):
            axis.plot(x, [r[key] / scale for r in records], marker=".", markersize=3, label=label)
    for axis, (_, title, _) in zip(axes, panels):
        axis.set_ylabel(title)
        axis.set_ylim(bottom=0)
        axis.axvline(budget, color="grey", linestyle=":", linewidth=1)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title(f"streamchat stress test (cache budget {budget} tokens, dotted line)")
    axes[-1].set_xlabel("tokens processed")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ----- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--turns", type=int, default=None, help=f"turns to run (default {DEFAULT_TURNS})")
    length.add_argument("--tokens", type=int, default=None, help="stop once this many tokens were processed")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="user turns: plain lines or JSONL with 'turns'")
    parser.add_argument("--out", default="out/stress", metavar="DIR", help="output folder (default out/stress)")
    parser.add_argument(
        "--rss-threshold", type=float, default=0.02, help="allowed RSS growth after warm-up (0.02 = 2%%)"
    )
    parser.add_argument(
        "--compare-dense", action="store_true", help="also run a plain growing DynamicCache and plot both"
    )
    parser.add_argument(
        "--dense-tokens",
        type=int,
        default=DEFAULT_DENSE_TOKENS,
        help=f"token limit of a dense run (default {DEFAULT_DENSE_TOKENS})",
    )
    parser.add_argument(
        "--json", action="store_true", help="last stdout line: one JSON object with the headline figures"
    )


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of the `--json` line."""
    figures: dict[str, Any] = {"command": "stress", "primary": report["primary"]}
    for name, run in report["runs"].items():
        records, verdict = run["records"], run["verdict"]
        rates = [r["decode_tokens_per_s"] for r in records if r["decode_tokens_per_s"] > 0]
        figures[name] = {
            "passed": verdict["passed"],
            "status": verdict["status"],
            "turns": len(records),
            "tokens_total": records[-1]["tokens_total"] if records else 0,
            "kv_mb": round(verdict["kv_bytes"] / MB, 3) if verdict["kv_bytes"] is not None else None,
            "kv_mb_max": round(max(r["kv_bytes"] for r in records) / MB, 3) if records else None,
            "rss_growth": None if verdict["rss_growth"] is None else round(verdict["rss_growth"], 4),
            "rss_mb_max": round(max(r["rss_bytes"] for r in records) / MB, 1) if records else None,
            "peak_rss_mb": round(records[-1]["peak_rss_bytes"] / MB, 1) if records else None,
            "decode_tokens_per_s_median": round(sorted(rates)[len(rates) // 2], 2) if rates else None,
        }
    figures["passed"] = report["runs"][report["primary"]]["verdict"]["passed"]
    return figures


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    mode = "bounded"
    if args.policy == DENSE:  # a mode of this tool, not a chat policy: keep the config's policy for the budget
        mode, args.policy = DENSE, None
    for name in ("turns", "tokens", "dense_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"streamchat stress: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    overrides = {"prompts_file": args.prompts} if args.prompts else {}
    settings = settings_from_args(args)
    settings = settings.replace(seed=0 if settings.seed is None else settings.seed, **overrides)
    try:
        load_turns(settings.prompts_file)
        loaded = load_model(settings.model, settings.device, settings.dtype)
        turns = args.turns if args.turns is not None else (None if args.tokens is not None else DEFAULT_TURNS)
        report = run_stress(
            loaded,
            settings,
            args.out,
            mode=mode,
            turns=turns,
            tokens=args.tokens,
            reply_tokens=args.max_new_tokens or DEFAULT_REPLY_TOKENS,
            rss_threshold=args.rss_threshold,
            compare_dense=args.compare_dense,
            dense_tokens=args.dense_tokens,
        )
    except (PromptsError, ModelError, SessionError) as error:
        print(f"streamchat stress: {error}", file=sys.stderr)
        return 2
    for name, run in report["runs"].items():
        last = run["records"][-1]
        print(
            f"{name}: {len(run['records'])} turns, {last['tokens_total']} tokens processed, cache {last['cache_tokens']} "
            f"tokens, KV {last['kv_bytes'] / MB:.2f} MB, RSS {last['rss_bytes'] / MB:.0f} MB "
            f"(peak {last['peak_rss_bytes'] / MB:.0f} MB)"
        )
        print(f"  verdict: {'PASS' if run['verdict']['passed'] else 'FAIL'}: {run['verdict']['message']}")
    print(f"results: {Path(args.out) / 'stress.json'}, stress.csv, stress.png")
    figures = headline(report)
    if args.json:
        reporting.print_json_line(figures)
    return 0 if figures["passed"] else 1
