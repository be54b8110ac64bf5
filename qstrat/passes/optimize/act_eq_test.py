"""Activation-aware equalization: float equivalence, activation ranges moved toward each other, beta = 0 is CLE."""

import warnings

import keras
import numpy as np
import pytest

import qstrat
from qstrat.graph import capture, rebuild
from qstrat.graph.rewrite import Editor
from qstrat.passes.calibrate import input_specs
from qstrat.passes.optimize import OptimizeReport
from qstrat.passes.optimize.act_eq import activation_factor, measure
from qstrat.passes.optimize.cle import cross_layer_equalization, find_pairs
from qstrat.passes.optimize.conftest import rand

pytestmark = pytest.mark.portable
L = keras.layers
CFG = {"cle_steps": 10, "cle_balance_method": "max", "cle_weight_threshold": 0.1, "act_eq_beta": 0.5}


def _model(shape=(6, 6, 3), data_format="channels_last"):
    """conv -> ReLU -> conv with balanced weights, on inputs whose channel 0 is 100x the others (`_data`):
    the 4 middle channels that read it span 100x the range of the other 4, which weights cannot show."""
    i = keras.Input(shape)
    head = L.Conv2D(8, 1, data_format=data_format, name="head")
    tail = L.Conv2D(4, 1, data_format=data_format, name="tail")
    model = keras.Model(i, tail(L.ReLU(name="relu")(head(i))))
    rng = np.random.default_rng(0)
    k = np.zeros((1, 1, 3, 8), "float32")
    k[0, 0, 0, :4] = rng.uniform(0.5, 1.0, 4)
    k[0, 0, 1:, 4:] = rng.uniform(0.5, 1.0, (2, 4))
    head.set_weights([k, np.zeros(8, "float32")])
    tail.set_weights([rng.uniform(-1, 1, (1, 1, 8, 4)).astype("float32"), np.zeros(4, "float32")])
    return model


def _data(n):
    x = rand(n, 6, 6, 3)
    x[..., 0] *= 100.0
    return x


def _ranges(model, x):
    """Per-channel max |x| of the tensor the tail reads."""
    mid = keras.Model(model.inputs, model.get_layer("relu").output)
    return np.abs(np.asarray(mid.predict(x, verbose=0))).max((0, 1, 2))


def _equalized(model, x, beta=0.5, aware=True, **cfg):
    graph = capture(model)
    pairs = find_pairs(Editor(graph))
    ranges = measure(graph, pairs, x, input_specs(model), 16, None) if aware else None
    return rebuild(cross_layer_equalization(graph, {**CFG, "act_eq_beta": beta, **cfg}, OptimizeReport(), ranges))


def test_measured_ranges_are_the_per_channel_maxima():
    model, x = _model(), _data(40)
    graph = capture(model)
    ranges = measure(graph, find_pairs(Editor(graph)), x, input_specs(model), 16, None)
    np.testing.assert_array_equal(ranges["head"], _ranges(model, x).astype(np.float64))  # a max: exact


def test_a_channels_first_model_measures_its_channels_on_axis_1_and_equalizes_as_its_twin():
    """The channels_first twin of `_model` (the same weights, the data transposed) has the same per-channel
    ranges, bit for bit (maxima of the same products), and activation-aware CLE gives it the same weights."""
    model, first = _model((6, 5, 3)), _model((3, 6, 5), "channels_first")  # (6, 5): no axis as long as the 8
    x = _data(40)[:, :, :5]
    xf = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    graph = capture(first)
    ranges = measure(graph, find_pairs(Editor(graph)), xf, input_specs(first), 16, None)
    np.testing.assert_array_equal(ranges["head"], _ranges(model, x).astype(np.float64))
    for u, v in zip(_equalized(model, x).get_weights(), _equalized(first, xf).get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def test_it_is_float_equivalent_and_moves_the_channel_ranges_together():
    model, x = _model(), _data(40)
    plain, aware = _equalized(model, x, aware=False), _equalized(model, x)
    y = np.asarray(model.predict(x, verbose=0))
    for m in (plain, aware):
        # Each channel is scaled by a float64 factor and rounded once to float32 in the head and the tail.
        rel = np.abs(np.asarray(m.predict(x, verbose=0)) - y).max() / np.abs(y).max()
        assert rel <= 1e-5, rel
    spread = {
        k: (r.max() / r.min())
        for k, r in (("float", _ranges(model, x)), ("cle", _ranges(plain, x)), ("aware", _ranges(aware, x)))
    }
    assert spread["float"] > 50 and spread["cle"] > 50  # built so: the weights are balanced already
    assert spread["aware"] < spread["cle"] / 5, spread


def test_beta_zero_is_weight_only_cle_bit_for_bit():
    model, x = _model(), _data(40)
    a, b = _equalized(model, x, beta=0.0), _equalized(model, x, aware=False)
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def test_channels_under_the_weight_threshold_keep_scale_1_with_activation_ranges_too():
    model, x = _model(), _data(40)
    # Head channel c's range plus the tail's input channel c's range: the threshold between the smallest two
    # sums and the rest, so that those two alone keep their weights (the head's kernel columns, the tail's rows).
    head, tail = (np.abs(np.asarray(model.get_layer(n).kernel)) for n in ("head", "tail"))
    sums = head.max((0, 1, 2)) + tail.max((0, 1, 3))
    low = np.argsort(sums)[:2]
    threshold = float(np.sort(sums)[1:3].mean())
    new = _equalized(model, x, cle_weight_threshold=threshold)
    new_head, new_tail = (np.asarray(new.get_layer(n).kernel) for n in ("head", "tail"))
    np.testing.assert_array_equal(new_head[..., low], np.asarray(model.get_layer("head").kernel)[..., low])
    np.testing.assert_array_equal(new_tail[:, :, low], np.asarray(model.get_layer("tail").kernel)[:, :, low])
    others = np.setdiff1d(np.arange(8), low)
    assert not np.array_equal(new_head[..., others], np.asarray(model.get_layer("head").kernel)[..., others])


def test_activation_factor():
    np.testing.assert_array_equal(activation_factor(np.array([4.0, 2.0, 1.0, 0.0, 1e-9])), [1.0, 2.0, 4.0, 1.0, 1.0])


def test_quantize_model_measures_on_its_data_and_off_is_plain_ptq():
    model, x = _model(), _data(64)
    q = qstrat.Quantizer(model, "pof2s")
    on = q.quantize_model(x, verbose=0, include_act_eq=True)
    assert q.timings["data_passes"] == 3  # ranges, calibration, bias correction
    assert "activation-aware" in next(e.detail for e in q.optimize_report.of("include_cle"))
    off = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, include_act_eq=False)
    default = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    for u, v in zip(off.get_weights(), default.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, v) for u, v in zip(on.get_weights(), off.get_weights(), strict=True))


def test_without_data_it_warns_and_cle_runs_on_weights():
    model, x = _model(), _data(16)
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match="include_act_eq needs calibration data"):
        q.optimize_model(include_act_eq=True)
    assert [e.kind for e in q.optimize_report.of("include_act_eq")] == ["skipped"]
    with warnings.catch_warnings(), pytest.warns(UserWarning, match="one-shot generator"):
        q.quantize_model((b for b in [x[:8], x[8:]]), verbose=0, include_act_eq=True, include_bias_corr=False)
    with pytest.warns(UserWarning, match="include_cle = false"):
        q.optimize_model(include_act_eq=True, include_cle=False)
