"""Behavioural suite files: one case per JSONL line, validated before anything is stored.

A case::

    {"id": "schema-1", "prompt": "Return the user as JSON", "slice": {"risk": "low", "format": "json"},
     "critical": false, "checks": [{"kind": "json_schema", "schema": {"type": "object", "required": ["name"]}}]}

``prompt`` (a string) or ``messages`` (chat turns ending with a user turn) is what the model
answers; ``slice`` labels group cases for per-slice release criteria; a ``critical`` case must
pass for any promotion gated on the suite. An optional first line ``{"suite": {...}}`` sets
suite-wide options: ``refusal_patterns`` (replacing the default list, `checks.REFUSAL_PATTERNS`)
and ``max_new_tokens`` (default 64). Check kinds are listed in `checks.CHECKS`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portfolio.errors import PortfolioError
from portfolio.registry.refs import NAME_RE
from portfolio.suites.checks import CHECKS, REFUSAL_PATTERNS

DEFAULT_MAX_NEW_TOKENS = 64
MAX_CASES = 100_000


class InvalidSuite(PortfolioError, ValueError):
    """A suite file has a malformed line, an unknown check or an invalid schema or regex."""


@dataclass(frozen=True)
class Case:
    """One behavioural case."""

    id: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    slice: dict[str, str]
    critical: bool
    checks: list[dict[str, Any]]

    @property
    def generates(self) -> bool:
        """Whether the case needs a generated answer (every check but ``choice`` does)."""
        return any(c["kind"] != "choice" for c in self.checks)

    def chat(self) -> list[dict[str, str]]:
        """The conversation sent to the model."""
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt or ""}]


@dataclass(frozen=True)
class Suite:
    """A parsed suite: its cases and options."""

    cases: list[Case]
    refusal_patterns: list[str] = field(default_factory=lambda: list(REFUSAL_PATTERNS))
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @property
    def slices(self) -> list[str]:
        """Every ``key=value`` slice label used, sorted."""
        return sorted({f"{k}={v}" for c in self.cases for k, v in c.slice.items()})


def _fail(where: str, message: str) -> InvalidSuite:
    return InvalidSuite(f"{where}: {message}")


def _check_options(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) - {"refusal_patterns", "max_new_tokens"}:
        raise _fail(where, "the suite options line takes only 'refusal_patterns' and 'max_new_tokens'")
    patterns = raw.get("refusal_patterns", list(REFUSAL_PATTERNS))
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise _fail(where, "'refusal_patterns' must be a non-empty list of regexes")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise _fail(where, f"refusal pattern {p!r} does not compile ({exc})") from None
    tokens = raw.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= 4096:
        raise _fail(where, f"'max_new_tokens' must be a whole number from 1 to 4096 (got {tokens!r})")
    return {"refusal_patterns": patterns, "max_new_tokens": tokens}


def _parse_case(record: Any, where: str) -> Case:
    if not isinstance(record, dict):
        raise _fail(where, f"a case must be a JSON object, not a {type(record).__name__}")
    unknown = set(record) - {"id", "prompt", "messages", "slice", "critical", "checks", "description"}
    if unknown:
        raise _fail(where, f"unknown field {sorted(unknown)[0]!r}; a case has id, prompt or messages, slice, critical, checks")
    case_id = record.get("id")
    if not isinstance(case_id, str) or not NAME_RE.fullmatch(case_id):
        raise _fail(where, f"'id' must be a name of letters, digits, '.', '_' or '-' (got {case_id!r})")
    prompt, messages = record.get("prompt"), record.get("messages")
    if (prompt is None) == (messages is None):
        raise _fail(where, "give 'prompt' (a string) or 'messages' (chat turns), one of them")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise _fail(where, "'prompt' must be a non-empty string")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise _fail(where, "'messages' must be a non-empty list of {\"role\": system|user|assistant, \"content\": str}")
        if messages[-1]["role"] != "user":
            raise _fail(where, "'messages' must end with a user turn, which the model answers")
    labels = record.get("slice", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and NAME_RE.fullmatch(k) and isinstance(v, str) and NAME_RE.fullmatch(v) for k, v in labels.items()
    ):
        raise _fail(where, "'slice' must map label names to values, both names (e.g. {\"risk\": \"high\"})")
    critical = record.get("critical", False)
    if not isinstance(critical, bool):
        raise _fail(where, "'critical' must be true or false")
    checks = record.get("checks")
    if not isinstance(checks, list) or not checks:
        raise _fail(where, "'checks' must be a non-empty list")
    parsed = []
    for i, check in enumerate(checks):
        if not isinstance(check, dict) or not isinstance(check.get("kind"), str):
            raise _fail(where, f"checks[{i}] must be an object with a 'kind'")
        spec = CHECKS.get(check["kind"])
        if spec is None:
            raise _fail(where, f"checks[{i}] has unknown kind {check['kind']!r}; use one of {', '.join(sorted(CHECKS))}")
        try:
            parsed.append(spec.validate(check))
        except ValueError as exc:
            raise _fail(where, f"checks[{i}] ({check['kind']}): {exc}") from None
    if sum(c["kind"] == "choice" for c in parsed) > 1:
        raise _fail(where, "a case holds at most one 'choice' check")
    return Case(case_id, prompt, messages, dict(labels), critical, parsed)


def parse_suite(data: bytes, name: str = "suite") -> Suite:
    """Parse and validate a suite file's bytes; the first bad line is named with its number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(f"{name} line {line}", "not UTF-8 text; re-encode the file as UTF-8") from None
    options: dict[str, Any] = {}
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(where, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise _fail(where, "JSON nested too deeply") from None
        if isinstance(record, dict) and "suite" in record and len(record) == 1:
            if cases or options:
                raise _fail(where, "the {\"suite\": ...} options line must come first")
            options = _check_options(record["suite"], where)
            continue
        case = _parse_case(record, where)
        if case.id in seen:
            raise _fail(where, f"case id {case.id!r} is used again (first on line {seen[case.id]}); ids must be unique")
        seen[case.id] = lineno
        cases.append(case)
        if len(cases) > MAX_CASES:
            raise _fail(where, f"more than {MAX_CASES} cases; split the suite")
    if not cases:
        raise InvalidSuite(f"{name}: no cases; a suite needs at least one")
    return Suite(cases, **options)


def read_suite_file(path: str | Path) -> tuple[bytes, Suite]:
    """A suite file's bytes and its parsed cases."""
    path = Path(path)
    if not path.is_file():
        raise InvalidSuite(f"{path}: no such file; give the path of a .jsonl suite file")
    data = path.read_bytes()
    return data, parse_suite(data, str(path))
