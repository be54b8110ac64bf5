"""Bias correction: it removes the per-channel output mean shift (right sign), layer by layer."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import CalibrationDataError
from qstrat.graph import capture
from qstrat.layers.bias_axis import keras_adds_channels_first_bias_last
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
    with pytest.warns(UserWarning, match="generator can be read only once") as record:
        q.quantize_model((x[i : i + 16] for i in range(0, 64, 16)), verbose=0)
    assert q.bias_corrections == []
    assert [w.filename for w in record if "read only once" in str(w.message)] == [__file__]  # the user's call
    with pytest.raises(CalibrationDataError, match="include_bias_corr"):
        correct_biases(q.quantize_model(x, verbose=0), capture(model), iter([x]))


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


@pytest.mark.parametrize("budget,held", [(None, 128), (864 * 48, 48), (864, 32)])
def test_bias_correction_reads_only_the_samples_it_measures(budget, held, monkeypatch):
    """Its memory is bounded by the samples it holds, not by the calibration set: `SAMPLES`, read once, or
    fewer (`MIN_SAMPLES` at least) where one activation for that many would pass `TENSOR_BYTES`."""
    from qstrat.passes.refine import bias_correction

    assert (bias_correction.SAMPLES, bias_correction.MIN_SAMPLES) == (128, 32)
    if budget is not None:  # the largest activation here is c1's, 6 x 6 x 6 float32: 864 bytes a sample
        monkeypatch.setattr(bias_correction, "TENSOR_BYTES", budget)
    x = _data(640)
    reads = []

    class Counted(keras.utils.PyDataset):
        def __len__(self):
            return 40

        def __getitem__(self, k):
            reads.append(k)
            return x[16 * k : 16 * (k + 1)]

    q = qstrat.Quantizer(_model(False), "pof2s")
    q.quantize_model(Counted(), verbose=0)
    assert q.bias_corrections
    assert reads == list(range(40)) + list(range(-(-held // 16)))  # calibration, then bias correction's samples


class _Batches(keras.utils.PyDataset):
    """The samples ``x`` in batches of 32: data that is not arrays in memory."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def __len__(self):
        return -(-len(self.x) // 32)

    def __getitem__(self, k):
        return self.x[32 * k : 32 * (k + 1)]


@pytest.mark.parametrize(
    "samples,steps,budget,dataset",
    [
        (128, None, None, False),  # every calibration sample is measured
        (129, None, None, False),  # 128 of the 129 are measured
        (300, 4, None, False),  # 4 steps of 32 read 128 samples, all of which are measured
        (100, None, 864 * 48, False),  # large activations: 48 of the 100 are measured
        (129, None, None, True),  # a dataset: the float model runs on the samples bias correction took
    ],
)
def test_the_calibration_probe_takes_the_float_means_where_the_data_is_in_memory(
    samples, steps, budget, dataset, monkeypatch
):
    from qstrat.passes.refine import bias_correction

    if budget is not None:  # the largest activation here is c1's, 6 x 6 x 6 float32: 864 bytes a sample
        monkeypatch.setattr(bias_correction, "TENSOR_BYTES", budget)
    float_passes = []
    real = bias_correction._float_means
    monkeypatch.setattr(bias_correction, "_float_means", lambda *a: float_passes.append(1) or real(*a))
    q = qstrat.Quantizer(_model(False), "pof2s")
    x = _data(samples)
    q.quantize_model(_Batches(x) if dataset else x, steps, 32, verbose=0)
    assert q.bias_corrections and len(float_passes) == dataset


@pytest.mark.parametrize("samples,budget", [(100, None), (300, None), (100, 864 * 48)])
def test_the_float_means_taken_by_the_probe_equal_those_of_a_float_pass(samples, budget, monkeypatch):
    """On all 100 samples, on 128 of 300, and on 48 of 100 (large activations: `sample_count`). Both sum
    each sample's channels in float32 and the samples in float64, in another order (by batch, or all at
    once): the float64 sums' last bits may differ (rtol 1e-12). JAX compiles the probe, whose convolutions
    may round a float32 value's last bit differently from eager ones: a few float32 ulps there (2^-20
    relative)."""
    from qstrat.calibration.data import take_samples
    from qstrat.passes.calibrate import calibrate_activations, input_specs
    from qstrat.passes.refine import bias_correction

    if budget is not None:
        monkeypatch.setattr(bias_correction, "TENSOR_BYTES", budget)
    model, x = _model(False), _data(samples)
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(x, verbose=0, include_bias_corr=False)
    graph = capture(q.optimize_model())
    sums = bias_correction.float_sums(qmodel, graph, x)
    assert sums is not None and len(sums.refs) == 2  # c1 and c2
    calibrate_activations(qmodel, graph, {}, x, verbose=0, sums=sums)
    (held,) = take_samples(x, input_specs(qmodel), bias_correction.sample_count(graph))
    assert sums.samples == len(held) == {(100, None): 100, (300, None): 128, (100, 864 * 48): 48}[(samples, budget)]
    walked = bias_correction._float_means(graph, sums.refs, [-1] * len(sums.refs), [ops.convert_to_tensor(held)])
    rtol = 2.0**-20 if keras.backend.backend() == "jax" else 1e-12
    for got, want in zip(sums.means(), walked, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol)


def _reference_corrections(qmodel, float_model, x, names):
    """The straightforward path: layer by layer in graph order, each measured from scratch through sub-models on
    the samples ``x``, corrected, and its bias state (and that of every layer sharing it) recalibrated."""
    from qstrat.layers import QuantizeWrapper
    from qstrat.passes.weight_calibration import calibrate_weight_group, weight_groups

    wrappers = {w.layer.name: w for w in qmodel.layers if isinstance(w, QuantizeWrapper)}
    groups = {(id(w), a): g for g in weight_groups(qmodel) for w, a in g}
    shifts = {}
    for name in names:
        w = wrappers[name]
        yq = ops.convert_to_numpy(keras.Model(qmodel.inputs, w.output)(x)).astype(np.float64)
        yf = ops.convert_to_numpy(keras.Model(float_model.inputs, float_model.get_layer(name).output)(x))
        shifts[name] = (yq - yf).reshape(-1, yq.shape[-1]).mean(0)
        w.layer.bias.assign((w.layer.bias.numpy().astype(np.float64) - shifts[name]).astype("float32"))
        calibrate_weight_group(groups[(id(w), "bias")])
    return shifts, wrappers


def _check_against_reference(model, data, names, custom=None, **overrides):
    """quantize_model's corrections against `_reference_corrections` on the samples bias correction measures."""
    from qstrat.calibration.data import take_samples
    from qstrat.passes.refine.bias_correction import SAMPLES

    overrides = {"weight_bit": 4, "include_cle": False, **overrides}
    q = qstrat.Quantizer(model, "pof2s", custom)
    qmodel = q.quantize_model(data, verbose=0, include_bias_corr=True, **overrides)
    ref_q = qstrat.Quantizer(model, "pof2s", custom).quantize_model(
        data, verbose=0, include_bias_corr=False, **overrides
    )
    (x,) = take_samples(data, [("image", data.shape, "float32")], SAMPLES)
    assert len(x) == min(SAMPLES, len(data))
    shifts, ref_wrappers = _reference_corrections(ref_q, q.optimize_model(**overrides), x, names)
    got = {c.layer: c.max_abs_shift for c in q.bias_corrections}
    assert list(got) == list(names) and max(got.values()) > 1e-3
    for name, shift in shifts.items():
        # The same float32 outputs, summed in float32 per sample and then in float64 (here: all in float64).
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


@pytest.mark.parametrize(
    "after,samples",
    [("output moved by the bias change", 100), ("layer run again", 100), ("output moved by the bias change", 300)],
)
def test_corrections_match_a_straightforward_layer_by_layer_path(after, samples, monkeypatch):
    """A corrected layer whose output is its linear part plus the bias moves its output by the change of its
    quantized bias; any other runs again (here every layer, with `BIAS_LAST` emptied). The float means come
    from the calibration probe, which meets the samples bias correction measures (100 of 100, or 128 of 300)
    on its pass."""
    from qstrat.passes.refine import bias_correction
    from qstrat.quantizers import fake_quant

    if after == "layer run again":
        monkeypatch.setattr(bias_correction, "BIAS_LAST", frozenset())
    fused, float_passes = [], []
    real, real_means = fake_quant.fused_pof2, bias_correction._float_means
    monkeypatch.setattr(fake_quant, "fused_pof2", lambda *a: fused.append(real(*a)) or fused[-1])
    monkeypatch.setattr(bias_correction, "_float_means", lambda *a: float_passes.append(1) or real_means(*a))
    i = keras.Input((8, 8, 3))
    x = L.ReLU(name="r1")(L.Conv2D(6, 3, padding="same", name="c1")(i))
    x = L.ReLU(name="r2")(L.Conv2D(6, 3, padding="same", name="c2")(x))
    y = L.Conv2D(4, 1, name="c3")(x)
    model = keras.Model(i, L.Dense(3, name="d")(L.GlobalAveragePooling2D(name="gap")(y)))
    _check_against_reference(model, _data(samples), ["c1", "c2", "c3", "d"])
    assert float_passes == []
    # On TensorFlow the walk ran the activation quantizers fused (`fused_measurement`); the reference, exact.
    assert any(f is not None for f in fused) == (keras.backend.backend() == "tensorflow")


def test_a_bias_state_shared_with_a_layer_that_ran_runs_the_model_again(monkeypatch):
    """conv_b shares conv_a's bias quantizer state: correcting conv_b recalibrates the state conv_a already ran
    with, so the layers after them are measured on a second run, with conv_a's output as it is now."""
    from qstrat.passes.quantize_test import sharing_strategy, twins
    from qstrat.passes.refine import bias_correction

    twin = twins()
    i = keras.Input((8, 8, 3), name="image")
    added = L.Add(name="add")([twin.get_layer("conv_a")(i), twin.get_layer("conv_b")(i)])
    model = keras.Model(i, L.Conv2D(3, 1, name="conv_c")(L.ReLU(name="relu")(added)))
    walks = []
    real = bias_correction._walk
    monkeypatch.setattr(bias_correction, "_walk", lambda *a: walks.append(a[0]) or real(*a))
    custom = {k: v for k, v in sharing_strategy().items() if k != "base"}  # over pof2s: conv_c is quantized too
    _check_against_reference(model, _data(80), ["conv_a", "conv_b", "conv_c"], custom)
    # The quantized model's, and its run again after conv_b (the calibration probe took the float means).
    assert len(walks) == 2


def _compiled_and_eager(monkeypatch, model, x, **kw):
    """``model`` quantized by pof2s twice: bias correction's walk compiled where it compiles (JAX), then eager;
    with the `LayerCalls` each made."""
    from qstrat.passes.refine import layer_calls

    made, real_init = [], layer_calls.LayerCalls.__init__

    def quantized(eager: bool):
        def init(self):
            real_init(self)
            self.jax = self.jax and not eager
            made.append(self)

        monkeypatch.setattr(layer_calls.LayerCalls, "__init__", init)
        return qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, include_cle=False, **kw)

    compiled = quantized(eager=False)
    walks = list(made)
    return compiled, quantized(eager=True), walks


def _same_corrected_biases(model, compiled, eager, names):
    for name in names:
        got, want = (m.get_layer(f"quant_{name}").layer.bias for m in (compiled, eager))
        np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(want))
        before = model.get_layer(name).bias
        assert not np.array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(before))  # it corrected


@pytest.mark.portable
def test_on_jax_each_layer_runs_compiled_and_corrects_as_eager_calls_do(monkeypatch):
    """On JAX the walk runs each layer that holds variables as one compiled function (`LayerCalls`); the
    biases it corrects are those of the same walk run eagerly, bit for bit. Elsewhere it runs eagerly."""
    model = _model(False)
    compiled, eager, walks = _compiled_and_eager(monkeypatch, model, _data(), weight_bit=4)
    assert (sum(len(c.compiled) for c in walks) > 0) == (keras.backend.backend() == "jax")
    _same_corrected_biases(model, compiled, eager, ("c1", "c2"))


@pytest.mark.portable
def test_on_jax_layers_that_compute_alike_share_one_compiled_function(monkeypatch):
    """Three convs, two alike but for their names and weights: the walk compiles two functions for the three
    wrappers on JAX (none elsewhere), and corrects every bias as the eager walk does, bit for bit."""
    i = keras.Input((8, 8, 3))
    x = L.ReLU(name="r1")(L.Conv2D(6, 3, padding="same", name="c1")(i))
    x = L.ReLU(name="r2")(L.Conv2D(6, 3, padding="same", name="c2")(x))
    x = L.Conv2D(6, 3, padding="same", name="c3")(x)
    model = keras.Model(i, L.GlobalAveragePooling2D(name="gap")(x))
    compiled, eager, walks = _compiled_and_eager(monkeypatch, model, _data(), weight_bit=4)
    wrapper_keys = [k for c in walks for k in c.compiled if isinstance(k, tuple) and k[0] == "QuantizeWrapper"]
    assert len(wrapper_keys) == (2 if keras.backend.backend() == "jax" else 0)
    _same_corrected_biases(model, compiled, eager, ("c1", "c2", "c3"))


def test_a_channels_first_model_is_corrected_as_its_channels_last_twin():
    """Its channels are on axis 1, where the shifts are measured. Small integer weights and inputs make
    every float sum exact in either layout, so the two quantized models, bias correction included, are
    the same model transposed, bit for bit."""
    rng = np.random.default_rng(0)

    def net(fmt, shape):  # outputs (6, 7, 8) and (5, 7, 8) channels_first: no axis as long as the channels
        i = keras.Input(shape)
        x = keras.layers.ReLU()(keras.layers.Conv2D(6, 3, data_format=fmt, name="a")(i))
        return keras.Model(i, keras.layers.Conv2D(5, 1, data_format=fmt, name="b")(x))

    last, first = net("channels_last", (9, 10, 3)), net("channels_first", (3, 9, 10))
    weights = [rng.integers(-3, 4, w.shape).astype("float32") for w in last.get_weights()]
    last.set_weights(weights)
    first.set_weights(weights)
    x = rng.integers(-4, 5, (64, 9, 10, 3)).astype("float32")
    xf = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    q_last, q_first = qstrat.Quantizer(last, "pof2s"), qstrat.Quantizer(first, "pof2s")
    y_last = ops.convert_to_numpy(q_last.quantize_model(x, verbose=0)(x))
    y_first = ops.convert_to_numpy(q_first.quantize_model(xf, verbose=0)(xf))
    assert [c.layer for c in q_first.bias_corrections] == ["a", "b"]
    assert q_first.bias_corrections == q_last.bias_corrections
    # a's output is exact (integer weights and inputs); b reads a's ReLU on an 8-bit grid coarser than its integers.
    assert q_first.bias_corrections[0].max_abs_shift == 0 < q_first.bias_corrections[1].max_abs_shift
    np.testing.assert_array_equal(np.transpose(y_first, (0, 2, 3, 1)), y_last)


@pytest.mark.parametrize("strategy", ["fs", "pof2s"])
def test_a_channels_first_bias_keras_adds_on_the_last_axis_is_left_and_a_bn_mean_is_corrected(strategy):
    """c1 writes (6, 6, 6) but has no bias: its shift goes to bn1's mean, which Keras applies on the channels
    (fs keeps BN; pof2s folds it into c1's bias, where Keras adds a bias on the channels, and else quantizes
    it, in a wrapper). c2 writes (4, 4, 4) with a bias, which Keras on TensorFlow adds on the last axis: left."""
    f = {"data_format": "channels_first"}
    i = keras.Input((3, 8, 8))
    x = L.BatchNormalization(axis=1, name="bn1")(L.Conv2D(6, 3, use_bias=False, name="c1", **f)(i))
    x = L.Conv2D(4, 3, name="c2", **f)(L.ReLU(name="r1")(x))
    model = keras.Model(i, L.GlobalAveragePooling2D(name="gap", **f)(x))
    q = qstrat.Quantizer(model, strategy)
    q.quantize_model(np.transpose(_data(), (0, 3, 1, 2)), verbose=0, weight_bit=4, include_cle=False)
    where = {c.layer: c.where for c in q.bias_corrections}
    misplaced = keras_adds_channels_first_bias_last()
    c1 = "bn1.moving_mean" if strategy == "fs" or misplaced else "bias"
    assert where == {"c1": c1, **({} if misplaced else {"c2": "bias"})}
