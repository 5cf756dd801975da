"""One load-test client in a process of its own (`loadtest.run_level` starts one per stream): the real `openai`
package streaming `requests` turns of one conversation, timing them as the client sees them.

Its own process, as a real client is: the clients' Python (parsing every chunk, 0.4-0.7 ms of CPU each on the
machine measured) does not queue behind the other clients' on one GIL, which would add that queueing to the
inter-token gaps they record. This module imports neither torch nor transformers, so a client starts in about a
second.
"""

from __future__ import annotations

import time
from typing import Any


def converse(
    base_url: str,
    model: str,
    api_key: str,
    prompt: str,
    requests: int,
    tokens: int,
    deadline: float,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """`requests` streamed turns (the first `prompt`, then "Go on, with more details.") at `temperature` (0:
    greedy; else sampled, seeded per prompt) until time.time() passes `deadline` (seconds since the epoch).
    Returns times to first token and gaps between text chunks (s), completion tokens (from the usage chunk),
    failures (stopping at the first) and this process's CPU seconds meanwhile."""
    import openai

    cpu = time.process_time()
    api = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=max(deadline - time.time(), 1))
    result = empty_result()
    messages: list[dict[str, str]] = []
    for turn in range(requests):
        if time.time() > deadline:
            break
        messages.append({"role": "user", "content": prompt if turn == 0 else "Go on, with more details."})
        started, stamps, pieces, used = time.perf_counter(), [], [], 0
        try:
            stream = api.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=tokens,
                temperature=temperature,
                stream=True,
                seed=None if temperature == 0 else len(prompt),
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    used = chunk.usage.completion_tokens
        except Exception as error:
            result["failures"].append(f"{type(error).__name__}: {error}")
            break
        messages.append({"role": "assistant", "content": "".join(pieces)})
        result["tokens"] += used
        if stamps:
            result["ttfts"].append(stamps[0] - started)
            result["gaps"].extend(after - before for before, after in zip(stamps, stamps[1:]))
    result["cpu_s"] = time.process_time() - cpu
    return result


def empty_result(failures: list[str] | None = None) -> dict[str, Any]:
    """`converse`'s result before any turn (with these failures)."""
    return {"ttfts": [], "gaps": [], "tokens": 0, "failures": failures or [], "cpu_s": 0.0}


def serve_one(connection, deadline_s: float, **conversation: Any) -> None:
    """A client process: import, say ready, wait for the go, converse (`conversation`: `converse`'s arguments but
    its deadline, which is `deadline_s` after the go), send the result back (or the error)."""
    try:
        import openai  # noqa: F401 - imported before the go, so start-up is not timed

        connection.send("ready")
        if connection.recv() != "go":
            return
        connection.send(converse(**conversation, deadline=time.time() + deadline_s))
    except Exception as error:
        connection.send(empty_result([f"{type(error).__name__}: {error}"]))
    finally:
        connection.close()
