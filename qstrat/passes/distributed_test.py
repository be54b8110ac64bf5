"""Spreading calibration's batches over devices: the grouping and the one-batch-at-a-time fallback.

The engines themselves (JAX DataParallel on 4 devices, TensorFlow MirroredStrategy on 2) run in child
processes, in `tests/distributed_test.py`, where the devices can be made before the backend starts.
"""

import numpy as np
import pytest

from qstrat.passes.distributed import Placement, Spread, placement
from qstrat.passes.runner import groups

pytestmark = pytest.mark.portable


def batches(*sizes):
    return [[np.full((n, 3), k, np.float32)] for k, n in enumerate(sizes)]


def test_groups_keep_the_order_and_the_last_one_may_be_short():
    got = list(groups(iter(batches(4, 4, 4, 4, 2)), 2))
    assert [[int(b[0][0, 0]) for b in g] for g in got] == [[0, 1], [2, 3], [4]]
    assert [len(g) for g in groups(iter(batches(4, 4)), 3)] == [2]
    assert list(groups(iter([]), 2)) == []


def test_no_distribution_means_one_device():
    assert placement() is None


class Recorder:
    """A probe that returns each batch's rows doubled and its size, and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return [batch[0] * 2, np.array(len(batch[0]))]


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_a_short_group_runs_one_batch_at_a_time(backend):
    probe = Recorder()
    spread = Spread(probe, Placement(backend, 4, engine=None), ["rows", "reduced"])
    group = batches(4, 4, 2)
    got = spread(group)
    assert probe.calls == 3 and spread.groups_spread == 0
    for batch, outs in zip(group, got, strict=True):
        np.testing.assert_array_equal(outs[0], batch[0] * 2)
        assert int(outs[1]) == len(batch[0])


def test_on_jax_a_group_of_batches_of_different_sizes_runs_one_batch_at_a_time():
    probe = Recorder()
    spread = Spread(probe, Placement("jax", 2, engine=None), ["rows", "reduced"])
    spread(batches(4, 3))
    assert probe.calls == 2 and spread.groups_spread == 0
