"""`python -m streamchat recall`: what does an endless chat still remember? A conversation-memory benchmark.

Scripted conversations run through `ChatSession` with the model's real chat template. A fact is planted in a user
turn ("my locker code is 4812", names, cities, numbers and codes drawn from seeded lists) and answered with a fixed
short acknowledgement; filler exchanges (user prompts from a prompts file, fixed assistant text so no decode is
needed) push it back by D tokens; then a probe question is asked. The answer is scored by likelihood, as evaluation
harnesses score small models: log P(answer prefix + true value | conversation + probe) against K distractors of the
same form (`ChatSession.score_reply`, run on a fork of the cache, so probing at D = 64 leaves the conversation to
go on to D = 128 untouched). Reported per policy, budget and distance: multiple-choice accuracy (chance is
1 / (K + 1)), the mean log-probability margin (true answer minus the best distractor, nats) and how much of the
planted exchange is still in the cache (`retained`, averaged over layers and KV heads).

Policies at equal budget: `dense` (no eviction, a cache of the model's whole context; distances that do not fit are
skipped), `sink_window`, `sink_message` (sink_window with `evict_unit: message`), `h2o`, `tova` (sinks + half heavy
hitters + half recent window, as in `ppl`).

`--mode lines` is the StreamingLLM paper's StreamEval (Xiao et al., 2023, Sec. 4.4) in chat form: user turns of
lines "the REGISTER_CONTENT in line N is <NNNN>", the probe asks for line N's content, and the distractors are the
contents of other lines of the same conversation.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from streamchat import reporting
from streamchat.cli import add_list_argument
from streamchat.config import Settings
from streamchat.model import LoadedModel
from streamchat.prompts import PromptsError, load_turns
from streamchat.session import ChatSession

DENSE = "dense"
MEMORY = "memory"
POLICY_NAMES = (DENSE, "sink_window", "sink_message", "h2o", "tova", MEMORY)
DEFAULT_POLICIES = POLICY_NAMES
PROBES = ("benchmark", "paraphrase")
DEFAULT_BUDGETS = (256,)
MEMORY_MIN_RECALL = 64  # the memory row recalls into at least this many places (a fact with its frame)
DEFAULT_DISTANCES = (32, 64, 128, 256, 512)
MODES = ("facts", "lines")
DEFAULT_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "mt_bench.jsonl"
BUILTIN_PROMPTS = (
    "Give me three tips for staying productive when working from home.",
    "Explain how a rainbow forms, in simple words.",
    "Write a short poem about the sea at night.",
    "What are the main differences between a virus and a bacterium?",
    "Suggest a healthy breakfast I can make in ten minutes.",
    "Summarize the plot of a famous novel of your choice.",
    "How does compound interest work? Give an example.",
    "Describe a good routine for learning a new language.",
)
ASSISTANT_FILLER = (
    "That is a good question. Here is a short answer. First, think about what matters most and start with small, "
    "concrete steps. Second, keep notes so you can see your progress over time. Third, ask for feedback from people "
    "you trust and adjust your plan when something does not work. With patience and steady practice, most people "
    "find that the task becomes much easier after a few weeks. Let me know if you would like more details."
)
ACK = "Got it, I will remember that."
LINES_ACK = "Noted."

NAMES = (
    "Alice",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hiroshi",
    "Ingrid",
    "Jonas",
    "Keiko",
    "Lucas",
    "Maya",
    "Nikolai",
    "Olivia",
    "Pedro",
    "Quentin",
    "Rosa",
    "Stefan",
    "Tara",
    "Umar",
    "Valeria",
)
CITIES = (
    "Paris",
    "Tokyo",
    "Lisbon",
    "Cairo",
    "Toronto",
    "Oslo",
    "Madrid",
    "Sydney",
    "Berlin",
    "Nairobi",
    "Lima",
    "Vienna",
    "Dublin",
    "Seoul",
    "Prague",
    "Athens",
    "Mumbai",
    "Boston",
    "Denver",
    "Manila",
)


@dataclass(frozen=True)
class FactKind:
    """One kind of fact: how it is planted, asked and answered, and the values it draws from."""

    name: str
    plant: str  # user turn, with {} for the value
    question: str  # the probe turn
    answer_prefix: str  # the start of the assistant's reply; candidates follow it
    values: tuple[str, ...]
    paraphrase: str = ""  # the question asked another way, sharing few words with the planted turn


FACT_KINDS = (
    FactKind(
        "name",
        "By the way, my name is {}. Please remember it.",
        "What is my name?",
        "Your name is",
        NAMES,
        "Who am I? Tell me how I am called.",
    ),
    FactKind(
        "city",
        "By the way, I live in {}. Please remember it.",
        "Which city do I live in?",
        "You live in",
        CITIES,
        "Which town is home for me?",
    ),
    FactKind(
        "number",
        "My lucky number is {}. Please remember it.",
        "What is my lucky number?",
        "Your lucky number is",
        tuple(str(n) for n in range(11, 100)),
        "Do you recall the figure that brings me good fortune?",
    ),
    FactKind(
        "code",
        "My locker code is {}. Please remember it.",
        "What is my locker code?",
        "Your locker code is",
        tuple(str(n) for n in range(1000, 10000)),
        "Which digits open the locker at my gym?",
    ),
)


def chat_prompts(path: str | Path | None) -> tuple[list[str], Path | None]:
    """The user filler turns: those of `path`, else ../shared/data/mt_bench.jsonl when present, else the built-in
    list; and the file they came from (None: built-in). Raises PromptsError for a file that cannot be used."""
    chosen = Path(path) if path else (DEFAULT_PROMPTS if DEFAULT_PROMPTS.exists() else None)
    return (load_turns(chosen) if chosen else list(BUILTIN_PROMPTS)), chosen


class RecallError(ValueError):
    """Arguments the benchmark cannot use; the message says what to change."""


# ----- settings of each policy ----------------------------------------------------------------------------------


def memory_recall_tokens(settings: Settings, budget: int) -> int:
    """The recalled region of the `memory` row at `budget`: `recall_tokens`, at most a quarter of the budget, at least `MEMORY_MIN_RECALL`."""
    return max(min(settings.recall_tokens, budget // 4), MEMORY_MIN_RECALL)


def policy_settings(settings: Settings, name: str, budget: int, context: int) -> Settings:
    """Settings that give `name` a cache of `budget` tokens (`dense`: the model's whole `context`, never evicting
    in a conversation that fits it). The filler is fed through transformers' forward, so `kv_dtype: auto` is the
    model's dtype: policies compare on the model's own numerics."""
    base = settings.replace(decode_path="transformers", evict_unit="token", temperature=0, memory=False)
    if name == DENSE:  # `budget` here: as much as the longest conversation needs, at most the model's context
        return base.replace(policy="sink_window", window=min(budget, context) - settings.sinks)
    if name in ("sink_window", "sink_message"):
        unit = "message" if name == "sink_message" else "token"
        return base.replace(policy="sink_window", window=budget - settings.sinks, evict_unit=unit)
    if name in ("h2o", "tova"):
        split = budget - settings.sinks
        return base.replace(policy=name, heavy=split // 2, recent=split - split // 2)
    if name == MEMORY:  # sink_window with conversation memory, its recalled region inside the same budget
        recall = memory_recall_tokens(settings, budget)
        return base.replace(
            policy="sink_window", window=budget - settings.sinks - recall, memory=True, recall_tokens=recall
        )
    raise RecallError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")


# ----- the scripted conversation ----------------------------------------------------------------------------------


@dataclass
class Script:
    """One trial: the planted exchange, the probe and its candidates (the true one at `answer`), and the filler."""

    kind: str
    plant: tuple[str, str]
    question: str
    prefix: str
    candidates: list[str]
    answer: int
    filler: list[tuple[str, str]]  # exchanges, cycled
    lines_filler: bool  # filler units are register lines (trim by lines) rather than reply words


def draw_distractors(rng: random.Random, values: list[str] | tuple[str, ...], answer: str, k: int) -> list[str]:
    """`k` distinct values of `values`, none equal to `answer`. Raises RecallError if there are too few."""
    pool = sorted(set(values) - {answer})
    if len(pool) < k:
        raise RecallError(f"only {len(pool)} distractors available for {k} (lower --distractors)")
    return rng.sample(pool, k)


def facts_script(rng: random.Random, trial: int, k: int, prompts: list[str], probes: str = "benchmark") -> Script:
    kind = FACT_KINDS[trial % len(FACT_KINDS)]
    value = rng.choice(kind.values)
    candidates = [value, *draw_distractors(rng, kind.values, value, k)]
    rng.shuffle(candidates)
    order = rng.sample(range(len(prompts)), len(prompts))
    filler = [(prompts[i], ASSISTANT_FILLER) for i in order]
    return Script(
        kind.name,
        (kind.plant.format(value), ACK),
        kind.paraphrase if probes == "paraphrase" else kind.question,
        kind.answer_prefix,
        [f" {c}" for c in candidates],
        candidates.index(value),
        filler,
        False,
    )


def register_line(number: int, value: str) -> str:
    return f"The REGISTER_CONTENT in line {number} is <{value}>."


def lines_script(rng: random.Random, trial: int, k: int, lines_per_turn: int = 4, total_lines: int = 800) -> Script:
    """StreamEval in chat form: the planted turn's first line is asked for; the filler is more register lines."""
    values = rng.sample(range(1000, 10000), total_lines)
    lines = [register_line(n, str(v)) for n, v in enumerate(values)]
    turns = [" ".join(lines[i : i + lines_per_turn]) for i in range(0, total_lines, lines_per_turn)]
    answer = str(values[0])
    candidates = [answer, *draw_distractors(rng, [str(v) for v in values], answer, k)]
    rng.shuffle(candidates)
    return Script(
        "lines",
        (turns[0], LINES_ACK),
        "What is the REGISTER_CONTENT in line 0?",
        "The REGISTER_CONTENT in line 0 is <",
        candidates,
        candidates.index(answer),
        [(turn, LINES_ACK) for turn in turns[1:]],
        True,
    )


def trimmed(exchange: tuple[str, str], units: int, lines_filler: bool) -> tuple[str, str]:
    """The exchange cut to `units` register lines (lines filler), or to `units` words (facts filler: the user's
    words first, then the reply's; the reply keeps at least one)."""
    user, reply = exchange
    if lines_filler:
        parts = user.split(". ")
        return ". ".join(parts[:units]).rstrip(".") + ".", reply
    words = user.split()
    return " ".join(words[: max(units, 1)]), " ".join(reply.split()[: max(units - len(words), 1)])


def unit_count(exchange: tuple[str, str], lines_filler: bool) -> int:
    return len(exchange[0].split(". ")) if lines_filler else len(exchange[0].split()) + len(exchange[1].split())


def exchange_tokens(session: ChatSession, exchange: tuple[str, str]) -> int:
    """Tokens `session.feed_exchange(*exchange)` would feed now."""
    return session.exchange_tokens(*exchange)


class Filler:
    """Feeds filler exchanges (cycled) into a session up to a token distance, trimming the last one to fit."""

    def __init__(self, script: Script):
        self.script, self.next = script, 0

    def fill_to(self, session: ChatSession, tokens: int) -> None:
        """Feed exchanges while they fit in `tokens` more tokens; the last one is cut (lines or words) to fit."""
        lines = self.script.lines_filler
        while tokens > 0:
            exchange = self.script.filler[self.next % len(self.script.filler)]
            cost = exchange_tokens(session, exchange)
            if cost > tokens:
                low, high = 0, unit_count(exchange, lines)  # the most units that fit (binary search)
                while low < high:
                    middle = (low + high + 1) // 2
                    if exchange_tokens(session, trimmed(exchange, middle, lines)) <= tokens:
                        low = middle
                    else:
                        high = middle - 1
                if low == 0:
                    return
                exchange = trimmed(exchange, low, lines)
                cost = exchange_tokens(session, exchange)
            session.feed_exchange(*exchange)
            self.next += 1
            tokens -= cost


def retained_fraction(session: ChatSession, start: int, end: int) -> float:
    """Share of stream tokens start..end-1 still cached, averaged over layers and KV heads."""
    cache = session.cache
    held = [
        ((layer.origins[..., : layer.length] >= start) & (layer.origins[..., : layer.length] < end)).sum(-1)
        for layer in cache.layers
    ]
    return float(torch.stack(held).float().mean()) / max(end - start, 1)


def run_trial(
    session: ChatSession, script: Script, distances: list[int], limit: int | None = None
) -> list[dict[str, Any]]:
    """One conversation: a warm-up exchange, the planted fact, then filler up to each distance (ascending), where
    the probe is scored on a fork. Stops before the stream passes `limit` tokens (dense: its cache, the model's
    context at most). Returns one record per distance reached."""
    session.reset()
    filler = Filler(script)
    session.feed_exchange(*script.filler[-1])  # the fact is not the first message (that one sits by the sinks)
    plant_start = session.cache.seen_tokens
    session.feed_exchange(*script.plant)
    plant_end = session.cache.seen_tokens
    records = []
    for distance in distances:
        filler.fill_to(session, plant_end + distance - session.cache.seen_tokens)
        if limit is not None and session.cache.seen_tokens + 64 > limit:
            break  # dense: the probe would not fit without eviction
        scores = session.score_reply(script.question, script.candidates, script.prefix)
        true = float(scores[script.answer])
        others = torch.cat((scores[: script.answer], scores[script.answer + 1 :]))
        records.append(
            {
                "kind": script.kind,
                "distance": distance,
                "realized_distance": session.cache.seen_tokens - plant_end,
                "correct": bool(true > float(others.max())),
                "margin": true - float(others.max()),
                "retained": round(retained_fraction(session, plant_start, plant_end), 4),
                "cache_tokens": session.cache.length,
            }
        )
        if session.settings.memory:  # was the planted message among the passages the probe brought back?
            planted = script.plant[0]
            records[-1]["fact_recalled"] = any(p.text in planted for p in session.would_recall(script.question))
    return records


# ----- the benchmark ----------------------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]], chance: float) -> list[dict[str, Any]]:
    """Accuracy, mean margin and retained share per (policy, budget, distance)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["policy"], record["budget"], record["distance"]), []).append(record)
    rows = []
    for (policy, budget, distance), group in groups.items():
        n = len(group)
        accuracy = sum(r["correct"] for r in group) / n
        rows.append(
            {
                "policy": policy,
                "budget": budget,
                "distance": distance,
                "trials": n,
                "accuracy": round(accuracy, 4),
                "above_chance": accuracy > chance + 2 * math.sqrt(chance * (1 - chance) / n),
                "mean_margin": round(sum(r["margin"] for r in group) / n, 4),
                "retained": round(sum(r["retained"] for r in group) / n, 4),
                "realized_distance": round(sum(r["realized_distance"] for r in group) / n, 1),
            }
        )
        if all("fact_recalled" in r for r in group):  # memory: the share of probes that brought the fact back
            rows[-1]["recalled"] = round(sum(r["fact_recalled"] for r in group) / n, 4)
    return rows


def memory_ends(rows: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per `policy@budget`: the first distance at which accuracy is no longer clearly above chance (within two
    binomial standard errors of it, at that trial count); None if it stays above chance at every distance."""
    ends: dict[str, int | None] = {}
    for row in sorted(rows, key=lambda r: r["distance"]):
        key = f"{row['policy']}@{row['budget']}"
        ends.setdefault(key, None)
        if ends[key] is None and not row["above_chance"]:
            ends[key] = row["distance"]
    return ends


def run_recall(
    loaded: LoadedModel,
    settings: Settings,
    budgets: list[int],
    policies: list[str],
    distances: list[int],
    trials: int,
    seed: int,
    prompts: list[str],
    mode: str = "facts",
    probes: str = "benchmark",
    distractors: int = 4,
    out: str | Path = "out/recall",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every (policy, budget) over the same `trials` scripts; write recall.csv, recall.json, recall.png."""
    if trials < 1 or distractors < 1 or not distances or min(distances) < 1 or not budgets:
        raise RecallError("--trials and --distractors must be at least 1, --distances positive")
    if mode not in MODES:
        raise RecallError(f"--mode must be one of {', '.join(MODES)}")
    if probes not in PROBES or (probes == "paraphrase" and mode != "facts"):
        raise RecallError(f"--probes must be one of {', '.join(PROBES)} (paraphrase: facts mode only)")
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 8192
    distances = sorted(set(distances))
    rng = random.Random(seed)
    scripts = [
        facts_script(random.Random(rng.random()), t, distractors, prompts, probes)
        if mode == "facts"
        else lines_script(random.Random(rng.random()), t, distractors)
        for t in range(trials)
    ]
    runs = [(DENSE, None)] if DENSE in policies else []
    runs += [(name, budget) for budget in budgets for name in policies if name != DENSE]
    for budget in budgets:
        if budget < 64 or budget > context:
            raise RecallError(f"--budget {budget}: must be between 64 and the model's context ({context})")
    records: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    progress = tqdm(total=len(runs) * trials, desc="recall", disable=not show_progress, file=sys.stderr)
    for name, budget in runs:
        dense_budget = min(context, max(distances) + 512)
        run_settings = policy_settings(settings, name, budget or dense_budget, context)
        session = ChatSession(loaded, run_settings)
        label = f"{name}@{budget or 'dense'}"
        run_started = time.perf_counter()
        for trial, script in enumerate(scripts):
            progress.set_postfix_str(f"{label} trial {trial + 1}")
            for record in run_trial(session, script, distances, run_settings.budget if name == DENSE else None):
                records.append({"policy": name, "budget": budget or 0, "trial": trial, **record})
            progress.update(1)
        seconds[label] = round(time.perf_counter() - run_started, 1)
        del session
    progress.close()
    chance = 1 / (distractors + 1)
    rows = summarize(records, chance)
    folder = reporting.output_dir(out)
    report = {
        "command": "recall",
        "mode": mode,
        "probes": probes,
        "budgets": budgets,
        "policies": policies,
        "distances": distances,
        "trials": trials,
        "distractors": distractors,
        "chance": round(chance, 4),
        "seed": seed,
        "sinks": settings.sinks,
        "slack": settings.slack,
        "context": context,
        "memory_ends": memory_ends(rows),
        "seconds": seconds,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": reporting.machine_info(),
        "rows": rows,
        "records": records,
        "out": str(folder),
    }
    reporting.write_csv(folder / "recall.csv", rows)
    reporting.write_json(folder / "recall.json", report)
    plot(rows, budgets, chance, folder / "recall.png", mode)
    return report


def plot(rows: list[dict[str, Any]], budgets: list[int], chance: float, path: Path, mode: str) -> Path:
    """Accuracy against distance, one panel per budget, one line per policy (dense in every panel), the budget
    marked by a dotted line and chance by a dashed one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.2), squeeze=False)
    for axes, budget in zip(panels[0], budgets):
        names = dict.fromkeys(r["policy"] for r in rows)
        for name in names:
            line = sorted(
                (r for r in rows if r["policy"] == name and (r["budget"] == budget or name == DENSE)),
                key=lambda r: r["distance"],
            )
            if line:
                axes.plot(
                    [r["distance"] for r in line],
                    [r["accuracy"] for r in line],
                    marker="o",
                    label=name,
                    linestyle="--" if name == DENSE else "-",
                )
        axes.axvline(budget, color="grey", linestyle=":", linewidth=1)
        axes.axhline(chance, color="black", linestyle="--", linewidth=0.8)
        axes.set_xscale("log", base=2)
        axes.set_ylim(-0.02, 1.02)
        axes.set_xlabel("tokens between the fact and the probe")
        axes.set_ylabel("multiple-choice accuracy")
        axes.set_title(f"{mode}: budget {budget} (dotted), chance {chance:.2f} (dashed)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# ----- command line -----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add_list_argument(
        parser,
        "--budget",
        default=list(DEFAULT_BUDGETS),
        type=int,
        metavar="TOKENS",
        help="cache budget(s) of every bounded policy (default 256)",
    )
    add_list_argument(
        parser,
        "--policies",
        default=list(DEFAULT_POLICIES),
        choices=POLICY_NAMES,
        metavar="NAME",
        help=f"what to run: {', '.join(POLICY_NAMES)} (default: all)",
    )
    add_list_argument(
        parser,
        "--distances",
        default=list(DEFAULT_DISTANCES),
        type=int,
        metavar="TOKENS",
        help="tokens between the planted fact and the probe (default 32 64 128 256 512)",
    )
    add("--trials", type=int, default=8, help="conversations per policy and budget (default 8; fact kinds rotate)")
    add("--distractors", type=int, default=4, metavar="K", help="wrong candidates per probe (default 4: chance 0.2)")
    add(
        "--mode",
        choices=MODES,
        default="facts",
        help="facts: personal facts amid chat filler (default); lines: StreamEval register lines",
    )
    add(
        "--probes",
        choices=PROBES,
        default="benchmark",
        help="facts mode: benchmark (the question names what was said: 'Which city do I live in?') or paraphrase "
        "(it shares few words with it: 'Which town is home for me?')",
    )
    add(
        "--prompts",
        default=None,
        metavar="FILE",
        help='user filler turns (plain lines or JSONL with "turns"; default ../shared/data/mt_bench.jsonl when '
        "present, else a built-in list)",
    )
    add("--out", default="out/recall", metavar="DIR", help="output folder (default out/recall)")
    add("--json", action="store_true", help="last stdout line: one JSON object with the headline figures")


def main(args: argparse.Namespace) -> int:
    from streamchat.cli import settings_from_args
    from streamchat.model import ModelError, load_model

    seed = args.seed if args.seed is not None else 0  # seeds the scripts; the conversation is scored, not sampled
    args.seed = None
    settings = settings_from_args(args)
    try:
        prompts, prompts_path = chat_prompts(args.prompts)
        loaded = load_model(settings.model, settings.device, settings.dtype)
        report = run_recall(
            loaded,
            settings,
            args.budget,
            args.policies,
            args.distances,
            args.trials,
            seed,
            prompts,
            args.mode,
            args.probes,
            args.distractors,
            args.out,
        )
    except (ModelError, RecallError, PromptsError) as error:
        print(f"streamchat recall: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.mode}: {args.trials} trials, {args.distractors} distractors (chance {report['chance']}), "
        f"prompts {prompts_path or 'built-in'}"
    )
    columns = ("policy", "budget", "distance", "accuracy", "mean_margin", "retained", "realized_distance")
    if any("recalled" in row for row in report["rows"]):
        columns += ("recalled",)
    print(format_table([{"recalled": "", **row} for row in report["rows"]], columns))
    print("memory ends (first distance not clearly above chance):", report["memory_ends"])
    print(f"results: {report['out']}/recall.csv, recall.json, recall.png")
    if args.json:
        reporting.print_json_line(
            {
                key: report[key]
                for key in ("command", "mode", "budgets", "trials", "chance", "memory_ends", "wall_seconds", "out")
            }
            | {"accuracy": {f"{r['policy']}@{r['budget']}@{r['distance']}": r["accuracy"] for r in report["rows"]}}
        )
    return 0
