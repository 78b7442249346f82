"""Routing rules: which version answers a request, by tenant, task and risk. Pure functions;
the registry stores rule sets (`registry.routes`) and resolves their targets.

A rule maps conditions to a target version ref, usually an alias (``acme@production``) so that
the route follows promotions and rollbacks:

    when tenant=acme            -> acme@production
    when task=code              -> code@production
    when tenant=acme,risk=high  -> safe@production
    default                     -> general@production

**Precedence.** Among the rules whose every condition equals the request's value, the most
specific wins (more conditions first); among equally specific ones the higher ``priority``;
then the rule set earlier. The default rule has no conditions, so it matches everything and
loses to every other match. A request that matches no rule (and a router with no default) is
refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from portfolio.errors import PortfolioError

ROUTE_KEYS = ("tenant", "task", "risk")
VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_RULES = 1000
MAX_PRIORITY = 1_000_000


class InvalidRoute(PortfolioError, ValueError):
    """A rule or a request that cannot be routed as written."""


@dataclass(frozen=True)
class Rule:
    """Conditions (all must hold) and the version ref they send a request to."""

    to: str
    when: dict[str, str] = field(default_factory=dict)
    priority: int = 0

    @property
    def label(self) -> str:
        """``tenant=acme,risk=high``, or ``default``."""
        return ",".join(f"{k}={self.when[k]}" for k in ROUTE_KEYS if k in self.when) or "default"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for storage and --json."""
        return asdict(self)


def parse_when(text: str) -> dict[str, str]:
    """``"tenant=acme,risk=high"`` -> ``{"tenant": "acme", "risk": "high"}``."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or key not in ROUTE_KEYS:
            raise InvalidRoute(f"--when {text!r}: write KEY=VALUE[,KEY=VALUE], KEY one of {', '.join(ROUTE_KEYS)}")
        if not VALUE_RE.fullmatch(value):
            raise InvalidRoute(f"--when {text!r}: {key}={value!r} is not a valid value "
                               "(letters, digits, '.', '_', '-'; up to 100; starting with a letter or digit)")
        if key in out:
            raise InvalidRoute(f"--when {text!r}: {key} given twice")
        out[key] = value
    return out


def check_request(request: Mapping[str, str | None]) -> dict[str, str]:
    """A request's routing attributes, checked: only known keys, valid values (None = absent)."""
    unknown = [k for k in request if k not in ROUTE_KEYS]
    if unknown:
        raise InvalidRoute(f"unknown routing attribute {unknown[0]!r}; use {', '.join(ROUTE_KEYS)}")
    out = {}
    for key, value in request.items():
        if value is None or value == "":
            continue
        if not VALUE_RE.fullmatch(str(value)):
            raise InvalidRoute(f"{key}={value!r} is not a valid {key} (letters, digits, '.', '_', '-'; up to 100)")
        out[key] = str(value)
    return out


def upsert(rules: list[Rule], rule: Rule) -> list[Rule]:
    """The rule set with ``rule`` added, replacing a rule with the same conditions in place."""
    if not 0 <= abs(rule.priority) <= MAX_PRIORITY:
        raise InvalidRoute(f"--priority must be between -{MAX_PRIORITY:,} and {MAX_PRIORITY:,} (got {rule.priority})")
    out = [rule if r.when == rule.when else r for r in rules]
    if rule not in out:
        if len(rules) >= MAX_RULES:
            raise InvalidRoute(f"a router holds at most {MAX_RULES} rules")
        out.append(rule)
    return out


def without(rules: list[Rule], when: dict[str, str]) -> list[Rule]:
    """The rule set without the rule whose conditions are ``when``."""
    if not any(r.when == when for r in rules):
        label = Rule("", when).label
        raise InvalidRoute(f"no rule '{label}' in this router; see `portfolio route show`")
    return [r for r in rules if r.when != when]


def ordered(rules: list[Rule]) -> list[Rule]:
    """The rules in precedence order: most conditions, then highest priority, then oldest."""
    return [r for _, r in sorted(enumerate(rules), key=lambda ir: (-len(ir[1].when), -ir[1].priority, ir[0]))]


def match(rules: list[Rule], request: Mapping[str, str]) -> Rule | None:
    """The rule that routes ``request`` (checked attributes), or None."""
    for rule in ordered(rules):
        if all(request.get(k) == v for k, v in rule.when.items()):
            return rule
    return None
