"""Calibration's fast path (one traced probe, statistics reduced in the graph) against a straightforward one.

The straightforward path takes every tapped float activation whole, from a
plain sub-model of the float model, batch by batch, and feeds it to a NumPy
observer; the quantizer state it gives must be the fast path's, bit for bit.
"""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.calibration import make_observer
from qstrat.graph import rebuild
from qstrat.passes.quantize import annotate, insert
from qstrat.passes.refine.constraints import RULES

pytestmark = pytest.mark.portable
L = keras.layers


def _model():
    i = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(i)
    y = L.Conv2D(8, 3, padding="same", name="c2")(x)
    x = L.ReLU(name="r2")(L.Add(name="add")([x, y]))
    x = L.MaxPooling2D(name="pool")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(i, L.Dense(5, name="logits")(x))


def _reference_states(q, overrides):
    strategy = q._strategy(overrides)
    graph = q._optimized_graph(strategy)
    _, taps = insert(graph, annotate(graph, strategy))
    policy = strategy.quantize["calib_position_policy"]
    refs = list(dict.fromkeys(r for rs in taps.values() for r in rs))
    probe = rebuild(graph, outputs=refs)  # plain float sub-model: every tapped tensor, whole
    return taps, refs, probe, policy


@pytest.mark.parametrize(
    "strategy, overrides",
    [
        ("pof2s", {}),
        ("fs", {}),
        ("pof2s", {"activation_method": "Min_KL"}),
        ("fs", {"activation_method": "Percentile"}),
    ],
)
def test_fast_calibration_gives_the_straightforward_state_bit_for_bit(strategy, overrides):
    model = _model()
    data = np.random.default_rng(0).normal(1.0, 2.0, size=(100, 10, 10, 3)).astype("float32")  # last batch: 4
    q = qstrat.Quantizer(model, strategy)
    # The DPU compiler constraints (refine) move positions after calibration, and the DPU average pooling
    # changes the graph the reference below observes: both off, to compare calibration alone.
    off = {**dict.fromkeys(RULES, False), "convert_average_pooling2d_to_dpu_version": False}
    qmodel = q.quantize_model(data, calib_batch_size=32, verbose=0, include_bias_corr=False, **off, **overrides)

    taps, refs, probe, policy = _reference_states(q, {"include_bias_corr": False, **off, **overrides})
    observers = {}
    for name in taps:
        fq = qmodel.get_layer(name)
        observers[name] = make_observer(fq.quantizer.observer_spec(policy), name=name)
    for start in range(0, len(data), 32):
        outs = probe(data[start : start + 32])
        outs = dict(
            zip(refs, [ops.convert_to_numpy(o) for o in (outs if isinstance(outs, list) else [outs])], strict=True)
        )
        for name, rs in taps.items():
            for r in rs:
                observers[name].update(outs[r])
    assert len(taps) >= 4
    for name in taps:
        fq = qmodel.get_layer(name)
        want = fq.quantizer.state_from_stats(observers[name].result())
        for key, value in want.items():
            got = ops.convert_to_numpy(fq.state[key])
            assert np.array_equal(got, np.asarray(value, got.dtype)), (name, key, got, value)
