"""The bias-correction schedule: a fixed number of passes over the data, whatever the depth."""

import pytest

from qstrat.passes.refine.schedule import MAX_PASSES, MAX_SAMPLES_PER_LEVEL, MIN_SAMPLES_PER_LEVEL, Schedule

pytestmark = pytest.mark.portable


def test_the_schedule_reads_the_data_a_fixed_number_of_times_whatever_the_depth():
    for samples in (16, 100, 128, 1000, 1024, 5000):
        for levels in (1, 5, 11, 53, 200):
            for batch in (1, 10, 32, 64):
                s = Schedule.plan(samples, levels, batch)
                assert 1 <= s.segment <= MAX_SAMPLES_PER_LEVEL
                assert s.segment * levels <= max(MAX_PASSES * samples, levels)  # never more than 3 passes' worth
                if MIN_SAMPLES_PER_LEVEL * levels <= samples:
                    assert s.passes == 1  # enough data: one pass
                    assert s.segment >= MIN_SAMPLES_PER_LEVEL
                if s.segment < MIN_SAMPLES_PER_LEVEL and levels <= samples:
                    assert s.segment * levels > (MAX_PASSES - 1) * samples  # short of data: all three passes used
                whole = s.segment // batch * batch
                if s.segment % batch:  # not whole batches: those would lose the minimum or a quarter
                    assert whole < MIN_SAMPLES_PER_LEVEL or 4 * whole < 3 * s.segment
    assert Schedule.plan(1024, 11, 32).segment == 64  # 93 samples a level would do; 64 are enough
    assert Schedule.plan(1024, 53, 32) == Schedule(53, 1024, 32)  # 38 a level in two passes: 32 in 1.7
    assert Schedule.plan(256, 5, 32).segment == 51  # 32 would drop 19 of 51 samples a level
