"""find_stragglers: ranks slower than the median by more than a threshold (pure function)."""

import math
import random

import pytest

from gigatron.cluster.monitor.stragglers import find_stragglers, straggler_counts


def test_one_slow_rank_among_many():
    rng = random.Random(1)
    times = [1.0 + rng.gauss(0, 0.01) for _ in range(64)]
    times[17] = 1.2
    assert find_stragglers(times, 0.10) == [17]
    assert find_stragglers(times, 0.25) == []  # 20% slower is not 25% slower


def test_threshold_is_relative_to_the_median_not_the_mean():
    times = [1.0] * 7 + [100.0]  # one huge outlier drags the mean, not the median
    assert find_stragglers(times, 0.5) == [7]
    times = [1.0, 1.0, 1.0, 1.1, 1.100001]
    assert find_stragglers(times, 0.1) == [4]  # strictly more than median * (1 + threshold)


def test_several_stragglers_and_ordering():
    times = [2.0, 1.0, 1.0, 1.5, 1.0, 1.0, 3.0]
    assert find_stragglers(times, 0.2) == [0, 3, 6]


def test_degenerate_inputs():
    assert find_stragglers([], 0.1) == []
    assert find_stragglers([1.0, 5.0], 0.1) == []  # no majority to compare with
    assert find_stragglers([1.0, 1.0, math.nan, 1.0, 9.0], 0.1) == [4]  # NaN ignored, never flagged
    assert find_stragglers([1.0, -1.0, 1.0, 1.0, 2.0], 0.1) == [4]
    assert find_stragglers([0.0, 0.0, 0.0], 0.1) == []
    with pytest.raises(ValueError):
        find_stragglers([1.0, 1.0, 1.0], -0.1)


def test_history_counts_per_rank_times_and_trainer_lists():
    records = [{"step_time_per_rank": [1.0, 1.0, 1.5, 1.0]}, {"step_time_per_rank": [1.0, 1.0, 1.4, 1.0]},
               {"stragglers": [1]}, {"loss": 1.0}]
    assert straggler_counts(records, 0.1) == {2: 2, 1: 1}


def test_ranks_are_compared_within_their_pipeline_stage():
    """The last stage (output layer and loss) is slower by design: compared with its own peers, it
    is not a straggler; a slow rank inside a stage still is. Records without stages: one group."""
    from gigatron.cluster.monitor.stragglers import find_stragglers_in_groups, per_rank_times

    times = [1.0, 1.0, 1.0, 1.02, 1.5, 1.5, 1.52, 2.4]  # stage 0: ranks 0-3, stage 1: ranks 4-7
    stages = [0, 0, 0, 0, 1, 1, 1, 1]
    assert find_stragglers(times, 0.10) == [4, 5, 6, 7]  # all of stage 1 against the global median
    assert find_stragglers_in_groups(times, stages, 0.10) == [7]
    assert find_stragglers_in_groups(times, None, 0.10) == find_stragglers(times, 0.10)
    record = {"compute_time_per_rank": times, "pipeline_stage_per_rank": stages, "step_time_per_rank": [1.0] * 8}
    assert per_rank_times(record) == (times, stages)  # compute times win over step times
    assert straggler_counts([record], 0.10) == {7: 1}
    assert per_rank_times({"loss": 1.0}) is None
