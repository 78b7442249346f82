"""Reading dataset files into validated rows.

Accepted: JSONL whose records hold ``text``, or ``prompt`` and ``completion``, or chat
``messages`` (a list of ``{"role", "content"}``); and plain ``.txt`` files, one document
each. One snapshot holds one format. Every line is checked and the first bad one is named
with its file and line number.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from portfolio.errors import InvalidDataset

FORMATS = ("text", "prompt_completion", "messages")
NEWLINE = b"\n"
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class ParsedFile:
    """One input file: its bytes' digest, size, format and how many rows it holds."""

    path: Path
    sha256: str
    size: int
    n_rows: int
    fmt: str


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_sha(record: dict[str, Any]) -> str:
    """The content hash of one row; stable across files and snapshots."""
    return hashlib.sha256(canonical_json(record).encode()).hexdigest()


def record_format(record: Any) -> str | None:
    """Which accepted format a JSON record is in, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _check_record(record: Any, where: str) -> str:
    fmt = record_format(record)
    if fmt is None:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InvalidDataset(
            f"{where}: no 'text', 'prompt'/'completion' or 'messages' field (found {keys}); "
            "each JSONL line must be one of those formats"
        )
    if fmt == "text":
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise InvalidDataset(f"{where}: 'text' must be a non-empty string")
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise InvalidDataset(
                    f"{where}: '{key}' must be a string (a prompt/completion row needs both)"
                )
        if not record["completion"].strip():
            raise InvalidDataset(f"{where}: 'completion' is empty; there is nothing to learn")
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidDataset(f"{where}: 'messages' must be a non-empty list")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise InvalidDataset(
                    f"{where}: messages[{i}] must be an object with a string 'content'"
                )
            if msg.get("role") not in CHAT_ROLES:
                raise InvalidDataset(
                    f"{where}: messages[{i}] has role {msg.get('role')!r}; "
                    f"use one of {sorted(CHAT_ROLES)}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidDataset(f"{where}: 'messages' has no assistant turn to learn from")
    return fmt


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidDataset(f"{where}: not UTF-8 text; re-encode the file as UTF-8") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_line(line: str, where: str) -> Any:
    try:
        # Python's json reads NaN and Infinity, which no other JSON reader (nor PostgreSQL's
        # JSON columns) accepts: refused anywhere in a row
        record = json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidDataset(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # from _no_constant
        raise InvalidDataset(f"{where}: {exc} (NaN and Infinity are not JSON); write null or a finite number") from None
    except RecursionError:
        raise InvalidDataset(f"{where}: JSON nested too deeply; flatten the record") from None
    try:
        canonical_json(record).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDataset(
            f"{where}: holds a lone surrogate ({exc.object[exc.start:exc.end].encode('unicode_escape').decode()}), "
            "which is not Unicode text; fix the \\u escape"
        ) from None
    except RecursionError:
        raise InvalidDataset(f"{where}: JSON nested too deeply; flatten the record") from None
    return record


def parse_file(path: str | os.PathLike, on_record: Callable[[dict[str, Any]], None] | None = None) -> ParsedFile:
    """Read and validate one file line by line (a file of any size is never held in
    memory whole, except a .txt, which is one document), hashing its bytes on the way;
    each valid record goes to ``on_record``. Lines end at ``\n`` only: U+2028, U+0085 and
    other Unicode line breaks are ordinary characters inside a record, as JSON says."""
    path = Path(path)
    if not path.is_file():
        raise InvalidDataset(f"{path}: no such file; give the path of a .jsonl or .txt file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json", ".ndjson"):
        raise InvalidDataset(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .jsonl or .txt")
    hasher = hashlib.sha256()
    size = 0
    if suffix == ".txt":
        raw = path.read_bytes()
        hasher.update(raw)
        try:
            text = raw.decode("utf-8")  # valid UTF-8 never decodes to a lone surrogate
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(NEWLINE) + 1
            raise InvalidDataset(f"{path} line {line}: not UTF-8 text; re-encode the file as UTF-8") from None
        if not text.strip():
            raise InvalidDataset(f"{path}: the file is empty; a .txt file is one document")
        if on_record is not None:
            on_record({"text": text})
        return ParsedFile(path, hasher.hexdigest(), len(raw), 1, "text")
    n_rows = 0
    fmt: str | None = None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            hasher.update(raw)
            size += len(raw)
            where = f"{path} line {lineno}"
            line = _decode(raw, where)
            if not line.strip():
                continue
            record = _parse_line(line, where)
            this = _check_record(record, where)
            if fmt is None:
                fmt = this
            elif this != fmt:
                raise InvalidDataset(f"{where}: a {this} row in a file of {fmt} rows; keep one format per snapshot")
            n_rows += 1
            if on_record is not None:
                on_record(record)
    if not n_rows:
        raise InvalidDataset(f"{path}: no rows; the file is empty")
    return ParsedFile(path, hasher.hexdigest(), size, n_rows, fmt)  # type: ignore[arg-type]


def parse_files(paths: list[str | os.PathLike], on_record: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[ParsedFile], str]:
    """Validate several files that make one snapshot; they must share one format. Records
    go to ``on_record`` in order (see `RowWriter`)."""
    if not paths:
        raise InvalidDataset("no files given; pass at least one .jsonl or .txt file")
    parsed: list[ParsedFile] = []
    fmt: str | None = None
    for p in paths:
        pf = parse_file(p, on_record)
        if fmt is not None and pf.fmt != fmt:
            raise InvalidDataset(
                f"{pf.path}: holds {pf.fmt} rows but earlier files hold {fmt}; one snapshot holds one format"
            )
        fmt = pf.fmt
        parsed.append(pf)
    return parsed, fmt  # type: ignore[return-value]


class RowWriter:
    """Writes a snapshot's rows as stored, one record at a time: one JSON object per line
    with a stable row id, the row's content hash and the record itself."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.n_rows = 0

    def __call__(self, record: dict[str, Any]) -> None:
        line = canonical_json({"row": self.n_rows, "sha": row_sha(record), "data": record})
        self.out.write(line.encode("utf-8") + b"\n")
        self.n_rows += 1


def snapshot_sha256(files: list[ParsedFile]) -> str:
    """The snapshot's digest: the file's sha256 for one file (equal to ``sha256sum FILE``);
    for several, the sha256 of their ``sha256sum``-style manifest in the given order."""
    if len(files) == 1:
        return files[0].sha256
    manifest = "".join(f"{f.sha256}  {f.path.name}\n" for f in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def read_rows(data: bytes) -> list[dict[str, Any]]:
    """Parse stored rows back: a list of ``{"row", "sha", "data"}``."""
    # split at "\n" only: stored records may hold U+2028 and friends, which splitlines() breaks on
    return [json.loads(line) for line in data.decode().split("\n") if line]
