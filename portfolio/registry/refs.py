"""References: ``NAME@3`` (a version), ``NAME@production`` (an alias), ``NAME`` (the latest)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from portfolio.errors import InvalidReference

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,199}")
VERSION_RE = re.compile(r"[0-9]+")
MAX_VERSION = 2**31 - 1
ALIAS_MAX = 100  # the alias columns are VARCHAR(100)  # the INTEGER column that holds version numbers


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a name and a selector (int version, alias name, or None)."""

    name: str
    selector: int | str | None

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def check_name(name: str, what: str = "name", max_len: int = 200) -> str:
    """Validate a name for an adapter, base, dataset or alias: ASCII letters, digits,
    ``.``, ``_``, ``-``, starting with a letter or digit, at most ``max_len`` long."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > max_len:
        raise InvalidReference(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' "
            f"(up to {max_len}, starting with a letter or digit)"
        )
    return name


def check_length(value: str | None, limit: int, what: str) -> str | None:
    """Refuse text longer than the column that stores it."""
    if value is not None and len(value) > limit:
        raise InvalidReference(f"{what} is {len(value)} characters long; the registry keeps at most {limit}")
    return value


def parse_ref(text: str) -> Ref:
    """Parse ``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS``."""
    name, sep, selector = text.partition("@")
    if not name or (sep and not selector):
        raise InvalidReference(f"invalid reference {text!r}: write NAME, NAME@VERSION or NAME@ALIAS")
    check_name(name)
    if not sep:
        return Ref(name, None)
    if VERSION_RE.fullmatch(selector):
        version = int(selector)
        if not 1 <= version <= MAX_VERSION:
            raise InvalidReference(f"invalid reference {text!r}: versions run from 1 to {MAX_VERSION}")
        return Ref(name, version)
    check_name(selector, "alias", ALIAS_MAX)
    return Ref(name, selector)
