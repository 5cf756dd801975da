"""Running `serve` as replicas (docs/deploy.md): the conversation id header, moving a conversation between two
servers over HTTP (GET/PUT /v1/conversations/{id}), refused uploads, and draining. Two tiny-model servers in this
process on free loopback ports, driven by the real `openai` client and httpx."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest
import torch
from safetensors.torch import save as save_tensors
from streamchat import persist
from streamchat.batching import Engine
from streamchat.config import load_settings
from streamchat.frontends.server import BackgroundServer, create_app, draining_server
from streamchat.model import LoadedModel
from streamchat.session import ChatSession

from test_server import SETTINGS  # a 64-token cache the turns overflow, greedy, bit-exact batched or alone

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TURNS = ["Hello there! How are you today?", "Tell me a story about a dragon.", "What is 2+2?", "Go on."]


def start(loaded, **settings):
    settings = load_settings(None, {**SETTINGS, **settings})
    engine = Engine(loaded, settings, max_sessions=4, prefill_piece=16)
    server = BackgroundServer(create_app(engine, "tiny-llama", api_key=KEY))
    server.engine = engine
    return server.__enter__()


def stop(server) -> None:
    server.__exit__(None, None, None)
    server.engine.close()


@pytest.fixture()
def pair(tiny):
    """Two replicas of the same model, as two `serve` processes would be."""
    servers = [start(tiny), start(tiny)]
    yield servers
    for server in servers:
        stop(server)


def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def turn(server, messages: list[dict], conversation: str, stream: bool = False) -> tuple[str, dict, dict]:
    """(reply, streamchat extension, usage) of one turn sent with the X-Conversation-Id header; checks that the
    response names the conversation in that header too."""
    create = api(server).chat.completions.with_raw_response.create
    extra = {"extra_headers": {"X-Conversation-Id": conversation}}
    if not stream:
        raw = create(model="tiny-llama", messages=messages, **extra)
        assert raw.headers["x-conversation-id"] == conversation
        response = raw.parse()
        return response.choices[0].message.content, response.model_extra["streamchat"], response.usage.model_dump()
    raw = create(model="tiny-llama", messages=messages, stream=True, stream_options={"include_usage": True}, **extra)
    assert raw.headers["x-conversation-id"] == conversation
    pieces, extension, usage = [], None, None
    for chunk in raw.parse():
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                extension = chunk.model_extra["streamchat"]
        else:
            usage = chunk.usage.model_dump()
    return "".join(pieces), extension, usage


def converse(server, conversation: str, texts: list[str], messages: list[dict] | None = None) -> list[dict]:
    """Send `texts` as turns (the whole history each time, as OpenAI clients do); returns the messages after."""
    messages = list(messages or [])
    for index, text in enumerate(texts):
        messages.append({"role": "user", "content": text})
        reply, _, _ = turn(server, messages, conversation, stream=index % 2 == 1)
        messages.append({"role": "assistant", "content": reply})
    return messages


def test_the_response_names_the_conversation_in_a_header(pair):
    server = pair[0]
    raw = httpx.post(
        server.url + "/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    generated = raw.json()["streamchat"]["conversation_id"]
    assert raw.headers["x-conversation-id"] == generated and generated.startswith("conv-")
    reply, extension, _ = turn(server, [{"role": "user", "content": "Hi"}], "mine", stream=True)
    assert extension["conversation_id"] == "mine" and extension["continued"] is False
    _, extension, _ = turn(
        server,
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And?"},
        ],
        "mine",
    )
    assert extension["continued"] is True  # the id's conversation went on from its cache
    # an id a header cannot carry (sent in the body): the reply comes, without the header
    odd = httpx.post(
        server.url + "/v1/chat/completions",
        headers=AUTH,
        json={"messages": [{"role": "user", "content": "Hi"}], "conversation_id": "naïve\r\nX-Evil: 1"},
    )
    assert odd.status_code == 200 and "x-conversation-id" not in odd.headers and "x-evil" not in odd.headers
    assert odd.json()["streamchat"]["conversation_id"] == "naïve\r\nX-Evil: 1"


def test_a_moved_conversation_continues_token_for_token_as_if_unmoved(pair):
    """GET from one replica, PUT onto the other: the next turns there are the ones the first would have given,
    on the same cache (nothing re-prefilled), evictions included."""
    first, second = pair
    messages = converse(first, "moving", TURNS[:3])  # 64-token cache: these turns evict
    assert first.engine.conversations["moving"].session.cache.stats()["evicted_total"] > 0
    download = httpx.get(first.url + "/v1/conversations/moving", headers=AUTH)
    assert download.status_code == 200 and download.headers["content-type"] == "application/octet-stream"
    listed = httpx.get(first.url + "/v1/conversations", headers=AUTH).json()["data"]
    assert [c["id"] for c in listed] == ["moving"]
    upload = httpx.put(second.url + "/v1/conversations/moving", headers=AUTH, content=download.content)
    assert upload.status_code == 200, upload.text
    assert upload.json()["cache_tokens"] == first.engine.conversations["moving"].session.cache.stats()["cache_tokens"]
    unmoved, moved = list(messages), list(messages)
    for index, text in enumerate(["And then?", TURNS[0]]):
        unmoved.append({"role": "user", "content": text})
        moved.append({"role": "user", "content": text})
        here = turn(first, unmoved, "moving", stream=index == 0)
        there = turn(second, moved, "moving", stream=index == 0)
        assert there == here  # reply, extension (cache figures, evictions, continued) and usage alike
        assert there[1]["continued"] is True and there[2]["prompt_tokens"] < 30  # the new message only
        unmoved.append({"role": "assistant", "content": here[0]})
        moved.append({"role": "assistant", "content": there[0]})
    # without the move, the other replica re-prefills the history: a different cache, other figures
    _, restarted, usage = turn(second, unmoved[:-1], "fresh")
    assert restarted["continued"] is False and usage["prompt_tokens"] > 60


def _file_from(loaded: LoadedModel, identity: str) -> bytes:
    other = LoadedModel(loaded.model, loaded.tokenizer, identity, "tiny", 0.0, False)
    session = ChatSession(other, load_settings(None, SETTINGS))
    "".join(session.send("Hello there!"))
    return persist.dumps(session)


def test_unsupported_or_corrupt_uploads_get_400_naming_the_problem_and_the_replica_goes_on(pair, tiny):
    first, second = pair
    converse(first, "kept", TURNS[:2])
    good = httpx.get(first.url + "/v1/conversations/kept", headers=AUTH).content
    assert httpx.put(second.url + "/v1/conversations/kept", headers=AUTH, content=good).status_code == 200
    before = second.engine.conversations["kept"].session.cache.stats()
    damaged = bytearray(good)
    damaged[-5] ^= 0xFF  # a byte of the last tensor
    header = {"format": "streamchat-session", "version": "2", "session": "{}", "sha256": ""}
    bad = {
        b"": "empty",
        b"hello, not a file": "not a streamchat session file",
        good[: len(good) // 2]: "truncated",
        bytes(damaged): "checksum mismatch",
        save_tensors({"x": torch.zeros(2)}, metadata={"format": "something-else"}): "not a streamchat session",
        save_tensors({"x": torch.zeros(2)}, metadata=header): "format version 2",
        _file_from(tiny, "another-model"): "saved with model 'another-model'",
    }
    for body, problem in bad.items():
        response = httpx.put(second.url + "/v1/conversations/kept", headers=AUTH, content=body)
        assert response.status_code == 400, (problem, response.text)
        error = response.json()["error"]
        assert problem in error["message"] and error["type"] == "invalid_request_error", (problem, error)
    assert httpx.put(second.url + "/v1/conversations/kept", content=good).status_code == 401  # behind the key
    assert httpx.get(second.url + "/v1/conversations/nobody", headers=AUTH).status_code == 404
    # the refused uploads changed nothing: the replica answers, and "kept" is the conversation uploaded first
    assert second.engine.conversations["kept"].session.cache.stats() == before
    assert httpx.get(second.url + "/health").json()["status"] == "ok"
    reply, extension, _ = turn(second, [{"role": "user", "content": "Still there?"}], "kept")
    assert reply and extension["continued"] is True


def test_drain_refuses_new_replies_with_503_while_the_one_in_flight_finishes(pair):
    from test_ui_api import endless_talker

    server = start(endless_talker())  # a reply that cannot end by itself before max_tokens: surely in flight
    try:
        body = {"messages": [{"role": "user", "content": "Hello there!"}], "stream": True, "max_tokens": 1500}
        lines, drained = [], None
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", json=body, headers={**AUTH, "X-Conversation-Id": "long"}
        ) as streaming:
            for line in streaming.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 6 and drained is None:  # replying now: drain
                    drained = httpx.post(server.url + "/admin/drain", headers=AUTH).json()
                    refused = httpx.post(
                        server.url + "/v1/chat/completions",
                        headers=AUTH,
                        json={"messages": [{"role": "user", "content": "Hi"}]},
                    )
                    health = httpx.get(server.url + "/health")
                    exported = httpx.get(server.url + "/v1/conversations/long", headers=AUTH)
        assert drained["status"] == "draining" and drained["active_turns"] == 1
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "draining" in refused.json()["error"]["message"]
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert exported.status_code == 409  # replying: not yet
        assert lines[-1] == "data: [DONE]"  # the reply in flight was not cut
        final = json.loads(next(line for line in reversed(lines) if '"finish_reason": "length"' in line)[6:])
        assert final["streamchat"]["stop_reason"] == "max_new_tokens"
        # once it is done, the drained replica hands its conversation over; it takes none itself
        exported = httpx.get(server.url + "/v1/conversations/long", headers=AUTH)
        assert exported.status_code == 200
        upload = httpx.put(server.url + "/v1/conversations/other", headers=AUTH, content=exported.content)
        assert upload.status_code == 503 and "retry-after" in upload.headers
    finally:
        stop(server)


@pytest.mark.parametrize("drained_first", [False, True], ids=["sigterm", "drain-then-sigterm"])
def test_sigterm_drains_then_shuts_down(tiny, drained_first):
    """SIGTERM (an orchestrator stopping the replica) drains, then exits once no reply is in flight; after POST
    /admin/drain too (a SIGTERM then still waits for the replies)."""
    import threading

    import uvicorn
    from streamchat.batching import Overloaded, TurnRequest

    engine = Engine(tiny, load_settings(None, SETTINGS), max_sessions=2, prefill_piece=16)
    try:
        server = draining_server(uvicorn.Config(create_app(engine, "tiny-llama")), engine, drain_timeout_s=30)
        in_flight = engine.open_turn(TurnRequest([{"role": "user", "content": "Hello"}]))  # admitted, replying
        if drained_first:
            engine.drain()
        server.handle_exit(signal.SIGTERM, None)
        with pytest.raises(Overloaded):  # new replies refused from now on
            engine.open_turn(TurnRequest([{"role": "user", "content": "Hi"}]))
        time.sleep(0.3)
        assert engine.draining and not server.should_exit  # waits for the reply in flight
        assert "".join(in_flight.run(threading.Event()))  # which finishes
        for _ in range(100):  # bounded: 5 s
            if server.should_exit:
                break
            time.sleep(0.05)
        assert server.should_exit  # then it shuts down
    finally:
        engine.close()


def test_the_nginx_template_renders_for_the_scale_test(tmp_path):
    """deploy/nginx.conf with the scale test's ports: one server line per replica, with the template's passive
    health parameters; the affinity and streaming directives kept; nginx itself accepts it where installed."""
    import os
    import shutil
    import subprocess

    from streamchat.evaluate.scaletest import TEMPLATE, fail_timeout_s, render_nginx_conf

    template = TEMPLATE.read_text()
    conf = render_nginx_conf(template, 18000, [18001, 18002, 18003])
    assert "listen 127.0.0.1:18000;" in conf and "127.0.0.1:8001" not in conf
    servers = [line.strip() for line in conf.splitlines() if line.strip().startswith("server 127.0.0.1:")]
    assert servers == [f"server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in (18001, 18002, 18003)]
    for directive in ("hash $streamchat_affinity consistent;", "proxy_buffering off;", "http_503 non_idempotent"):
        assert directive in conf
    assert fail_timeout_s(conf) == 5
    with pytest.raises(ValueError):
        render_nginx_conf("events {}", 1, [2])
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        pytest.skip("nginx is not installed (bash setup.sh --dev installs it)")
    (tmp_path / "nginx.conf").write_text(conf)
    checked = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr


def test_a_file_saved_by_the_terminal_chat_can_be_put_too(pair, tiny):
    """A `/save` file (no server history in it): PUT under an id, the next message sent alone with that id goes on
    from its cache."""
    session = ChatSession(tiny, load_settings(None, SETTINGS))
    "".join(session.send(TURNS[0]))
    upload = httpx.put(pair[0].url + "/v1/conversations/from-repl", headers=AUTH, content=persist.dumps(session))
    assert upload.status_code == 200 and upload.json()["seen_tokens"] == session.cache.stats()["seen_total"]
    expected = "".join(session.send(TURNS[1]))
    reply, extension, usage = turn(pair[0], [{"role": "user", "content": TURNS[1]}], "from-repl")
    assert reply == expected and extension["continued"] is True
