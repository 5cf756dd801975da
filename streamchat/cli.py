"""`python -m streamchat COMMAND`, or `streamchat COMMAND` (the console script of `pip install .`): the command-line
entry point shared by every front end.

Each front end module exposes `add_arguments(parser)` and `main(args) -> int`; settings flags are common to all.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from streamchat.config import DEFAULT_CONFIG, Settings, SettingsError, load_settings, parse_assignments

# command -> (module, help)
COMMANDS = {
    "chat": ("streamchat.frontends.repl", "chat in the terminal (interactive, or --jsonl for scripts)"),
    "ui": ("streamchat.frontends.web", "chat in the browser (the same as python app.py)"),
    "serve": (
        "streamchat.frontends.server",
        "OpenAI-compatible API server (chat completions) with continuous batching",
    ),
    "loadtest": (
        "streamchat.evaluate.loadtest",
        "load test of serve: N concurrent streaming OpenAI clients, tok/s, TTFT, inter-token latency",
    ),
    "scaletest": (
        "streamchat.evaluate.scaletest",
        "scale-out test: 2 serve replicas behind nginx; affinity, SIGKILL failover, moves (GET/PUT), drain",
    ),
    "ppl": (
        "streamchat.evaluate.ppl",
        "perplexity of a long text under each cache policy at one budget (StreamingLLM Fig. 3)",
    ),
    "soak": (
        "streamchat.evaluate.soak",
        "reliability soak: 200,000+ tokens through one conversation, memory must stay flat",
    ),
    "stress": (
        "streamchat.evaluate.stress",
        "memory stress test: an endless scripted conversation, memory must stay bounded",
    ),
    "bench": (
        "streamchat.evaluate.bench",
        "speed benchmark: decode ms/token, cache overhead, speedups, TTFT, load time",
    ),
    "recall": (
        "streamchat.evaluate.recall",
        "conversation memory: is a fact planted D tokens back still recalled? accuracy vs D per policy",
    ),
    "memorycost": (
        "streamchat.evaluate.memory_cost",
        "what conversation memory costs: time to first token and decode speed, memory off and on side by side",
    ),
    "speed": (
        "streamchat.evaluate.speed",
        "decode tokens/s of each decode path side by side (fast path, transformers, llama.cpp) and weight options' perplexity",
    ),
}

# Named flags that map straight onto settings keys (everything else: --set key=value).
SETTINGS_FLAGS = {
    "model": str,
    "device": str,
    "dtype": str,
    "policy": str,
    "sinks": int,
    "window": int,
    "heavy": int,
    "recent": int,
    "system": str,
    "max_new_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
}


class _ListAction(argparse.Action):
    """Collects `--flag a b`, `--flag a,b` and `--flag a --flag b` alike into one list, checked against `choices`."""

    def __init__(self, *args, item_type=str, known=None, **kwargs):
        self.item_type, self.known = item_type, known
        super().__init__(*args, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
        if not items:
            parser.error(f"{option_string}: empty list")
        if self.known is not None:
            unknown = [item for item in items if item not in self.known]
            if unknown:
                parser.error(f"{option_string}: unknown {', '.join(unknown)}; valid: {', '.join(map(str, self.known))}")
        try:
            items = [self.item_type(item) for item in items]
        except ValueError:
            parser.error(f"{option_string}: expected {self.item_type.__name__} values, got {' '.join(values)}")
        previous = getattr(namespace, self.dest, None)
        seen = list(previous) if previous is not None and previous is not self.default else []
        setattr(namespace, self.dest, list(dict.fromkeys(seen + items)))


def add_list_argument(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: list | None,
    help: str,
    choices: tuple | list | None = None,
    type: type = str,
    metavar: str = "ITEM",
) -> None:
    """The one way every command takes a list: space- or comma-separated (`--policies h2o tova`, `--policies
    h2o,tova`), repeatable, checked against `choices` with an error naming the valid ones."""
    known = list(choices) if choices is not None else None
    parser.add_argument(
        flag,
        action=_ListAction,
        known=known,
        item_type=type,
        default=default,
        metavar=metavar,
        help=help + " (space- or comma-separated)",
    )


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override the config file)")
    group.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    for name, kind in SETTINGS_FLAGS.items():
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, metavar=kind.__name__.upper()
        )
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The config file, then --set pairs, then named flags; validated once. Also applies `threads`, which is
    process-wide, so every command honours it."""
    overrides = parse_assignments(args.set)
    for name in SETTINGS_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            overrides["system_prompt" if name == "system" else name] = value
    settings = load_settings(args.config, overrides)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return settings


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `only`, of that one command's options (the others are listed, not
    imported: `chat` then never imports gradio, matplotlib or the measuring tools, which would cost start-up time
    and resident memory)."""
    prog = "streamchat" if Path(sys.argv[0]).name == "streamchat" else "python -m streamchat"  # the console script
    parser = argparse.ArgumentParser(prog=prog, description="Endless chat in constant memory.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            add_settings_arguments(sub)
            importlib.import_module(module_name).add_arguments(sub)
        sub.set_defaults(module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        words = sys.argv[1:] if argv is None else argv
        args = build_parser(only=words[0] if words and words[0] in COMMANDS else None).parse_args(argv)
        args.argv = list(words)  # for commands that rerun themselves in a child
    except SystemExit as done:  # argparse printed the usage error (or --help): a status, not an exception, for callers
        return int(done.code or 0)
    from streamchat.model import ModelError  # imports transformers: not before the arguments are known

    try:
        return importlib.import_module(args.module).main(args)
    except SettingsError as error:
        print(f"streamchat: config error: {error}", file=sys.stderr)
        return 2
    except ModelError as error:  # a missing or unusable model, for every command alike
        print(f"streamchat {args.command}: {error}", file=sys.stderr)
        return 2
