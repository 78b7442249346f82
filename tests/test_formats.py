import io
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
    records = []
    parsed, got = formats.parse_files([write_jsonl("d.jsonl", rows)], records.append)
    assert got == fmt and parsed[0].n_rows == len(rows)
    assert records == rows


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
    records = []
    parsed, fmt = formats.parse_files([a, b], records.append)
    assert fmt == "text" and [p.n_rows for p in parsed] == [1, 1]
    assert records == [{"text": "first doc\nline two\n"}, {"text": "second"}]


def test_rows_keep_stable_ids_and_hashes(write_jsonl):
    out = io.BytesIO()
    formats.parse_files([write_jsonl("d.jsonl", [{"text": "a"}, {"text": "b"}])], formats.RowWriter(out))
    rows = formats.read_rows(out.getvalue())
    assert [r["row"] for r in rows] == [0, 1]
    assert rows[1]["sha"] == formats.row_sha({"text": "b"})
    assert rows[0]["data"] == {"text": "a"}


def test_non_utf8_is_refused_with_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidDataset, match="line 2: not UTF-8"):
        formats.parse_files([path])


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\x0b", "\x1c"], ids=["LS", "PS", "NEL", "VT", "FS"])
def test_unicode_line_breaks_inside_records_are_text(tmp_path, char):
    """JSON allows U+2028 and friends inside strings; only \\n ends a line, in the input and
    in the stored rows, so such a record is accepted and reads back whole."""
    jsonl, txt = tmp_path / "d.jsonl", tmp_path / "d.txt"
    jsonl.write_text(json.dumps({"text": f"a{char}b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    txt.write_text(f"one{char}document", encoding="utf-8")
    for path, record in ((jsonl, {"text": f"a{char}b"}), (txt, {"text": f"one{char}document"})):
        out = io.BytesIO()
        formats.parse_files([path], formats.RowWriter(out))
        assert [r["data"] for r in formats.read_rows(out.getvalue())] == [record]


@pytest.mark.parametrize("line, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"text": "\\ud800"}', "lone surrogate"),
], ids=["deep-nesting", "lone-surrogate"])
def test_hostile_lines_are_refused_with_their_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(InvalidDataset, match=f"line 2: .*{message}"):
        formats.parse_files([path])


def test_a_large_file_is_streamed(tmp_path):
    """Parsing holds one line at a time: peak memory stays far below the file's size."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * 1000}) + "\n"
    path.write_text(line * 20_000)  # 20 MB
    tracemalloc.start()
    parsed, _ = formats.parse_files([path], formats.RowWriter(io.BufferedWriter(io.FileIO(tmp_path / "rows", "w"))))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert parsed[0].n_rows == 20_000
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB for a 20 MB file"
