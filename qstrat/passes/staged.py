"""`StagedSums`: per-sample channel sums of a graph's targets, computing only the part of the graph they need.

Bias correction measures the targets of one level at a time, on its own
samples, and a level's targets need only the layers up to them: running the
whole model for every level computes more than it uses (twice as much, on
average, when every level's layers cost the same).
`StagedSums` cuts the graph into stages along its levels (stage g: the nodes
the targets of its levels need that no earlier stage computes) and traces
one function per stage. For the targets of stage g, a batch runs stages 0 to
g, each handing the next the tensors it needs. The values are those of one
traced function of the whole graph: the same layers on the same tensors.

TensorFlow only (one traced function per stage); other backends run the
whole graph (`qstrat.passes.runner.graph_probe`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qstrat.graph.ir import Graph, TensorRef
from qstrat.graph.rebuild import needed, replay

# More stages compute less of the graph per level, and each costs a trace of
# its own. Measured with bench/traces.py --max-stages at 1024 samples: on
# ResNet50 (50 levels, 6 stages) a level's batch costs 62% of a whole-graph
# call on average, and the stages' first calls 0.7 s more; MobileNetV2 gains
# about nothing (its first layers, at the largest resolution, cost the most);
# a shallow graph (the mini-Xception's 11 levels) would lose.
MAX_STAGES = 8
MIN_LEVELS_PER_STAGE = 8


def stage_count(levels: int) -> int:
    return max(1, min(MAX_STAGES, levels // MIN_LEVELS_PER_STAGE))


def _spec(graph: Graph, ref: TensorRef) -> tuple:
    """(shape, dtype) of one tensor of the graph, as the model it was captured from records it."""
    if ref in graph.inputs:
        t = graph.node(ref.node).op.output
        return tuple(t.shape), t.dtype
    for node in graph.consumers(ref):
        for r, t in zip(node.inputs, node.in_tensors, strict=True):
            if r == ref:
                return tuple(t.shape), t.dtype
    raise ValueError(f"no recorded shape for {ref}")  # pragma: no cover - every handed-over tensor has a consumer


class StagedSums:
    """``sums(batch, stage)`` -> ``[channel sums (batch, sum of C), counts (T,)]`` of the targets of ``stage``.

    Args:
        graph: the graph to run (its nodes call ``op_for(node)``).
        refs: the targets, grouped by level in order (``levels[i]`` is the level of ``refs[i]``).
        stages: this many stages (at most one per level), of whole levels, about as many levels each.
    """

    def __init__(self, graph: Graph, op_for: Callable, refs: list[TensorRef], levels: list[int], stages: int):
        import tensorflow as tf

        from qstrat.layers.probe import SampleChannelSums

        count = max(levels) + 1
        stages = max(1, min(stages, count))
        self.stage_of_level = [level * stages // count for level in range(count)]
        self.targets = [[i for i, lv in enumerate(levels) if self.stage_of_level[lv] == g] for g in range(stages)]
        nodes, done = [], set()
        for g in range(stages):
            upto = needed(graph, [refs[i] for t in self.targets[: g + 1] for i in t])
            nodes.append(upto - done)
            done |= upto
        later_inputs = [{r for n in graph.nodes if n.name in ns for r in n.inputs} for ns in nodes]
        order = _order(graph)
        self._fns, self._takes, self._hands = [], [], []
        for g in range(stages):
            produced_before = set().union(*nodes[:g]) if g else set()
            takes = sorted({r for r in later_inputs[g] if r.node in produced_before or r in graph.inputs}, key=order)
            hands = sorted({r for s in later_inputs[g + 1 :] for r in s if r.node in nodes[g]}, key=order)
            outs = [refs[i] for i in self.targets[g]]
            sums = SampleChannelSums(name=f"qstrat_stage_sums_{g}")

            def fn(*xs, takes=takes, hands=hands, outs=outs, sums=sums):
                tensors = replay(graph, op_for, dict(zip(takes, xs, strict=True)), outs + hands)
                return [*sums(tensors[: len(outs)]), *tensors[len(outs) :]]

            specs = [_spec(graph, r) for r in takes]
            signature = [tf.TensorSpec((None, *shape[1:]), dtype) for shape, dtype in specs]
            self._fns.append(tf.function(fn, input_signature=signature, autograph=False))
            self._takes.append(takes)
            self._hands.append(hands)
        self._inputs = list(graph.inputs)

    @property
    def stages(self) -> int:
        return len(self._fns)

    def __call__(self, batch: list[np.ndarray], stage: int) -> list[np.ndarray]:
        tensors = dict(zip(self._inputs, batch, strict=True))
        for g in range(stage + 1):
            outs = self._fns[g](*[tensors[r] for r in self._takes[g]])
            tensors.update(zip(self._hands[g], outs[2:], strict=True))
        return [outs[0].numpy(), outs[1].numpy()]


def _order(graph: Graph):
    position = {node.name: k for k, node in enumerate(graph.nodes)}
    return lambda ref: (position[ref.node], ref.index)
