"""`python -m streamchat speed`: decode tokens/s of every decode path side by side, and each fast variant's
perplexity change.

Speed: every path holds a full cache of `budget` tokens and decodes forced text tokens one at a time; the paths
take turns in short blocks, in an order reversed every round, so a shared CPU's load falls on all alike and the
ratios hold within the run. Paths: plain transformers with a DynamicCache kept at the budget (the reference),
transformers on the bounded cache, the fast path with each weight option and K/V cache dtype (and compiled, on
request), and llama.cpp on the same GGUF file when `llama-cpp-python` is installed (skipped with a note otherwise).

Quality: the NLL of each next token of a long text fed token by token through the bounded cache at the budget (so
the second half runs with evictions), for each of those fast path variants in lock step; the fast path with the
model's own weights and dtype is the reference (it matches transformers within float rounding, tests/test_fast.py).

Memory: the resident memory (RSS, peak) of a process decoding as a chat does by default on the model measured
(`evaluate/footprint.py`: a `budget`-token prompt, then 64 tokens), next to llama.cpp's process after its steps.

CPU class (`--isa avx2`): the whole measurement reruns in a child process with ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2 and FBGEMM_ENABLE_INSTRUCTIONS=AVX2, so torch, oneDNN and fbgemm use their AVX2 kernels
(and `auto` chooses as on an AVX2-only CPU), and llama.cpp runs from an AVX2-only build: the folder given by
`--llama-cpp-avx2` or $STREAMCHAT_LLAMA_CPP_AVX2 (`pip install --target DIR llama-cpp-python` built with
AVX-512 off; docs/speed-cpu.md), or is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from streamchat import native, reporting
from streamchat.attention import attention_kwargs
from streamchat.cache import BoundedCache
from streamchat.cli import add_list_argument
from streamchat.config import DECODE_WEIGHTS, KV_DTYPES, Settings
from streamchat.evaluate import footprint
from streamchat.fastpath import decode_summary, decoder_for, kv_dtype_for
from streamchat.fastpath.choice import cpu_class
from streamchat.model import LoadedModel, embedded_gguf_path, load_model
from streamchat.packing import PACKED_ATTR
from streamchat.prompts import demo_token_ids
from streamchat.quant import LINEAR_MODES, resolve_weights

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
LLAMA_CPP_AVX2_ENV = "STREAMCHAT_LLAMA_CPP_AVX2"  # folder holding an AVX2-only llama_cpp package
SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "data" / "frankenstein-opening.txt"  # ~5,000 tokens
LLAMA_CPP_ENV = "STREAMCHAT_LLAMA_CPP"  # folder holding the llama_cpp package to compare with (any ISA)
REFERENCE = "transformers_dynamic"
LLAMA_CPP = "llama_cpp"
CHAT = "chat_session"  # ChatStepper: the REPL's and the server's per-token work around the default step
BLOCK = 8  # tokens a path decodes per turn in the speed measurement


class Stepper:
    """One decode path: `prefill(ids)` (untimed) then `step(token)` per decoded token."""

    def prefill(self, ids: list[int]) -> None:
        raise NotImplementedError

    def step(self, token_id: int) -> torch.Tensor | None:
        raise NotImplementedError

    def timed_step(self, token_id: int) -> float:
        """Seconds one `step` takes."""
        started = time.perf_counter()
        self.step(token_id)
        return time.perf_counter() - started

    def close(self) -> None:
        """Release what the path holds outside this process (nothing, but for llama.cpp)."""


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
    """What a chat does per token on the bounded cache: make room, then the transformers step (`weights` None) or
    the fast step with those weights; the cache's K/V dtype follows `settings.kv_dtype` for that path."""

    def __init__(self, model: torch.nn.Module, settings: Settings, weights: str | None, compile: bool = False):
        settings = settings.replace(decode_path="fast" if weights else "transformers")
        self.model, self.cache = model, BoundedCache(model, settings, kv_dtype_for(model, settings))
        self.decoder = decoder_for(model, weights, compile) if weights else None

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        """As a chat's prefill: a fast path whose native step takes the chunk feeds it there, else the forward."""
        for start in range(0, len(ids), self.cache.room):
            chunk = ids[start : start + self.cache.room]
            self.cache.make_room(len(chunk))
            if self.decoder is not None and self.decoder.native_ready([self.cache], prefill=True):
                self.decoder.prefill(chunk, self.cache)
                continue
            self.model(
                input_ids=torch.tensor([chunk], device=self.model.device),
                past_key_values=self.cache,
                **attention_kwargs(self.cache),
            )

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        self.cache.make_room(1)
        if self.decoder is not None:
            return self.decoder.decode(token_id, self.cache)
        out = self.model(
            input_ids=torch.tensor([[token_id]], device=self.model.device),
            past_key_values=self.cache,
            **attention_kwargs(self.cache),
        )
        return out.logits[:, -1].float()


class ChatStepper(Stepper):
    """What the REPL and the server run per generated token, in this process: a `ChatSession` reply (the greedy
    choice with the repetition penalty, detokenizing, eviction and the default decode step), timed per token as the
    chat counts its decode speed, so that its figure sits beside the step's. The `budget`-token prompt goes in as a
    user message; a reply that ends starts another turn ("Go on."), whose prefill is not timed."""

    def __init__(self, loaded: LoadedModel, settings: Settings):
        from streamchat.session import ChatSession

        self.session = ChatSession(loaded, settings.replace(temperature=0.0))
        self.reply: Any = None

    def prefill(self, ids: list[int]) -> None:
        self._start(self.session.tokenizer.decode(ids, skip_special_tokens=True))

    def _start(self, text: str) -> None:
        if self.reply is not None:
            self.reply.close()
        self.reply = self.session.send(text, max_new_tokens=1_000_000)
        next(self.reply, None)  # the prefill and the first token (from the prefill's logits)

    def step(self, token_id: int) -> None:
        self.timed_step(token_id)

    def timed_step(self, token_id: int) -> float:
        """Seconds per token of the reply's next piece (a piece may take several tokens, e.g. a split character)."""
        cache = self.session.cache
        seen = cache.seen_tokens
        started = time.perf_counter()
        piece = next(self.reply, None)
        elapsed = time.perf_counter() - started
        fed = cache.seen_tokens - seen
        if piece is None:
            self._start("Go on.")
        return elapsed / max(fed, 1)

    def close(self) -> None:
        if self.reply is not None:
            self.reply.close()


class LlamaCppFailed(RuntimeError):
    """llama.cpp could not run (not installed, refused the file, or its process died)."""


class LlamaCppStepper(Stepper):
    """llama.cpp (llama-cpp-python) on the GGUF file, one token per eval with the context kept at the budget, run in
    its own process (`llama_cpp_worker`), which times each eval itself."""

    def __init__(self, gguf: Path, budget: int, threads: int, package_dir: str | None = None):
        env = dict(os.environ)
        if package_dir:  # this llama_cpp build first on the path (an AVX2-only one for --isa avx2)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_dir, env.get("PYTHONPATH")]))
        self.worker = subprocess.Popen(
            self.command(gguf, budget, threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        answer = self._read()
        if "error" in answer:
            raise LlamaCppFailed(answer["error"])
        self.system_info: str = answer.get("system_info", "")
        self.memory: dict[str, int] = {}

    @staticmethod
    def command(gguf: Path, budget: int, threads: int) -> list[str]:
        return [sys.executable, "-m", "streamchat.evaluate.llama_cpp_worker", str(gguf), str(budget), str(threads)]

    def _read(self) -> dict[str, Any]:
        line = self.worker.stdout.readline()
        if not line:
            raise LlamaCppFailed(f"its process exited with code {self.worker.wait()}")
        return json.loads(line)

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        try:
            self.worker.stdin.write(json.dumps(command) + "\n")
            self.worker.stdin.flush()
        except BrokenPipeError:
            raise LlamaCppFailed(f"its process exited with code {self.worker.wait()}") from None
        return self._read()

    def prefill(self, ids: list[int]) -> None:
        self._ask({"prefill": ids})

    def step(self, token_id: int) -> None:
        self._ask({"step": token_id})

    def timed_step(self, token_id: int) -> float:
        answer = self._ask({"step": token_id})
        self.memory = {key: answer[key] for key in ("rss_bytes", "peak_rss_bytes") if key in answer}
        return answer["seconds"]

    def close(self) -> None:
        self.worker.kill()
        self.worker.wait()


def text_ids(tokenizer, text: str | None, count: int) -> list[int]:
    """The first `count` tokens of `text` (None: the built-in demo prompts, repeated as needed); a ValueError if
    the text is shorter."""
    if text is None:
        return demo_token_ids(tokenizer, count)
    ids = tokenizer(text[: count * 8], add_special_tokens=False)["input_ids"][:count]
    if len(ids) < count:
        raise ValueError(f"the --text file has only {len(ids)} tokens; {count} are needed")
    return ids


KV_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TORCH_KERNELS = "fast_int4_torch_kernels_kv_fp32"  # int4 on torch's weight-only kernels (where native ones run)


def fast_variants(
    loaded: LoadedModel, settings: Settings, weights: list[str], kv_dtypes: list[str]
) -> dict[str, tuple]:
    """Each fast path to measure, by name (e.g. `fast_int4_kv_bf16`): (weights, settings with its kv_dtype).
    Options that resolve alike (auto and int4 on the embedded model) are measured once; a GGUF run from its own
    blocks has one set of weights, the file's ("model"), whatever `weights` asks."""
    layers = loaded.model.model.layers
    if getattr(getattr(loaded.model, PACKED_ATTR, None), "mode", None) == "gguf":
        weights = ["model"]
    variants = {}
    for option in weights:
        resolved = resolve_weights(layers, option)
        for kv in kv_dtypes:
            path_settings = settings.replace(kv_dtype=kv, decode_path="fast")
            name = f"fast_{resolved}_kv_{KV_NAMES[kv_dtype_for(loaded.model, path_settings)]}"
            variants.setdefault(name, (resolved, path_settings))
    return variants


def default_variant(loaded: LoadedModel, settings: Settings) -> str:
    """The name `fast_variants` gives the configuration a chat decodes with by default."""
    variants = fast_variants(
        loaded, settings.replace(decode_path="fast"), [settings.decode_weights], [settings.kv_dtype]
    )
    return next(iter(variants))


def build_paths(
    loaded: LoadedModel,
    settings: Settings,
    weights: list[str],
    kv_dtypes: list[str],
    compile: bool,
    llama_cpp: bool,
    llama_cpp_dir: str | None = None,
) -> tuple[dict[str, Stepper], list[str]]:
    """The steppers to compare, and notes on paths skipped."""
    model, budget = loaded.model, settings.budget
    paths: dict[str, Stepper] = {
        REFERENCE: DynamicStepper(model, budget),
        "transformers_bounded": BoundedStepper(model, settings, None),
    }
    variants = fast_variants(loaded, settings, weights, kv_dtypes)
    for name, (option, path_settings) in variants.items():
        paths[name] = BoundedStepper(model, path_settings, option)
        if compile:
            paths[f"{name}_compiled"] = BoundedStepper(model, path_settings, option, compile=True)
    int4 = [path_settings for option, path_settings in variants.values() if option == "int4"]
    if native.active() and int4:  # the same step on torch's int4 kernels and SDPA, for the side-by-side record
        with native.torch_kernels():
            paths[TORCH_KERNELS] = BoundedStepper(model, int4[0].replace(kv_dtype="model"), "int4")
    paths[CHAT] = ChatStepper(loaded, settings)
    notes = []
    if llama_cpp:
        gguf = embedded_gguf_path() if settings.model is None else Path(settings.model)
        try:
            if gguf.suffix != ".gguf":
                raise LlamaCppFailed(f"{gguf} is not a GGUF file")
            if forced_avx2() and not llama_cpp_dir:
                raise LlamaCppFailed(f"no AVX2-only build named (--llama-cpp-avx2 DIR or ${LLAMA_CPP_AVX2_ENV})")
            if llama_cpp_dir and not (Path(llama_cpp_dir) / "llama_cpp").is_dir():
                raise LlamaCppFailed(f"no llama_cpp package in {llama_cpp_dir}")
            paths[LLAMA_CPP] = LlamaCppStepper(gguf, budget, torch.get_num_threads(), llama_cpp_dir)
            notes.append(f"llama.cpp build: {paths[LLAMA_CPP].system_info}")
        except LlamaCppFailed as error:
            notes.append(f"llama.cpp skipped: {error}")
    return paths, notes


def measure_speed(
    loaded: LoadedModel,
    settings: Settings,
    text: str | None,
    tokens: int,
    weights: list[str],
    kv_dtypes: list[str],
    compile: bool = False,
    llama_cpp: bool = True,
    show_progress: bool = True,
    llama_cpp_dir: str | None = None,
) -> dict[str, Any]:
    """Median ms/token of each path decoding at least `tokens` counted tokens at a full cache, and tokens/s ratios
    to plain transformers. Paths take turns in blocks of `BLOCK` tokens (order reversed every round); the first
    step of each block is not counted: it pays for the previous path's threads winding down (llama.cpp's OpenMP
    threads in its own process spin on the same cores for a while after each eval, as torch's do). The warm-up
    step (first-call allocations; a compiled path's compilation) is timed apart, and so is each path's prefill of
    the `budget` tokens from an empty cache (a chat's prefill: the native step's chunks where it takes them)."""
    budget = settings.budget
    paths, notes = build_paths(loaded, settings, weights, kv_dtypes, compile, llama_cpp, llama_cpp_dir)
    llama_memory: dict[str, int] = {}
    rounds = -(-tokens // (BLOCK - 1))
    ids = text_ids(loaded.tokenizer, text, budget + 1 + rounds * BLOCK)
    warmup: dict[str, float] = {}
    prefill: dict[str, float] = {}  # seconds of each path's `budget`-token prefill from an empty cache
    times: dict[str, list[float]] = {name: [] for name in paths}

    def turn(name: str, block: list[int]) -> None:
        try:
            if name not in warmup:
                started = time.perf_counter()
                paths[name].prefill(ids[:budget])
                prefill[name] = time.perf_counter() - started
                warmup[name] = paths[name].timed_step(ids[budget])
            else:
                times[name] += [paths[name].timed_step(token) for token in block][1:]
        except LlamaCppFailed as error:
            notes.append(f"llama.cpp dropped: {error}")
            paths.pop(name).close()
            del times[name]

    try:
        for name in list(paths):
            turn(name, [])
        for index in tqdm(range(rounds), desc="decode", disable=not show_progress, file=sys.stderr, leave=False):
            block = ids[budget + 1 + index * BLOCK : budget + 1 + (index + 1) * BLOCK]
            for name in list(paths) if index % 2 == 0 else reversed(list(paths)):
                turn(name, block)
    finally:
        llama_memory = getattr(paths.get(LLAMA_CPP), "memory", {})
        default_name = default_variant(loaded, settings)
        per_token = step_reads(paths.get(default_name))
        for path in paths.values():
            path.close()
    names = list(paths)
    reference = statistics.median(times[REFERENCE])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        rows.append(
            {
                "path": name,
                "ms_per_token": round(1000 * median, 2),
                "tokens_per_s": round(1 / median, 2),
                "speedup_vs_transformers": round(reference / median, 2),
                "first_step_s": round(warmup[name], 2),
                "prefill_tokens_per_s": round(budget / prefill[name], 1),
            }
        )
    return {
        "budget": budget,
        "policy": settings.policy,
        "tokens": len(times[REFERENCE]),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "notes": notes,
        "default_path": default_name,
        "cpu_class": cpu_class(),
        "auto_choice": decode_summary(loaded.model, settings.replace(decode_path="fast")),
        "llama_cpp_memory": llama_memory,
        "reads": reads_report(per_token, next((r for r in rows if r["path"] == default_name), None)),
    }


def step_reads(stepper: Stepper | None) -> dict[str, int] | None:
    """Bytes one decode step of a fast path reads from memory: its decoder's weights and the K/V of its cache's
    tokens (both read whole every step). None for a path without a decoder of its own."""
    decoder = getattr(stepper, "decoder", None)
    if decoder is None or not hasattr(decoder, "nbytes"):
        return None
    kv = sum(
        layer.keys.narrow(2, 0, layer.length).nbytes + layer.values.narrow(2, 0, layer.length).nbytes
        for layer in stepper.cache.layers
    )
    return {"weights_bytes": decoder.nbytes(), "kv_bytes": kv}


def reads_report(per_token: dict[str, int] | None, row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The default path's bytes per token x tokens/s against this machine's streaming read, measured now
    (native.read_bandwidth, after the other paths' processes are gone): what bounds decode at real sizes."""
    machine = native.read_bandwidth() if per_token else None
    if not per_token or not row or not machine:
        return None
    gb_s = (per_token["weights_bytes"] + per_token["kv_bytes"]) * row["tokens_per_s"] / 1e9
    return {
        **per_token,
        "gb_s": round(gb_s, 2),
        "machine_read_gb_s": round(machine, 2),
        "share": round(gb_s / machine, 3),
    }


def forced_avx2() -> bool:
    """Whether this process runs torch's AVX2 kernels on request (ATEN_CPU_CAPABILITY=avx2)."""
    return os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2"


def measure_chat_memory(settings: Settings, budget: int, new_tokens: int = 64) -> dict[str, int]:
    """RSS and peak RSS (bytes) of a fresh chat process (`evaluate/footprint.py`, packed weights as `chat` holds
    them) on the model this run measures (`settings.model`): a `budget`-token prompt, then `new_tokens` tokens. {}
    if it fails."""
    figures = footprint.run_child("packed", budget, new_tokens, settings.threads, model=settings.model)
    if "rss_mb" not in figures:
        return {}
    return {"rss_bytes": int(figures["rss_mb"] * 2**20), "peak_rss_bytes": int(figures["peak_rss_mb"] * 2**20)}


@torch.inference_mode()
def measure_quality(
    loaded: LoadedModel,
    settings: Settings,
    text: str,
    tokens: int,
    weights: list[str],
    kv_dtypes: list[str],
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity of the first `tokens` tokens of `text`, token by token through the bounded cache, for each fast
    path variant (weights x K/V dtype, in lock step), and its change relative to the model's own weights and dtype."""
    variants = fast_variants(loaded, settings, ["model"], ["model"])
    variants.update(fast_variants(loaded, settings, weights, kv_dtypes))
    reference = next(iter(variants))
    ids = torch.tensor(text_ids(loaded.tokenizer, text, tokens))
    steppers = {
        name: BoundedStepper(loaded.model, path_settings, option) for name, (option, path_settings) in variants.items()
    }
    nll = dict.fromkeys(steppers, 0.0)
    for stepper in steppers.values():
        stepper.prefill(ids[:1].tolist())  # the first token goes through the transformers path, like a prompt
    for index in tqdm(range(1, tokens - 1), desc="perplexity", disable=not show_progress, file=sys.stderr, leave=False):
        for name, stepper in steppers.items():
            logits = stepper.step(int(ids[index]))
            nll[name] += float(torch.nn.functional.cross_entropy(logits, ids[index + 1 : index + 2]))
    reference_ppl = math.exp(nll[reference] / (tokens - 2))
    rows = []
    for name in steppers:
        value = math.exp(nll[name] / (tokens - 2))
        rows.append(
            {"path": name, "perplexity": round(value, 4), "change_pct": round(100 * (value / reference_ppl - 1), 3)}
        )
    return rows


def format_report(report: dict[str, Any]) -> str:
    speed = report.get("speed")
    lines = []
    if speed:
        lines.append(
            f"decode at a full cache of {speed['budget']} tokens ({speed.get('policy', 'sink_window')}), "
            f"{speed['tokens']} tokens, {speed['threads']} threads:"
        )
        for row in speed["rows"]:
            lines.append(
                f"  {row['path']:<28} {row['ms_per_token']:>8.2f} ms/token {row['tokens_per_s']:>7.1f} tok/s "
                f"{row['speedup_vs_transformers']:>5.2f}x  (first step {row['first_step_s']:.1f} s; "
                f"prefill {row['prefill_tokens_per_s']:.0f} tok/s)"
            )
        lines += [f"  note: {note}" for note in speed["notes"]]
        lines.append(f"  default configuration: {speed['default_path']} ({speed['auto_choice']})")
        fastest = min(speed["rows"], key=lambda row: row["ms_per_token"])
        by_name = {row["path"]: row for row in speed["rows"]}
        default = by_name.get(speed["default_path"])
        if default:
            lines.append(
                f"  default vs fastest ({fastest['path']}): {default['tokens_per_s'] / fastest['tokens_per_s']:.2f}x"
            )
            if LLAMA_CPP in by_name:
                lines.append(
                    f"  default vs llama.cpp: {default['tokens_per_s'] / by_name[LLAMA_CPP]['tokens_per_s']:.2f}x"
                )
            if CHAT in by_name:
                lines.append(
                    f"  chat session (what the REPL and the server decode, greedy) vs the default step: "
                    f"{by_name[CHAT]['tokens_per_s'] / default['tokens_per_s']:.2f}x"
                )
        reads = speed.get("reads")
        if reads:
            lines.append(
                f"  default reads {(reads['weights_bytes'] + reads['kv_bytes']) / 1e9:.3f} GB a token (weights "
                f"{reads['weights_bytes'] / 1e9:.3f} + K/V {reads['kv_bytes'] / 1e9:.3f}): {reads['gb_s']:.1f} GB/s, "
                f"{100 * reads['share']:.0f}% of this machine's streaming read ({reads['machine_read_gb_s']:.1f} GB/s, "
                f"{speed['threads']} threads, measured after the run)"
            )
    memory = report.get("memory")
    if memory:
        mb = 1024 * 1024
        for name, figures in memory.items():
            if figures:
                lines.append(
                    f"  memory, {name:<22} RSS {figures['rss_bytes'] / mb:6.0f} MB, peak {figures['peak_rss_bytes'] / mb:6.0f} MB"
                )
    for row in report.get("quality", []):
        lines.append(f"  perplexity, {row['path']:<22} {row['perplexity']:.3f} ({row['change_pct']:+.3f}%)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text",
        default=str(SAMPLE_TEXT),
        metavar="FILE",
        help="text to decode (default: the opening of Frankenstein, public domain, shipped in streamchat/data/)",
    )
    parser.add_argument("--budget", type=int, default=1024, help="cache tokens, sinks included (default 1024)")
    parser.add_argument("--tokens", type=int, default=48, help="decoded tokens timed per path (default 48)")
    add_list_argument(
        parser,
        "--weights",
        default=list(LINEAR_MODES),
        choices=DECODE_WEIGHTS,
        metavar="NAME",
        help=f"fast path weight options to run (default {' '.join(LINEAR_MODES)}; auto is one of them)",
    )
    add_list_argument(
        parser,
        "--kv-dtypes",
        default=["model", "float16", "bfloat16"],
        choices=KV_DTYPES,
        metavar="NAME",
        help="K/V cache dtypes for each fast path (default model float16 bfloat16; also auto)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time compiled fast paths (compiles first: minutes)"
    )
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="CPU kernel class: native, or avx2 (forced in a child process, as on an AVX2-only CPU)",
    )
    parser.add_argument(
        "--llama-cpp-avx2",
        default=os.environ.get(LLAMA_CPP_AVX2_ENV),
        metavar="DIR",
        help=f"folder of an AVX2-only llama_cpp build for --isa avx2 (default ${LLAMA_CPP_AVX2_ENV})",
    )
    parser.add_argument(
        "--llama-cpp",
        default=os.environ.get(LLAMA_CPP_ENV),
        metavar="DIR",
        help=f"folder holding the llama_cpp package to compare with (e.g. another venv's site-packages; default "
        f"${LLAMA_CPP_ENV}, else the one this Python imports)",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the chat-process RSS measurement (a child process: one prompt, 64 tokens)",
    )
    parser.add_argument(
        "--quality-tokens",
        type=int,
        default=0,
        metavar="N",
        help="also measure each weight option's perplexity on the first N tokens of --text (e.g. 2000)",
    )
    parser.add_argument("--out", default="out/speed", metavar="DIR", help="output folder (default out/speed)")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object with the figures")


def at_budget(settings, budget: int):
    """`settings` with the cache sized to `budget` tokens under its own policy: sink_window's window, or H2O's and
    TOVA's recent tokens beside their heavy hitters (as configured, at most what the budget leaves)."""
    if settings.policy == "sink_window":
        return settings.replace(window=budget - settings.sinks)
    heavy = min(settings.heavy, budget - settings.sinks - settings.slack - 1)
    return settings.replace(heavy=heavy, recent=budget - settings.sinks - heavy)


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)
    settings = at_budget(settings, args.budget)
    if args.isa == "avx2" and not forced_avx2():  # torch picks its kernels once per process: rerun in a child
        print(f"streamchat speed: running with {' '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}", file=sys.stderr)
        return subprocess.run(
            [sys.executable, "-m", "streamchat", *args.argv], env={**os.environ, **AVX2_ENV}
        ).returncode
    weights, kv_dtypes = list(args.weights), list(args.kv_dtypes)
    try:
        if args.tokens < 1 or not (args.quality_tokens == 0 or args.quality_tokens >= 3):
            raise ValueError("--tokens must be at least 1, --quality-tokens 0 (off) or at least 3")
        text = reporting.read_text_file(args.text, "--text file")
        loaded = load_model(settings.model, settings.device, settings.dtype)
        report: dict[str, Any] = {"command": "speed", "machine": reporting.machine_info(), "model": loaded.source}
        report["machine"]["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        report["speed"] = measure_speed(
            loaded,
            settings,
            text,
            args.tokens,
            weights,
            kv_dtypes,
            args.compile,
            not args.no_llama_cpp,
            llama_cpp_dir=args.llama_cpp_avx2 if forced_avx2() else args.llama_cpp,
        )
        report["memory"] = {}
        if not args.no_memory:
            report["memory"]["streamchat_chat_default"] = measure_chat_memory(settings, args.budget)
        report["memory"]["llama_cpp"] = report["speed"]["llama_cpp_memory"]
        if args.quality_tokens:
            report["quality"] = measure_quality(loaded, settings, text, args.quality_tokens, weights, kv_dtypes)
    except ValueError as error:  # a bad flag, an unreadable or too short --text file
        print(f"streamchat speed: {error}", file=sys.stderr)
        return 2
    folder = reporting.output_dir(args.out)
    reporting.write_json(folder / "speed.json", report)
    print(format_report(report))
    if args.json:
        reporting.print_json_line(report)
    return 0
