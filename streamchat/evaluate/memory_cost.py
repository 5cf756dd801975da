"""`python -m streamchat memorycost`: what conversation memory costs a chat, memory off and on side by side.

Two sessions on one loaded model, at the same total cache budget (memory off: sinks + window; on: sinks + a
smaller window + the recalled region), get the same scripted chat turn by turn, interleaved, so the machine's
noise falls on both alike: user turns from a prompts file (MT-Bench by default when ../shared is there), with a
personal facts told in the first turns and asked about some 2,000 tokens later. Replies are generated (greedy, `--reply-tokens`).
Reported: median time to first token and decode tokens/s of each, their ratios, how many turns rewrote the
recalled region (a re-prefill), and the store's size per evicted token.

`--ppl-text FILE` also pastes a long text into both chats, one paragraph per user message (a fixed short reply
after each), and compares the perplexity of the pasted tokens as the chat path feeds them (teacher forced,
`ChatSession.feed_exchange(score_user=True)`): recall brings earlier paragraphs back while later ones are read,
and must not make the text less predictable.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

from tqdm import tqdm

from streamchat import reporting
from streamchat.config import Settings
from streamchat.model import ModelError, load_for_chat
from streamchat.prompts import PromptsError
from streamchat.session import ChatSession, SessionError

DEFAULT_TURNS = 50
DEFAULT_BUDGET = 1024
DEFAULT_REPLY_TOKENS = 64
PLANT_AT = (1, 3, 5, 7, 9)  # turns where the facts are told (of a 50-turn chat)...
ASK_AT = (30, 35, 40, 45, 49)  # ...and asked: some 2,000 tokens later, past a 1,024-token cache, so recalled
FACTS = (
    ("By the way, my name is Greta. Please remember it.", "What is my name?"),
    ("By the way, I live in Lisbon. Please remember it.", "Which city do I live in?"),
    ("My lucky number is 42. Please remember it.", "What is my lucky number?"),
    ("My locker code is 4812. Please remember it.", "What is my locker code?"),
    ("My sister is called Ingrid and she works as a pilot.", "What does my sister do for a living?"),
)


def script(prompts: list[str], turns: int) -> list[str]:
    """`turns` user messages: the prompts in order (cycled), the facts told at PLANT_AT and asked at ASK_AT (each
    scaled to `turns` / 50)."""
    scale = turns / 50
    plant = {round(t * scale): i for i, t in enumerate(PLANT_AT)}
    ask = {round(t * scale): i for i, t in enumerate(ASK_AT)}
    messages, prompt = [], 0
    for turn in range(turns):
        if turn in plant:
            messages.append(FACTS[plant[turn]][0])
        elif turn in ask:
            messages.append(FACTS[ask[turn]][1])
        else:
            messages.append(prompts[prompt % len(prompts)])
            prompt += 1
    return messages


def paired_sessions(loaded, settings: Settings, budget: int) -> dict[str, ChatSession]:
    """Memory off and on at the same total `budget` (sink_window; the recalled region comes out of the window),
    greedy, on one loaded model."""
    base = settings.replace(policy="sink_window", temperature=0)
    recall = min(settings.recall_tokens, budget // 4)
    return {
        "off": ChatSession(loaded, base.replace(memory=False, window=budget - settings.sinks)),
        "on": ChatSession(
            loaded, base.replace(memory=True, recall_tokens=recall, window=budget - settings.sinks - recall)
        ),
    }


def run(loaded, settings: Settings, prompts: list[str], turns: int, budget: int, reply_tokens: int) -> dict[str, Any]:
    sessions = paired_sessions(loaded, settings.replace(max_new_tokens=reply_tokens), budget)
    rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    started = time.perf_counter()
    for message in tqdm(script(prompts, turns), desc="memorycost", file=sys.stderr):
        for name, session in sessions.items():
            "".join(session.send(message))
            turn = session.last_turn
            rows[name].append(
                {"ttft_s": turn.ttft_s, "decode_tokens_per_s": turn.decode_tokens_per_s, "changed": turn.recall_changed}
            )
    memory = sessions["on"].memory_stats()
    cache = sessions["on"].cache.stats()
    evicted = cache["evicted_total"]

    def median(name: str, key: str) -> float:
        values = [row[key] for row in rows[name] if row[key] > 0]
        return statistics.median(values) if values else 0.0

    ttft = {name: median(name, "ttft_s") for name in rows}
    decode = {name: median(name, "decode_tokens_per_s") for name in rows}
    return {
        "command": "memorycost",
        "turns": turns,
        "budget": budget,
        "recall_tokens": sessions["on"].settings.recall_tokens,
        "reply_tokens": reply_tokens,
        "ttft_median_s": ttft,
        "ttft_ratio": round(ttft["on"] / ttft["off"], 3) if ttft["off"] else None,
        "decode_median_tok_s": decode,
        "decode_ratio": round(decode["on"] / decode["off"], 3) if decode["off"] else None,
        "recall_rewrites": sum(row["changed"] for row in rows["on"]),
        "store_passages": memory.get("memory_passages", 0),
        "store_file_bytes": memory.get("memory_file_bytes", 0),
        "store_bytes_per_evicted_token": round(memory.get("memory_file_bytes", 0) / evicted, 1) if evicted else None,
        "evicted_tokens": evicted,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": reporting.machine_info(),
        "turn_rows": rows,
    }


def run_repeated(
    loaded, settings: Settings, prompts: list[str], turns: int, budget: int, reply_tokens: int, repeats: int
) -> dict[str, Any]:
    """`run` `repeats` times, each with two new conversations: the report of the chat whose time-to-first-token
    ratio is the median, with every chat's ratios (`ttft_ratios`, `decode_ratios`). A 50-turn median moves by
    +-0.15 between chats on a 2-core machine (2026-12-07: x1.01-1.33 for the same code), so one chat is no verdict."""
    runs = [run(loaded, settings, prompts, turns, budget, reply_tokens) for _ in range(max(repeats, 1))]
    report = sorted(runs, key=lambda r: r["ttft_ratio"] or 0.0)[len(runs) // 2]
    return {
        **report,
        "repeats": len(runs),
        "ttft_ratios": [r["ttft_ratio"] for r in runs],
        "decode_ratios": [r["decode_ratio"] for r in runs],
        "recall_rewrites_each": [r["recall_rewrites"] for r in runs],
        "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
    }


PASTE_REPLY = "Go on."


def paragraphs(text: str, max_words: int = 200) -> list[str]:
    """The text's paragraphs (split at blank lines), joined onto one line each, cut to at most `max_words`."""
    parts = []
    for block in text.split("\n\n"):
        words = block.split()
        parts += [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]
    return parts


def text_perplexity(loaded, settings: Settings, text: str, tokens: int, budget: int) -> dict[str, Any]:
    """Perplexity of `text`'s pasted tokens through the chat path, memory off and on at the same budget."""
    sessions = paired_sessions(loaded, settings, budget)
    totals = {name: [0.0, 0] for name in sessions}
    progress = tqdm(total=tokens, desc="memorycost ppl", file=sys.stderr)
    for paragraph in paragraphs(text):
        if totals["off"][1] >= tokens:
            break
        for name, session in sessions.items():
            nll, count = session.feed_exchange(paragraph, PASTE_REPLY, score_user=True)
            totals[name][0] += nll
            totals[name][1] += count
        progress.update(totals["off"][1] - progress.n)
    progress.close()
    ppl = {name: math.exp(nll / max(count, 1)) for name, (nll, count) in totals.items()}
    return {
        "ppl": {name: round(value, 4) for name, value in ppl.items()},
        "ppl_ratio": round(ppl["on"] / ppl["off"], 4),
        "ppl_tokens": totals["off"][1],
        "ppl_store_passages": sessions["on"].memory_stats().get("memory_passages", 0),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--turns", type=int, default=DEFAULT_TURNS, help=f"user turns (default {DEFAULT_TURNS})")
    add("--budget", type=int, default=DEFAULT_BUDGET, help=f"total cache budget of both (default {DEFAULT_BUDGET})")
    add("--reply-tokens", type=int, default=DEFAULT_REPLY_TOKENS, help="tokens per reply (default 64)")
    add("--repeats", type=int, default=1, help="chats of --turns each; the median chat is reported (default 1)")
    add("--prompts", default=None, metavar="FILE", help="user turns (default ../shared/data/mt_bench.jsonl if there)")
    add("--ppl-text", default=None, metavar="FILE", help="also compare the perplexity of this text pasted into both")
    add("--ppl-tokens", type=int, default=20_000, help="pasted tokens scored with --ppl-text (default 20,000)")
    add("--out", default="out/memorycost", metavar="DIR", help="output folder (default out/memorycost)")
    add("--json", action="store_true", help="last stdout line: one JSON object with the figures")


def print_chat_figures(report: dict[str, Any], args: argparse.Namespace) -> None:
    ttft, decode = report["ttft_median_s"], report["decode_median_tok_s"]
    print(
        f"{args.turns} turns at budget {args.budget} (memory on: {report['recall_tokens']} recalled places), "
        f"{report['recall_rewrites']} recalled-region rewrites"
    )
    print(f"time to first token, median: off {ttft['off']:.3f} s, on {ttft['on']:.3f} s (x{report['ttft_ratio']})")
    if report.get("repeats", 1) > 1:
        ratios = sorted(report["ttft_ratios"])
        print(
            f"time to first token ratio over {report['repeats']} chats: x{report['ttft_ratio']} median "
            f"(x{ratios[0]}-x{ratios[-1]}: {', '.join(f'x{r}' for r in report['ttft_ratios'])})"
        )
    print(f"decode, median: off {decode['off']:.1f} tok/s, on {decode['on']:.1f} tok/s (x{report['decode_ratio']})")
    print(
        f"store: {report['store_passages']} passages, {report['store_file_bytes']:,} bytes on disk, "
        f"{report['store_bytes_per_evicted_token']} bytes per evicted token"
    )


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args
    from streamchat.evaluate.recall import chat_prompts

    settings = settings_from_args(args)
    try:
        if args.turns == 1 or args.turns < 0 or args.reply_tokens < 1 or (not args.turns and not args.ppl_text):
            raise SessionError("--turns must be 0 (with --ppl-text) or at least 2, --reply-tokens at least 1")
        if args.repeats < 1:
            raise SessionError("--repeats must be at least 1")
        prompts, _ = chat_prompts(args.prompts)
        loaded = load_for_chat(settings)
        report = {"command": "memorycost", "budget": args.budget, "machine": reporting.machine_info()}
        if args.turns:
            report = run_repeated(loaded, settings, prompts, args.turns, args.budget, args.reply_tokens, args.repeats)
        if args.ppl_text:
            text = reporting.read_text_file(args.ppl_text, "text file", ValueError)
            report.update(text_perplexity(loaded, settings, text, args.ppl_tokens, args.budget))
    except (ModelError, PromptsError, SessionError, ValueError) as error:
        print(f"streamchat memorycost: {error}", file=sys.stderr)
        return 2
    folder = reporting.output_dir(args.out)
    reporting.write_json(folder / "memorycost.json", report)
    if args.turns:
        print_chat_figures(report, args)
    if "ppl" in report:
        print(
            f"pasted text, {report['ppl_tokens']:,} tokens: perplexity off {report['ppl']['off']:.3f}, "
            f"on {report['ppl']['on']:.3f} (x{report['ppl_ratio']})"
        )
    if args.json:
        reporting.print_json_line({k: v for k, v in report.items() if k not in ("turn_rows", "machine")})
    return 0
