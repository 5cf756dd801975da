"""llama.cpp in a process of its own, for `streamchat speed`: a crash in that optional native library (seen: its
AMX kernels on a CPU whose kernel does not grant AMX) costs that row of the table, not the run.

Protocol: one JSON object per line each way. In: {"prefill": [ids]} or {"step": id}. Out: {} after a prefill,
{"seconds": s} after a step (timed here, so the pipe's latency is not counted against llama.cpp). The first line
out is {"ready": true} or {"error": "..."}.
"""

from __future__ import annotations

import json
import sys
import time


def serve(gguf: str, budget: int, threads: int) -> None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print(json.dumps({"error": "llama-cpp-python is not installed (optional: pip install llama-cpp-python)"}))
        return
    try:
        llm = Llama(model_path=gguf, n_ctx=budget + 64, n_threads=threads, n_batch=256, verbose=False)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which skips the row
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "prefill" in command:
            llm.reset()
            llm.eval(command["prefill"])
            print("{}", flush=True)
            continue
        if llm.n_tokens >= budget:  # keep the cached length at the budget, as the other paths do
            llm.n_tokens = budget - 1  # the next eval drops the last place from llama.cpp's KV cache
        started = time.perf_counter()
        llm.eval([command["step"]])
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
