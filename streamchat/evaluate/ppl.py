"""`python -m streamchat ppl`: perplexity of a long text under each cache policy at one budget.

The StreamingLLM paper's experiment (Xiao et al., 2023, Table 1 and Fig. 3) on our model: the NLL of every next
token of a text, for

- `dense`: the full cache (nothing evicted; past the model's context length it is expected to break). Computed
  in chunks, which gives the same NLLs as token by token (causal attention).
- `window`: a rolling window without sinks (`sink_window` with sinks 0).
- `recompute`: each token predicted by a fresh forward over the `budget` tokens before it: the quality reference,
  and slow (a full forward per token), so it is batched and by default evaluated at every Nth token only
  (`--recompute-every`); every policy's perplexity at those same tokens past the budget is reported beside it
  (`ppl_at_recompute_tokens`, and `vs_recompute` in the JSON line: the ratio to recompute's).
- `sink_window` and `h2o`: the chat's own `BoundedCache`, fed one token at a time through `make_room` and a model
  forward, exactly as a chat decodes. `sink_message` (not in the default run) is `sink_window` with
  `evict_unit: message`, the text's paragraphs (after a blank line) standing for messages.
  H2O splits the budget less the sinks half heavy hitters, half recent
  (`--heavy` sets the heavy part). `tova` (not in the default run) is run the same way.

All bounded policies have the same budget. The token-by-token policies run in lock step, one token each in turn,
so a shared CPU's load changes hit them alike and their times per token compare within one run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

from streamchat import reporting
from streamchat.attention import attention_kwargs
from streamchat.cache import BoundedCache
from streamchat.cli import add_list_argument
from streamchat.config import Settings
from streamchat.model import LoadedModel

DENSE, WINDOW, RECOMPUTE = "dense", "window", "recompute"
STEPPED = (WINDOW, "sink_window", "sink_message", "h2o", "tova")  # fed token by token through a BoundedCache
POLICY_NAMES = (DENSE, WINDOW, RECOMPUTE, "sink_window", "h2o")  # the default run
CHOICES = (*POLICY_NAMES, "tova", "sink_message")
LAST = 1000  # the table's second perplexity: over the last 1,000 predicted tokens
DEFAULT_TOKENS, DEFAULT_BUDGET, DEFAULT_RECOMPUTE_EVERY = 5000, 256, 16


class PplError(ValueError):
    """Arguments or input text the command cannot use; the message says what to change."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--text",
        metavar="FILE",
        help="a long UTF-8 text (e.g. ../shared/data/frankenstein.txt); not with --kl-reference",
    )
    add(
        "--kl-reference",
        metavar="REF.npz",
        help="instead of the text: KL divergence against another engine's logits (tokens int32 [P], logits "
        "[P, vocab]; as llama-perplexity --kl-divergence) through the chat path; --json: kl_mean, kl_p99, "
        "top1_agreement, ppl, ppl_reference",
    )
    add("--tokens", type=int, default=DEFAULT_TOKENS, help=f"first tokens of the text (default {DEFAULT_TOKENS})")
    add(
        "--budget",
        type=int,
        default=DEFAULT_BUDGET,
        help=f"cache tokens of every bounded policy (default {DEFAULT_BUDGET}); --sinks sets the sinks, --heavy "
        "the heavy hitters of h2o (default: half the budget less the sinks)",
    )
    add_list_argument(
        parser,
        "--policies",
        default=list(POLICY_NAMES),
        choices=CHOICES,
        metavar="NAME",
        help=f"what to run: {', '.join(CHOICES)} (default: {' '.join(POLICY_NAMES)})",
    )
    add(
        "--recompute-every",
        type=int,
        default=DEFAULT_RECOMPUTE_EVERY,
        metavar="N",
        help=f"evaluate recompute at every Nth token only (default {DEFAULT_RECOMPUTE_EVERY}; 1: all, slow)",
    )
    add(
        "--resident",
        choices=("full", "packed"),
        default="full",
        help="weights the model holds: full (as loaded, the default: policies compared on the model's own "
        "numerics) or packed (as a chat process holds them with the fast path: --set decode_weights=..., "
        "prefill included; docs/memory.md)",
    )
    add("--out", default="out/ppl", metavar="DIR", help="output folder (default out/ppl)")
    add("--json", action="store_true", help="last stdout line: one JSON object with the headline figures")


# ----- settings of each policy ----------------------------------------------------------------------------------


def policy_settings(settings: Settings, name: str, budget: int, heavy: int | None = None) -> Settings:
    """Settings that give policy `name` a cache of `budget` tokens (validated: a SettingsError names the key)."""
    if name == WINDOW:
        return settings.replace(policy="sink_window", sinks=0, window=budget)
    if name in ("sink_window", "sink_message"):
        unit = "message" if name == "sink_message" else "token"
        return settings.replace(policy="sink_window", window=budget - settings.sinks, evict_unit=unit)
    if name in ("h2o", "tova"):  # sinks + heavy hitters + recent; they differ in how they rank tokens
        split = budget - settings.sinks
        heavy = split // 2 if heavy is None else heavy
        if not 0 <= heavy < split:
            raise PplError(f"--heavy must be between 0 and {split - 1} (the budget less the sinks, less 1)")
        return settings.replace(policy=name, heavy=heavy, recent=split - heavy)
    raise ValueError(f"{name} runs without a bounded cache")


def policy_keys(settings: Settings) -> dict[str, Any]:
    """The cache settings a policy ran with, for the report."""
    keys = ("policy", "sinks", "window")
    if settings.policy in ("h2o", "tova"):
        keys = ("policy", "sinks", "heavy", "recent") + (("h2o_score",) if settings.policy == "h2o" else ())
    return {key: getattr(settings, key) for key in keys}


# ----- the runs -------------------------------------------------------------------------------------------------


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target under logits [..., vocab], in fp64 for summing long runs."""
    return -torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[..., None])[..., 0]


@torch.inference_mode()
def run_dense(model: torch.nn.Module, ids: torch.Tensor, chunk: int, progress: Callable) -> np.ndarray:
    """NLL of ids[1:] with everything cached, fed `chunk` tokens per forward pass."""
    cache, nll = DynamicCache(), []
    for start in progress(range(0, len(ids) - 1, chunk), desc=DENSE):
        piece = ids[start : min(start + chunk, len(ids) - 1)]
        logits = model(input_ids=piece[None], past_key_values=cache, use_cache=True).logits[0]
        nll.append(_nll(logits, ids[start + 1 : start + 1 + len(piece)]))
    return torch.cat(nll).numpy()


@torch.inference_mode()
def run_recompute(
    model: torch.nn.Module, ids: torch.Tensor, budget: int, every: int, batch: int, progress: Callable
) -> np.ndarray:
    """NLL of ids[1:] where each token is predicted from a fresh forward over the `budget` tokens before it
    (or all of them, near the start); NaN at the tokens skipped by `every`."""
    nll = np.full(len(ids) - 1, np.nan)
    head = ids[: min(budget, len(ids))]  # tokens 1..budget-1 see their whole prefix: one causal forward
    logits = model(input_ids=head[None]).logits[0, :-1]
    nll[: len(head) - 1] = _nll(logits, head[1:]).numpy()
    targets = list(range(budget, len(ids), every))
    for start in progress(range(0, len(targets), batch), desc=RECOMPUTE):
        group = targets[start : start + batch]
        windows = torch.stack([ids[target - budget : target] for target in group])
        logits = model(input_ids=windows, logits_to_keep=1).logits[:, -1]
        nll[np.array(group) - 1] = _nll(logits, ids[group]).numpy()
    return nll


class SteppedRun:
    """One policy's BoundedCache, fed one token per step through the transformers forward (so `kv_dtype: auto`
    keeps K/V in the model's dtype: policies are compared on the model's own numerics)."""

    def __init__(self, model: torch.nn.Module, settings: Settings, steps: int, message_starts: frozenset = frozenset()):
        self.model, self.cache = model, BoundedCache(model, settings.replace(decode_path="transformers"))
        self.message_starts = message_starts if settings.evict_unit == "message" else frozenset()
        self.nll = np.empty(steps)
        self.seconds = 0.0
        self.peak_tokens = 0

    @torch.inference_mode()
    def step(self, index: int, token: torch.Tensor, target: torch.Tensor) -> None:
        started = time.perf_counter()
        if index in self.message_starts:
            self.cache.mark_message_start(index)
        self.cache.make_room(1)
        out = self.model(
            input_ids=token.view(1, 1), past_key_values=self.cache, use_cache=True, **attention_kwargs(self.cache)
        )
        self.nll[index] = _nll(out.logits[0, -1], target).item()
        self.seconds += time.perf_counter() - started
        self.peak_tokens = max(self.peak_tokens, self.cache.length)


def run_stepped(
    model: torch.nn.Module,
    ids: torch.Tensor,
    runs: dict[str, Settings],
    progress: Callable,
    message_starts: frozenset = frozenset(),
) -> dict[str, SteppedRun]:
    """The token-by-token policies in lock step: token t goes through every policy before token t+1.
    `message_starts`: token indices that begin a message, for runs with `evict_unit: message`."""
    stepped = {name: SteppedRun(model, settings, len(ids) - 1, message_starts) for name, settings in runs.items()}
    for index in progress(range(len(ids) - 1), desc=" + ".join(stepped) or "stepped"):
        for run in stepped.values():
            run.step(index, ids[index], ids[index + 1])
    return stepped


def paragraph_starts(tokenizer, text: str, count: int) -> frozenset:
    """Indices among the first `count` tokens of `text` whose token begins a paragraph (follows a blank line):
    the 'messages' of `sink_message` in a plain text."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts, seen_blank = set(), False
    for index, (begin, end) in enumerate(encoded["offset_mapping"][:count]):
        piece = text[begin:end]
        if seen_blank and piece.strip():
            starts.add(index)
            seen_blank = False
        if "\n\n" in piece or (piece.strip() == "" and "\n" in piece and text[max(begin - 1, 0)] == "\n"):
            seen_blank = True
    return frozenset(starts)


# ----- figures --------------------------------------------------------------------------------------------------


def perplexity(nll: np.ndarray) -> float:
    """exp(mean NLL) over the tokens that have one (NaN entries are tokens not evaluated)."""
    values = nll[~np.isnan(nll)]
    return float(math.exp(values.mean())) if len(values) else float("nan")


def summarize(
    nll: dict[str, np.ndarray], seconds: dict[str, float], modes: dict[str, str], budget: int
) -> list[dict[str, Any]]:
    """One row per policy: perplexity overall, past the budget (where policies differ), over the last tokens, at
    the recompute tokens, and time."""
    sampled = None
    if RECOMPUTE in nll:  # the tokens recompute evaluated past the budget (before it, every policy is dense)
        sampled = ~np.isnan(nll[RECOMPUTE])
        sampled[: budget - 1] = False
    rows = []
    for name, values in nll.items():
        evaluated = int((~np.isnan(values)).sum())
        rows.append(
            {
                "policy": name,
                "ppl": round(perplexity(values), 4),
                "ppl_after_budget": round(perplexity(values[budget - 1 :]), 4),
                f"ppl_last_{LAST}": round(perplexity(values[-LAST:]), 4),
                "ppl_at_recompute_tokens": round(perplexity(values[sampled]), 4) if sampled is not None else None,
                "tokens_evaluated": evaluated,
                "ms_per_token": round(1000 * seconds[name] / max(evaluated, 1), 3),
                "mode": modes[name],
            }
        )
    return rows


def trailing_mean(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the evaluated values among the last `width` tokens, at each evaluated token from `width` on:
    (token indices, means). Skipped tokens (NaN, as with recompute) leave the window `width` tokens wide."""
    valid = ~np.isnan(values)
    sums = np.concatenate(([0.0], np.cumsum(np.where(valid, values, 0.0))))
    counts = np.concatenate(([0], np.cumsum(valid)))
    index = np.arange(len(values))
    start = np.maximum(index - width + 1, 0)
    shown = valid & (index >= width - 1)
    means = (sums[index + 1] - sums[start]) / np.maximum(counts[index + 1] - counts[start], 1)
    return index[shown] + 1, means[shown]


def plot(nll: dict[str, np.ndarray], budget: int, path: Path) -> Path:
    """Running log-perplexity (mean NLL so far) against tokens, as in the paper's Fig. 3, and a trailing mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (running, local) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, values in nll.items():
        valid = ~np.isnan(values)
        positions = np.flatnonzero(valid) + 1  # token index of each prediction
        kept = values[valid]
        running.plot(positions, np.cumsum(kept) / np.arange(1, len(kept) + 1), label=name, linewidth=1.2)
        local.plot(*trailing_mean(values, max(1, min(100, len(values) // 10))), label=name, linewidth=1.0)
    titles = ("running log-perplexity (mean NLL so far)", "mean NLL over the last 100 tokens")
    for axes, title in zip((running, local), titles):
        axes.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
        axes.set_xlabel("tokens")
        axes.set_ylabel("log perplexity")
        axes.set_title(title)
        axes.grid(alpha=0.3)
    running.legend()
    figure.suptitle(f"budget {budget} tokens (dotted line)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def headline(rows: list[dict[str, Any]], report: dict[str, Any]) -> dict[str, Any]:
    """The `--json` line: perplexities per policy, times, and the two comparisons the experiment is about."""
    by_name = {row["policy"]: row for row in rows}
    figures: dict[str, Any] = {
        "command": "ppl",
        "tokens": report["tokens"],
        "budget": report["budget"],
        "ppl": {name: row["ppl"] for name, row in by_name.items()},
        "ppl_after_budget": {name: row["ppl_after_budget"] for name, row in by_name.items()},
        f"ppl_last_{LAST}": {name: row[f"ppl_last_{LAST}"] for name, row in by_name.items()},
        "ms_per_token": {name: row["ms_per_token"] for name, row in by_name.items()},
        "out": report["out"],
    }
    if RECOMPUTE in by_name:
        reference = by_name[RECOMPUTE]["ppl_at_recompute_tokens"]
        figures["vs_recompute"] = {
            name: round(row["ppl_at_recompute_tokens"] / reference, 4) for name, row in by_name.items()
        }
    if "h2o" in by_name and "sink_window" in by_name:
        ratio = by_name["h2o"]["ms_per_token"] / by_name["sink_window"]["ms_per_token"]
        figures["h2o_time_overhead"] = round(ratio - 1, 4)
    return figures


def run_ppl(
    loaded: LoadedModel,
    settings: Settings,
    text: str,
    tokens: int = DEFAULT_TOKENS,
    budget: int = DEFAULT_BUDGET,
    policies: tuple[str, ...] = POLICY_NAMES,
    recompute_every: int = DEFAULT_RECOMPUTE_EVERY,
    heavy: int | None = None,
    out: str | Path = "out/ppl",
    source: str = "",
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the experiment, write ppl.csv, ppl.json, nll.csv and ppl.png into `out`; returns (rows, report)."""
    if tokens < 2 or budget < 2 or recompute_every < 1:
        raise PplError("--tokens and --budget must be at least 2, --recompute-every at least 1")
    ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens], dtype=torch.long)
    if len(ids) < 2:
        raise PplError(f"the text has {len(ids)} tokens: at least 2 are needed")
    ids = ids.to(next(loaded.model.parameters()).device)
    model = loaded.model
    stepped = {name: policy_settings(settings, name, budget, heavy) for name in STEPPED if name in policies}

    def progress(iterable, desc: str):
        return tqdm(iterable, desc=desc, disable=not show_progress, file=sys.stderr)

    nll: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    modes: dict[str, str] = {}
    started = time.perf_counter()
    if DENSE in policies:
        started_dense = time.perf_counter()
        nll[DENSE] = run_dense(model, ids, settings.prefill_chunk, progress)
        seconds[DENSE], modes[DENSE] = time.perf_counter() - started_dense, f"chunks of {settings.prefill_chunk}"
    if RECOMPUTE in policies:
        started_recompute = time.perf_counter()
        nll[RECOMPUTE] = run_recompute(model, ids, budget, recompute_every, 8, progress)
        seconds[RECOMPUTE] = time.perf_counter() - started_recompute
        modes[RECOMPUTE] = f"batched, every {recompute_every} token(s)"
    runs = run_stepped(model, ids, stepped, progress, paragraph_starts(loaded.tokenizer, text, len(ids)))
    peaks = {}
    for name, run in runs.items():
        nll[name], seconds[name], modes[name] = run.nll, run.seconds, "token by token"
        peaks[name] = run.peak_tokens
    nll = {name: nll[name] for name in CHOICES if name in nll}
    rows = summarize(nll, seconds, modes, budget)
    folder = reporting.output_dir(out)
    report = {
        "command": "ppl",
        "text": source,
        "tokens": len(ids),
        "budget": budget,
        "sinks": settings.sinks,
        "slack": settings.slack,
        "recompute_every": recompute_every,
        "policy_settings": {name: policy_keys(s) for name, s in stepped.items()},
        "peak_cache_tokens": peaks,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "machine": reporting.machine_info(),
        "rows": rows,
        "out": str(folder),
    }
    reporting.write_csv(folder / "ppl.csv", rows)
    reporting.write_json(folder / "ppl.json", report)
    per_token = [
        {
            "token": index + 1,
            **{name: None if np.isnan(v[index]) else round(float(v[index]), 5) for name, v in nll.items()},
        }
        for index in range(len(ids) - 1)
    ]
    reporting.write_csv(folder / "nll.csv", per_token)
    plot(nll, budget, folder / "ppl.png")
    return rows, report


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args
    from streamchat.model import ModelError, load_for_chat, load_model

    heavy, args.heavy = args.heavy, None  # --heavy is the h2o split here, not the chat default
    settings = settings_from_args(args)
    if args.kl_reference:
        return _main_kl(args, settings)
    if not args.text:
        print("streamchat ppl: give --text FILE (a long UTF-8 text) or --kl-reference REF.npz", file=sys.stderr)
        return 2
    try:
        text = reporting.read_text_file(args.text, "--text file", encoding="utf-8-sig")  # a byte-order mark is not text
    except ValueError as error:
        print(f"streamchat ppl: {error}", file=sys.stderr)
        return 2
    try:
        if args.resident == "packed":
            loaded = load_for_chat(settings.replace(decode_path="fast"))
        else:
            loaded = load_model(settings.model, settings.device, settings.dtype)
        rows, report = run_ppl(
            loaded,
            settings,
            text,
            args.tokens,
            args.budget,
            tuple(args.policies),
            args.recompute_every,
            heavy,
            args.out,
            source=args.text,
        )
    except (ModelError, PplError) as error:
        print(f"streamchat ppl: {error}", file=sys.stderr)
        return 2
    weights = loaded.packing.mode if loaded.packing and loaded.packing.mode else "full"
    print(f"weights: {weights} ({loaded.packing.note if loaded.packing else 'as loaded'})")
    print(
        f"{report['tokens']} tokens of {args.text}, budget {args.budget} ({settings.sinks} sinks, slack {settings.slack})"
    )
    print(format_table(rows))
    print(f"results: {report['out']}/ppl.csv, ppl.json, nll.csv, ppl.png")
    if args.json:
        reporting.print_json_line(headline(rows, report))
    return 0


def _main_kl(args: argparse.Namespace, settings: Settings) -> int:
    """`ppl --kl-reference REF.npz` (streamchat/evaluate/kl.py)."""
    from streamchat.evaluate.kl import ReferenceError, run_kl
    from streamchat.model import ModelError, load_for_chat

    if not Path(args.kl_reference).is_file():
        print(f"streamchat ppl: --kl-reference file not found: {args.kl_reference}", file=sys.stderr)
        return 2
    try:
        loaded = load_for_chat(settings.replace(decode_path=settings.decode_path))
        result = run_kl(loaded, settings, args.kl_reference)
    except (ModelError, ReferenceError) as error:
        print(f"streamchat ppl: {error}", file=sys.stderr)
        return 2
    print(
        f"{result['positions']} positions of {args.kl_reference} on {loaded.source}: KL mean {result['kl_mean']:.5f}, "
        f"p99 {result['kl_p99']:.5f}, max {result['kl_max']:.5f} nats; top-1 agreement {result['top1_agreement']:.3f}; "
        f"perplexity {result['ppl']:.3f} (reference {result['ppl_reference']:.3f})"
    )
    if args.json:
        reporting.print_json_line({"kl_reference": str(args.kl_reference), "model": loaded.source, **result})
    return 0
