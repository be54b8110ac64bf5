"""The integer executor against the fake-quant Keras model, bit for bit.

For every FakeQuant node of the quantized graph, the Keras tensor times 2^pos
must be exactly the executor's integers, and the outputs must be equal, on a
trained CNN with real digits, on a model holding every supported layer type,
and on inputs placed on the input quantizer's rounding ties.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import qstrat
from qstrat import zoo
from qstrat.errors import CalibrationDataError, UnsupportedError
from qstrat.graph import capture
from qstrat.graph.ir import TensorRef
from qstrat.integer import run_integer, simulate_integer
from qstrat.layers import FakeQuant, QuantizeWrapper, set_quantizers_enabled


def quantize(model, calib, strategy="pof2s", **keys):
    keys.setdefault("include_bias_corr", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qstrat.Quantizer(model, strategy).quantize_model(calib, calib_batch_size=64, verbose=0, **keys)


def keras_grid_values(qmodel, x) -> tuple[dict, list]:
    """({FakeQuant node name: its output in the Keras model}, [model outputs]), from one probe on the same layers.

    On TensorFlow and torch the probe is called eagerly (tracing it for ``predict`` takes seconds); on JAX
    an eager call compiles every operation apart (hundreds of compiles, half a minute for the model of every
    layer type), so there it runs through ``predict``, compiled once.
    `test_simulate_integer_equals_predict` compares with ``predict`` itself on every backend.
    """
    graph = capture(qmodel)
    tensors = {}
    for node in graph.nodes:
        for ref, t in zip(node.inputs, node.in_tensors, strict=True):
            tensors.setdefault(ref, t)
    for ref, t in zip(graph.outputs, qmodel.outputs, strict=True):
        tensors.setdefault(ref, t)
    nodes = [n for n in graph.nodes if isinstance(n.op, FakeQuant)]
    inputs = qmodel.inputs if len(qmodel.inputs) > 1 else qmodel.inputs[0]
    probe = keras.Model(inputs, [tensors[TensorRef(n.name, 0)] for n in nodes] + list(qmodel.outputs))
    if keras.backend.backend() == "jax":
        outs = probe.predict(x, batch_size=len(x), verbose=0)
    else:
        outs = [ops.convert_to_numpy(o) for o in probe(x, training=False)]
    return dict(zip([n.name for n in nodes], outs, strict=False)), outs[len(nodes) :]


def assert_bit_exact(qmodel, x):
    """The executor's integers are the Keras model's grid values times 2^pos, everywhere; returns the run."""
    run = run_integer(qmodel, x)
    fq, want = keras_grid_values(qmodel, x)
    assert set(run.tensors) == set(fq) and fq
    for name, (ints, pos) in run.tensors.items():
        scaled = np.ldexp(fq[name].astype(np.float64), np.asarray(pos))
        assert ints.dtype == np.int64 and scaled.shape == ints.shape, name
        mismatches = int(np.sum(scaled != ints))
        assert mismatches == 0, f"{name}: {mismatches} of {ints.size} differ"
    got = run.outputs if isinstance(run.outputs, list) else [run.outputs]
    for a, b in zip(want, got, strict=True):
        assert b.dtype == np.float32 and np.array_equal(a, b)
    return run


def random_biases(model, seed=0):
    """Nonzero biases everywhere (Keras starts them at zero, which would leave the bias path untested)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape).astype(np.float32))
    return model


# ---- (a) the trained digits CNN on real images ------------------------------------------------------


@pytest.fixture(scope="module")
def digits16():
    x, _ = zoo.digits()
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)  # the CNN's 16x16 input


@pytest.mark.portable
@pytest.mark.parametrize(
    "strategy,keys",
    [
        ("pof2s", {}),
        ("pof2s", {"weight_per_channel": True}),
        ("pof2s", {"weight_per_channel": True, "activation_per_channel": True}),
        ("pof2s", {"include_bias_corr": True}),
        ("tqt", {}),
    ],
    ids=["pof2s", "per_channel", "per_channel_activations", "bias_corr", "tqt"],
)
def test_digits_cnn(digits16, strategy, keys):
    qmodel = quantize(zoo.digits_cnn(), digits16[:256], strategy, **keys)
    x = digits16[256:512]
    run = assert_bit_exact(qmodel, x)
    assert run.float_layers == [] and run.accumulator_overflow == []
    assert np.array_equal(run.outputs, qmodel.predict(x, verbose=0, batch_size=len(x)))
    assert len(run.tensors) == sum(isinstance(layer, FakeQuant) for layer in qmodel.layers)
    if keys.get("activation_per_channel"):
        assert np.shape(run.tensors["relu2_output_q"][1]) == (32,)


# ---- (b) every layer type ---------------------------------------------------------------------------


def every_layer_model(plain_averages=True):
    """Two inputs (8x8 images, 16x4 sequences), two outputs, and every layer the executor knows.

    ``plain_averages=False`` swaps the three Keras averages over a count that
    is not a power of 2 for max pooling (see `PLAIN_AVERAGES`).
    """
    keras.utils.set_random_seed(7)
    img, seq = keras.Input((8, 8, 1), name="image"), keras.Input((16, 4), name="sequence")
    x = L.ReLU(name="relu")(L.Conv2D(8, 3, padding="same", name="conv")(img))
    d = L.Conv2D(8, 3, padding="same", dilation_rate=2, name="dilated")(x)
    d = L.LeakyReLU(negative_slope=0.1, name="leaky")(d)
    alpha = keras.initializers.RandomUniform(0, 0.5)
    p = L.PReLU(shared_axes=[1, 2], alpha_initializer=alpha, name="prelu")(L.Conv2D(8, 1, name="pw")(x))
    s = L.Subtract(name="sub")([L.Add(name="add")([d, p]), x])
    g = L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(s)
    m = L.Multiply(name="mul")([s, L.Activation("sigmoid", name="sig")(g)])
    dw = L.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same", name="dw")(m)
    dw = L.Activation("relu6", name="relu6")(dw)
    mp = L.MaxPooling2D(3, strides=2, padding="same", name="maxpool")(m)
    if plain_averages:
        ap = L.AveragePooling2D(3, strides=2, padding="same", name="avgpool_same")(m)
    else:
        ap = L.MaxPooling2D(2, name="avgpool_same")(m)
    dap = L.AveragePooling2D(3, strides=2, name="avgpool")(L.ZeroPadding2D(((1, 0), (1, 0)), name="pad_avg")(m))
    cat = L.Concatenate(name="cat")([dw, mp, ap, dap])
    t = L.Conv2DTranspose(8, 3, strides=2, padding="same", name="convt")(cat)
    t2 = L.Conv2DTranspose(4, 2, strides=2, padding="valid", output_padding=1, name="convt_op")(cat)
    t2 = L.Cropping2D(((0, 1), (1, 0)), name="crop")(t2)
    u = L.UpSampling2D(2, name="up")(cat)
    ub = L.UpSampling2D(2, interpolation="bilinear", name="up_bilinear")(cat)
    zp = L.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(L.Concatenate(name="cat_up")([t, t2, u, ub]))
    gap9 = L.GlobalAveragePooling2D(name="gap9")(zp)  # 9x9: the DPU's sum * k / 2^n
    z = L.Activation("linear", name="lin")(L.Conv2D(4, 3, strides=2, name="strided")(zp))
    perm = L.Permute((2, 1, 3), name="permute")(z)
    gap = L.GlobalAveragePooling2D(name="gap")(perm)  # 4x4: a power of 2, kept plain
    flat = L.Flatten(name="flat")(perm)
    vol = L.Conv3D(2, 2, padding="same", name="conv3d")(L.Reshape((4, 4, 4, 1), name="to3d")(flat))
    vol = L.GlobalAveragePooling3D(name="gap3d")(L.ReLU(name="relu3d")(vol))
    tanh = L.Activation("tanh", name="tanh")(L.Dense(16, name="dense")(flat))
    q = L.Conv1D(8, 3, padding="causal", dilation_rate=2, name="conv1d")(seq)
    q = L.Activation("relu", name="act_relu")(q)
    q2 = L.ReLU(max_value=6, name="relu_max6")(L.Conv1D(8, 3, strides=2, padding="same", name="conv1d_s")(q))
    q3 = L.DepthwiseConv1D(3, name="dw1d")(q)
    pool1d = L.GlobalAveragePooling1D if plain_averages else L.GlobalMaxPooling1D
    g1 = pool1d(name="gap1d")(q3)  # 14 steps: an exact average over 14
    q3 = L.Cropping1D((4, 4), name="crop1d")(L.ZeroPadding1D((1, 1), name="pad1d")(q3))
    q4 = L.MaxPooling1D(2, padding="same", name="maxpool1d")(q)
    pool1d = L.AveragePooling1D if plain_averages else L.MaxPooling1D
    q5 = pool1d(3, strides=2, padding="same", name="avgpool1d")(q)
    av = L.Average(name="avg")([q2, q3, q4, q5])  # over 4: exact on every backend
    ct = L.Conv1DTranspose(4, 3, strides=2, padding="same", name="convt1d")(av)
    c1 = L.Concatenate(name="cat1d")([L.UpSampling1D(2, name="up1d")(av), ct])
    c1 = L.Flatten(name="flat1d")(L.Conv1D(2, 3, name="conv1d_end")(c1))
    lam = L.Lambda(lambda v: v * 0.75, name="lambda")(g1)
    head = L.Concatenate(name="cat_head")([gap, gap9, tanh, lam, vol, c1])
    out = L.Activation("softmax", name="softmax")(L.Dense(10, name="head")(head))
    return random_biases(keras.Model([img, seq], [out, L.Dense(3, name="aux")(c1)]))


@pytest.fixture(scope="module")
def mixed_data():
    """Real digits (as images and as 16x4 sequences) and random normal data: calibration and test sets."""
    images, _ = zoo.digits()
    rng = np.random.default_rng(0)

    def take(lo, n):
        real = [images[lo : lo + n], images[lo + n : lo + 2 * n].reshape(n, 16, 4)]
        noise = [rng.normal(size=(n, 8, 8, 1)), rng.normal(size=(n, 16, 4))]
        return [np.concatenate([a, b.astype(np.float32)]) for a, b in zip(real, noise, strict=True)]

    return take(0, 64), take(300, 48)


# JAX computes a Keras average over N values as the sum times float32(1 / N) (XLA turns the division
# into that product), which rounds an exact average off its tie whenever 1 / N is not a float32 (N not a
# power of 2): the fake-quant model then differs from the exact integer result there (9 of 768 values
# of the 1-D global average, say). TensorFlow and torch divide, exactly. So the tests of plain averages
# run on TensorFlow; the portable ones keep averages over powers of 2 and the DPU's sum * k / 2^n.
PLAIN_AVERAGES = ("avgpool_same", "gap1d", "avgpool1d")


@pytest.mark.parametrize(
    "keys,plain_averages",
    [
        ({}, True),
        ({"weight_per_channel": True}, True),
        pytest.param({"weight_per_channel": True}, False, marks=pytest.mark.portable),
    ],
    ids=["per_tensor", "per_channel", "per_channel_portable"],
)
def test_every_layer_type(mixed_data, keys, plain_averages):
    calib, x = mixed_data
    qmodel = quantize(every_layer_model(plain_averages), calib, **keys)
    if keys.get("weight_per_channel"):
        pos = qmodel.get_layer("quant_dw").state["kernel"]["pos"]
        assert pos.shape == (8,) and len(set(np.asarray(pos).tolist())) > 1  # really per channel
    run = assert_bit_exact(qmodel, x)
    assert run.float_layers == ["up_bilinear", "tanh", "lambda", "cat_head", "softmax"]
    types = {type(layer.layer if isinstance(layer, QuantizeWrapper) else layer).__name__ for layer in qmodel.layers}
    assert {"DPUHardSigmoid", "DPUAveragePooling2D", "DPUGlobalAveragePooling2D", "PReLU", "Average"} <= types
    plain = [type(qmodel.get_layer(name)).__name__ for name in PLAIN_AVERAGES]
    assert all(("Average" in t) == plain_averages for t in plain), plain


@pytest.mark.portable
def test_separable_conv_kept_whole(digits16):
    """separable_conv=False keeps SeparableConv2D: depthwise then pointwise in one integer accumulator."""
    keras.utils.set_random_seed(1)
    i = keras.Input((16, 16, 1))
    h = L.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, activation="relu", name="sep")(i)
    h = L.SeparableConv2D(4, 3, strides=2, name="sep2")(h)
    model = keras.Model(i, L.Dense(3, name="head")(L.Flatten()(h)))
    for keys in ({}, {"weight_per_channel": True}):
        qmodel = quantize(model, digits16[:128], separable_conv=False, **keys)
        assert isinstance(qmodel.get_layer("quant_sep").layer, L.SeparableConv2D)
        assert_bit_exact(qmodel, digits16[300:364])


# ---- (c) rounding ties at the input, every round mode -----------------------------------------------

ROUND_MODES = ["HALF_UP", "HALF_AWAY_FROM_ZERO", "HALF_TO_ZERO", "HALF_TO_EVEN", "FLOOR"]


@pytest.mark.portable
@pytest.mark.parametrize("mode", ROUND_MODES)
def test_inputs_on_rounding_ties(digits16, mode):
    """(k + 1/2) * 2^-pos inputs, inside and beyond the grid, with every round mode for inputs and activations."""
    qmodel = quantize(zoo.digits_cnn(), digits16[:256], input_round_mode=mode, activation_round_mode=mode)
    pos = qstrat.get_quantize_info(qmodel)["digit"]["output"]["quantize_pos"]
    rng = np.random.default_rng(3)
    k = rng.integers(-140, 140, (64, 16, 16, 1))
    ties = np.ldexp(k + 0.5, -pos).astype(np.float32)
    random = rng.uniform(-1.2, 1.2, (64, 16, 16, 1)).astype(np.float32)
    run = assert_bit_exact(qmodel, np.concatenate([ties, random]))
    ints, _ = run.tensors["digit_output_q"]
    assert ints.min() == -128 and ints.max() == 127  # the ties beyond the grid were clipped


# ---- the API ----------------------------------------------------------------------------------------


@pytest.mark.portable
def test_simulate_integer_equals_predict(mixed_data):
    calib, x = mixed_data
    qmodel = quantize(every_layer_model(plain_averages=False), calib)
    whole = simulate_integer(qmodel, x)
    assert isinstance(whole, list) and len(whole) == 2
    want = qmodel.predict(x, verbose=0, batch_size=len(x[0]))
    assert all(np.array_equal(a, b) for a, b in zip(want, whole, strict=True))
    by_name = simulate_integer(qmodel, {"image": x[0], "sequence": x[1]}, batch_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(whole, by_name, strict=True))
    with pytest.raises(CalibrationDataError, match="1 input arrays for a model with 2 inputs"):
        simulate_integer(qmodel, x[0])


# ---- what it refuses --------------------------------------------------------------------------------


def small_cnn():
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1), name="image")
    x = L.ReLU(name="relu")(L.Conv2D(4, 3, name="conv")(i))
    return keras.Model(i, L.Dense(2, name="head")(L.Flatten(name="flat")(x)))


@pytest.fixture(scope="module")
def images():
    return zoo.digits()[0][:64]


@pytest.mark.portable
def test_a_bypassed_quantizer_is_refused(images):
    qmodel = quantize(small_cnn(), images)
    qmodel.get_layer("relu_output_q").enabled.assign(0.0)
    with pytest.raises(UnsupportedError, match="relu_output_q: the quantizer is bypassed.*power-of-2"):
        run_integer(qmodel, images)
    set_quantizers_enabled(qmodel, True)
    qmodel.get_layer("quant_conv").enabled["kernel"].assign(0.0)
    with pytest.raises(UnsupportedError, match="conv.kernel: the quantizer is bypassed"):
        run_integer(qmodel, images)


@pytest.mark.portable
def test_float_scale_models_are_refused(images):
    qmodel = quantize(small_cnn(), images, "fs")
    with pytest.raises(UnsupportedError, match="has float scales; simulate_integer needs power-of-2 quantizers"):
        simulate_integer(qmodel, images)


@pytest.mark.portable
def test_asymmetric_grids_are_refused(images):
    qmodel = quantize(small_cnn(), images, activation_symmetry=False)
    with pytest.raises(UnsupportedError, match="asymmetric"):
        simulate_integer(qmodel, images)


@pytest.mark.portable
def test_a_leaky_relu_the_dpu_has_not_is_refused(images):
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    x = L.LeakyReLU(negative_slope=0.3, name="leaky")(L.Conv2D(4, 3, name="conv")(i))
    qmodel = quantize(keras.Model(i, x), images)
    with pytest.raises(UnsupportedError, match="leaky: LeakyReLU slope 0.3 is not the DPU's 26/256"):
        simulate_integer(qmodel, images)


# ---- where float32 cannot follow --------------------------------------------------------------------


@pytest.mark.portable
def test_a_bias_finer_than_float32_holds_is_where_the_fake_quant_model_rounds(images):
    """conv + bias at position 23: 4.5 - 2^-22 needs 25 bits, float32 rounds it to the tie 4.5.

    The executor keeps the exact sum and rounds it half up to 4; the fake-quant
    model rounds the tie to 5. This is the float path's error, not the
    executor's (the DPU aligns its bias to the accumulator with shifts).
    """
    i = keras.Input((4, 1))
    model = keras.Model(i, L.ReLU(name="relu")(L.Conv1D(1, 1, name="conv")(i)))
    model.get_layer("conv").set_weights([np.ones((1, 1, 1), np.float32), np.array([-(2.0**-22)], np.float32)])
    x = np.array([4.5, 5.5, 6.5, 7.25], np.float32).reshape(1, 4, 1)
    qmodel = quantize(model, x, include_cle=False)
    qmodel.get_layer("relu_output_q").state["pos"].assign(0.0)
    qmodel.get_layer("quant_conv").state["bias"]["pos"].assign(23.0)
    run = run_integer(qmodel, x)
    assert run.tensors["relu_output_q"][0].ravel().tolist() == [4, 5, 6, 7]
    assert qmodel.predict(x, verbose=0).ravel().tolist() == [5, 6, 7, 7]
