"""`python -m streamchat loadtest`: N concurrent streaming OpenAI clients against `serve`, for N = 1, 2, 4, 8.

Starts `serve` as a child process on 127.0.0.1 (a free port; never another address) with the given settings,
and for each N runs N client processes (`loadtest_client`: no client's Python waits on another's GIL), each with
the real `openai` package, each holding its own conversation of
`--requests` streamed turns of up to `--tokens` tokens. Per N: aggregate generated tokens/s (all clients' completion
tokens over the level's wall time), p50/p95 time to first token and inter-token latency (gaps between streamed
chunks, as a client sees them), the server process's RSS, the CPU time per generated token of the server and of the
clients (they share the machine) and the load average. Writes loadtest.json, loadtest.csv and loadtest.png (the
first repeat) to
`--out`; checks the batching targets (aggregate tok/s with 4 streams >= 2.5x one stream's, p95 inter-token latency
with 4 <= 2x one stream's) and says whether they were met. Every loop is bounded in count and in time.

First (unless --no-step-cost) it measures the CPU time of one batched decode step for each batch size in this
process: unlike wall-clock figures, that holds on a machine shared with other jobs.

Needs `openai` (a test dependency): `.venv/bin/pip install -r requirements-dev.txt`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from streamchat.reporting import cpu_model, machine_info, output_dir, print_json_line, write_csv, write_json

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a big city, with many details.",
    "Write a long letter to a friend about a journey across the mountains.",
    "Explain how plants grow from a seed into a tree, in detail.",
    "Tell a long tale about a dragon and a clever child.",
    "Describe the history of writing, from clay tablets to computers.",
    "Write a long essay about why people enjoy music.",
]


PASTE = Path(__file__).resolve().parents[1] / "data" / "frankenstein-opening.txt"  # ~5,000 tokens of prose


def prompt_for(index: int, paste_words: int = 0) -> str:
    """Client `index`'s request: one of PROMPTS, after `paste_words` words of the shipped Frankenstein opening
    (each client from its own place) when asked, so that its reply decodes at a full cache as a chat about a long
    paste does."""
    prompt = PROMPTS[index % len(PROMPTS)]
    if paste_words <= 0:
        return prompt
    words = PASTE.read_text(encoding="utf-8").split()
    start = (index * 97) % max(len(words) - paste_words, 1)
    return " ".join(words[start : start + paste_words]) + "\n\n" + prompt


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_level(
    base_url: str,
    model: str,
    clients: int,
    requests: int,
    tokens: int,
    deadline_s: float,
    api_key: str = "loadtest",
    temperature: float = 0.0,
    paste_words: int = 0,
) -> dict[str, Any]:
    """One load level: `clients` client processes (`loadtest_client`), each `requests` streamed turns in one
    conversation at `temperature` (0: greedy), started together once all have imported the openai package. Also
    returns the CPU seconds the clients used while conversing."""
    import multiprocessing

    from streamchat.evaluate.loadtest_client import serve_one

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch, no threads of this one
    workers = []
    for index in range(clients):
        parent, child = context.Pipe()
        process = context.Process(
            target=serve_one,
            daemon=True,
            args=(child, deadline_s),
            kwargs={
                "base_url": base_url,
                "model": model,
                "api_key": api_key,
                "prompt": prompt_for(index, paste_words),
                "requests": requests,
                "tokens": tokens,
                "temperature": temperature,
            },
        )
        process.start()
        workers.append((process, parent))
    results, failures = [], []
    try:
        for _process, connection in workers:  # every client started and imported before the clock starts
            if not connection.poll(120):
                raise RuntimeError("a load-test client did not start within 120 s")
            connection.recv()
        started = time.perf_counter()
        for _, connection in workers:
            connection.send("go")
        for _process, connection in workers:
            if connection.poll(deadline_s + 60):
                results.append(connection.recv())
            else:
                failures.append("TimeoutError: no result from a client")
        wall = time.perf_counter() - started
    finally:
        for process, connection in workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
    ttfts = [t for r in results for t in r["ttfts"]]
    gaps = [g for r in results for g in r["gaps"]]
    failures += [f for r in results for f in r["failures"]]
    completion = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "completion_tokens": completion,
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(completion / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_s": round(percentile(ttfts, 50), 4),
        "ttft_p95_s": round(percentile(ttfts, 95), 4),
        "itl_p50_ms": round(1000 * percentile(gaps, 50), 2),
        "itl_p95_ms": round(1000 * percentile(gaps, 95), 2),
        "rss_mb": 0.0,
        "failures": len(failures),
        "first_failure": failures[0] if failures else "",
        "clients_cpu_s": round(sum(r["cpu_s"] for r in results), 3),  # while conversing (not starting up)
    }


def step_cost(settings, batches: list[int], steps: int = 12) -> list[dict[str, Any]]:
    """CPU time of one batched decode step per batch size, in this process on one torch thread.

    CPU time (not wall time) measures the work a step does, so it holds on a machine shared with other jobs, where
    wall-clock figures swing with the load: the batching capability without the noise. Returns per batch size B
    the median step in ms and what it implies: aggregate speedup B*t1/tB and inter-token latency ratio tB/t1."""
    from streamchat.fastpath import decoder_for_step
    from streamchat.fastpath.batched import batchable, decode_batch
    from streamchat.model import load_model
    from streamchat.session import ChatSession

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(settings.model, settings.device, settings.dtype)
        sessions = [ChatSession(loaded, settings) for _ in range(max(batches))]
        for index, session in enumerate(sessions):
            "".join(session.send(PROMPTS[index % len(PROMPTS)], max_new_tokens=1))
        decoder = decoder_for_step(loaded.model, sessions[0].cache, settings)
        if decoder is None or not batchable(sessions[0].cache):
            return []
        rows, single = [], None
        for batch in batches:
            caches = [session.cache for session in sessions[:batch]]
            times = []
            for _ in range(steps):
                for cache in caches:
                    cache.make_room(1)
                started = time.process_time()
                if batch == 1:
                    decoder.decode(5, caches[0])
                else:
                    decode_batch(decoder, [5] * batch, caches)
                times.append(time.process_time() - started)
            median = statistics.median(times[2:])  # the first steps warm up
            single = single or (median if batch == 1 else None)
            row = {"batch": batch, "step_cpu_ms": round(1000 * median, 2)}
            if single:
                row["implied_tok_s_speedup"] = round(batch * single / median, 2)
                row["implied_itl_ratio"] = round(median / single, 2)
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(threads)


def plot(rows: list[dict[str, Any]], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [row["clients"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(clients, [row["aggregate_tok_s"] for row in rows], "o-")
    axes[0].set(title="aggregate generated tokens/s", xlabel="concurrent streams")
    axes[1].plot(clients, [row["itl_p50_ms"] for row in rows], "o-", label="p50")
    axes[1].plot(clients, [row["itl_p95_ms"] for row in rows], "s--", label="p95")
    axes[1].set(title="inter-token latency (ms)", xlabel="concurrent streams")
    axes[1].legend()
    axes[2].plot(clients, [row["ttft_p50_s"] for row in rows], "o-", label="p50")
    axes[2].plot(clients, [row["ttft_p95_s"] for row in rows], "s--", label="p95")
    axes[2].set(title="time to first token (s)", xlabel="concurrent streams")
    axes[2].legend()
    for axis in axes:
        axis.set_xticks(clients)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from streamchat.cli import add_list_argument

    add_list_argument(
        parser,
        "--clients",
        default=[1, 2, 4, 8],
        type=int,
        metavar="N",
        help="concurrent streaming clients per level (default: 1 2 4 8)",
    )
    parser.add_argument("--requests", type=int, default=2, help="streamed turns per client per level (default 2)")
    parser.add_argument("--tokens", type=int, default=96, help="max_tokens of each request (default 96)")
    parser.add_argument(
        "--paste-words",
        type=int,
        default=0,
        metavar="N",
        help="put N words of prose before each client's first request (e.g. 800: about 1,000 tokens, so replies "
        "decode at a full cache, as `speed` measures; default 0)",
    )
    parser.add_argument(
        "--request-temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="temperature each request asks for (default 0: greedy; e.g. 0.7 to sample, with the "
        "server's top_k, top_p and a seed per client)",
    )
    parser.add_argument("--level-timeout", type=float, default=300.0, help="seconds per level at most (default 300)")
    parser.add_argument("--repeat", type=int, default=1, help="run the levels this many times, interleaved (default 1)")
    parser.add_argument(
        "--no-step-cost",
        action="store_true",
        help="skip the CPU-time cost of batched decode steps (measured in this process first)",
    )
    parser.add_argument("--out", default="out/loadtest", metavar="DIR", help="output folder (default out/loadtest)")
    parser.add_argument(
        "--json", action="store_true", help="last stdout line: one JSON object with the headline figures"
    )


def _settings_argv(args: argparse.Namespace) -> list[str]:
    """The settings flags this command was given, for the `serve` child."""
    from streamchat.cli import SETTINGS_FLAGS

    argv = ["--config", args.config]
    for pair in args.set:
        argv += ["--set", pair]
    for name in SETTINGS_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(port: int, max_sessions: int, *extra: str) -> list[str]:
    """The command line of `python -m streamchat serve` on 127.0.0.1:`port` in this interpreter, `extra` appended."""
    return [
        sys.executable,
        "-m",
        "streamchat",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-sessions",
        str(max_sessions),
        *extra,
    ]


def wait_for_health(process: subprocess.Popen, url: str, timeout_s: float, name: str) -> dict:
    """/health's JSON once the server at `url` answers it with 200; RuntimeError naming `name` if the process
    exits first or `timeout_s` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}")
        try:
            response = httpx.get(url + "/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s")


def start_server(args: argparse.Namespace, max_sessions: int, timeout_s: float = 300.0):
    """`python -m streamchat serve` on 127.0.0.1 in a child process (its own interpreter: the clients' Python
    work does not share its GIL); returns (process, base URL, model id) once /health answers."""
    port = _free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k != "STREAMCHAT_API_KEY"}
    process = subprocess.Popen(serve_command(port, max_sessions, *_settings_argv(args)), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_health(process, url, timeout_s, "the server")
    except RuntimeError:
        process.terminate()
        raise
    return process, url + "/v1", health["model"]


def main(args: argparse.Namespace) -> int:
    import psutil

    try:
        import openai  # noqa: F401
    except ImportError:
        print(
            "streamchat loadtest: needs the openai package: .venv/bin/pip install -r requirements-dev.txt",
            file=sys.stderr,
        )
        return 2
    if (
        any(n < 1 or n > 64 for n in args.clients)
        or not 1 <= args.requests <= 100
        or not 1 <= args.tokens <= 4096
        or args.level_timeout <= 0
        or not 1 <= args.repeat <= 10
        or not 0 <= args.paste_words <= 4000
    ):
        print(
            "streamchat loadtest: --clients 1-64, --requests 1-100, --tokens 1-4096, --repeat 1-10, "
            "--paste-words 0-4000, --level-timeout above 0",
            file=sys.stderr,
        )
        return 2
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)  # checked here, so a bad flag fails before the server starts
    info = {
        **machine_info(),
        "cpu_model": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "policy": settings.policy,
        "budget": settings.budget,
        "decode_weights": settings.decode_weights,
        "load_before": os.getloadavg(),
    }
    print(
        f"loadtest: {info['cpu_model']}, {info['cpus']} CPUs, capability {info['capability']}; "
        f"load average {info['load_before'][0]:.2f}",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    costs = [] if args.no_step_cost else step_cost(settings, sorted({1, *args.clients}))
    for cost in costs:
        print(
            f"  batched step of {cost['batch']}: {cost['step_cpu_ms']:.1f} ms CPU (1 thread)"
            + (
                f": x{cost['implied_tok_s_speedup']:.2f} tok/s, x{cost['implied_itl_ratio']:.2f} step time vs 1"
                if "implied_itl_ratio" in cost
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
    try:
        process, base, model = start_server(args, max(args.clients))
    except RuntimeError as error:
        print(f"streamchat loadtest: {error}", file=sys.stderr)
        return 1
    info["model"], info["request_temperature"] = model, args.request_temperature
    info["paste_words"] = args.paste_words
    try:
        run_level(base, model, 1, 1, 8, args.level_timeout)  # warm-up: weights prepared, first cache made
        for repeat in range(args.repeat):
            for clients in args.clients:
                server = psutil.Process(process.pid)
                server_cpu = sum(server.cpu_times()[:2])
                row = {
                    "repeat": repeat,
                    **run_level(
                        base,
                        model,
                        clients,
                        args.requests,
                        args.tokens,
                        args.level_timeout,
                        temperature=args.request_temperature,
                        paste_words=args.paste_words,
                    ),
                }
                # CPU seconds per generated token: the server's, and the clients' (they share the cores)
                tokens = max(row["completion_tokens"], 1)
                row["server_cpu_ms_per_token"] = round(1000 * (sum(server.cpu_times()[:2]) - server_cpu) / tokens, 2)
                row["client_cpu_ms_per_token"] = round(1000 * row.pop("clients_cpu_s") / tokens, 2)
                row["rss_mb"] = round(server.memory_info().rss / 2**20, 1)
                row["load_avg"] = round(os.getloadavg()[0], 2)
                rows.append(row)
                print(
                    f"  {clients} streams: {row['aggregate_tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_s']:.3f} s "
                    f"p95 {row['ttft_p95_s']:.3f} s  ITL p50 {row['itl_p50_ms']:.1f} ms p95 {row['itl_p95_ms']:.1f} ms"
                    f"  server RSS {row['rss_mb']:.0f} MB  CPU/token: server {row['server_cpu_ms_per_token']:.1f} ms, "
                    f"clients {row['client_cpu_ms_per_token']:.1f} ms  load {row['load_avg']:.1f}"
                    + (f"  FAILURES {row['failures']}: {row['first_failure']}" if row["failures"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    info["load_after"] = os.getloadavg()
    summary: dict[str, Any] = {"machine": info, "levels": rows, "step_cost": costs}
    by_clients: dict[int, list[dict]] = {}
    for row in rows:
        by_clients.setdefault(row["clients"], []).append(row)
    if 1 in by_clients and 4 in by_clients:
        one, four = by_clients[1], by_clients[4]
        speedup = statistics.median(b["aggregate_tok_s"] / a["aggregate_tok_s"] for a, b in zip(one, four))
        itl = statistics.median(b["itl_p95_ms"] / a["itl_p95_ms"] for a, b in zip(one, four))
        summary["targets"] = {
            "tok_s_4_over_1": round(speedup, 2),
            "tok_s_target": 2.5,
            "itl_p95_4_over_1": round(itl, 2),
            "itl_target": 2.0,
            "met": speedup >= 2.5 and itl <= 2.0,
        }
        print(
            f"loadtest: 4 streams vs 1 (median over repeats): aggregate tok/s x{speedup:.2f} (target >= 2.5), "
            f"p95 inter-token latency x{itl:.2f} (target <= 2.0): {'met' if summary['targets']['met'] else 'NOT met'}",
            file=sys.stderr,
        )
    out = output_dir(args.out)
    write_json(out / "loadtest.json", summary)
    write_csv(out / "loadtest.csv", rows)
    title = (
        f"streamchat serve, {model}, {info['cpu_model']} ({info['cpus']} CPUs, {info['capability']}), {info['date']}"
    )
    plot([r for r in rows if r["repeat"] == 0], out / "loadtest.png", title)
    print(f"loadtest: wrote {out}/loadtest.json, loadtest.csv, loadtest.png", file=sys.stderr)
    if args.json:
        print_json_line({"levels": rows, **summary.get("targets", {})})
    return 0 if not any(row["failures"] for row in rows) else 1
