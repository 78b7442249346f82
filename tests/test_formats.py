import json

import pytest

from portfolio.data import formats
from portfolio.errors import InvalidDataset


@pytest.mark.parametrize(
    "rows, fmt",
    [
        ([{"text": "a"}, {"text": "b"}], "text"),
        ([{"prompt": "q", "completion": "a"}], "prompt_completion"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}], "messages"),
    ],
    ids=["text", "prompt-completion", "chat"],
)
def test_accepted_formats(write_jsonl, rows, fmt):
    parsed, got = formats.parse_files([write_jsonl("d.jsonl", rows)])
    assert got == fmt
    assert parsed[0].records == rows


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', "{not json"], "line 2: not valid JSON"),
        (['{"text": "ok"}', '{"body": "x"}'], "line 2: no 'text'"),
        (['{"text": ""}'], "line 1: 'text' must be a non-empty string"),
        (['{"prompt": "q"}'], "line 1: 'completion' must be a string"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "line 1: messages[0] has role 'robot'"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], "line 1: 'messages' has no assistant turn"),
        (['{"text": "a"}', '{"prompt": "q", "completion": "a"}'], "line 2: a prompt_completion row in a file of text rows"),
        (["", "  "], "no rows"),
        (['[1, 2]'], "line 1: no 'text'"),
    ],
    ids=["bad-json", "unknown-fields", "empty-text", "half-prompt", "bad-role", "no-assistant", "mixed", "empty", "not-object"],
)
def test_bad_lines_are_named(write_jsonl, lines, message):
    path = write_jsonl("bad.jsonl", lines)
    with pytest.raises(InvalidDataset, match=message.replace("[", r"\[").replace("]", r"\]")):
        formats.parse_files([path])


def test_text_files_are_one_document_each(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first doc\nline two\n")
    b.write_text("second")
    parsed, fmt = formats.parse_files([a, b])
    assert fmt == "text" and [p.records for p in parsed] == [[{"text": "first doc\nline two\n"}], [{"text": "second"}]]


def test_rows_keep_stable_ids_and_hashes(write_jsonl):
    parsed, _ = formats.parse_files([write_jsonl("d.jsonl", [{"text": "a"}, {"text": "b"}])])
    rows = formats.read_rows(formats.rows_jsonl(parsed))
    assert [r["row"] for r in rows] == [0, 1]
    assert rows[1]["sha"] == formats.row_sha({"text": "b"})
    assert rows[0]["data"] == {"text": "a"}


def test_non_utf8_is_refused_with_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidDataset, match="line 2: not UTF-8"):
        formats.parse_files([path])
