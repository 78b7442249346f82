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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfolio.errors import InvalidDataset

FORMATS = ("text", "prompt_completion", "messages")
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class ParsedFile:
    """One input file: its bytes' digest and the records it holds."""

    path: Path
    sha256: str
    size: int
    records: list[dict[str, Any]]


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


def parse_file(path: str | os.PathLike) -> tuple[ParsedFile, str]:
    """Read and validate one file; return it with its format."""
    path = Path(path)
    if not path.is_file():
        raise InvalidDataset(f"{path}: no such file; give the path of a .jsonl or .txt file")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidDataset(f"{path} line {line}: not UTF-8 text; re-encode the file as UTF-8") from None
    if path.suffix.lower() == ".txt":
        if not text.strip():
            raise InvalidDataset(f"{path}: the file is empty; a .txt file is one document")
        return ParsedFile(path, digest, len(raw), [{"text": text}]), "text"
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise InvalidDataset(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .jsonl or .txt"
        )
    records: list[dict[str, Any]] = []
    fmt: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidDataset(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        this = _check_record(record, where)
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise InvalidDataset(
                f"{where}: a {this} row in a file of {fmt} rows; keep one format per snapshot"
            )
        records.append(record)
    if not records:
        raise InvalidDataset(f"{path}: no rows; the file is empty")
    return ParsedFile(path, digest, len(raw), records), fmt  # type: ignore[return-value]


def parse_files(paths: list[str | os.PathLike]) -> tuple[list[ParsedFile], str]:
    """Validate several files that make one snapshot; they must share one format."""
    if not paths:
        raise InvalidDataset("no files given; pass at least one .jsonl or .txt file")
    parsed: list[ParsedFile] = []
    fmt: str | None = None
    for p in paths:
        pf, this = parse_file(p)
        if fmt is not None and this != fmt:
            raise InvalidDataset(
                f"{pf.path}: holds {this} rows but earlier files hold {fmt}; "
                "one snapshot holds one format"
            )
        fmt = this
        parsed.append(pf)
    return parsed, fmt  # type: ignore[return-value]


def snapshot_sha256(files: list[ParsedFile]) -> str:
    """The snapshot's digest: the file's sha256 for one file (equal to ``sha256sum FILE``);
    for several, the sha256 of their ``sha256sum``-style manifest in the given order."""
    if len(files) == 1:
        return files[0].sha256
    manifest = "".join(f"{f.sha256}  {f.path.name}\n" for f in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def rows_jsonl(files: list[ParsedFile]) -> bytes:
    """The snapshot's rows as stored: one JSON object per line with a stable row id,
    the row's content hash and the record itself."""
    lines = []
    row_id = 0
    for f in files:
        for record in f.records:
            lines.append(canonical_json({"row": row_id, "sha": row_sha(record), "data": record}))
            row_id += 1
    return ("\n".join(lines) + "\n").encode()


def read_rows(data: bytes) -> list[dict[str, Any]]:
    """Parse stored rows back: a list of ``{"row", "sha", "data"}``."""
    return [json.loads(line) for line in data.decode().splitlines() if line]
