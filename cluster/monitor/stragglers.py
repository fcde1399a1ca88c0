"""Which ranks are slow: a pure function the trainer calls on gathered per-rank compute times.

A rank is a straggler when its compute time (collective waits excluded, so that waiting on a
slow peer does not make a fast rank look slow) exceeds the median over ranks by more than
`threshold` as a fraction of the median:

    straggler(r)  <=>  t_r > median(t) * (1 + threshold)

The median, not the mean, so that one very slow rank does not raise the bar it is measured
against. With fewer than 3 ranks there is no majority to compare with and nothing is flagged.
Ranks are compared with peers doing the same work: under pipeline parallelism, the ranks of the
same stage (`find_stragglers_in_groups`; the first and last stages hold the embedding and the
loss). The trainer (core/monitoring.py) and `gigatron status` apply the same rule to the same
record: `compute_time_per_rank` with `pipeline_stage_per_rank` (or, in older runs and the
generated fixtures, `step_time_per_rank`).
"""

from __future__ import annotations

import math
from statistics import median


def find_stragglers(times_per_rank: list[float], threshold: float) -> list[int]:
    """Ranks (indices into `times_per_rank`) slower than the median by more than `threshold`.

    Non-finite or negative times (a rank that reported nothing) are ignored for the median and
    never flagged. Raises ValueError for a negative threshold."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    valid = [(r, t) for r, t in enumerate(times_per_rank)
             if isinstance(t, (int, float)) and math.isfinite(t) and t >= 0]
    if len(valid) < 3:
        return []
    middle = median(t for _, t in valid)
    if middle <= 0:
        return []
    bar = middle * (1 + threshold)
    return [r for r, t in valid if t > bar]


def find_stragglers_in_groups(times_per_rank: list[float], groups: list[int] | None, threshold: float) -> list[int]:
    """find_stragglers within each group of peers (groups[r]: rank r's pipeline stage; None: one
    group): the flagged ranks, sorted."""
    if not groups or len(groups) != len(times_per_rank):
        return find_stragglers(times_per_rank, threshold)
    flagged = []
    for group in sorted(set(groups)):
        peers = [r for r, g in enumerate(groups) if g == group]
        flagged += [peers[i] for i in find_stragglers([times_per_rank[r] for r in peers], threshold)]
    return sorted(flagged)


def per_rank_times(record: dict) -> tuple[list, list | None] | None:
    """(times, groups) of a metrics record: the trainer's compute times and pipeline stages, else
    `step_time_per_rank` (one group); None when the record has no per-rank times."""
    times = record.get("compute_time_per_rank")
    if isinstance(times, list) and times:
        groups = record.get("pipeline_stage_per_rank")
        return times, groups if isinstance(groups, list) else None
    times = record.get("step_time_per_rank")
    if isinstance(times, list) and times:
        return times, None
    return None


def straggler_counts(records: list[dict], threshold: float) -> dict[int, int]:
    """rank -> how many of the records' per-rank time lists flag it (history of a run), also
    counting the trainer's own `stragglers` lists where no per-rank times were logged."""
    counts: dict[int, int] = {}
    for record in records:
        found = per_rank_times(record)
        if found is not None:
            flagged = find_stragglers_in_groups(found[0], found[1], threshold)
        else:
            flagged = [r for r in record.get("stragglers") or [] if isinstance(r, int)]
        for r in flagged:
            counts[r] = counts.get(r, 0) + 1
    return counts
