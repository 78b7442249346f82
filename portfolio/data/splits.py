"""The fixed held-out split of every snapshot.

A row is held out when its content hash falls in the first ``HELDOUT_FRACTION`` of the hash
space, so the decision depends on the row's bytes alone: the same rows are held out every
time, in every snapshot that contains them, and training never sees them.
"""

from __future__ import annotations

from typing import Any

HELDOUT_FRACTION = 0.1


def is_heldout(row_sha: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether a row (by its sha256 hex) belongs to the held-out split."""
    return int(row_sha[:15], 16) < fraction * 16**15


def split_rows(rows: list[dict[str, Any]], fraction: float = HELDOUT_FRACTION) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of a snapshot's stored rows (``{"row", "sha", "data"}``).

    A snapshot of two or more rows always holds at least one row out (the one with the
    smallest hash), so every snapshot can be evaluated; a single row is training data only.
    """
    heldout = [r for r in rows if is_heldout(r["sha"], fraction)]
    if not heldout and len(rows) >= 2:
        heldout = [min(rows, key=lambda r: r["sha"])]
    held = {r["row"] for r in heldout}
    return [r for r in rows if r["row"] not in held], heldout
