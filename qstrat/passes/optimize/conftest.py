"""Shared checks for the optimize passes: float equivalence of a pass on a model built in code."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.graph import capture, rebuild
from qstrat.passes.optimize import OptimizeReport


def _outputs(model, x):
    y = model(x)
    return [ops.convert_to_numpy(t) for t in y] if isinstance(y, (list, tuple)) else [ops.convert_to_numpy(y)]


def randomize_bn(model, seed=0):
    """Give every BatchNormalization non-trivial statistics, so that folding it matters."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 2.0, w.shape).astype("float32")
                    if "variance" in v.path
                    else rng.normal(0, 0.5, w.shape).astype("float32")
                    for v, w in zip(layer.weights, layer.get_weights(), strict=True)
                ]
            )
    return model


@pytest.fixture
def run_pass():
    """``run_pass(fn, model, x, **config)`` -> (new model, report, max relative difference of the outputs)."""

    def run(fn, model, x, **config):
        before = [w.copy() for w in model.get_weights()]
        report = OptimizeReport()
        graph = fn(capture(model), config, report)
        new = rebuild(graph)
        ya, yb = _outputs(model, x), _outputs(new, x)
        rel = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) for a, b in zip(ya, yb, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
        return new, report, rel

    return run


def types(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")
