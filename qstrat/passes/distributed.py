"""Calibration on several devices: the engines Keras users already run, not one of ours.

When a `keras.distribution` is set (JAX: ``DataParallel``, or ``ModelParallel``
with a batch axis in its mesh) or calibration runs inside a
``tf.distribute.MirroredStrategy`` scope (TensorFlow), the calibration probe
runs on a *group* of units at once, one whole unit on each device, and the
observers take the batches' results in batch order, as on one device. A unit
is what one device runs as one call: a batch, or for a small model on
TensorFlow or torch several consecutive batches joined
(`qstrat.passes.runner.merged`, the same on one device and under a
distribution).

No unit is split. Each device computes exactly the unit one device would,
with the same graph (optimized the same way:
`qstrat.passes.runner.lightly_optimized`), so every per-sample value is bit for bit
the same (rows computed in smaller pieces can round differently: kernels pick
their paths by shape). The
per-channel, moving-average and per-batch-vote observers see the same
batches in the same order.

On JAX the group is one array sharded on the batch axis, each device's shard
one batch. The per-tensor statistics the probe reduces in the graph (ranges,
aligned histograms) come back as one reduction over the group: minima, maxima
and integer counts, which the all-reduces across the devices compute exactly.
The observer takes them as one update, which its exact ``merge`` makes the
same as one update per batch (on JAX a unit is one batch). On TensorFlow each
replica runs its own unit through the probe (``strategy.run``) and returns
that unit's statistics.

A group that is not full, or (JAX) whose batches differ in size, runs one
unit at a time as without a distribution.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np

from qstrat.passes.runner import BatchRunner, lightly_optimized, split_outputs


@dataclass(frozen=True)
class Placement:
    """Where calibration's batches go: ``width`` devices, one batch on each."""

    backend: str  # "jax" | "tensorflow"
    width: int
    engine: object  # the keras.distribution.Distribution, or the tf.distribute strategy

    def describe(self) -> str:
        return f"{type(self.engine).__name__} over {self.width} devices"


def placement() -> Placement | None:
    """The active distribution calibration spreads its batches over, or None (one device)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        dist = keras.distribution.distribution()
        if dist is None:
            return None
        import jax

        if jax.process_count() > 1:
            warnings.warn(
                "qstrat calibrates on this process's devices only: a multi-process JAX distribution is not "
                "supported yet, so the batches run on one device.",
                UserWarning,
                stacklevel=3,
            )
            return None
        mesh = dist.device_mesh
        name = getattr(dist, "batch_dim_name", None)
        width = mesh.shape[list(mesh.axis_names).index(name)] if name in mesh.axis_names else 1
        return Placement("jax", int(width), dist) if width > 1 else None
    if backend != "tensorflow" or "tensorflow" not in sys.modules:
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        warnings.warn(
            f"qstrat calibrates under tf.distribute.MirroredStrategy; under {type(strategy).__name__} the "
            "batches run on one device.",
            UserWarning,
            stacklevel=3,
        )
        return None
    if not tf.distribute.in_cross_replica_context():
        return None  # called from inside a replica's step: that replica's device already
    width = strategy.num_replicas_in_sync
    return Placement("tensorflow", int(width), strategy) if width > 1 else None


class Spread:
    """``spread(group)`` -> each batch's probe outputs, the group's batches on the devices of ``where``.

    ``outputs[k]``, what the probe's output k is: ``"rows"``, one row per sample (tensors); ``"reduced"``, a
    statistic of the whole batch (the in-graph ranges and histograms). On JAX a full group's statistics are one
    reduction over the group: the first batch gets it, the others None.
    """

    def __init__(self, runner: BatchRunner, where: Placement, outputs: list[str]):
        self.runner, self.where, self.outputs = runner, where, outputs
        self.width = where.width
        self.groups_spread = 0  # groups that ran spread over the devices (the rest: a batch at a time)
        self._step = None

    def __call__(self, group: list[list[np.ndarray]]) -> list[list]:
        sizes = {len(batch[0]) for batch in group}
        if len(group) < self.width or (self.where.backend == "jax" and len(sizes) > 1):
            return [self.runner(batch) for batch in group]
        self.groups_spread += 1
        if self.where.backend == "jax":
            return self._jax(group)
        return self._tensorflow(group)

    def _jax(self, group):
        import jax

        dist = self.where.engine
        inputs = []
        for k in range(len(group[0])):
            whole = np.concatenate([batch[k] for batch in group])
            inputs.append(jax.device_put(whole, dist.get_data_layout(whole.shape).backend_layout))
        outs = self.runner.model.predict_on_batch(inputs)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return split_outputs(outs, self.outputs, [len(batch[0]) for batch in group])

    def _tensorflow(self, group):
        import tensorflow as tf

        strategy = self.where.engine
        if self._step is None:
            fn = self.runner._fn.python_function
            self._step = tf.function(lambda *xs: strategy.run(fn, args=xs), autograph=False, reduce_retracing=True)
        values = [
            strategy.experimental_distribute_values_from_function(
                lambda ctx, k=k: tf.constant(group[ctx.replica_id_in_sync_group][k])
            )
            for k in range(len(group[0]))
        ]
        with lightly_optimized():  # as the one-device probe runs (`BatchRunner`): the same graph, the same bits
            outs = self._step(*values)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        local = [strategy.experimental_local_results(out) for out in outs]
        return [[np.asarray(replicas[r]) for replicas in local] for r in range(len(group))]
