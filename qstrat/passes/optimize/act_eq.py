"""Activation-aware equalization: the per-channel activation ranges CLE weighs when ``include_act_eq`` is on.

Weight-only CLE balances each pair's per-channel weight ranges. With one
activation quantizer per tensor, the tensor between the two layers of a pair
is quantized on one grid for all its channels, so a channel whose values
stay small gets few steps of it. Activation-aware equalization measures, on
the calibration data, each channel's range A_c of that tensor (max |x|
over every other axis),
and mixes a second factor into CLE's:

    s_c = s_weight,c^(1 - beta) * s_activation,c^beta,   s_activation,c = max_c' A_c' / A_c

(in log space: beta = 0 is weight-only CLE, bit for bit; beta = 1 equalizes
the activation ranges alone), clipped to [0.1, 10] each step like CLE's.
The head's output channel c is multiplied by s_c and the tail's input
channel divided by it, so the float model is unchanged; a channel's range
scales with its head's output, so the ranges are measured once, before CLE,
and tracked through its steps. Channels that never reach 1e-6 of the
largest range keep the weight factor alone.

Measuring takes one pass over the calibration data through the float graph
(after BatchNormalization folding), with only the tensors between pairs
reduced to per-channel maxima inside the probe.
"""

from __future__ import annotations

import numpy as np

from qstrat.calibration.data import iterate_batches
from qstrat.graph.ir import Graph, taken_names, unique_name
from qstrat.graph.rewrite import Editor
from qstrat.passes.optimize.channels import channel_axis
from qstrat.passes.runner import graph_probe

DEAD = 1e-6  # a channel below this fraction of the largest range has no activation factor


def activation_factor(ranges: np.ndarray) -> np.ndarray:
    """max_c' A_c' / A_c per channel; 1 for channels that stay below DEAD of the largest."""
    top = float(np.max(ranges)) if ranges.size else 0.0
    out = np.ones_like(ranges, dtype=np.float64)
    live = ranges > DEAD * top
    out[live] = top / ranges[live]
    return out


def measure(
    graph: Graph, pairs, data, specs, batch_size: int, steps: int | None, progress=None
) -> dict[str, np.ndarray]:
    """{head name: max |x| per channel of the tensor its tail reads}, over the calibration data."""
    from keras import ops

    from qstrat.graph.rebuild import run_graph

    ed = Editor(graph)
    heads = [p.head for p in pairs]
    refs = [ed.node(p.tail).inputs[0] for p in pairs]
    unique = list(dict.fromkeys(refs))
    # The channel axis of each tensor: its pair's head's (the last, or 1 for channels_first; `cle.find_pairs`).
    axes = dict(zip(refs, (channel_axis(ed.node(h)) for h in heads), strict=True))

    def body(inputs, symbolic):
        outs = run_graph(graph, inputs, unique, symbolic)
        return [
            ops.max(ops.abs(t), axis=tuple(a for a in range(len(t.shape)) if a != axes[r]))
            for r, t in zip(unique, outs, strict=True)
        ]

    runner = graph_probe(graph, body, unique_name("qstrat_act_eq_ranges", taken_names(graph)))
    total = [None] * len(unique)
    bar = progress.data_pass(None, what="per-channel activation ranges (include_act_eq)") if progress else None
    for k, batch in enumerate(iterate_batches(data, specs, batch_size, steps)):
        for i, m in enumerate(runner(batch)):
            m = np.asarray(m, np.float64)
            total[i] = m if total[i] is None else np.maximum(total[i], m)
        if bar is not None:
            bar.update(k + 1)
    by_ref = dict(zip(unique, total, strict=True))
    return {h: by_ref[r] for h, r in zip(heads, refs, strict=True)}
