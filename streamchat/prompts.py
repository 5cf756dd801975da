"""Scripted user turns for unattended conversations (the stress test, the endless demo).

A prompts file is either plain text (one turn per non-empty line) or JSONL whose objects carry a "turns" list
(the MT-Bench layout). `endless_turns` cycles the turns forever, so a script of ten lines drives a conversation of
any length.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from streamchat.reporting import read_text_file

DEFAULT_TURNS = (
    "Hi! Can you introduce yourself in two sentences?",
    "Tell me a short story about a lighthouse keeper and a storm.",
    "What are three tips for learning a new language?",
    "Explain how a rainbow forms, simply.",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery and explain why.",
    "How do I make a cup of good tea?",
    "Give me a fun fact about octopuses.",
    "Summarize what we talked about so far in one sentence.",
)


def demo_token_ids(tokenizer, count: int) -> list[int]:
    """`count` token ids of the built-in turns, repeated: text that benchmarks feed as if it were generated."""
    ids = tokenizer(" ".join(DEFAULT_TURNS), add_special_tokens=False)["input_ids"]
    return (ids * (count // len(ids) + 1))[:count]


class PromptsError(ValueError):
    """The prompts file is missing, unreadable, empty or malformed; the message names the file and line."""


def _turns_from_json_line(line: str, path: Path, number: int) -> list[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PromptsError(f"{path}:{number}: invalid JSON ({error.msg})") from None
    turns = record.get("turns") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
        raise PromptsError(f'{path}:{number}: expected an object with a "turns" list of strings')
    return [turn for turn in turns if turn.strip()]


def load_turns(path: str | Path | None = None) -> list[str]:
    """The user turns in `path` (plain lines or JSONL with "turns"), or the built-in list when `path` is None."""
    if path is None:
        return list(DEFAULT_TURNS)
    path = Path(path).expanduser()
    text = read_text_file(path, "prompts file", PromptsError)
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    is_jsonl = path.suffix == ".jsonl" or (lines and lines[0][1].startswith("{"))
    if is_jsonl:
        turns = [turn for number, line in lines for turn in _turns_from_json_line(line, path, number)]
    else:
        turns = [line for _, line in lines]
    if not turns:
        raise PromptsError(f"prompts file {path} holds no user turns")
    return turns


def endless_turns(path: str | Path | None = None) -> Iterator[str]:
    """The turns of `path` (or the built-in list), cycled forever; the file is read once, errors raise at once."""
    return itertools.cycle(load_turns(path))
