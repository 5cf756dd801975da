import itertools
import json

import pytest
from streamchat.prompts import DEFAULT_TURNS, PromptsError, endless_turns, load_turns


def test_default_turns_when_no_file():
    assert load_turns(None) == list(DEFAULT_TURNS)
    assert len(DEFAULT_TURNS) >= 5


def test_plain_lines_skip_blank_lines(tmp_path):
    path = tmp_path / "turns.txt"
    path.write_text("first question\n\n  second question  \n")
    assert load_turns(path) == ["first question", "second question"]


def test_jsonl_turns_lists_are_flattened(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"question_id": 1, "turns": ["a?", "b?"]}, {"turns": ["c?"]}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert load_turns(path) == ["a?", "b?", "c?"]


def test_json_lines_detected_without_jsonl_suffix(tmp_path):
    path = tmp_path / "script.txt"
    path.write_text('{"turns": ["x", "y"]}\n')
    assert load_turns(path) == ["x", "y"]


def test_endless_turns_cycle_forever(tmp_path):
    path = tmp_path / "turns.txt"
    path.write_text("one\ntwo\n")
    assert list(itertools.islice(endless_turns(path), 5)) == ["one", "two", "one", "two", "one"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no user turns"),
        ("\n  \n", "no user turns"),
        ('{"turns": [1]}\n', '"turns" list'),
        ('{"turns": ["ok"]}\n{broken\n', ":2: invalid JSON"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PromptsError, match=message):
        load_turns(path)


def test_missing_file_raises_at_once(tmp_path):
    with pytest.raises(PromptsError, match="not found"):
        endless_turns(tmp_path / "nope.txt")
