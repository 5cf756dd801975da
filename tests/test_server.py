"""The OpenAI-compatible server and its batching engine, on the tiny model, served in this process on a free
loopback port; the clients are the real `openai` package and httpx (for raw HTTP)."""

from __future__ import annotations

import gc
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from streamchat.batching import Engine, Overloaded, TurnRequest
from streamchat.config import load_settings
from streamchat.frontends.server import BackgroundServer, create_app, security_warning
from streamchat.session import ChatSession

# int8 decode weights: torch's weight-only kernels compute each row alone, so a batched step is bit-exact with a lone
# one (fp32 F.linear is not: a 4-row GEMM rounds differently from a GEMV, ~1e-6, which can flip a greedy near-tie)
SETTINGS = {
    "sinks": 4,
    "window": 60,
    "temperature": 0,
    "max_new_tokens": 12,
    "prefill_chunk": 16,
    "decode_weights": "int8",
}
PROMPTS = [
    "Hello there! How are you today?",
    "Tell me a story about a dragon.",
    "What is 2+2?",
    "Numbers 0123456789 and symbols",
]
KEY = "test-key"


@pytest.fixture()
def served(tiny):
    settings = load_settings(None, SETTINGS)
    engine = Engine(tiny, settings, max_sessions=4, prefill_piece=16)
    app = create_app(engine, "tiny-llama", api_key=KEY, max_body_bytes=64 * 1024)
    with BackgroundServer(app) as server:
        server.engine, server.settings = engine, settings
        yield server
    engine.close()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference_replies(tiny, settings, turns: list[str]) -> list[str]:
    """What one plain ChatSession answers to these turns (greedy), alone."""
    session = ChatSession(tiny, settings)
    return ["".join(session.send(text)) for text in turns]


def ask(api: openai.OpenAI, messages: list[dict], stream: bool, **kwargs) -> tuple[str, dict, str]:
    """(reply, streamchat extension, finish reason) through the openai client."""
    if not stream:
        response = api.chat.completions.create(model="tiny-llama", messages=messages, **kwargs)
        return (
            response.choices[0].message.content,
            response.model_extra["streamchat"],
            response.choices[0].finish_reason,
        )
    pieces, extension, finish = [], None, None
    chunks = api.chat.completions.create(
        model="tiny-llama", messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    for chunk in chunks:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finish, extension = chunk.choices[0].finish_reason, chunk.model_extra["streamchat"]
        else:
            assert chunk.usage.completion_tokens >= 1 and chunk.usage.prompt_tokens >= 1
    return "".join(pieces), extension, finish


def test_openai_client_chats_past_the_cache_with_eviction_figures(served, tiny):
    api = client(served)
    turns = [f"{PROMPTS[i % 4]} (turn {i})" for i in range(8)]
    expected = reference_replies(tiny, served.settings, turns)
    messages = [{"role": "system", "content": "You are a tiny test model."}]
    conversation, evicted, previous_total = None, 0, 0
    for i, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        reply, extension, finish = ask(api, messages, stream=i % 2 == 1)
        messages.append({"role": "assistant", "content": reply})
        assert reply == expected[i]  # the same as one session alone: only the new message was prefilled
        assert finish in ("stop", "length")
        assert extension["conversation_id"] == (conversation or extension["conversation_id"])
        conversation = extension["conversation_id"]
        assert extension["policy"] == "sink_window" and extension["cache_capacity"] == 64
        assert 0 < extension["cache_tokens"] <= 64 and extension["pinned_tokens"] > 0
        assert extension["evicted_total"] == previous_total + extension["evicted_this_turn"]
        previous_total = extension["evicted_total"]
        evicted += extension["evicted_this_turn"]
    assert extension["seen_tokens"] > 64 and evicted == extension["evicted_total"] > 0


def test_a_resent_history_starts_a_conversation_that_streams_it_through_the_cache(served, tiny):
    """An unknown history (another client's, or a replica's) is fed whole, in pieces, through the bounded cache."""
    api = client(served)
    history = []
    for i in range(6):
        history += [
            {"role": "user", "content": PROMPTS[i % 4] * 3},
            {"role": "assistant", "content": PROMPTS[3 - i % 4]},
        ]
    reply, extension, _ = ask(api, [*history, {"role": "user", "content": "What is 2+2?"}], stream=False)
    assert reply and extension["evicted_this_turn"] > 0 and extension["cache_tokens"] <= 64


def test_four_concurrent_clients_are_isolated_batched_and_bounded(served, tiny):
    api = client(served)
    expected = {i: reference_replies(tiny, served.settings, [PROMPTS[i], "Go on."]) for i in range(4)}
    results, errors = {}, []
    steps_before = served.engine.batched_rows

    def chat(i: int) -> None:
        try:
            messages = [{"role": "user", "content": PROMPTS[i]}]
            first, _, _ = ask(api, messages, stream=True)
            messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Go on."}]
            second, extension, _ = ask(api, messages, stream=i % 2 == 0)
            results[i] = ([first, second], extension)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for i in range(4):
        assert results[i][0] == expected[i]  # no cross-talk, and batched greedy == alone
    assert len({results[i][1]["conversation_id"] for i in range(4)}) == 4
    assert served.engine.batched_rows > steps_before  # conversations did share decode steps
    # bounded memory: 4 more conversations replace the least recently used, the cache count stays at max_sessions
    for i in range(4):
        ask(api, [{"role": "user", "content": f"New conversation {i}"}], stream=False)
    stats = served.engine.stats()
    assert len(stats["conversations"]) == 4
    per_cache = next(iter(stats["conversations"].values()))["kv_bytes"]
    assert sum(c["kv_bytes"] for c in stats["conversations"].values()) <= 4 * per_cache


def test_greedy_batched_with_three_others_equals_alone(tiny):
    settings = load_settings(None, {**SETTINGS, "max_new_tokens": 24})
    engine = Engine(tiny, settings, max_sessions=4, prefill_piece=16)
    try:

        def run(text: str) -> str:
            return "".join(engine.open_turn(TurnRequest([{"role": "user", "content": text}])).run(threading.Event()))

        alone = [run(text) for text in PROMPTS]
        assert engine.batched_steps == 0
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, run(PROMPTS[i]))) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert [together[i] for i in range(4)] == alone
        assert engine.batched_steps > 0 and engine.batched_rows > engine.batched_steps  # steps were shared
    finally:
        engine.close()


def test_metrics_parse(served):
    ask(client(served), [{"role": "user", "content": "Hello there!"}], stream=True)
    response = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for name in (
        "streamchat_conversations_live",
        "streamchat_kv_bytes",
        "streamchat_kv_bytes_total",
        "streamchat_cache_tokens",
        "streamchat_evicted_tokens",
        "streamchat_prompt_tokens",
        "streamchat_generated_tokens",
        "streamchat_time_to_first_token_seconds",
        "streamchat_inter_token_latency_seconds",
        "streamchat_queue_depth",
        "streamchat_step_threads",
    ):
        assert name in families, name
    generated = next(s.value for s in families["streamchat_generated_tokens"].samples if s.name.endswith("_total"))
    assert generated >= 1
    assert families["streamchat_conversations_live"].samples[0].value == 1
    ttft_count = next(
        s.value for s in families["streamchat_time_to_first_token_seconds"].samples if s.name.endswith("_count")
    )
    assert ttft_count == 1
    assert families["streamchat_step_threads"].samples[0].value == served.engine._threads >= 1
    tab = served.engine.new_session()  # a web UI tab on the same engine counts while it lives
    "".join(tab.send("Hi"))

    def live():
        text = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        families = {family.name: family for family in text_string_to_metric_families(text)}
        labels = {s.labels.get("conversation") for s in families["streamchat_kv_bytes"].samples}
        return families["streamchat_conversations_live"].samples[0].value, labels

    count, labels = live()
    assert count == 2 and tab.label in labels
    del tab
    gc.collect()
    assert live()[0] == 1


def post(server, body, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers, timeout=30)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


USER = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [*USER, {"role": "assistant", "content": "hi"}]}, "messages[1].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": USER, "model": "gpt-4o"}, "model"),
        ({"messages": USER, "temperature": 5}, "temperature"),
        ({"messages": USER, "temperature": 1e-9}, "temperature"),  # logits divided by it overflow: 0 means greedy
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"messages": USER, "stop": [""]}, "stop"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(served, body, param):
    response = post(served, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error["param"] == param and error["type"] == "invalid_request_error" and param.split("[")[0] in error["message"]
    )


def test_a_failed_generation_is_an_openai_error_not_a_bare_500(served, monkeypatch):
    """A reply that fails after it started (here: sampling raises) answers a non-streamed request with a 500 in
    OpenAI's error format, and a streamed one with an error event; the server goes on serving."""
    import streamchat.batching

    def broken(jobs, logits):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(streamchat.batching, "sample_rows", broken)
    response = post(served, {"messages": USER, "max_tokens": 5})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "sampling broke" in error["message"]
    streamed = post(served, {"messages": [{"role": "user", "content": "Another one"}], "max_tokens": 5, "stream": True})
    assert streamed.status_code == 200 and "sampling broke" in streamed.text
    monkeypatch.undo()
    assert post(served, {"messages": [{"role": "user", "content": "And now?"}], "max_tokens": 3}).status_code == 200


def test_bad_json_auth_size_and_overload(served):
    assert post(served, None, raw=b"{not json").status_code == 400
    assert post(served, {"messages": USER}, key=None).status_code == 401
    assert post(served, {"messages": USER}, key="wrong").json()["error"]["type"] == "authentication_error"
    assert httpx.get(served.url + "/v1/models").status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    assert post(served, {"messages": [{"role": "user", "content": "x" * 70_000}]}).status_code == 413
    turns = [served.engine.open_turn(TurnRequest([{"role": "user", "content": f"hold {i}"}])) for i in range(4)]
    response = post(served, {"messages": USER})
    assert response.status_code in (429, 503) and response.headers["retry-after"] == "1"
    with pytest.raises(Overloaded):
        served.engine.open_turn(TurnRequest(USER))
    for turn in turns:  # consuming a turn releases its slot
        "".join(turn.run(threading.Event()))
    assert post(served, {"messages": USER}).status_code == 200


def test_stop_strings_and_explicit_conversation_id(served, tiny):
    api = client(served)
    full, _, _ = ask(api, USER, stream=False, max_tokens=12)
    stop = full[3:5]
    cut, extension, finish = ask(api, USER, stream=True, max_tokens=12, stop=[stop])
    assert cut == full[: full.index(stop)] and finish == "stop"
    response = post(served, {"messages": USER, "conversation_id": "mine"})
    assert response.json()["streamchat"]["conversation_id"] == "mine"
    again = post(served, {"messages": [{"role": "user", "content": "Go on."}], "conversation_id": "mine"})
    assert again.json()["streamchat"]["seen_tokens"] > response.json()["streamchat"]["seen_tokens"]
    # the whole history resent under the id, as the client holds it: the cache goes on
    history = [
        *USER,
        {"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": again.json()["choices"][0]["message"]["content"]},
    ]
    third = post(served, {"messages": [*history, {"role": "user", "content": "And then?"}], "conversation_id": "mine"})
    assert third.json()["streamchat"]["seen_tokens"] > again.json()["streamchat"]["seen_tokens"]
    assert served.engine.conversations["mine"].session.turns == 3  # continued, not started again
    # an edited earlier message under the same id: the conversation starts again from what was sent
    edited = [{"role": "user", "content": "Something else entirely."}, *history[1:]]
    restarted = post(
        served, {"messages": [*edited, {"role": "user", "content": "And then?"}], "conversation_id": "mine"}
    )
    assert restarted.json()["streamchat"]["conversation_id"] == "mine"
    session = served.engine.conversations["mine"].session
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["Something else entirely.", "Go on.", "And then?"]  # not "Hello", Go on, And then?, And then?


def test_client_disconnect_stops_generation_and_keeps_the_conversation(tiny):
    from test_ui_api import endless_talker

    loaded = endless_talker()
    settings = load_settings(None, {**SETTINGS, "max_new_tokens": 100_000})
    engine = Engine(loaded, settings, max_sessions=2, prefill_piece=16)
    with BackgroundServer(create_app(engine, "tiny-llama")) as server:
        body = {"messages": [{"role": "user", "content": "Hello there!"}], "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            texts = 0
            for line in response.iter_lines():  # the role chunk, then text: decoding has started
                texts += '"content": ""' not in line and '"content"' in line
                if texts == 2:
                    break
        conversation = next(iter(engine.conversations.values()))
        for _ in range(200):  # bounded: 10 s
            if not conversation.busy:
                break
            time.sleep(0.05)
        assert not conversation.busy
        session = conversation.session
        assert session.last_turn.stop_reason == "stopped" and session.last_turn.new_tokens < 100_000
        assert session.messages[-1]["role"] == "assistant"
        # the conversation goes on: an explicit id continues it, consistently
        reply = httpx.post(
            server.url + "/v1/chat/completions",
            timeout=30,
            json={
                "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": 5,
                "conversation_id": conversation.id,
            },
        ).json()
        assert reply["streamchat"]["conversation_id"] == conversation.id
        assert reply["usage"]["completion_tokens"] == 5
    engine.close()


def test_curl_style_sse_lines(served):
    body = {"messages": USER, "stream": True, "max_tokens": 4}
    with httpx.stream(
        "POST", served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "streamchat" in chunks[-1]


def test_security_warning():
    assert security_warning("127.0.0.1", None) is None
    assert security_warning("0.0.0.0", "key") is None
    assert "without an API key" in security_warning("0.0.0.0", None)


def test_greedy_batched_equals_alone_on_the_real_model(embedded):
    settings = load_settings(None, {"temperature": 0, "max_new_tokens": 24, "window": 252})
    engine = Engine(embedded, settings, max_sessions=4)
    prompts = ["Name three colors.", "What is the capital of France?", "Write a haiku about rain.", "Count to five."]
    try:

        def run(text: str) -> str:
            return "".join(engine.open_turn(TurnRequest([{"role": "user", "content": text}])).run(threading.Event()))

        alone = [run(text) for text in prompts]
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, run(prompts[i]))) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [together[i] for i in range(4)] == alone
        assert engine.batched_steps > 0
    finally:
        engine.close()


def test_loadtest_level_against_a_tiny_server(served):
    """One load level, bounded, through the real openai client (the command itself loads the real model)."""
    from streamchat.evaluate.loadtest import percentile, run_level

    row = run_level(served.url + "/v1", "tiny-llama", clients=2, requests=1, tokens=4, deadline_s=60, api_key=KEY)
    assert row["failures"] == 0 and row["clients"] == 2
    assert 2 <= row["completion_tokens"] <= 8 and row["aggregate_tok_s"] > 0
    sampled = run_level(
        served.url + "/v1", "tiny-llama", clients=1, requests=1, tokens=4, deadline_s=60, api_key=KEY, temperature=0.7
    )
    assert sampled["failures"] == 0 and 1 <= sampled["completion_tokens"] <= 4
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 95) == 4.0
    pasted = run_level(
        served.url + "/v1", "tiny-llama", clients=1, requests=1, tokens=4, deadline_s=60, api_key=KEY, paste_words=60
    )
    assert pasted["failures"] == 0 and 1 <= pasted["completion_tokens"] <= 4


def test_loadtest_paste_puts_prose_before_each_clients_request():
    """--paste-words: each client's request after that many words of the shipped prose, from its own place."""
    from streamchat.evaluate.loadtest import PROMPTS, prompt_for

    assert prompt_for(2) == PROMPTS[2]
    first, second = prompt_for(0, 120), prompt_for(1, 120)
    assert first.endswith("\n\n" + PROMPTS[0]) and second.endswith("\n\n" + PROMPTS[1])
    assert len(first.split("\n\n")[0].split()) == 120 and first.split()[:5] != second.split()[:5]


def test_ui_tabs_reply_through_the_engine(tiny):
    from streamchat.batching import EngineSession
    from streamchat.frontends.web import ChatApp

    settings = load_settings(None, SETTINGS)
    engine = Engine(tiny, settings, max_sessions=2)
    try:
        app = ChatApp(tiny, settings, max_sessions=2, engine=engine)
        first, _ = app.sessions.get("tab-1")
        second, _ = app.sessions.get("tab-2")
        assert isinstance(first.chat, EngineSession) and first.chat is not second.chat
        replies = {}
        threads = [
            threading.Thread(target=lambda s=s, k=k: replies.__setitem__(k, "".join(s.chat.send(PROMPTS[k]))))
            for k, s in enumerate((first, second))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert [replies[0], replies[1]] == [reference_replies(tiny, settings, [PROMPTS[k]])[0] for k in range(2)]
    finally:
        engine.close()


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_attention_score_policies_through_the_engine(tiny, policy, weights):
    """H2O/TOVA read each step's attention scores: on the native whole step (int4 weights) the kernel writes them and
    their conversations may batch; where it does not run (int8 here) they decode singly. Same replies as alone."""
    settings = load_settings(None, {**SETTINGS, "policy": policy, "heavy": 24, "recent": 24, "decode_weights": weights})
    engine = Engine(tiny, settings, max_sessions=2, prefill_piece=16)
    try:
        replies: dict[int, str] = {}

        def run(i: int) -> None:
            turn = engine.open_turn(TurnRequest([{"role": "user", "content": PROMPTS[i] * 2}]))
            replies[i] = "".join(turn.run(threading.Event()))
            replies[i + 10] = turn.result.extension["policy"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert [replies[0], replies[1]] == [reference_replies(tiny, settings, [PROMPTS[i] * 2])[0] for i in range(2)]
        assert replies[10] == policy and (weights == "int4" or engine.batched_steps == 0)
    finally:
        engine.close()
