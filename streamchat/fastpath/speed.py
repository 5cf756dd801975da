"""`python -m streamchat speed`: decode tokens/s of every decode path side by side, and each weight option's
perplexity change.

Speed: every path holds a full cache of `budget` tokens and decodes forced text tokens one at a time; the paths
take turns token by token, in an order reversed every round, so a shared CPU's load falls on all alike and the
ratios hold within the run. Paths: plain transformers with a DynamicCache kept at the budget (the reference),
transformers on the bounded cache, the fast path with each weight option (and compiled, on request), and
llama.cpp on the same GGUF file when `llama-cpp-python` is installed (skipped with a note otherwise).

Quality: the NLL of each next token of a long text fed token by token through the bounded cache at the budget (so
the second half runs with evictions), for each weight option in lock step; the fast path with the model's own
weights is the reference (it matches transformers within float rounding, see tests/test_fast.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from streamchat import reporting
from streamchat.cache import BoundedCache
from streamchat.config import DECODE_WEIGHTS, Settings
from streamchat.fastpath.decoder import decoder_for
from streamchat.model import LoadedModel, embedded_gguf_path, load_model
from streamchat.quant import LINEAR_MODES

REFERENCE = "transformers_dynamic"


class Stepper:
    """One decode path: `prefill(ids)` (untimed) then `step(token)` per decoded token."""

    def prefill(self, ids: list[int]) -> None:
        raise NotImplementedError

    def step(self, token_id: int) -> torch.Tensor | None:
        raise NotImplementedError


class DynamicStepper(Stepper):
    """Plain transformers decode with a DynamicCache, cropped back after each token to stay at the budget."""

    def __init__(self, model: torch.nn.Module, budget: int):
        self.model, self.budget, self.cache = model, budget, DynamicCache()

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        self.model(input_ids=torch.tensor([ids], device=self.model.device), past_key_values=self.cache, use_cache=True)

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([[token_id]], device=self.model.device), past_key_values=self.cache, use_cache=True
        )
        if self.cache.get_seq_length() > self.budget:
            self.cache.crop(self.budget - self.cache.get_seq_length())  # negative: drop the newest
        return out.logits[:, -1].float()


class BoundedStepper(Stepper):
    """What a chat does per token on the bounded cache: make room, then the transformers or the fast step."""

    def __init__(self, model: torch.nn.Module, settings: Settings, weights: str | None, compile: bool = False):
        self.model, self.cache = model, BoundedCache(model, settings)
        self.decoder = decoder_for(model, weights, compile) if weights else None

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        for start in range(0, len(ids), self.cache.room):
            chunk = ids[start : start + self.cache.room]
            self.cache.make_room(len(chunk))
            self.model(input_ids=torch.tensor([chunk], device=self.model.device), past_key_values=self.cache)

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        self.cache.make_room(1)
        if self.decoder is not None:
            return self.decoder.decode(token_id, self.cache)
        out = self.model(input_ids=torch.tensor([[token_id]], device=self.model.device), past_key_values=self.cache)
        return out.logits[:, -1].float()


class LlamaCppStepper(Stepper):
    """llama.cpp (through llama-cpp-python) on the GGUF file, one token per eval, context trimmed at the budget."""

    def __init__(self, gguf: Path, budget: int, threads: int):
        from llama_cpp import Llama

        self.budget = budget
        self.llm = Llama(model_path=str(gguf), n_ctx=budget + 64, n_threads=threads, n_batch=256, verbose=False)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def step(self, token_id: int) -> None:
        if self.llm.n_tokens >= self.budget:  # keep the cached length at the budget, as the other paths do
            self.llm.n_tokens = self.budget - 1
        self.llm.eval([token_id])


def text_ids(tokenizer, path: str | Path, count: int) -> list[int]:
    """The first `count` tokens of a text file."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text[: count * 8], add_special_tokens=False)["input_ids"][:count]
    if len(ids) < count:
        raise ValueError(f"{path} has only {len(ids)} tokens; {count} asked for")
    return ids


def build_paths(
    loaded: LoadedModel, settings: Settings, weights: list[str], compile: bool, llama_cpp: bool
) -> tuple[dict[str, Stepper], list[str]]:
    """The steppers to compare, and notes on paths skipped."""
    model, budget = loaded.model, settings.budget
    paths: dict[str, Stepper] = {
        REFERENCE: DynamicStepper(model, budget),
        "transformers_bounded": BoundedStepper(model, settings, None),
    }
    for option in weights:
        paths[f"fast_{option}"] = BoundedStepper(model, settings, option)
        if compile:
            paths[f"fast_{option}_compiled"] = BoundedStepper(model, settings, option, compile=True)
    notes = []
    if llama_cpp:
        try:
            gguf = embedded_gguf_path() if settings.model is None else Path(settings.model)
            if gguf.suffix != ".gguf":
                raise ValueError(f"{gguf} is not a GGUF file")
            paths[f"llama_cpp ({gguf.name})"] = LlamaCppStepper(gguf, budget, torch.get_num_threads())
        except ImportError:
            notes.append("llama.cpp skipped: llama-cpp-python is not installed (optional: pip install llama-cpp-python)")
        except Exception as error:  # noqa: BLE001 - an optional comparison must not stop the benchmark
            notes.append(f"llama.cpp skipped: {error}")
    return paths, notes


def measure_speed(
    loaded: LoadedModel, settings: Settings, text: str | Path, tokens: int, weights: list[str],
    compile: bool = False, llama_cpp: bool = True, show_progress: bool = True,
) -> dict[str, Any]:
    """Median ms/token of each path decoding `tokens` tokens at a full cache, and tokens/s ratios to plain
    transformers. A compiled path's first step (the compilation) is timed apart and left out of its median."""
    budget = settings.budget
    paths, notes = build_paths(loaded, settings, weights, compile, llama_cpp)
    ids = text_ids(loaded.tokenizer, text, budget + tokens + 1)
    warmup = {}
    for name, path in paths.items():
        path.prefill(ids[:budget])
        started = time.perf_counter()
        path.step(ids[budget])  # warm-up: first-call allocations, and the compilation of compiled paths
        warmup[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for index in tqdm(range(tokens), desc="decode", disable=not show_progress, file=sys.stderr, leave=False):
        token = ids[budget + 1 + index]
        for name in names if index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            paths[name].step(token)
            times[name].append(time.perf_counter() - started)
    reference = statistics.median(times[REFERENCE])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        rows.append({
            "path": name,
            "ms_per_token": round(1000 * median, 2),
            "tokens_per_s": round(1 / median, 2),
            "speedup_vs_transformers": round(reference / median, 2),
            "first_step_s": round(warmup[name], 2),
        })
    return {"budget": budget, "tokens": tokens, "threads": torch.get_num_threads(), "rows": rows, "notes": notes}


@torch.inference_mode()
def measure_quality(
    loaded: LoadedModel, settings: Settings, text: str | Path, tokens: int, weights: list[str],
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity of the first `tokens` tokens of `text`, token by token through the bounded cache, for each
    weight option of the fast path (in lock step), and its change relative to the model's own weights."""
    options = ["model", *[option for option in weights if option != "model"]]
    ids = torch.tensor(text_ids(loaded.tokenizer, text, tokens))
    steppers = {option: BoundedStepper(loaded.model, settings, option) for option in options}
    nll = {option: 0.0 for option in options}
    for stepper in steppers.values():
        stepper.prefill(ids[:1].tolist())  # the first token goes through the transformers path, like a prompt
    for index in tqdm(range(1, tokens - 1), desc="perplexity", disable=not show_progress, file=sys.stderr, leave=False):
        for option, stepper in steppers.items():
            logits = stepper.step(int(ids[index]))
            nll[option] += float(torch.nn.functional.cross_entropy(logits, ids[index + 1 : index + 2]))
    reference = math.exp(nll["model"] / (tokens - 2))
    rows = []
    for option in options:
        value = math.exp(nll[option] / (tokens - 2))
        rows.append({"weights": option, "perplexity": round(value, 4), "change_pct": round(100 * (value / reference - 1), 2)})
    return rows


def format_report(report: dict[str, Any]) -> str:
    speed = report.get("speed")
    lines = []
    if speed:
        lines.append(f"decode at a full cache of {speed['budget']} tokens, {speed['tokens']} tokens, {speed['threads']} threads:")
        for row in speed["rows"]:
            lines.append(
                f"  {row['path']:<28} {row['ms_per_token']:>8.2f} ms/token {row['tokens_per_s']:>7.1f} tok/s "
                f"{row['speedup_vs_transformers']:>5.2f}x  (first step {row['first_step_s']:.1f} s)"
            )
        lines += [f"  note: {note}" for note in speed["notes"]]
    for row in report.get("quality", []):
        lines.append(f"  perplexity with {row['weights']:<6} weights: {row['perplexity']:.3f} ({row['change_pct']:+.2f}%)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default="../shared/data/frankenstein.txt", metavar="FILE", help="text to decode")
    parser.add_argument("--budget", type=int, default=1024, help="cache tokens, sinks included (default 1024)")
    parser.add_argument("--tokens", type=int, default=48, help="decoded tokens timed per path (default 48)")
    parser.add_argument("--weights", default=",".join(LINEAR_MODES), metavar="LIST",
                        help=f"fast path weight options to run (default {','.join(LINEAR_MODES)}; auto is one of them)")
    parser.add_argument("--compile", action="store_true", help="also time compiled fast paths (compiles first: minutes)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument("--quality-tokens", type=int, default=0, metavar="N",
                        help="also measure each weight option's perplexity on the first N tokens of --text (e.g. 2000)")
    parser.add_argument("--out", default="out/speed", metavar="DIR", help="output folder (default out/speed)")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object with the figures")


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)
    settings = settings.replace(policy="sink_window", window=args.budget - settings.sinks)
    weights = [option.strip() for option in args.weights.split(",") if option.strip()]
    unknown = [option for option in weights if option not in DECODE_WEIGHTS]
    if unknown:
        print(f"streamchat speed: unknown weights {unknown}; known: {', '.join(DECODE_WEIGHTS)}", file=sys.stderr)
        return 2
    loaded = load_model(settings.model, settings.device, settings.dtype)
    report: dict[str, Any] = {"command": "speed", "machine": reporting.machine_info(), "model": loaded.source}
    report["speed"] = measure_speed(loaded, settings, args.text, args.tokens, weights, args.compile, not args.no_llama_cpp)
    if args.quality_tokens:
        report["quality"] = measure_quality(loaded, settings, args.text, args.quality_tokens, weights)
    folder = reporting.output_dir(args.out)
    reporting.write_json(folder / "speed.json", report)
    print(format_report(report))
    if args.json:
        reporting.print_json_line(report)
    return 0
