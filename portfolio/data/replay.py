"""The replay buffer: a seeded reservoir sample of earlier training rows."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def reservoir_sample(items: Iterable[T], k: int, seed: int) -> list[T]:
    """Algorithm R: a uniform sample of ``k`` items from a stream of unknown length, the
    same for the same seed and the same stream; returned in stream order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < k:
            reservoir.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < k:
                reservoir[j] = (i, item)
    return [item for _, item in sorted(reservoir, key=lambda pair: pair[0])]


def replay_counts(steps: int, batch_size: int, ratio: float) -> Iterator[int]:
    """How many replay sequences go into each batch so that, over the run, exactly
    ``floor(ratio · batch_size · steps)`` of the sequences are replay — spread evenly, so a
    ratio of 5% with batches of 8 still replays (one sequence every 2–3 steps). Yielded one
    step at a time (a run of many steps never holds the list)."""
    done = 0
    for step in range(steps):
        target = int(ratio * batch_size * (step + 1) + 1e-9)
        count = min(target - done, batch_size - 1) if ratio > 0 else 0
        done += count
        yield count
