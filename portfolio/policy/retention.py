"""The bounded retention set: what a candidate is checked for forgetting on, at a cost that
does not grow with the adapter's history.

An adapter's retention set holds at most ``size`` held-out rows, stratified over the
snapshots its versions were trained on (the strata). Each stratum gets an equal share of
``size`` (a stratum with fewer held-out rows gives its unused share to the others: water
filling), and within a stratum the rows with the smallest *priority* are taken, where

    priority(row) = sha256(seed ‖ row sha256)

is a seeded pseudo-random key fixed by the row's bytes. Taking the k smallest keys is a
uniform sample without replacement (bottom-k sampling, the reservoir with random keys), and
the k smallest keys of a stratum are always among its k' smallest for k < k'. So when a new
snapshot arrives and every share shrinks, the new set is computed from the stored members
and the new snapshot's rows alone — reservoir-style, without re-reading old snapshots — and
it equals the set drawn from scratch over all strata with the same seed: any decision made
on it can be replayed.

Pure functions; the registry stores the sets (`registry.retention`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

DEFAULT_RETENTION_SIZE = 256
DEFAULT_RETENTION_SEED = 0
MAX_RETENTION_SIZE = 100_000


def priority(seed: int, row_sha: str) -> str:
    """The row's sampling key under ``seed`` (hex; smaller = taken first)."""
    return hashlib.sha256(f"{seed}:{row_sha}".encode()).hexdigest()[:16]


def quotas(available: dict[Hashable, int], size: int) -> dict[Hashable, int]:
    """Rows per stratum: equal shares of ``size`` (the remainder to the strata listed last),
    each capped at what the stratum holds, the unused share spread over the others."""
    out = {}
    remaining = size
    # strata that cannot fill a share go first, so what they leave over is shared out
    order = sorted(available, key=lambda k: available[k])
    for i, key in enumerate(order):
        share = remaining // (len(order) - i)
        out[key] = min(available[key], share)
        remaining -= out[key]
    return {key: out[key] for key in available}


@dataclass(frozen=True)
class Member:
    """One row of a retention set."""

    stratum: Hashable  # a snapshot id
    row: int
    priority: str


def draw(strata: dict[Hashable, Sequence[tuple[int, str]]], size: int, seed: int) -> list[Member]:
    """The retention set over ``strata`` (stratum -> its held-out ``(row id, row sha)``),
    from scratch."""
    ranked = {s: sorted((priority(seed, sha), row) for row, sha in rows) for s, rows in strata.items()}
    want = quotas({s: len(r) for s, r in ranked.items()}, size)
    return [Member(s, row, key) for s, r in ranked.items() for key, row in r[: want[s]]]


def extend(members: list[Member], strata: list[Hashable], counts: dict[Hashable, int], new: dict[Hashable, Sequence[tuple[int, str]]],
           size: int, seed: int, reread: Callable[[Hashable], Sequence[tuple[int, str]]]) -> list[Member]:
    """The set after adding the strata in ``new`` (stratum -> held-out rows) to a set over
    ``strata``, whose held-out row counts are ``counts``. Old strata keep the prefix of their
    members that their smaller share allows; ``reread`` (stratum -> its rows) is called only
    for a stratum whose share grew beyond what is stored (possible only when ``size`` grew)."""
    ranked: dict[Hashable, list[tuple[str, int]]] = {s: [] for s in strata}
    for m in members:
        ranked[m.stratum].append((m.priority, m.row))
    for s in ranked:
        ranked[s].sort()
    for s, rows in new.items():
        ranked[s] = sorted((priority(seed, sha), row) for row, sha in rows)
    available = {**{s: counts[s] for s in strata}, **{s: len(r) for s, r in new.items()}}
    want = quotas(available, size)
    out = []
    for s, r in ranked.items():
        if want[s] > len(r):
            r = sorted((priority(seed, sha), row) for row, sha in reread(s))
        out += [Member(s, row, key) for key, row in r[: want[s]]]
    return out
