"""`python -m streamchat soak`: hundreds of thousands of tokens through one conversation, to show it stays healthy.

Long pasted passages (from `--text FILE`, or generated text) stream through the cache in prefill chunks, each
followed by a short generated reply, with a question turn mixed in now and then. The soak passes when the KV
bytes never change, RSS grows little once the cache has filled, no turn failed, and the session still answers
at the end.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from streamchat import reporting
from streamchat.memory import peak_rss_bytes
from streamchat.model import ModelError, load_model
from streamchat.session import ChatSession, SessionError

DEFAULT_TOKENS = 200_000
DEFAULT_PASTE_CHARS = 6000
DEFAULT_REPLY_TOKENS = 16
QUESTION_EVERY = 3
QUESTIONS = (
    "Who is speaking in the passage above?",
    "Summarize what we read so far in one sentence.",
    "What is the mood of that last passage?",
    "Name one object mentioned above.",
)
FINAL_QUESTION = "Thank you. Are you still with me? Answer in one short sentence."
MB = 1024 * 1024
WORDS = [
    "the",
    "sea",
    "wind",
    "light",
    "house",
    "night",
    "storm",
    "keeper",
    "ship",
    "rock",
    "wave",
    "old",
    "young",
    "letter",
    "friend",
    "journey",
    "cold",
    "mountain",
    "river",
    "fire",
    "book",
    "window",
    "door",
    "road",
    "village",
    "bell",
    "morning",
    "evening",
    "silence",
    "voice",
    "promise",
    "memory",
    "garden",
    "winter",
]


def generated_text(seed: int = 0) -> Iterator[str]:
    """Endless plain sentences, for a soak without a text file."""
    rng = random.Random(seed)
    while True:
        words = rng.choices(WORDS, k=rng.randint(6, 18))
        yield " ".join(words).capitalize() + ". "


def passages(text: str | None, size: int, seed: int = 0) -> Iterator[str]:
    """Passages of about `size` characters, cut at whitespace: the text cycled forever, or generated text."""
    if text is None:
        sentences = generated_text(seed)
        while True:
            passage = ""
            while len(passage) < size:
                passage += next(sentences)
            yield passage.strip()
    if not text.strip():
        raise ValueError("the text to paste is empty")
    start = 0
    while True:
        end = start + size
        if end >= len(text):
            piece, start = text[start:], 0
        else:
            cut = text.rfind(" ", start + size // 2, end)
            end = cut if cut > 0 else end
            piece, start = text[start:end], end
        if piece.strip():
            yield piece.strip()


def turns(text: str | None, paste_chars: int) -> Iterator[tuple[str, str]]:
    """(kind, message): pasted passages with a question every QUESTION_EVERY passages."""
    questions = itertools.cycle(QUESTIONS)
    for index, passage in enumerate(passages(text, paste_chars), start=1):
        yield "paste", f"Here is a passage from a book:\n\n{passage}\n\nWhat happens in it?"
        if index % QUESTION_EVERY == 0:
            yield "question", next(questions)


def _record(session: ChatSession, kind: str, chars: int, error: str | None) -> dict[str, Any]:
    stats = session.stats()
    turn = session.last_turn.to_dict() if session.last_turn and error is None else {}
    return {
        "turn": stats["turns"],
        "kind": kind,
        "user_chars": chars,
        "prompt_tokens": turn.get("prompt_tokens", 0),
        "new_tokens": turn.get("new_tokens", 0),
        "stop_reason": turn.get("stop_reason", "error" if error else None),
        "prefill_tokens_per_s": round(turn.get("prefill_tokens_per_s", 0.0), 1),
        "decode_tokens_per_s": round(turn.get("decode_tokens_per_s", 0.0), 1),
        "seen_total": stats["seen_total"],
        "cache_tokens": stats["cache_tokens"],
        "evicted_total": stats["evicted_total"],
        "kv_bytes": stats["kv_bytes"],
        "rss_bytes": stats["rss_bytes"],
        "error": error,
        # conversation memory on: the store on disk grows by the text; RAM must not
        **(
            {
                "memory_passages": stats.get("memory_passages", 0),
                "memory_file_bytes": stats.get("memory_file_bytes", 0),
                "recalled_tokens": stats.get("recalled_tokens", 0),
                "recall_changed": turn.get("recall_changed", False),
            }
            if "memory" in stats
            else {}
        ),
    }


def run_soak(
    session: ChatSession,
    tokens: int = DEFAULT_TOKENS,
    text: str | None = None,
    paste_chars: int = DEFAULT_PASTE_CHARS,
    reply_tokens: int = DEFAULT_REPLY_TOKENS,
    rss_threshold: float = 0.05,
    progress: bool = True,
    max_seconds: float | None = None,
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Push at least `tokens` tokens through the session (or as many as `max_seconds` allow: the soak then
    fails); returns the per-turn records and the verdict. `checkpoint` gets the records every 10 turns, so a long
    run leaves partial results behind."""
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="soak", disable=not progress, file=sys.stderr)
    for kind, message in turns(text, paste_chars):
        if session.cache.seen_tokens >= tokens or (max_seconds and time.perf_counter() - started > max_seconds):
            break
        error = None
        try:
            for _ in session.send(message, max_new_tokens=reply_tokens):
                pass
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"
        records.append(_record(session, kind, len(message), error))
        bar.update(min(records[-1]["seen_total"], tokens) - bar.n)
        bar.set_postfix(kv_mb=f"{records[-1]['kv_bytes'] / MB:.1f}", rss_mb=f"{records[-1]['rss_bytes'] / MB:.0f}")
        if checkpoint and len(records) % 10 == 0:
            checkpoint(records)
        if sum(r["error"] is not None for r in records[-5:]) == 5:
            break  # five failures in a row: something is broken for good
    bar.close()
    final_reply = ""
    try:
        final_reply = "".join(session.send(FINAL_QUESTION, max_new_tokens=reply_tokens))
        records.append(_record(session, "final", len(FINAL_QUESTION), None))
    except Exception as failure:
        records.append(_record(session, "final", len(FINAL_QUESTION), f"{type(failure).__name__}: {failure}"))
    summary = summarize(records, session.cache.capacity, rss_threshold, final_reply, tokens)
    return {"summary": summary, "turns": records, "seconds": time.perf_counter() - started}


def summarize(
    records: list[dict[str, Any]], capacity: int, rss_threshold: float, final_reply: str, target: int
) -> dict[str, Any]:
    """The verdict: KV bytes constant, RSS growth after the cache first filled below the threshold, no errors,
    and a final answer."""
    filled = next((i for i, r in enumerate(records) if r["seen_total"] >= capacity), len(records) - 1)
    after = records[filled:]
    baseline = after[0]["rss_bytes"]
    rss_growth = max(r["rss_bytes"] for r in after) - baseline
    kv_values = sorted({r["kv_bytes"] for r in records})
    errors = [r["error"] for r in records if r["error"]]
    final = records[-1]
    still_answering = final["kind"] == "final" and final["error"] is None and final["new_tokens"] >= 1
    kv_constant, rss_flat = len(kv_values) == 1, rss_growth <= rss_threshold * baseline
    return {
        "passed": kv_constant and rss_flat and not errors and still_answering and final["seen_total"] >= target,
        "tokens_processed": final["seen_total"],
        "tokens_target": target,
        "turns": len(records),
        "paste_turns": sum(r["kind"] == "paste" for r in records),
        "generated_tokens": sum(r["new_tokens"] for r in records),
        "errors": len(errors),
        "first_errors": errors[:3],
        "kv_bytes": kv_values[0] if kv_constant else kv_values,
        "kv_constant": kv_constant,
        "rss_after_fill_mb": round(baseline / MB, 1),
        "rss_growth_mb": round(rss_growth / MB, 1),
        "rss_threshold": rss_threshold,
        "rss_flat": rss_flat,
        "peak_rss_mb": round(peak_rss_bytes() / MB, 1),
        "still_answering": still_answering,
        "final_reply": final_reply,
        "cache_tokens_end": final["cache_tokens"],
        "evicted_total": final["evicted_total"],
        "median_prefill_tokens_per_s": _median([r["prefill_tokens_per_s"] for r in records if r["kind"] == "paste"]),
        "median_decode_tokens_per_s": _median([r["decode_tokens_per_s"] for r in records if r["new_tokens"] > 1]),
        **_memory_summary(records),
    }


def _memory_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """With conversation memory on: the store's size at the end, its bytes per evicted token, and the turns that
    rewrote the recalled region."""
    final = records[-1]
    if "memory_file_bytes" not in final:
        return {}
    evicted = final["evicted_total"]
    return {
        "memory_passages": final["memory_passages"],
        "memory_file_bytes": final["memory_file_bytes"],
        "memory_bytes_per_evicted_token": round(final["memory_file_bytes"] / evicted, 1) if evicted else None,
        "recall_rewrites": sum(bool(r.get("recall_changed")) for r in records),
    }


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to push (default {DEFAULT_TOKENS})")
    parser.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text to paste (default: generated text)")
    parser.add_argument("--paste-chars", type=int, default=DEFAULT_PASTE_CHARS, help="characters per pasted passage")
    parser.add_argument("--reply-tokens", type=int, default=DEFAULT_REPLY_TOKENS, help="most tokens per reply")
    parser.add_argument("--rss-threshold", type=float, default=0.05, help="allowed RSS growth after the cache filled")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early (the soak then fails)")
    parser.add_argument("--out", default="out/soak", metavar="DIR", help="output folder (default out/soak)")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object with the headline")


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args

    settings = settings_from_args(args)
    if args.tokens < 1 or args.paste_chars < 1 or args.reply_tokens < 1:
        print("streamchat soak: --tokens, --paste-chars and --reply-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        text = reporting.read_text_file(args.text, "--text file") if args.text else None
        if text is not None and not text.strip():
            raise ValueError(f"{args.text} is empty")
        loaded = load_model(settings.model, settings.device, settings.dtype)
        session = ChatSession(loaded, settings)
    except (OSError, UnicodeDecodeError, ValueError, ModelError, SessionError) as error:
        print(f"streamchat soak: {error}", file=sys.stderr)
        return 2
    out = reporting.output_dir(args.out)
    about = {
        "machine": reporting.machine_info(),
        "model": loaded.source,
        "text": args.text or "generated",
        "settings": settings.to_dict(),
    }
    partial = lambda records: reporting.write_json(out / "soak.partial.json", {**about, "turns": records})
    max_seconds = args.max_minutes * 60 if args.max_minutes else None
    result = run_soak(
        session,
        args.tokens,
        text,
        args.paste_chars,
        args.reply_tokens,
        args.rss_threshold,
        max_seconds=max_seconds,
        checkpoint=partial,
    )
    summary = result["summary"]
    report = {**about, "seconds": round(result["seconds"], 1), "summary": summary, "turns": result["turns"]}
    reporting.write_json(out / "soak.json", report)
    reporting.write_csv(out / "soak_turns.csv", result["turns"])
    (out / "soak.partial.json").unlink(missing_ok=True)
    print(
        f"soak {'PASSED' if summary['passed'] else 'FAILED'}: {summary['tokens_processed']:,} tokens in "
        f"{summary['turns']} turns, {report['seconds']:.0f} s | KV {summary['kv_bytes']} bytes "
        f"({'constant' if summary['kv_constant'] else 'CHANGED'}) | RSS +{summary['rss_growth_mb']} MB after fill "
        f"| errors {summary['errors']}"
        + (
            f" | memory store {summary['memory_file_bytes']:,} bytes ({summary['memory_bytes_per_evicted_token']} per "
            f"evicted token), {summary['recall_rewrites']} recalls"
            if "memory_file_bytes" in summary
            else ""
        )
        + f" | final reply: {summary['final_reply'][:60]!r} | results in {out}"
    )
    if args.json:
        headline = {k: v for k, v in summary.items() if k not in ("first_errors", "final_reply")}
        reporting.print_json_line({"command": "soak", "seconds": report["seconds"], **headline})
    return 0 if summary["passed"] else 1
