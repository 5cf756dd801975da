"""The resident memory of a process that decodes as a chat does by default, for `streamchat speed`.

Run as `python -m streamchat.evaluate.chat_rss_worker SETTINGS_JSON PROMPT_TOKENS NEW_TOKENS`: loads the model,
feeds a PROMPT_TOKENS-token prompt (demo text) through the bounded cache, decodes NEW_TOKENS tokens with the
configured decode path, weights and K/V dtype, and prints one JSON line: {"rss_bytes": n, "peak_rss_bytes": n}.
A process of its own, so the paths `speed` compares side by side (each with its own weights) do not count.
"""

from __future__ import annotations

import json
import sys

import torch

from streamchat import memory
from streamchat.config import Settings
from streamchat.evaluate.llama_cpp_worker import peak_rss_bytes


def main(settings_json: str, prompt_tokens: int, new_tokens: int) -> dict[str, int]:
    from streamchat.evaluate.speed import BoundedStepper
    from streamchat.model import load_model
    from streamchat.prompts import demo_token_ids

    settings = Settings(**json.loads(settings_json))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    loaded = load_model(settings.model, settings.device, settings.dtype)
    fast = settings.decode_path == "fast"
    stepper = BoundedStepper(loaded.model, settings, settings.decode_weights if fast else None)
    ids = demo_token_ids(loaded.tokenizer, prompt_tokens + new_tokens)
    stepper.prefill(ids[:prompt_tokens])
    for token in ids[prompt_tokens:]:
        stepper.step(token)
    return {"rss_bytes": memory.rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}  # VmHWM: not the parent's peak


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
