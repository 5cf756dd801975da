"""`python -m streamchat scaletest`: two `serve` replicas behind nginx on loopback, with failover, moves and a drain.

Starts 2 replicas (`serve` child processes, `--set threads=1` unless told otherwise) and nginx (run as the current
user, with a temporary prefix for its pid, logs and buffers, and a config generated from deploy/nginx.conf: only
the upstream's server lines and the listen address are replaced by free loopback ports). Then it drives
`--conversations` conversations (8) with the real `openai` client, each pinned by its `X-Conversation-Id` header,
greedy (temperature 0), and checks, in order:

1. affinity: each conversation's turns reach one replica (the conversation appears in one replica's /metrics),
   and every response names its conversation in the X-Conversation-Id header;
2. moves: a conversation fetched from its replica (GET /v1/conversations/{id}) and put onto the other (PUT, under
   another id) continues there token for token as it does where it was (its next turns, side by side);
3. failover: one replica is SIGKILLed while replies stream; only its in-flight replies fail; each of its
   conversations sends that turn again, which nginx passes to the other replica, where the history streams
   through the cache again (`streamchat.continued` false) and the conversation goes on. The killed replica is
   started again, as an orchestrator would;
4. drain: the surviving replica is drained (POST /admin/drain) while replies stream on it: they finish, a new
   request gets 503 + Retry-After, its conversations are handed to the restarted replica (GET, then PUT), and their
   next turns (through nginx, which passes the drained replica's 503s on) continue on the handed-over caches.

Every loop is bounded in count and time (`--timeout` for the whole run); loopback only. The last stdout line with
`--json`: requests, failovers, moved, moved_equal, handed_over, lost_replies (replies lost beyond the killed
replica's in-flight ones: must be 0), the failover's cost (prompt tokens and time to first token of the re-prefilled
turns against continued ones) and the machine. Exit status 0 when every check passed. Needs nginx (Debian's
`nginx` package: `bash setup.sh --dev` installs it) and `openai` (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from streamchat.evaluate.loadtest import PROMPTS, _free_loopback_port, _settings_argv, serve_command, wait_for_health
from streamchat.reporting import cpu_model, machine_info, output_dir, print_json_line, write_json

TEMPLATE = Path(__file__).resolve().parent.parent.parent / "deploy" / "nginx.conf"
KEY = "scaletest"
FOLLOW_UPS = ["Go on.", "Tell me more about that.", "What happened next?", "Say it in other words."]


def render_nginx_conf(template: str, listen_port: int, replica_ports: list[int], user: str | None = None) -> str:
    """deploy/nginx.conf with its listen address and its upstream's server lines replaced (the first server line's
    parameters kept for every replica); `user`: the worker processes' user (only when nginx starts as root).
    ValueError if the template lacks either."""
    servers = list(re.finditer(r"^(\s*)server 127\.0\.0\.1:\d+( [^;]*)?;\n", template, flags=re.M))
    listen = re.search(r"^(\s*)listen 127\.0\.0\.1:\d+;", template, flags=re.M)
    if not servers or not listen:
        raise ValueError("the nginx template lacks `server 127.0.0.1:PORT ...;` lines or `listen 127.0.0.1:PORT;`")
    indent, parameters = servers[0].group(1), servers[0].group(2) or ""
    lines = "".join(f"{indent}server 127.0.0.1:{port}{parameters};\n" for port in replica_ports)
    text = template[: servers[0].start()] + lines + template[servers[-1].end() :]
    text = re.sub(r"^(\s*)listen 127\.0\.0\.1:\d+;", rf"\g<1>listen 127.0.0.1:{listen_port};", text, flags=re.M)
    if user:
        text = f"user {user};\n" + text
    return text


def fail_timeout_s(conf: str) -> float:
    """The upstream's fail_timeout (seconds; nginx's default 10 when not given)."""
    found = re.search(r"fail_timeout=(\d+)s?", conf)
    return float(found.group(1)) if found else 10.0


class Replica:
    """One `serve` child process on a loopback port."""

    def __init__(self, name: str, args: argparse.Namespace, port: int | None = None):
        self.name, self.args = name, args
        self.port = port or _free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, log_dir: Path) -> None:
        command = serve_command(
            self.port,
            2 * self.args.conversations + 4,
            "--api-key",
            KEY,
            *_settings_argv(self.args),
            "--set",
            f"threads={self.args.replica_threads}",
        )
        env = {k: v for k, v in os.environ.items() if k != "STREAMCHAT_API_KEY"}
        with (log_dir / f"replica-{self.name}.log").open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)

    def wait_healthy(self, timeout_s: float) -> None:
        wait_for_health(self.process, self.url, timeout_s, f"replica {self.name}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def conversations(self) -> set[str]:
        """The conversations this replica holds, from its /metrics (streamchat_cache_tokens' labels)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
        return {
            sample.labels["conversation"]
            for family in text_string_to_metric_families(text)
            if family.name == "streamchat_cache_tokens"
            for sample in family.samples
        }


class Conversation:
    """One client conversation: its id, the messages so far, and what happened to its turns."""

    def __init__(self, index: int):
        self.id = f"scale-{index}"
        self.index = index
        self.messages: list[dict[str, str]] = []
        self.pending: str | None = None  # a user message whose reply failed: sent again next turn


class Driver:
    """Turns through one OpenAI base URL (nginx's, or a replica's), with counters."""

    def __init__(self, deadline: float, tokens: int):
        self.deadline, self.tokens = deadline, tokens
        self.requests = 0
        self.header_mismatches = 0
        self.lock = threading.Lock()

    def client(self, base_url: str):
        import openai

        timeout = max(self.deadline - time.monotonic(), 5)
        return openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=timeout)

    def turn(
        self,
        base_url: str,
        conversation: Conversation,
        text: str | None = None,
        max_tokens: int | None = None,
        conversation_id: str | None = None,
        on_chunk=None,
    ) -> dict[str, Any]:
        """One streamed turn (the whole history sent, as OpenAI clients do); returns its figures. On an error the
        user message stays pending (the next turn sends it again) and the error is returned under "error"."""
        if time.monotonic() > self.deadline:
            raise TimeoutError("the scale test ran past --timeout")
        text = conversation.pending or text or FOLLOW_UPS[len(conversation.messages) // 2 % len(FOLLOW_UPS)]
        conversation.pending = text
        messages = [*conversation.messages, {"role": "user", "content": text}]
        wanted = conversation_id or conversation.id
        with self.lock:
            self.requests += 1
        started = time.perf_counter()
        first = None
        pieces, extension, usage = [], None, None
        try:
            raw = self.client(base_url).chat.completions.with_raw_response.create(
                model="streamchat",
                messages=messages,
                max_tokens=max_tokens or self.tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Conversation-Id": wanted},
            )
            if raw.headers.get("x-conversation-id") != wanted:
                with self.lock:
                    self.header_mismatches += 1
            for chunk in raw.parse():
                if chunk.choices:
                    piece = chunk.choices[0].delta.content or ""
                    if piece and first is None:
                        first = time.perf_counter() - started
                    pieces.append(piece)
                    if on_chunk is not None:
                        on_chunk(conversation, len(pieces))
                    if chunk.choices[0].finish_reason:
                        extension = chunk.model_extra.get("streamchat")
                elif chunk.usage is not None:
                    usage = chunk.usage
            if extension is None or usage is None:
                raise RuntimeError("the stream ended without its last chunk")
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}"[:300], "id": wanted}
        reply = "".join(pieces)
        conversation.messages = [*messages, {"role": "assistant", "content": reply}]
        conversation.pending = None
        return {
            "id": wanted,
            "reply": reply,
            "continued": extension.get("continued"),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "evicted": extension.get("evicted_this_turn"),
            "ttft_s": first if first is not None else time.perf_counter() - started,
            "seconds": time.perf_counter() - started,
        }


class Nginx:
    """nginx as the current user: a temporary prefix, the generated config, in the foreground (a child process)."""

    def __init__(self, binary: str, prefix: Path, conf: str):
        self.binary, self.prefix = binary, prefix
        self.conf_path = prefix / "nginx.conf"
        self.conf_path.write_text(conf)
        self.process: subprocess.Popen | None = None

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-e", "stderr", "-c", str(self.conf_path), *extra]

    def start(self, url: str, timeout_s: float = 20) -> None:
        import httpx

        check = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused the config: {check.stderr.strip()}")
        with (self.prefix / "nginx-stderr.log").open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(self.command("-g", "daemon off;"), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with status {self.process.returncode} (see {self.prefix})")
            try:
                httpx.get(url + "/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"nginx did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def _parallel(jobs: list, workers: int) -> list:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", type=int, default=8, help="client conversations (default 8)")
    parser.add_argument(
        "--turns",
        type=int,
        default=2,
        help="turns per conversation before the moves and the kill (default 2; more: a longer history to re-prefill)",
    )
    parser.add_argument("--tokens", type=int, default=24, help="max_tokens of an ordinary turn (default 24)")
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=96,
        help="max_tokens of the turns streaming when a replica is killed or drained (default 96)",
    )
    parser.add_argument("--replica-threads", type=int, default=1, help="torch threads per replica (default 1)")
    parser.add_argument("--nginx", default=None, help="the nginx binary (default: nginx on PATH, or /usr/sbin/nginx)")
    parser.add_argument(
        "--nginx-conf",
        default=str(TEMPLATE),
        metavar="PATH",
        help="the config template (default: deploy/nginx.conf of this checkout)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run at most (default 900)")
    parser.add_argument("--out", default="out/scaletest", metavar="DIR", help="output folder (default out/scaletest)")
    parser.add_argument(
        "--json", action="store_true", help="last stdout line: one JSON object with the headline figures"
    )


def main(args: argparse.Namespace) -> int:
    try:
        import openai  # noqa: F401
    except ImportError:
        print("streamchat scaletest: needs the openai package: pip install -r requirements-dev.txt", file=sys.stderr)
        return 2
    if not (
        2 <= args.conversations <= 32
        and 1 <= args.turns <= 50
        and 1 <= args.tokens <= 1024
        and 1 <= args.long_tokens <= 4096
        and 1 <= args.replica_threads <= 256
        and args.timeout > 0
    ):
        print(
            "streamchat scaletest: --conversations 2-32, --turns 1-50, --tokens 1-1024, --long-tokens 1-4096, "
            "--replica-threads 1-256, --timeout above 0",
            file=sys.stderr,
        )
        return 2
    binary = args.nginx or shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        print(
            "streamchat scaletest: nginx not found: install Debian's nginx package (bash setup.sh --dev does), "
            "or pass --nginx PATH",
            file=sys.stderr,
        )
        return 2
    if not Path(args.nginx_conf).is_file():
        print(f"streamchat scaletest: no nginx config template at {args.nginx_conf} (--nginx-conf)", file=sys.stderr)
        return 2
    from streamchat.cli import settings_from_args

    settings_from_args(args)  # checked here, so a bad flag fails before anything starts
    out = output_dir(args.out)
    work = Path(tempfile.mkdtemp(prefix="streamchat-scaletest-"))
    summary: dict[str, Any] = {}
    replicas = [Replica("a", args), Replica("b", args)]
    running: dict[str, Nginx] = {}
    try:
        summary = _run(args, binary, work, replicas, running)
    except (RuntimeError, TimeoutError, ValueError, OSError) as error:
        print(f"streamchat scaletest: {error} (logs in {work})", file=sys.stderr)
        summary = {"error": str(error), "logs": str(work)}
    finally:
        if "nginx" in running:
            running["nginx"].stop()
        for replica in replicas:
            replica.stop()
    write_json(out / "scaletest.json", summary)
    passed = bool(summary.get("passed"))
    if "error" not in summary and passed:
        shutil.rmtree(work, ignore_errors=True)
    print(f"scaletest: {'PASSED' if passed else 'FAILED'}; wrote {out}/scaletest.json", file=sys.stderr)
    if args.json:
        print_json_line({k: v for k, v in summary.items() if k not in ("turns",)})
    return 0 if passed else 1


def _run(
    args: argparse.Namespace, binary: str, work: Path, replicas: list[Replica], running: dict[str, Nginx]
) -> dict[str, Any]:
    """The four phases (the module's docstring); `running["nginx"]` is set once nginx is started (for the caller
    to stop it whatever happens)."""
    import httpx

    started = time.monotonic()
    deadline = started + args.timeout
    info = {
        **machine_info(),
        "cpu_model": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "nginx": subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip(),
        "replica_threads": args.replica_threads,
    }
    print(
        f"scaletest: {info['cpu_model']}, {info['cpus']} CPUs, {info['capability']}; {info['nginx']}", file=sys.stderr
    )
    for replica in replicas:
        replica.start(work)
    for replica in replicas:
        replica.wait_healthy(min(300, deadline - time.monotonic()))
    load_s = time.monotonic() - started
    listen = _free_loopback_port()
    user = None
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name  # workers as the current user, not nobody: the prefix is ours
    conf = render_nginx_conf(Path(args.nginx_conf).read_text(), listen, [r.port for r in replicas], user)
    nginx = running["nginx"] = Nginx(binary, work, conf)
    summary: dict[str, Any] = {}
    front = f"http://127.0.0.1:{listen}"
    nginx.start(front)
    print(
        f"scaletest: replicas up in {load_s:.1f} s (:{replicas[0].port}, :{replicas[1].port}); nginx on :{listen}",
        file=sys.stderr,
    )
    driver = Driver(deadline, args.tokens)
    conversations = [Conversation(i) for i in range(args.conversations)]
    turns: list[dict[str, Any]] = []
    lost: list[str] = []

    def record(results: list[dict[str, Any]], phase: str, allowed: set[str] = frozenset()) -> list[dict[str, Any]]:
        for result in results:
            result["phase"] = phase
            turns.append(result)
            if "error" in result and result["id"] not in allowed:
                lost.append(f"{phase} {result['id']}: {result['error']}")
        return results

    # 1. affinity: --turns turns per conversation through nginx, all conversations at once
    for round_ in range(args.turns):
        record(
            _parallel(
                [
                    (lambda c=c, r=round_: driver.turn(front, c, PROMPTS[c.index % len(PROMPTS)] if r == 0 else None))
                    for c in conversations
                ],
                len(conversations),
            ),
            "affinity",
        )
    held = {replica.name: replica.conversations() for replica in replicas}
    home: dict[str, Replica] = {}
    for conversation in conversations:
        owners = [replica for replica in replicas if conversation.id in held[replica.name]]
        if len(owners) == 1:
            home[conversation.id] = owners[0]
    affinity_ok = len(home) == len(conversations)
    per_replica = {r.name: sorted(c.id for c in conversations if home.get(c.id) is r) for r in replicas}
    print(f"scaletest: affinity {'ok' if affinity_ok else 'BROKEN'}: {per_replica}", file=sys.stderr)

    # 2. moves: one conversation from each replica (where it has one) onto the other, next turns side by side
    auth = {"Authorization": f"Bearer {KEY}"}
    moved, moved_equal, move_bytes = 0, 0, []
    for replica in replicas:
        mine = [c for c in conversations if home.get(c.id) is replica]
        if not mine:
            continue
        conversation, other = mine[0], next(r for r in replicas if r is not replica)
        download = httpx.get(f"{replica.url}/v1/conversations/{conversation.id}", headers=auth, timeout=60)
        download.raise_for_status()
        move_bytes.append(len(download.content))
        twin_id = f"moved-{conversation.id}"
        upload = httpx.put(
            f"{other.url}/v1/conversations/{twin_id}", headers=auth, content=download.content, timeout=60
        )
        if upload.status_code != 200:
            lost.append(f"move {conversation.id}: PUT answered {upload.status_code}: {upload.text[:200]}")
            continue
        twin = Conversation(conversation.index)
        twin.id, twin.messages = twin_id, list(conversation.messages)
        equal = True
        for _ in range(2):
            here = record([driver.turn(front, conversation)], "move")[0]
            there = record([driver.turn(other.url, twin)], "move")[0]
            equal = equal and "error" not in here and "error" not in there
            equal = (
                equal and here["reply"] == there["reply"] and here["completion_tokens"] == there["completion_tokens"]
            )
            equal = equal and there.get("continued") is True
        moved += 1
        moved_equal += equal
        print(
            f"scaletest: moved {conversation.id} {replica.name}->{other.name} ({len(download.content) / 2**20:.1f} MiB): "
            f"{'equal token for token' if equal else 'DIFFERENT'}",
            file=sys.stderr,
        )

    # 3. failover: SIGKILL the replica holding the most conversations while every conversation streams a reply
    victim = max(replicas, key=lambda r: len(per_replica[r.name]))
    survivor = next(r for r in replicas if r is not victim)
    victims = {c.id for c in conversations if home.get(c.id) is victim}
    streaming = threading.Event()
    started_ids: set[str] = set()

    def on_chunk(conversation: Conversation, pieces: int) -> None:
        if pieces >= 2:  # the role chunk and one more: admitted and replying (or done)
            started_ids.add(conversation.id)
            if len(started_ids) == len(conversations):
                streaming.set()

    def killer() -> None:
        streaming.wait(timeout=max(min(60, deadline - time.monotonic()), 1))
        victim.process.send_signal(signal.SIGKILL)

    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    kill_turns = record(
        _parallel(
            [
                (lambda c=c: driver.turn(front, c, max_tokens=args.long_tokens, on_chunk=on_chunk))
                for c in conversations
            ],
            len(conversations),
        ),
        "kill",
        allowed=victims,
    )
    kill_thread.join(timeout=70)
    victim.process.wait(timeout=30)
    cut = [t["id"] for t in kill_turns if "error" in t]
    print(f"scaletest: SIGKILLed replica {victim.name}: {len(cut)} in-flight replies cut ({cut})", file=sys.stderr)
    after = record(
        _parallel([(lambda c=c: driver.turn(front, c)) for c in conversations], len(conversations)), "failover"
    )
    now_held = survivor.conversations()
    # a victim's conversation failed over when a turn after the kill started it again from its history on the
    # survivor (usually the turn sent again; a request nginx passed on before any reply byte counts too)
    failed_over = [
        t
        for t in kill_turns + after
        if t["id"] in victims and "error" not in t and t["continued"] is False and t["id"] in now_held
    ]
    failovers = len({t["id"] for t in failed_over})
    survivors_continued = all(t["continued"] is True for t in after if t["id"] not in victims and "error" not in t)
    last_failure = time.monotonic()
    print(
        f"scaletest: failover: {failovers} of {len(victims)} conversations went on on replica {survivor.name} "
        "(history re-prefilled)",
        file=sys.stderr,
    )

    # 4. the killed replica back (an orchestrator's restart); drain the survivor while replies stream on it
    victim.start(work)
    victim.wait_healthy(min(300, max(deadline - time.monotonic(), 1)))
    # nginx takes a replica it marked down back after fail_timeout, with the first request that succeeds there;
    # until then it probes it with one request at a time and counts it out for the others. That request is sent
    # here (a /health with a key the hash puts on the restarted replica) before the other replica is drained, so
    # the drain does not fall in the window where nginx knows only one replica and that one answers 503.
    time.sleep(max(0.0, last_failure + fail_timeout_s(conf) + 1 - time.monotonic()))
    probe_key = next(iter(victims))
    httpx.get(front + "/health", headers={"X-Conversation-Id": probe_key}, timeout=30)
    drain_state: dict[str, Any] = {}
    drain_now = threading.Event()
    draining_ids: set[str] = set()

    def on_drain_chunk(conversation: Conversation, pieces: int) -> None:
        if pieces >= 2:  # every conversation admitted before the drain: none of them may be refused
            draining_ids.add(conversation.id)
            if len(draining_ids) == len(conversations):
                drain_now.set()

    def drainer() -> None:
        drain_now.wait(timeout=max(min(60, deadline - time.monotonic()), 1))
        drain_state["drain"] = httpx.post(survivor.url + "/admin/drain", headers=auth, timeout=30).json()
        refused = httpx.post(
            survivor.url + "/v1/chat/completions",
            headers=auth,
            json={"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 4},
            timeout=30,
        )
        drain_state["refused"] = (refused.status_code, refused.headers.get("retry-after"))

    drain_thread = threading.Thread(target=drainer, daemon=True)
    drain_thread.start()
    record(
        _parallel(
            [
                (lambda c=c: driver.turn(survivor.url, c, max_tokens=args.long_tokens, on_chunk=on_drain_chunk))
                for c in conversations
            ],
            len(conversations),
        ),
        "drain",
    )
    drain_thread.join(timeout=90)
    in_flight_at_drain = drain_state.get("drain", {}).get("active_turns", 0)
    refused_ok = drain_state.get("refused", (0, None))[0] == 503 and drain_state["refused"][1] is not None
    listed = httpx.get(survivor.url + "/v1/conversations", headers=auth, timeout=30).json()["data"]
    handed = 0
    for entry in listed:
        if time.monotonic() > deadline:
            raise TimeoutError("the scale test ran past --timeout")
        download = httpx.get(f"{survivor.url}/v1/conversations/{entry['id']}", headers=auth, timeout=60)
        if download.status_code != 200:
            continue
        upload = httpx.put(
            f"{victim.url}/v1/conversations/{entry['id']}", headers=auth, content=download.content, timeout=60
        )
        handed += upload.status_code == 200
    after_drain = record(
        _parallel([(lambda c=c: driver.turn(front, c)) for c in conversations], len(conversations)), "handed over"
    )
    continued_after_drain = sum(1 for t in after_drain if "error" not in t and t["continued"] is True)
    print(
        f"scaletest: drained replica {survivor.name} with {in_flight_at_drain} replies in flight (new request: "
        f"{drain_state.get('refused')}); {handed} conversations handed to {victim.name}; "
        f"{continued_after_drain} of {len(conversations)} went on from the handed-over cache",
        file=sys.stderr,
    )

    regular = [t for t in turns if "error" not in t and t.get("continued") is True and t["phase"] != "drain"]
    costs = {
        "failover_prompt_tokens_mean": _mean([t["prompt_tokens"] for t in failed_over]),
        "failover_ttft_s_mean": _mean([t["ttft_s"] for t in failed_over]),
        "continued_prompt_tokens_mean": _mean([t["prompt_tokens"] for t in regular]),
        "continued_ttft_s_mean": _mean([t["ttft_s"] for t in regular]),
        "failover_evicted_mean": _mean([t["evicted"] for t in failed_over]),
    }
    checks = {
        "affinity": affinity_ok,
        "headers": driver.header_mismatches == 0,
        "moves": moved >= 1 and moved_equal == moved,
        "failover": len(victims) >= 1 and failovers == len(victims) and survivors_continued,
        "drain_in_flight": in_flight_at_drain >= 1,
        "drain_refuses": refused_ok,
        "handed_over": handed >= len(conversations) and continued_after_drain == len(conversations),
        "no_lost_replies": not lost,
    }
    summary.update(
        {
            "passed": all(checks.values()),
            "checks": checks,
            "requests": driver.requests,
            "conversations": len(conversations),
            "failovers": failovers,
            "cut_in_flight": len(cut),
            "moved": moved,
            "moved_equal": moved_equal,
            "move_mib": [round(b / 2**20, 2) for b in move_bytes],
            "handed_over": handed,
            "lost_replies": len(lost),
            "lost": lost[:10],
            **costs,
            "replica_load_s": round(load_s, 1),
            "seconds": round(time.monotonic() - started, 1),
            "machine": info,
            "turns": turns,
        }
    )
    print(
        f"scaletest: {driver.requests} requests, {failovers} failovers ({len(cut)} in-flight replies cut), "
        f"{moved_equal}/{moved} moves equal, {handed} handed over, {len(lost)} replies lost; failover turn: "
        f"{costs['failover_prompt_tokens_mean']} prompt tokens, TTFT {costs['failover_ttft_s_mean']} s vs continued "
        f"{costs['continued_prompt_tokens_mean']} tokens, {costs['continued_ttft_s_mean']} s; "
        f"{summary['seconds']} s in all",
        file=sys.stderr,
    )
    return summary
