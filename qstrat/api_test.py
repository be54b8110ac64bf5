"""End to end: a model with every supported layer, quantized, saved, loaded and bypassed."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import CalibrationDataError, ConfigError
from qstrat.graph import UnsupportedModelError
from qstrat.layers import QuantizeWrapper, set_quantizers_enabled
from qstrat.passes.optimize import PASSES

pytestmark = pytest.mark.portable


def np_(t):
    return ops.convert_to_numpy(t)


def zoo_model():
    i = keras.Input((16, 16, 3), name="image")
    x = keras.layers.ZeroPadding2D(1, name="pad")(i)
    x = keras.layers.Conv2D(8, 3, name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    shared = keras.layers.Conv2D(8, 3, padding="same", name="shared_conv")
    a = shared(x)
    b = shared(keras.layers.LeakyReLU(negative_slope=0.1, name="leaky")(x))
    x = keras.layers.Add(name="add")([a, b])
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Multiply(name="mul")([x, y])
    p = keras.layers.MaxPooling2D(2, name="maxpool")(x)
    q = keras.layers.AveragePooling2D(2, name="avgpool")(x)
    x = keras.layers.Concatenate(name="cat")([p, q])
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="convt")(x)
    x = keras.layers.UpSampling2D(2, name="up")(x)
    g = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    f = keras.layers.Flatten(name="flat")(keras.layers.Reshape((32, 32, 4), name="reshape")(x))
    f = keras.layers.Dense(8, name="dense_f")(f)
    x = keras.layers.Concatenate(name="cat2")([g, f])
    return keras.Model(i, keras.layers.Dense(5, name="head")(x))


@pytest.fixture(scope="module")
def setup():
    model = zoo_model()
    data = np.random.default_rng(0).normal(size=(48, 16, 16, 3)).astype("float32")
    before = ([w.copy() for w in model.get_weights()], model.get_config())
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(data, calib_batch_size=16, verbose=0)
    return model, data, before, q, qmodel


def test_the_float_model_is_not_changed(setup):
    model, _, before, _, _ = setup
    assert model.get_config() == before[1]
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before[0], strict=True))


def test_quantizers_follow_the_strategy(setup):
    _, _, _, q, qmodel = setup
    info = qstrat.get_quantize_info(qmodel)
    for conv in ("conv1", "shared_conv", "dw", "convt", "dense_f", "head"):
        assert set(info[conv]) >= {"kernel", "bias"}, conv
        assert info[conv]["kernel"]["round_mode"] == "HALF_AWAY_FROM_ZERO"
    # Conv -> BN -> ReLU: BN folded into the conv, one quantizer, after the ReLU.
    assert "bn1" not in info and [e.detail for e in q.optimize_report.of("fold_conv_bn")] == ["folded into conv1"]
    assert "output" not in info["conv1"] and "output" in info["relu1"]
    for name in ("add", "mul", "maxpool", "avgpool", "cat", "up", "gap", "head", "image"):
        assert "output" in info[name], name
    assert info["relu1"]["output"]["round_mode"] == "HALF_UP"
    assert info["image"]["output"]["method"] == "Min_MSE"
    rep = q.report.layers
    assert rep["pad"].status == "skipped" and "keeps its input's grid" in rep["pad"].reason
    assert rep["reshape"].status == "skipped" and rep["flat"].status == "skipped"
    assert "fused with relu1" in rep["conv1"].notes[0]
    # The shared conv is one wrapper called twice.
    wrappers = [layer for layer in qmodel.layers if isinstance(layer, QuantizeWrapper)]
    assert [w.layer.name for w in wrappers].count("shared_conv") == 1
    assert len(wrappers[[w.layer.name for w in wrappers].index("shared_conv")]._inbound_nodes) == 2


def test_quantized_outputs_are_close_to_float(setup):
    model, data, _, _, qmodel = setup
    yf, yq = np_(model(data)), np_(qmodel(data))
    err = np.sqrt(np.mean((yf - yq) ** 2)) / np.sqrt(np.mean(yf**2))
    assert 0 < err < 0.2


def test_bypassed_quantizers_reproduce_the_optimized_float_model(setup):
    model, data, _, q, _ = setup
    # Bias correction changes float biases to cancel quantization's mean shifts, so it is off here.
    qmodel = q.quantize_model(data, calib_batch_size=16, verbose=0, include_bias_corr=False)
    optimized = q.optimize_model()  # BN folded, CLE: equal to the float model up to rounding
    yf, yo = np_(model(data)), np_(optimized(data))
    assert np.abs(yf - yo).max() <= 1e-5 * np.abs(yf).max()
    n = set_quantizers_enabled(qmodel, False)
    try:
        assert n > 20
        assert np.array_equal(yo, np_(qmodel(data)))
    finally:
        set_quantizers_enabled(qmodel, True)
    assert not np.array_equal(yo, np_(qmodel(data)))


def _flags(qmodel):
    """The on/off flags of the tensors' quantizers (FakeQuant) and of the layers' (QuantizeWrapper)."""
    from qstrat.layers import FakeQuant

    tensors = [float(np_(layer.enabled)) for layer in qmodel.layers if isinstance(layer, FakeQuant)]
    layers = [
        float(np_(f)) for layer in qmodel.layers if isinstance(layer, QuantizeWrapper) for f in layer.enabled.values()
    ]
    return tensors, layers


def test_bypass_of_the_activations_or_the_weights_alone(setup):
    model, data, _, _, qmodel = setup
    try:
        n_act = set_quantizers_enabled(qmodel, False, which="activations")
        tensors, layers = _flags(qmodel)
        assert n_act == len(tensors) > 0 and set(tensors) == {0.0} and set(layers) == {1.0}
        weights_alone = np_(qmodel(data))
        set_quantizers_enabled(qmodel, True)
        n_w = set_quantizers_enabled(qmodel, False, which="weights")
        tensors, layers = _flags(qmodel)
        assert n_w == len(layers) > 0 and set(tensors) == {1.0} and set(layers) == {0.0}
        activations_alone = np_(qmodel(data))
        set_quantizers_enabled(qmodel, False, which="activations")  # the rest off too: the float computation
        nothing = np_(qmodel(data))
        assert set_quantizers_enabled(qmodel, True) == n_act + n_w
        everything = np_(qmodel(data))
        for part in (weights_alone, activations_alone):  # each half alone is neither all nor none of the error
            assert not np.array_equal(part, everything) and not np.array_equal(part, nothing)
        with pytest.raises(ConfigError, match="activations, weights"):
            set_quantizers_enabled(qmodel, False, which="biases")
        assert set(_flags(qmodel)[0]) == set(_flags(qmodel)[1]) == {1.0}  # refused before any flag moved
    finally:
        set_quantizers_enabled(qmodel, True)


def test_with_the_optimize_stage_off_bypass_is_exactly_the_users_model():
    model = zoo_model()
    data = np.random.default_rng(2).normal(size=(16, 16, 16, 3)).astype("float32")
    off = {key: False for key in PASSES}
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(data, verbose=0, include_bias_corr=False, **off)
    assert "bn1" in qstrat.get_quantize_info(qmodel) or any(layer.name == "bn1" for layer in qmodel.layers)
    set_quantizers_enabled(qmodel, False)
    assert np.array_equal(np_(model(data)), np_(qmodel(data)))


def test_save_and_load(setup, tmp_path):
    _, data, _, _, qmodel = setup
    path = tmp_path / "q.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    assert np.array_equal(np_(qmodel(data)), np_(loaded(data)))
    assert qstrat.get_quantize_info(loaded) == qstrat.get_quantize_info(qmodel)


def test_fs_quantizes_inputs_of_convs():
    model = zoo_model()
    data = np.random.default_rng(1).normal(size=(32, 16, 16, 3)).astype("float32")
    qmodel = qstrat.Quantizer(model, "fs").quantize_model(data, verbose=0)
    info = qstrat.get_quantize_info(qmodel)
    assert info["conv1"]["kernel"]["per_channel"] and "input_0" in info["conv1"]
    assert "input_0" not in info.get("image", {}) and "output" in info["image"]


def test_calibration_data_errors():
    model = zoo_model()
    q = qstrat.Quantizer(model, "pof2s")
    bad = np.ones((4, 16, 16, 3), "float32")
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationDataError, match="input 'image': 1 of 3072 values are NaN or Inf"):
        q.quantize_model(bad, verbose=0)
    with pytest.raises(
        CalibrationDataError, match=r"expected shape \(None, 16, 16, 3\) \(batch first\), got \(16, 16, 3\)"
    ):
        q.quantize_model(np.ones((16, 16, 3), "float32"), verbose=0)
    with pytest.raises(CalibrationDataError, match="expected numbers, got dtype"):
        q.quantize_model(np.array([["a"]]), verbose=0)
    with pytest.raises(CalibrationDataError, match="yielded no batches"):
        q.quantize_model(iter([]), verbose=0, include_bias_corr=False)
    with pytest.raises(CalibrationDataError, match="no calibration data"):
        q.quantize_model(None, verbose=0)
    with pytest.raises(ConfigError, match='unknown strategy key "weight_bits"'):
        q.quantize_model(bad, verbose=0, weight_bits=4)


def test_generators_and_pydatasets_stream(setup):
    model = setup[0]
    data = setup[1]

    def gen():
        for k in range(0, 48, 8):
            yield data[k : k + 8], None

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, k):
            return data[k * 16 : (k + 1) * 16]

    def quantize(source, **kw):
        return qstrat.get_quantize_info(qstrat.Quantizer(model, "pof2s").quantize_model(source, verbose=0, **kw))

    # A generator is read once, so bias correction (a second read) is off for this comparison.
    ia = quantize(gen(), include_bias_corr=False)
    ib = quantize(Batches(), include_bias_corr=False)
    ic = quantize(data, calib_batch_size=16, calib_steps=3, include_bias_corr=False)
    assert ia == ib == ic  # the global policy depends on the data, not on how it is batched
    # A PyDataset can be read again: bias correction runs, and reads it the same way every time.
    q = qstrat.Quantizer(model, "pof2s")
    once = qstrat.get_quantize_info(q.quantize_model(Batches(), verbose=0))
    assert q.bias_corrections and once == quantize(Batches()) != ic


def test_overrides_reach_the_quantizers(setup):
    model, data = setup[0], setup[1]
    qm = qstrat.Quantizer(model, "pof2s").quantize_model(data, verbose=0, weight_bit=4, ignore_layers=["head"])
    info = qstrat.get_quantize_info(qm)
    assert info["conv1"]["kernel"]["bit_width"] == 4 and "head" not in info


def test_subclassed_models_are_refused_with_a_fix():
    class Net(keras.Model):
        def call(self, x):
            return x * 2

    with pytest.raises(UnsupportedModelError, match="Rebuild it as a functional model"):
        qstrat.Quantizer(Net())


def test_optimize_model_returns_an_independent_float_equivalent_model(setup):
    model, data = setup[0], setup[1]
    q = qstrat.Quantizer(model, "pof2s")
    opt = q.optimize_model()
    yf, yo = np_(model(data)), np_(opt(data))
    assert opt is not model and np.abs(yf - yo).max() <= 1e-5 * np.abs(yf).max()
    assert "BatchNormalization" not in {type(layer).__name__ for layer in opt.layers}
    assert q.optimize_report.passes_run[:2] == ["remove_dropout", "remove_unused_layers"]
    assert not any(a is b for a in opt.weights for b in model.weights)
    off = q.optimize_model(fold_conv_bn=False, convert_bn_to_dwconv=False, include_cle=False)
    assert np.array_equal(yf, np_(off(data)))


def test_progress_names_each_stage_and_counts_the_passes_over_the_data(setup, capsys):
    model, data = setup[0], setup[1]
    q = qstrat.Quantizer(model, "pof2s")
    q.quantize_model(data, calib_batch_size=16, verbose=0)
    assert capsys.readouterr().out == ""  # verbose=0 prints nothing
    stages = ("capture + optimize", "annotate + insert + rebuild", "weight calibration", "activation calibration")
    assert set(stages + ("bias correction",)) <= set(q.timings)
    assert q.bias_corrections
    assert q.timings["data_passes"] == 2  # one calibration pass, then bias correction's read of its samples
    q.quantize_model(data, calib_batch_size=16, verbose=1)
    out = capsys.readouterr().out
    for stage in stages + ("bias correction",):
        assert f"qstrat: {stage}: " in out
    assert "qstrat: pass 1 over the calibration data: activation statistics" in out
    assert "(2 passes over the calibration data)" in out
    q.quantize_model(data, calib_batch_size=16, verbose=0, include_bias_corr=False)
    assert q.timings["data_passes"] == 1 and "bias correction" not in q.timings


def tiny_model():
    i = keras.Input((6,), name="x")
    return keras.Model(i, keras.layers.Dense(3, name="head")(keras.layers.Dense(4, activation="relu", name="d")(i)))


def test_quantize_model_keeps_the_collector_off_the_callers_objects_and_lifts_only_its_own_freeze():
    import gc

    model = tiny_model()
    data = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    seen = []

    def batches():
        for k in range(0, 16, 8):
            seen.append(gc.get_freeze_count())  # read while quantize_model runs
            yield data[k : k + 8]

    def quantize():
        qstrat.Quantizer(model, "pof2s").quantize_model(batches(), verbose=0, include_bias_corr=False)

    assert gc.get_freeze_count() == 0
    quantize()
    assert len(seen) == 2 and min(seen) > 0  # frozen throughout the calibration pass
    assert gc.get_freeze_count() == 0  # and lifted

    gc.freeze()  # the caller's own freeze stays as it was
    try:
        frozen = gc.get_freeze_count()
        seen.clear()
        quantize()
        # not frozen again (that would add the objects made since), not lifted (0); frozen objects freed
        # meanwhile leave the count
        assert len(seen) == 2 and all(0 < n <= frozen for n in seen) and 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()

    gc.disable()  # with the collector off, nothing to keep away from it
    try:
        seen.clear()
        quantize()
        assert seen == [0, 0] and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_quantize_model_warnings_point_at_the_callers_line():
    data = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    with pytest.warns(UserWarning, match="train_with_bn") as record:
        qstrat.Quantizer(tiny_model(), "pof2s").quantize_model(data, verbose=0, train_with_bn=True)
    assert [w.filename for w in record if "train_with_bn" in str(w.message)] == [__file__]
