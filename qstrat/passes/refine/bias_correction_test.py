"""Bias correction: it removes the per-channel output mean shift (right sign), layer by layer."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import CalibrationDataError
from qstrat.graph import capture
from qstrat.passes.refine.bias_correction import correct_biases

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
    from qstrat.passes.refine.bias_correction import _levels

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


def _reference_corrections(qmodel, float_model, x, levels_of, segment, assign):
    """The straightforward path: level by level, each on its segment of the fixed random order, through sub-models."""
    from qstrat.layers import QuantizeWrapper

    stream = np.concatenate([np.random.default_rng(0).permutation(len(x))] * 4)
    wrappers = {w.layer.name: w for w in qmodel.layers if isinstance(w, QuantizeWrapper)}
    shifts = {}
    for level in range(max(levels_of.values()) + 1):
        seg = x[stream[level * segment : (level + 1) * segment]]
        for name in (n for n, lv in levels_of.items() if lv == level):
            w = wrappers[name]
            yq = ops.convert_to_numpy(keras.Model(qmodel.inputs, w.output)(seg)).astype(np.float64)
            yf = ops.convert_to_numpy(keras.Model(float_model.inputs, float_model.get_layer(name).output)(seg))
            shifts[name] = (yq - yf).reshape(-1, yq.shape[-1]).mean(0)
            w.layer.bias.assign((w.layer.bias.numpy().astype(np.float64) - shifts[name]).astype("float32"))
            assign(w.state["bias"], w.quantizers["bias"].state_from_tensor(w.layer.bias.numpy()))
    return shifts, wrappers


@pytest.mark.parametrize("path", ["paired probe", "float side from calibration", "float side, one stage a level"])
def test_corrections_match_a_straightforward_level_by_level_path(path, monkeypatch):
    """Paired: the pass alone, float and quantized in one probe (any data source). Float side: the API's
    path for arrays, the float sums gathered by the calibration pass and only the quantized model here
    (on TensorFlow, also cut into stages that compute each level's layers only: `StagedSums`)."""
    from qstrat.passes import staged
    from qstrat.passes.calibrate import _assign
    from qstrat.passes.refine.schedule import Schedule

    if path.endswith("one stage a level"):
        monkeypatch.setattr(staged, "MIN_LEVELS_PER_STAGE", 1)

    i = keras.Input((8, 8, 3))
    x = L.ReLU(name="r1")(L.Conv2D(6, 3, padding="same", name="c1")(i))
    x = L.ReLU(name="r2")(L.Conv2D(6, 3, padding="same", name="c2")(x))
    y = L.Conv2D(4, 1, name="c3")(x)
    model = keras.Model(i, L.Dense(3, name="d")(L.GlobalAveragePooling2D(name="gap")(y)))
    data = _data(100)
    overrides = {"weight_bit": 4, "include_cle": False, "include_bias_corr": False}
    q = qstrat.Quantizer(model, "pof2s")
    if path == "paired probe":
        qmodel = q.quantize_model(data, verbose=0, **overrides)
        graph = q._optimized_graph(q._strategy(overrides))
        done = correct_biases(qmodel, graph, data, None, 32, verbose=0, samples=len(data))
    else:
        qmodel = q.quantize_model(data, verbose=0, **{**overrides, "include_bias_corr": True})
        done = q.bias_corrections
    ref_q = qstrat.Quantizer(model, "pof2s").quantize_model(data, verbose=0, **overrides)
    levels = {"c1": 0, "c2": 1, "c3": 2, "d": 3}
    schedule = Schedule.plan(len(data), len(levels), 32)
    assert (schedule.passes, schedule.segment) == (2, 50)  # 32 samples per level: two passes over 100
    shifts, ref_wrappers = _reference_corrections(ref_q, q.optimize_model(**overrides), data, levels, 50, _assign)
    got = {c.layer: c.max_abs_shift for c in done}
    assert set(got) == set(levels) and max(got.values()) > 1e-3
    for name, shift in shifts.items():
        # The same float32 outputs, summed in float32 in the probe (per batch, or per sample) and in float64 here.
        np.testing.assert_allclose(got[name], np.abs(shift).max(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            qmodel.get_layer(f"quant_{name}").layer.bias.numpy(),
            ref_wrappers[name].layer.bias.numpy(),
            rtol=1e-5,
            atol=1e-5,
        )
        assert np.array_equal(
            ops.convert_to_numpy(qmodel.get_layer(f"quant_{name}").state["bias"]["pos"]),
            ops.convert_to_numpy(ref_wrappers[name].state["bias"]["pos"]),
        )
