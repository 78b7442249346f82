"""References: ``NAME@3`` (a version), ``NAME@production`` (an alias), ``NAME`` (the latest)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from portfolio.errors import InvalidReference

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a name and a selector (int version, alias name, or None)."""

    name: str
    selector: int | str | None

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def check_name(name: str, what: str = "name") -> str:
    """Validate a name for an adapter, base, dataset or alias."""
    if not NAME_RE.match(name or ""):
        raise InvalidReference(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' "
            "(up to 200, starting with a letter or digit)"
        )
    return name


def parse_ref(text: str) -> Ref:
    """Parse ``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS``."""
    name, sep, selector = text.partition("@")
    if not name or (sep and not selector):
        raise InvalidReference(f"invalid reference {text!r}: write NAME, NAME@VERSION or NAME@ALIAS")
    check_name(name)
    if not sep:
        return Ref(name, None)
    if selector.isdigit():
        version = int(selector)
        if version < 1:
            raise InvalidReference(f"invalid reference {text!r}: versions start at 1")
        return Ref(name, version)
    check_name(selector, "alias")
    return Ref(name, selector)
