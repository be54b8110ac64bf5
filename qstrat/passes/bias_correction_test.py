"""Bias correction: it removes the per-channel output mean shift (right sign), layer by layer."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import CalibrationDataError
from qstrat.graph import capture
from qstrat.passes.bias_correction import correct_biases

pytestmark = pytest.mark.portable
L = keras.layers


def _model(bn: bool):
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, use_bias=not bn, name="c1")(i)
    if bn:
        x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.Conv2D(4, 3, name="c2")(x)
    return keras.Model(i, L.GlobalAveragePooling2D(name="gap")(x))


def _data(n=64, seed=0):
    # A large positive mean: weight rounding errors then shift the output means.
    return (np.random.default_rng(seed).uniform(0, 4, size=(n, 8, 8, 3))).astype("float32")


def _mean_shift(model, qmodel, x):
    return np.abs(np.mean(ops.convert_to_numpy(qmodel(x)) - ops.convert_to_numpy(model(x)), axis=0))


@pytest.mark.parametrize("strategy,bn", [("pof2s", False), ("fs", True)])
def test_bias_correction_removes_the_mean_shift(strategy, bn):
    model, x = _model(bn), _data()
    overrides = {"weight_bit": 4, "include_cle": False}
    before = qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0, include_bias_corr=False, **overrides)
    q = qstrat.Quantizer(model, strategy)
    after = q.quantize_model(x, verbose=0, include_bias_corr=True, **overrides)
    shift_before, shift_after = _mean_shift(model, before, x), _mean_shift(model, after, x)
    assert shift_before.max() > 1e-3
    assert shift_after.max() < shift_before.max() / 4, (shift_before, shift_after)
    where = {c.layer: c.where for c in q.bias_corrections}
    assert where == ({"c1": "bn1.moving_mean", "c2": "bias"} if bn else {"c1": "bias", "c2": "bias"})


def test_a_generator_skips_bias_correction_with_a_warning():
    model, x = _model(False), _data()
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match="generator can be read only once"):
        q.quantize_model((x[i : i + 16] for i in range(0, 64, 16)), verbose=0)
    assert q.bias_corrections == []
    with pytest.raises(CalibrationDataError, match="include_bias_corr"):
        correct_biases(q.quantize_model(x, verbose=0), capture(model), iter([x]))


def test_parallel_branches_share_a_pass():
    from qstrat.passes.bias_correction import _levels

    i = keras.Input((6, 6, 2))
    a, b = L.Conv2D(3, 1, name="a")(i), L.Conv2D(3, 3, padding="same", name="b")(i)
    c = L.Conv2D(2, 1, name="c")(L.Add()([a, b]))
    d = L.Conv2D(2, 1, name="d")(L.ReLU()(c))
    graph = capture(keras.Model(i, L.Add()([d, L.Conv2D(2, 1, name="e")(b)])))
    assert _levels(graph, ["a", "b", "c", "d", "e"]) == [0, 0, 1, 2, 1]


def test_shuffled_data_corrects_on_the_samples_it_measures():
    model, x = _model(False), _data(256)

    class Shuffled(keras.utils.PyDataset):
        """Random batches: each pass over the data sees different samples."""

        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(0)

        def __len__(self):
            return 2

        def __getitem__(self, k):
            return x[self.rng.integers(0, len(x), 16)]

    overrides = {"weight_bit": 4, "include_cle": False}
    before = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, include_bias_corr=False, **overrides)
    after = qstrat.Quantizer(model, "pof2s").quantize_model(Shuffled(), verbose=0, **overrides)
    # Measured on all the data: correcting from 32 random samples per pass still helps.
    assert _mean_shift(model, after, x).max() < _mean_shift(model, before, x).max() / 2
