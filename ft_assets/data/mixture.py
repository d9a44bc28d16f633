"""Multi-task mixtures: the training split drawn from several tasks in set proportions.

`mix` is a pure function of (rows per task, weights, seed, size):

1. quotas: each task gets `size * w / sum(w)` rows, rounded by largest remainder so the quotas
   add up to `size` exactly (every count is within one row of its exact share);
2. draw: a task's rows are taken in a seeded random order; a quota larger than the task
   (upsampling) walks through further seeded orders, so every row repeats equally often (+-1);
   a smaller quota (downsampling) is a seeded subset without repeats;
3. order: the drawn rows are shuffled together (seeded), so batches mix the tasks.

Nothing here knows about training; `data.rows.build_sft_dataset` calls it when datasets have
weights, and the training loop sees an ordinary list of examples.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def quotas(weights: dict[str, float], size: int) -> dict[str, int]:
    """Rows per task: proportional to the weights, summing to `size` (largest remainder)."""
    if size < 0:
        raise ValueError(f"mixture size must be >= 0, got {size}")
    total = sum(weights.values())
    if not weights or total <= 0 or any(w <= 0 for w in weights.values()):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    exact = {t: size * w / total for t, w in weights.items()}
    counts = {t: int(x) for t, x in exact.items()}
    left = size - sum(counts.values())
    # ties broken by task name so the result never depends on dict order
    for t in sorted(exact, key=lambda t: (-(exact[t] - counts[t]), t))[:left]:
        counts[t] += 1
    return counts


def draw(rows: Sequence[T], n: int, seed: int, task: str) -> list[T]:
    """`n` rows of one task: seeded permutations, one after another (repeats only when n > len)."""
    if n and len(rows) == 0:
        raise ValueError(f"task {task!r} has no training rows but a positive mixture weight")
    out: list[T] = []
    cycle = 0
    while len(out) < n:
        order = list(range(len(rows)))
        random.Random(f"{seed}:{task}:{cycle}").shuffle(order)
        out += [rows[i] for i in order[: n - len(out)]]
        cycle += 1
    return out


def mix(rows_by_task: dict[str, Sequence[T]], weights: dict[str, float], seed: int,
        size: int | None = None) -> tuple[list[T], dict[str, int]]:
    """The mixed training rows and how many came from each task. `size` defaults to the total
    number of rows (the mixture reshapes the proportions, not the epoch length)."""
    missing = sorted(set(rows_by_task) ^ set(weights))
    if missing:
        raise ValueError(f"tasks and weights differ: {missing}")
    size = sum(len(r) for r in rows_by_task.values()) if size is None else size
    counts = quotas(weights, size)
    mixed: list[T] = []
    for task in sorted(rows_by_task):
        mixed += draw(rows_by_task[task], counts[task], seed, task)
    random.Random(f"{seed}:mixture").shuffle(mixed)
    return mixed, counts
