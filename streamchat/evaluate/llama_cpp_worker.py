"""llama.cpp in a process of its own, for `streamchat speed`: a crash in that optional native library (seen: its
AMX kernels on a CPU whose kernel does not grant AMX) costs that row of the table, not the run.

Protocol: one JSON object per line each way. In: {"prefill": [ids]} or {"step": id}. Out: {} after a prefill,
{"seconds": s, "rss_bytes": n, "peak_rss_bytes": n} after a step (timed here, so the pipe's latency is not counted
against llama.cpp; this process's resident memory). The first line out is {"ready": true, "system_info": "..."}
(llama.cpp's CPU feature line, e.g. "AVX2 = 1 | AVX512 = 0 ...") or {"error": "..."}.

Which llama.cpp build runs is Python's choice of `llama_cpp` package: `speed --isa avx2` puts an AVX2-only build's
folder first on PYTHONPATH (see streamchat/evaluate/speed.py).
"""

from __future__ import annotations

import json
import sys
import time

from streamchat.memory import peak_rss_bytes, rss_bytes  # torch-free probes: its RSS is llama.cpp's own


def serve(gguf: str, budget: int, threads: int) -> None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print(json.dumps({"error": "llama-cpp-python is not installed (optional: pip install llama-cpp-python)"}))
        return
    try:
        llm = Llama(model_path=gguf, n_ctx=budget + 64, n_threads=threads, n_batch=256, verbose=False)
    except Exception as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        return
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    print(json.dumps({"ready": True, "system_info": info.strip(), "module": llama_cpp.__file__}), flush=True)
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
        seconds = time.perf_counter() - started
        print(
            json.dumps({"seconds": seconds, "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}), flush=True
        )


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
