"""`python -m streamchat serve`: an OpenAI-compatible chat-completions server over bounded, batched caches.

The HTTP layer only (FastAPI + uvicorn): requests are validated here and handed to `streamchat.batching.Engine`,
which keeps the live conversations and batches their decode steps. Endpoints: POST /v1/chat/completions
(streaming as server-sent events in OpenAI's chunk format, or not), GET /v1/models, GET /health, GET /metrics
(Prometheus text format); for running replicas (docs/deploy.md): GET /v1/conversations (live ids),
GET/PUT /v1/conversations/{id} (a conversation as a `.streamchat` file, out and in), POST /admin/drain. Every
chat response carries the conversation's id in the X-Conversation-Id header (what a load balancer hashes on).
Every response carries a `streamchat` object (policy, cache tokens/capacity, evicted
this turn and in total, pinned tokens); OpenAI clients ignore it. Errors use OpenAI's format
({"error": {"message", "type", "param", "code"}}). docs/server.md describes it all.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from streamchat.batching import ConversationError, Engine, Overloaded, TurnRequest
from streamchat.config import MIN_TEMPERATURE
from streamchat.session import SessionError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, far beyond any cache
MAX_UPLOAD_BYTES = 2 << 30  # a PUT conversation file: 2 GiB, above an 8B model's fp16 cache of 4,096 tokens (0.5 GiB)
DRAIN_TIMEOUT_S = 60.0  # SIGTERM: how long in-flight replies may take to finish before the server exits anyway
CONVERSATION_HEADER = "X-Conversation-Id"
MAX_MESSAGES = 4096
MAX_TOKENS_LIMIT = 100_000
REFUSED_FIELDS = {
    "tools": "tools are not supported",
    "tool_choice": "tools are not supported",
    "functions": "functions are not supported",
    "function_call": "functions are not supported",
    "audio": "audio is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class APIError(Exception):
    """An error response in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


def _number(body: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise _bad(name, f"must be between {low} and {high}, got {value}")
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part_index, part in enumerate(content):
            param = f"messages[{index}].content[{part_index}]"
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(param, f"only text parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise _bad(f"messages[{index}].content", "must be a string or a list of text parts")


def parse_request(body: Any, model_names: tuple[str, ...]) -> tuple[TurnRequest, bool, bool]:
    """The engine's request from a chat-completions body; returns (request, stream, include_usage).
    Raises APIError(400) naming the offending field."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in model_names:
        raise APIError(
            400,
            f"model: unknown model {str(model)[:80]!r}; this server has {', '.join(model_names)}",
            "model",
            headers={},
        )
    for name, why in REFUSED_FIELDS.items():
        if body.get(name) not in (None, [], {}):
            raise _bad(name, why)
    if body.get("n") not in (None, 1):
        raise _bad("n", "only n=1 is supported")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise _bad("logprobs", "log probabilities are not supported")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("response_format", 'only {"type": "text"} is supported')
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2.0, 2.0) not in (None, 0, 0.0):
            raise _bad(name, "not supported; the server applies its configured repetition_penalty instead")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages per request")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{index}]", "must be an object with role and content")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(
                f"messages[{index}].role",
                f"must be system (or developer), user or assistant, got {json.dumps(role)[:40]}",
            )
        if role == "system" and index != 0:
            raise _bad(f"messages[{index}].role", "a system message may only come first")
        if message.get("tool_calls"):
            raise _bad(f"messages[{index}].tool_calls", "tools are not supported")
        parsed.append({"role": role, "content": _content(message, index)})
    if parsed[-1]["role"] != "user":
        raise _bad(f"messages[{len(parsed) - 1}].role", "the last message must be the user's")
    if not parsed[-1]["content"].strip():
        raise _bad(f"messages[{len(parsed) - 1}].content", "the user message is empty")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    ):
        raise _bad("stop", "must be a non-empty string or a list of at most 4 non-empty strings")
    max_tokens = _number(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, MAX_TOKENS_LIMIT, integer=True)
    conversation_id = body.get("conversation_id")
    if conversation_id is not None and not (isinstance(conversation_id, str) and 0 < len(conversation_id) <= 128):
        raise _bad("conversation_id", "must be a string of 1 to 128 characters")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    request = TurnRequest(
        messages=parsed,
        conversation_id=conversation_id,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        seed=_number(body, "seed", 0, 2**63 - 1, integer=True),
        stop=list(stop or []),
    )
    if request.top_p == 0:
        raise _bad("top_p", "must be above 0")
    if request.temperature is not None and 0 < request.temperature < MIN_TEMPERATURE:
        raise _bad("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return request, stream, bool(options.get("include_usage"))


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may live in one process)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.engine = engine
        r = self.registry
        self.requests = Counter(
            "streamchat_requests", "Chat completion requests by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("streamchat_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("streamchat_generated_tokens", "Tokens generated", registry=r)
        self.evicted_tokens = Counter("streamchat_evicted_tokens", "Tokens evicted from bounded caches", registry=r)
        self.ttft = Histogram(
            "streamchat_time_to_first_token_seconds", "Time to first token", registry=r, buckets=LATENCY_BUCKETS
        )
        self.itl = Histogram(
            "streamchat_inter_token_latency_seconds",
            "Time between streamed text pieces",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        r.register(self)

    def collect(self):
        stats = self.engine.stats()
        conversations = stats["conversations"]
        yield GaugeMetricFamily("streamchat_conversations_live", "Live conversations", value=len(conversations))
        yield GaugeMetricFamily("streamchat_active_turns", "Conversations replying now", value=stats["active_turns"])
        yield GaugeMetricFamily(
            "streamchat_draining",
            "1 once asked to drain (new replies refused with 503)",
            value=int(self.engine.draining),
        )
        yield GaugeMetricFamily(
            "streamchat_queue_depth", "Prefill chunks waiting for the scheduler", value=stats["queued_steps"]
        )
        yield GaugeMetricFamily(
            "streamchat_decoding", "Replies decoding on the scheduler (rows of its next step)", value=stats["decoding"]
        )
        kv = GaugeMetricFamily("streamchat_kv_bytes", "KV cache bytes per conversation", labels=["conversation"])
        tokens = GaugeMetricFamily("streamchat_cache_tokens", "Tokens cached per conversation", labels=["conversation"])
        for name, cache in conversations.items():
            kv.add_metric([name], cache["kv_bytes"])
            tokens.add_metric([name], cache["cache_tokens"])
        yield kv
        yield tokens
        yield GaugeMetricFamily(
            "streamchat_kv_bytes_total",
            "KV cache bytes of all conversations",
            value=sum(c["kv_bytes"] for c in conversations.values()),
        )
        yield GaugeMetricFamily(
            "streamchat_step_threads",
            "Threads the scheduler's last step (decode or prefill) ran on; 0 before the first",
            value=stats["step_threads"],
        )
        yield GaugeMetricFamily(
            "streamchat_batched_rows_per_step",
            "Mean conversations per batched step since start (steps of 2 or more)",
            value=stats["batched_rows"] / max(stats["batched_steps"], 1),
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _read_bytes(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes (else APIError 413, before reading it where Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over {limit} bytes", kind="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes", kind="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_body(request: Request, limit: int) -> Any:
    data = await _read_bytes(request, limit)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"could not parse the JSON body: {error}") from None


def _overloaded(error: Overloaded) -> APIError:
    return APIError(
        error.status,
        str(error),
        kind="rate_limit_error" if error.status == 429 else "server_overloaded",
        headers={"Retry-After": str(error.retry_after)},
    )


def _id_header(conversation_id: str) -> dict[str, str]:
    """The X-Conversation-Id response header for `conversation_id`: none for an id that is not printable ASCII
    (one sent in the body may be anything; a header cannot carry it, and must never carry a line break)."""
    if conversation_id.isascii() and conversation_id.isprintable():
        return {CONVERSATION_HEADER: conversation_id}
    return {}


def _conversation_id(value: str) -> str:
    if not 0 < len(value) <= 128:
        raise APIError(400, "the conversation id must be 1 to 128 characters", "conversation_id")
    return value


def api_router(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> tuple[APIRouter, Metrics]:
    """The API's routes over `engine` (for `serve`, and for mounting beside the web UI in one process).
    `max_body_bytes`: largest chat request; `max_upload_bytes`: largest conversation file a PUT may send."""
    router = APIRouter()
    metrics = Metrics(engine)
    model_names = (model_name, "streamchat")
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode())):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @router.get("/health")
    async def health():
        stats = engine.stats()
        body = {
            "status": "draining" if engine.draining else "ok",
            "model": model_name,
            "conversations": len(stats["conversations"]),
            "active_turns": stats["active_turns"],
        }
        return JSONResponse(body, status_code=503 if engine.draining else 200)  # draining: out of rotation

    @router.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except APIError as error:
            return error.response()
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "streamchat"}],
        }

    @router.get("/metrics")
    async def prometheus(request: Request):
        try:
            check_key(request)
        except APIError as error:
            return error.response()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            body = await _read_body(request, max_body_bytes)
            turn_request, stream, include_usage = parse_request(body, model_names)
            header_id = request.headers.get("x-conversation-id")
            if header_id and turn_request.conversation_id is None:
                turn_request.conversation_id = header_id[:128]
            try:
                turn = engine.open_turn(turn_request)
            except Overloaded as error:
                raise _overloaded(error) from None
            except SessionError as error:
                raise APIError(400, str(error), "messages") from None
        except APIError as error:
            metrics.requests.labels(str(error.status)).inc()
            return error.response()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        events = _start(turn)
        pinned = _id_header(turn.conversation.id)  # the id to send back to stay on this conversation
        if stream:
            metrics.requests.labels("200").inc()  # the headers go out now; a later failure is an SSE error event
            return StreamingResponse(
                _sse(request, turn, events, completion_id, model_name, include_usage, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **pinned},
            )
        try:
            text = await _collect(request, turn, events, metrics)
        except Exception as error:
            metrics.requests.labels("500").inc()
            return APIError(500, f"generation failed: {error}", kind="server_error").response()
        metrics.requests.labels("200").inc()
        if text is None:
            return Response(status_code=499)
        result = turn.result
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
            "streamchat": result.extension,
        }
        return JSONResponse(body, headers=pinned)

    @router.get("/v1/conversations")
    async def list_conversations(request: Request):
        """The live conversations' ids, least recently used first (what a draining replica can hand over)."""
        try:
            check_key(request)
        except APIError as error:
            return error.response()
        ids = engine.conversation_ids()
        return {
            "object": "list",
            "data": [{"id": i, "object": "conversation"} for i in ids],
            "draining": engine.draining,
        }

    @router.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request):
        """The conversation as a `.streamchat` file (application/octet-stream). 404 unknown, 409 replying now."""
        try:
            check_key(request)
            data = await asyncio.to_thread(engine.export_conversation, _conversation_id(conversation_id))
        except ConversationError as error:
            return APIError(error.status, str(error), "conversation_id").response()
        except APIError as error:
            return error.response()
        return Response(
            data,
            media_type="application/octet-stream",
            headers={
                **_id_header(conversation_id),
                "Content-Disposition": 'attachment; filename="conversation.streamchat"',
            },
        )

    @router.put("/v1/conversations/{conversation_id}")
    async def put_conversation(conversation_id: str, request: Request):
        """Take over a `.streamchat` file's conversation under this id, exactly: 200 with its cache figures;
        400 naming the problem (not a session file, damaged, another model...), 409 replying now, 503 draining.
        A refused upload changes nothing."""
        try:
            check_key(request)
            conversation_id = _conversation_id(conversation_id)
            data = await _read_bytes(request, max_upload_bytes)
            if not data:
                raise APIError(400, "the body is empty: send a .streamchat file (GET /v1/conversations/{id} gives one)")
            try:
                stats = await asyncio.to_thread(engine.import_conversation, conversation_id, data)
            except Overloaded as error:
                raise _overloaded(error) from None
            except ConversationError as error:
                raise APIError(error.status, str(error), "body" if error.status == 400 else "conversation_id") from None
        except APIError as error:
            return error.response()
        body = {
            "id": conversation_id,
            "object": "conversation",
            "policy": stats["policy"],
            "cache_tokens": stats["cache_tokens"],
            "cache_capacity": stats["cache_capacity"],
            "seen_tokens": stats["seen_total"],
        }
        return JSONResponse(body, headers=_id_header(conversation_id))

    @router.post("/admin/drain")
    async def drain(request: Request):
        """Stop taking new replies (503 + Retry-After from now on, /health too); in-flight ones finish."""
        try:
            check_key(request)
        except APIError as error:
            return error.response()
        engine.drain()
        stats = engine.stats()
        return {"status": "draining", "active_turns": stats["active_turns"], "conversations": engine.conversation_ids()}

    return router, metrics


class _Events:
    """A turn running in its own thread, its text pieces handed to the event loop through an asyncio queue."""

    def __init__(self, turn):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.checked = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(turn,), name="streamchat-turn", daemon=True)

    def _run(self, turn) -> None:
        put = lambda item: self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        try:
            for piece in turn.run(self.stop):
                put(("text", piece))
            put(("end", None))
        except BaseException as error:
            put(("error", error))

    async def next(self, request: Request) -> tuple[str, Any]:
        """The next event; ("gone", None) when the client disconnected meanwhile (the turn is then stopped).
        The connection is checked at least every 0.25 s, also while pieces keep coming."""
        while True:
            now = time.monotonic()
            if now - self.checked > 0.25:
                self.checked = now
                if await request.is_disconnected():
                    self.stop.set()
                    return "gone", None
            if not self.queue.empty():  # the common case while tokens stream: no task, no timer
                return self.queue.get_nowait()
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.25)
            except TimeoutError:
                continue


def _start(turn) -> _Events:
    events = _Events(turn)
    events.thread.start()
    return events


def _usage(result) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _record(metrics: Metrics, turn, started: float, stamps: list[float]) -> None:
    result = turn.result
    metrics.prompt_tokens.inc(result.prompt_tokens)
    metrics.generated_tokens.inc(result.completion_tokens)
    metrics.evicted_tokens.inc(result.extension.get("evicted_this_turn", 0))
    if stamps:
        metrics.ttft.observe(stamps[0] - started)
        for before, after in zip(stamps, stamps[1:]):
            metrics.itl.observe(after - before)


async def _collect(request: Request, turn, events: _Events, metrics: Metrics) -> str | None:
    started, stamps, pieces = time.perf_counter(), [], []
    try:
        while True:
            kind, value = await events.next(request)
            if kind == "text":
                stamps.append(time.perf_counter())
                pieces.append(value)
            elif kind == "error":
                raise value
            elif kind == "gone":
                return None
            else:
                return "".join(pieces)
    finally:
        events.stop.set()  # a cancelled request (client gone) stops its generation at the next token
        await asyncio.to_thread(events.thread.join, 30)
        _record(metrics, turn, started, stamps)


async def _sse(request, turn, events: _Events, completion_id, model_name, include_usage, metrics: Metrics):
    started, stamps = time.perf_counter(), []
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    recorded = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.next(request)
            if kind == "text":
                stamps.append(time.perf_counter())
                yield chunk({"content": value})
            elif kind == "error":
                error = {"message": f"generation failed: {value}", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            elif kind == "gone":
                return
            else:
                break
        await asyncio.to_thread(events.thread.join, 30)
        result = turn.result
        _record(metrics, turn, started, stamps)  # before the last chunks: a client may read /metrics right after
        recorded = True
        yield chunk({}, result.finish_reason, streamchat=result.extension)
        if include_usage:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [],
                "usage": _usage(result),
                "streamchat": result.extension,
            }
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        events.stop.set()  # the client went away (or the stream ended): stop at the next token
        await asyncio.to_thread(events.thread.join, 30)
        if not recorded:
            _record(metrics, turn, started, stamps)


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The API as a FastAPI app of its own (`serve`); `app.state.metrics` holds its metrics."""
    app = FastAPI(title="streamchat", docs_url=None, redoc_url=None, openapi_url=None)
    router, metrics = api_router(engine, model_name, api_key, max_body_bytes, max_upload_bytes)
    app.include_router(router)
    app.state.metrics, app.state.engine = metrics, engine
    return app


def security_warning(host: str, api_key: str | None) -> str | None:
    """The warning printed when the API is reachable beyond this machine without a key (None: nothing to say)."""
    if api_key or _is_loopback(host):
        return None
    return (
        f"streamchat: WARNING: listening on {host} without an API key: anyone who can reach this address can "
        "use the model. Set --api-key (or STREAMCHAT_API_KEY), or bind 127.0.0.1."
    )


def api_key_for(args: argparse.Namespace) -> str | None:
    """The API key from --api-key or STREAMCHAT_API_KEY (None: no key required), after printing the warning when
    that leaves an address beyond this machine open (`security_warning`). For `serve` and `ui` alike."""
    api_key = args.api_key or os.environ.get("STREAMCHAT_API_KEY") or None
    warning = security_warning(args.host, api_key)
    if warning:
        print(warning, file=sys.stderr)
    return api_key


class BackgroundServer:
    """uvicorn serving `app` on a bound loopback socket in a thread (tests and the load test); `url` is its base."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the server did not start within 30 s")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()


def draining_server(config, engine: Engine, drain_timeout_s: float = DRAIN_TIMEOUT_S):
    """A uvicorn Server for `config` where SIGTERM drains first (`Engine.drain`: new replies get 503 + Retry-After,
    in-flight ones finish, for at most `drain_timeout_s` seconds) and then shuts down; a second SIGTERM, or SIGINT,
    stops at once (uvicorn's own handling)."""
    import uvicorn

    class Server(uvicorn.Server):
        drain_started = False

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM and not self.drain_started:  # also after POST /admin/drain: wait for replies
                self.drain_started = True
                engine.drain()
                print("streamchat: SIGTERM: draining (in-flight replies finish, new ones get 503)", file=sys.stderr)
                threading.Thread(target=self._exit_when_idle, name="streamchat-drain", daemon=True).start()
                return
            super().handle_exit(sig, frame)

        def _exit_when_idle(self) -> None:
            idle = engine.wait_idle(drain_timeout_s)
            print(
                "streamchat: drained, shutting down"
                if idle
                else f"streamchat: replies still running after {drain_timeout_s:g} s; shutting down anyway",
                file=sys.stderr,
            )
            self.should_exit = True

    return Server(config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=8,
        help="live conversations at most; the least recently used idle one is freed past it (default: 8)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $STREAMCHAT_API_KEY, else no key)",
    )
    parser.add_argument(
        "--prefill-piece",
        type=int,
        default=32,
        help="prefill tokens per scheduler step between batched decode steps (default: 32)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT_S,
        metavar="SECONDS",
        help=f"on SIGTERM, how long in-flight replies may take before the server exits (default: {DRAIN_TIMEOUT_S:g})",
    )


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from streamchat.cli import settings_from_args
    from streamchat.model import load_for_chat

    settings = settings_from_args(args)
    if args.max_sessions < 1 or args.prefill_piece < 1 or not 0 <= args.port <= 65535 or not args.drain_timeout >= 0:
        print(
            "streamchat serve: --max-sessions and --prefill-piece must be 1 or more, --port 0-65535, "
            "--drain-timeout 0 or more",
            file=sys.stderr,
        )
        return 2
    api_key = api_key_for(args)
    loaded = load_for_chat(settings)
    engine = Engine(loaded, settings, args.max_sessions, args.prefill_piece)
    app = create_app(engine, loaded.identity, api_key)
    print(
        f"streamchat: {loaded.source} loaded in {loaded.load_seconds:.1f} s; OpenAI API at "
        f"http://{args.host}:{args.port}/v1 (model {loaded.identity!r})",
        file=sys.stderr,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    try:
        draining_server(config, engine, args.drain_timeout).run()
    finally:
        engine.close()
    return 0
