"""The engine's decode loop (streamchat/batching.py): replies decoded on the scheduler, sampled there (greedy rows
together), handed to the turns' threads; on the tiny model. What a reply says and what the cache holds afterwards
must be what a plain ChatSession gives, alone or batched, stopped early or not."""

from __future__ import annotations

import threading

import pytest
import torch
from streamchat import native
from streamchat.batching import Engine, sample_rows
from streamchat.config import load_settings
from streamchat.session import ChatSession
from transformers import RepetitionPenaltyLogitsProcessor

SETTINGS = {
    "sinks": 4,
    "window": 60,
    "temperature": 0,
    "max_new_tokens": 10,
    "prefill_chunk": 16,
    "decode_weights": "int8",
    "repetition_penalty": 1.3,
}
TURNS = ["Hello there! How are you today?", "Tell me a story about a dragon.", "And then?", "What is 2+2?"]


def stream(session: ChatSession) -> list[int]:
    """Every token the conversation holds: fed to the cache (the recent window) or waiting for the next turn."""
    return list(session._recent_ids) + list(session._pending)


def converse(session: ChatSession, stop_after: int | None = None) -> list[tuple[str, list[int]]]:
    """Each turn's reply and the token stream after it; with `stop_after`, each reply is stopped after that many
    text pieces (as the UI's Stop or a stop string does). Checks on the way that a turn adds to the stream exactly
    its prompt and then its reply's tokens, the last one the consumer saw last: nothing generated past it."""
    out = []
    for text in TURNS:
        before, stop, pieces = stream(session), threading.Event(), []
        for piece in session.send(text, stop):
            pieces.append(piece)
            if stop_after is not None and len(pieces) >= stop_after:
                stop.set()
        after, reply_ids = stream(session), session.last_reply_ids
        assert after[len(after) - len(reply_ids) :] == reply_ids
        if len(session._recent_ids) < session.cache.capacity:  # the window kept everything: the whole stream
            assert after[: len(before)] == before
        out.append(("".join(pieces), after))
    return out


@pytest.mark.parametrize(
    "changes",
    [{}, {"temperature": 0.8, "seed": 7}, {"repetition_penalty": 1.0}],
    ids=["greedy-penalty", "sampled-seeded", "greedy"],
)
def test_engine_replies_and_streams_equal_a_plain_session(tiny, changes):
    settings = load_settings(None, {**SETTINGS, **changes})
    expected = converse(ChatSession(tiny, settings))
    engine = Engine(tiny, settings, max_sessions=4, prefill_piece=16)
    try:
        assert converse(engine.new_session()) == expected
    finally:
        engine.close()


def test_four_batched_sessions_stopped_at_different_tokens(tiny):
    """Batched (greedy rows sampled together), each stopped after its own number of pieces: every turn adds its
    prompt and reply tokens and nothing after them (checked in `converse`); the first turn's reply and stream, and
    every turn of the conversation never stopped, are the plain session's. (After a stop, the engine may already
    have fed the reply's last token through the decode step, where a plain session feeds it in the next turn's
    prefill: the same tokens, rounded differently, so later turns are not compared token for token.)"""
    settings = load_settings(None, {**SETTINGS, "max_new_tokens": 16, "window": 200})
    stops = [None, 2, 5, 9]
    expected = [converse(ChatSession(tiny, settings), stop) for stop in stops]
    engine = Engine(tiny, settings, max_sessions=4, prefill_piece=16)
    try:
        sessions = [engine.new_session() for _ in stops]
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = converse(sessions[i], stops[i])
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stops))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert results[0] == expected[0]
        assert [results[i][0] for i in range(len(stops))] == [expected[i][0] for i in range(len(stops))]
        assert all(len(results[i][1][0]) >= 1 for i in range(1, len(stops)))  # later stopped turns replied too
        assert engine.batched_rows > engine.batched_steps > 0
    finally:
        engine.close()


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_sample_rows_choose_what_the_session_samples_alone(tiny, kernel, penalty):
    """Greedy rows sampled together (native pass or torch) pick what transformers' penalty + argmax picks per row,
    ties included (the first maximum), whatever the history lengths and repeats."""
    settings = load_settings(None, {**SETTINGS, "repetition_penalty": penalty})
    generator = torch.Generator().manual_seed(0)
    jobs, rows = [], []
    for length in (0, 1, 7, 40):
        session = ChatSession(tiny, settings)
        ids = torch.randint(0, 50, (length,), generator=generator).tolist()  # repeats on purpose
        session._recent_ids.extend(ids)
        row = torch.randn(1, tiny.model.config.vocab_size, generator=generator)
        row[0, 3] = row[0, 11] = row.max() + 1  # a tie: the first index wins
        if ids:
            row[0, ids[0]] = row.max() + 2  # a penalized favourite
        job = type("Job", (), {})()
        job.session, job.settings, job.processors = session, settings, session._logits_processors(settings)
        jobs.append(job)
        rows.append(row)
    logits = torch.cat(rows)
    expected = []
    for job, row in zip(jobs, rows):
        history = torch.tensor([list(job.session._recent_ids)], dtype=torch.int64)
        scores = RepetitionPenaltyLogitsProcessor(penalty)(history, row.clone()) if penalty != 1.0 else row
        expected.append(int(scores.argmax(dim=-1)))
    if kernel == "torch":
        with native.torch_kernels():
            assert sample_rows(jobs, logits.clone()) == expected
    else:
        assert sample_rows(jobs, logits.clone()) == expected
    assert expected[3] != 3 or penalty == 1.0  # the penalized favourite lost where a penalty applies


def test_closing_the_engine_ends_a_reply_that_is_decoding(tiny):
    settings = load_settings(None, {**SETTINGS, "max_new_tokens": 100_000})
    engine = Engine(tiny, settings, max_sessions=2, prefill_piece=16)
    session = engine.new_session()
    pieces, errors, started = [], [], threading.Event()

    def reply() -> None:
        try:
            for piece in session.send("Tell me a very long story."):
                pieces.append(piece)
                started.set()
        except RuntimeError as error:
            errors.append(str(error))
        finally:
            started.set()

    thread = threading.Thread(target=reply)
    thread.start()
    assert started.wait(60)
    engine.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors and "closed" in errors[0]
    assert not session.busy and session.last_turn is not None  # the turn ended and recorded its stats


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_prefill_pieces_ride_in_the_decode_step_and_change_no_reply(tiny, weights, monkeypatch):
    """With the native step (int4 weights), a new conversation's prefill pieces run in the same call as the other
    conversations' decode rows (chunked prefill); with the transformers forward (int8 here) they run alone between
    steps, cut the same way as when nobody decodes. Either way every reply is the one it gets alone."""
    if native.library() is None and weights == "int4":
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    settings = load_settings(
        None, {**SETTINGS, "decode_weights": weights, "max_new_tokens": 24, "repetition_penalty": 1.0}
    )
    prompts = [text * 3 for text in TURNS]  # several pieces each
    cuts: dict[int, list[int]] = {}  # first token of a prompt -> the sizes of the transformers forwards that fed it
    forward = ChatSession._forward

    def recording(session, ids):
        if len(ids) > 1:
            cuts.setdefault(session.label, []).append(len(ids))
        return forward(session, ids)

    monkeypatch.setattr(ChatSession, "_forward", recording)
    engine = Engine(tiny, settings, max_sessions=4, prefill_piece=8)
    try:
        limits = [300, 24, 24, 24]  # the first decodes long enough for the others to prefill meanwhile
        alone = []
        for text, limit in zip(prompts, limits):
            session = engine.new_session()
            alone.append("".join(session.send(text, max_new_tokens=limit)))
        assert engine.mixed_pieces == 0
        cut_alone, cuts = dict(cuts), {}
        together: dict[int, str] = {}
        decoding = threading.Event()

        def run(i: int) -> None:
            pieces = []
            for piece in engine.new_session().send(prompts[i], max_new_tokens=limits[i]):
                pieces.append(piece)
                decoding.set()
            together[i] = "".join(pieces)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        threads[0].start()
        assert decoding.wait(60)  # the first conversation decodes while the others prefill, piece by piece
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [together.get(i) for i in range(len(prompts))] == alone
        assert engine.batched_rows > engine.batched_steps
        assert (engine.mixed_pieces > 0) == (weights == "int4")
        # a prefill the transformers forward runs is cut the same way batched or alone (it rounds by chunk shape)
        assert sorted(cuts.values()) == sorted(cut_alone.values())
    finally:
        engine.close()


def test_seeded_sampled_replies_batched_equal_alone(tiny):
    """Sampled rows (temperature, top-k, top-p, repetition penalty) drawn together on the scheduler, each with its
    own session's generator: a seeded conversation replies the same batched with others or alone."""
    settings = load_settings(None, {**SETTINGS, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "max_new_tokens": 16})
    seeds = [3, 5, 7, 11]
    engine = Engine(tiny, settings, max_sessions=4, prefill_piece=16)
    try:

        def reply(i: int) -> str:
            session = engine.new_session(settings.replace(seed=seeds[i]))
            return "".join(session.send(TURNS[i]))

        alone = [reply(i) for i in range(4)]
        steps_before = engine.batched_steps
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, reply(i))) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert [together.get(i) for i in range(4)] == alone
        assert len(set(alone)) > 1  # the seeds matter
        assert engine.batched_steps > steps_before
    finally:
        engine.close()


def test_the_scheduler_decodes_on_the_engine_threads_after_turns_set_theirs(tiny):
    """A turn's thread sets torch's count to 1 for itself (it only samples); the scheduler thread's steps must keep
    the engine's count. torch hands a thread its count lazily, from whichever thread set one last: without the
    scheduler claiming its own, every step after the first turn ran on one core (ITL 9 ms instead of 5). Where the
    kernels run, the scheduler pins their count (`native.pin_threads`) and runs torch's small ops on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine(tiny, load_settings(None, SETTINGS), max_sessions=2, prefill_piece=16)
        try:
            session = engine.new_session()
            for text in TURNS[:2]:
                assert "".join(session.send(text))
                assert torch.get_num_threads() == 2  # the turn restores its caller's count
            assert engine.stats()["step_threads"] == 2
        finally:
            engine.close()
    finally:
        torch.set_num_threads(before)
