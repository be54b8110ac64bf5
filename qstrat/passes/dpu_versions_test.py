"""The DPU versions pass: which layers it converts, into what, and that the rebuilt model computes the DPU's math."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.graph import TensorRef, capture, rebuild
from qstrat.layers import set_quantizers_enabled
from qstrat.layers.dpu import DPUAveragePooling2D, DPUGlobalAveragePooling2D, DPUHardSigmoid
from qstrat.passes.dpu_versions import to_dpu_versions

pytestmark = pytest.mark.portable
L = keras.layers

SIGMOID = "convert_sigmoid_to_hard_sigmoid"
HARD_SIGMOID = "convert_hard_sigmoid_to_dpu_version"
LEAKY = "convert_leaky_relu_to_dpu_version"
POOL = "convert_average_pooling2d_to_dpu_version"
ALL = (SIGMOID, HARD_SIGMOID, LEAKY, POOL)


def np_(t):
    return ops.convert_to_numpy(t)


def grid(shape, p=2, lo=-24, hi=24, seed=0):
    """Random values k * 2^-p (k an integer in [lo, hi]): the DPU layers compute exactly on these."""
    k = np.random.default_rng(seed).integers(lo, hi + 1, size=shape)
    return (k * 2.0**-p).astype("float32")


def hard_sigmoid(x):
    return np.clip(x.astype(np.float64) + 3, 0, 6) * 2731 / 16384


def window_sums(x, pool, strides):
    """NHWC window sums of a valid pooling, in float64."""
    (ph, pw), (sh, sw) = pool, strides
    n, h, w, c = x.shape
    oh, ow = (h - ph) // sh + 1, (w - pw) // sw + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j, :] = x[:, i * sh : i * sh + ph, j * sw : j * sw + pw, :].astype(np.float64).sum(axis=(1, 2))
    return out


def exact_f32(expected):
    assert np.array_equal(expected.astype(np.float32).astype(np.float64), expected), "the expectation is not exact"
    return expected


def exactly(y, expected):
    """y (float32) equals the float64 expectation, which float32 holds exactly."""
    expected, y = exact_f32(expected), np_(y)
    return y.shape == expected.shape and np.array_equal(y.astype(np.float64), expected)


def outputs(model, x):
    y = model(x)
    return [np_(t) for t in y] if isinstance(y, (list, tuple)) else [np_(y)]


def convert(model, *keys, **config):
    """(rebuilt model, converted graph, report) of the pass with ``keys`` on."""
    graph, report = to_dpu_versions(capture(model), {**dict.fromkeys(keys, True), **config})
    return rebuild(graph), graph, report


def nodes(graph):
    return [(n.name, n.type_name) for n in graph.nodes if n.type_name != "InputLayer"]


def events(report, kind=None):
    return [(e.pass_name, e.node, e.kind) for e in report.events if kind is None or e.kind == kind]


def everything_model():
    """One layer of each kind the pass converts, each reading the input; output j is the j-th below."""
    i = keras.Input((6, 6, 2))
    outs = [
        L.Activation("sigmoid", name="sig")(i),
        L.Activation("swish", name="sw")(i),
        L.Activation("hard_sigmoid", name="hsig")(i),
        L.ReLU(6.0, name="r6")(i + 3.0) * (1 / 6),
        L.LeakyReLU(0.1, name="lr")(i),
        L.AveragePooling2D(3, strides=1, name="ap")(i),
        L.GlobalAveragePooling2D(name="gap")(i),
    ]
    return keras.Model(i, outs)


# ---- nothing to do -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, dict.fromkeys(ALL, False)])
def test_with_every_key_off_the_graph_is_returned_unchanged(config):
    graph = capture(everything_model())
    new, report = to_dpu_versions(graph, config)
    assert new is graph and report.events == [] and report.passes_run == []


def test_a_model_with_nothing_to_convert_keeps_its_nodes():
    i = keras.Input((8, 8, 2))
    x = L.Conv2D(3, 3, activation="relu", name="c")(i)
    x = L.MaxPooling2D(2, name="mp")(L.Activation("tanh", name="t")(x))
    x = L.ReLU(name="r")(x)
    model = keras.Model(i, L.Dense(2, activation="softmax", name="d")(L.Flatten(name="f")(x)))
    graph = capture(model)
    new, report = to_dpu_versions(graph, dict.fromkeys(ALL, True))
    assert [(n.name, n.op) for n in new.nodes] == [(n.name, n.op) for n in graph.nodes]
    assert [n.inputs for n in new.nodes] == [n.inputs for n in graph.nodes]
    assert report.events == [] and sorted(report.passes_run) == sorted(ALL)


# ---- sigmoid and swish ---------------------------------------------------------------------------------


def test_sigmoid_becomes_one_hard_sigmoid_keeping_its_name():
    i = keras.Input((16,))
    model = keras.Model(i, L.Activation("sigmoid", name="sig")(i))
    new, graph, report = convert(model, SIGMOID)
    assert nodes(graph) == [("sig", "DPUHardSigmoid")]
    assert isinstance(new.get_layer("sig"), DPUHardSigmoid)
    assert events(report) == [(SIGMOID, "sig", "changed")]
    x = grid((3, 16))
    assert exactly(new(x), hard_sigmoid(x))
    assert np.abs(np_(new(x)) - np_(model(x))).max() > 0.01  # not the float sigmoid


@pytest.mark.parametrize("act", ["swish", "silu"])
def test_swish_becomes_x_times_a_hard_sigmoid(act):
    i = keras.Input((16,))
    model = keras.Model(i, L.Activation(act, name="sw")(i))
    new, graph, report = convert(model, SIGMOID)
    assert nodes(graph) == [("sw_hard_sigmoid", "DPUHardSigmoid"), ("sw", "Multiply")]
    x_ref = TensorRef(graph.nodes[0].name)
    assert graph.node("sw_hard_sigmoid").inputs == (x_ref,)
    assert graph.node("sw").inputs == (x_ref, TensorRef("sw_hard_sigmoid"))
    assert events(report) == [(SIGMOID, "sw", "changed")]
    x = grid((3, 16))
    assert exactly(new(x), x.astype(np.float64) * hard_sigmoid(x))
    assert np.abs(np_(new(x)) - np_(model(x))).max() > 0.01


def test_hard_sigmoid_activation_becomes_the_dpu_hard_sigmoid():
    i = keras.Input((16,))
    model = keras.Model(i, L.Activation("hard_sigmoid", name="hs")(i))
    new, graph, report = convert(model, HARD_SIGMOID)
    assert nodes(graph) == [("hs", "DPUHardSigmoid")]
    assert events(report) == [(HARD_SIGMOID, "hs", "changed")]
    x = grid((3, 16))
    assert exactly(new(x), hard_sigmoid(x))
    assert not np.array_equal(np_(new(x)), np_(model(x)))  # 2731/16384 is not 1/6


@pytest.mark.parametrize("act", ["hard_silu", "hard_swish"])
def test_hard_swish_becomes_x_times_the_dpu_hard_sigmoid(act):
    i = keras.Input((16,))
    model = keras.Model(i, L.Activation(act, name="hsw")(i))
    new, graph, report = convert(model, HARD_SIGMOID)
    assert nodes(graph) == [("hsw_hard_sigmoid", "DPUHardSigmoid"), ("hsw", "Multiply")]
    assert events(report) == [(HARD_SIGMOID, "hsw", "changed")]
    x = grid((3, 16))
    assert exactly(new(x), x.astype(np.float64) * hard_sigmoid(x))


# ---- the keras.ops hard-sigmoid pattern ----------------------------------------------------------------

PATTERNS = {
    "times_sixth": lambda x: L.ReLU(6.0, name="r6")(x + 3.0) * (1 / 6),
    "over_six": lambda x: L.ReLU(6.0, name="r6")(x + 3.0) / 6.0,
    "sixth_times": lambda x: (1 / 6) * L.ReLU(6.0, name="r6")(3.0 + x),
    "relu6_activation": lambda x: ops.multiply(L.Activation("relu6", name="r6")(ops.add(x, 3.0)), 1 / 6),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_relu6_of_x_plus_3_over_6_collapses_to_one_hard_sigmoid(pattern):
    i = keras.Input((16,))
    model = keras.Model(i, PATTERNS[pattern](i))
    before = capture(model)
    last = before.nodes[-1].name
    new, graph, report = convert(model, HARD_SIGMOID)
    assert nodes(graph) == [(last, "DPUHardSigmoid")]
    assert graph.node(last).inputs == (TensorRef(before.nodes[0].name),)
    assert events(report) == [(HARD_SIGMOID, last, "changed")]
    x = grid((3, 16))
    assert exactly(new(x), hard_sigmoid(x))
    assert not np.array_equal(np_(new(x)), np_(model(x)))


def _hs_pattern_with(add=3.0, scale=1 / 6, relu=None, extra=None):
    i = keras.Input((16,))
    a = i + add
    r = (relu or L.ReLU(6.0, name="r6"))(a)
    y = r * scale
    return keras.Model(i, [y, {"add": a, "relu": r}[extra]] if extra else y)


def _divided_by(c):
    i = keras.Input((16,))
    return keras.Model(i, L.ReLU(6.0, name="r6")(i + 3.0) / c)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: _hs_pattern_with(extra="add"), id="add_read_twice"),
        pytest.param(lambda: _hs_pattern_with(extra="relu"), id="relu_read_twice"),
        pytest.param(lambda: _hs_pattern_with(add=2.0), id="plus_2"),
        pytest.param(lambda: _hs_pattern_with(scale=0.2), id="times_0.2"),
        pytest.param(lambda: _hs_pattern_with(relu=L.ReLU(name="r")), id="relu_without_max"),
        pytest.param(lambda: _hs_pattern_with(relu=L.ReLU(5.0, name="r5")), id="relu5"),
        pytest.param(lambda: _divided_by(5.0), id="over_5"),
        pytest.param(
            lambda: _hs_pattern_with(relu=L.ReLU(6.0, threshold=1.0, name="r6t")),
            id="relu6_with_threshold",
        ),
    ],
)
def test_the_pattern_is_kept_when_it_is_not_exactly_the_hard_sigmoid(model):
    model = model()
    before = capture(model)
    new, graph, report = convert(model, HARD_SIGMOID)
    assert nodes(graph) == nodes(before)
    assert events(report) == []
    x = grid((3, 16))
    for a, b in zip(outputs(model, x), outputs(new, x), strict=True):
        assert np.array_equal(a, b)


# ---- activations held by a kernel layer ----------------------------------------------------------------


def test_conv_holding_a_sigmoid_is_split_then_converted():
    i = keras.Input((5, 5, 3))
    conv = L.Conv2D(4, 1, activation="sigmoid", name="c")
    model = keras.Model(i, conv(i))
    rng = np.random.default_rng(1)
    kernel = (rng.integers(-4, 5, (1, 1, 3, 4)) / 4).astype("float32")
    bias = (rng.integers(-4, 5, (4,)) / 4).astype("float32")
    conv.set_weights([kernel, bias])
    new, graph, report = convert(model, SIGMOID)
    assert nodes(graph) == [("c", "Conv2D"), ("c_sigmoid", "DPUHardSigmoid")]
    assert graph.node("c_sigmoid").inputs == (TensorRef("c"),)
    assert new.get_layer("c").get_config()["activation"] == "linear"
    assert conv.get_config()["activation"] == "sigmoid"  # the float model's layer is not touched
    assert events(report) == [(SIGMOID, "c", "changed"), (SIGMOID, "c_sigmoid", "changed")]
    x = grid((2, 5, 5, 3))
    pre = x.astype(np.float64) @ kernel[0, 0].astype(np.float64) + bias  # a 1x1 convolution
    assert exactly(new(x), hard_sigmoid(pre))


def test_dense_holding_a_swish_is_split_then_converted():
    i = keras.Input((6,))
    dense = L.Dense(4, activation="swish", name="fc")
    model = keras.Model(i, dense(i))
    rng = np.random.default_rng(2)
    kernel = (rng.integers(-4, 5, (6, 4)) / 4).astype("float32")
    bias = (rng.integers(-4, 5, (4,)) / 4).astype("float32")
    dense.set_weights([kernel, bias])
    new, graph, report = convert(model, SIGMOID)
    act = graph.nodes[-1].name
    assert nodes(graph) == [("fc", "Dense"), (f"{act}_hard_sigmoid", "DPUHardSigmoid"), (act, "Multiply")]
    assert graph.node(act).inputs == (TensorRef("fc"), TensorRef(f"{act}_hard_sigmoid"))
    assert new.get_layer("fc").get_config()["activation"] == "linear"
    assert events(report) == [(SIGMOID, "fc", "changed"), (SIGMOID, act, "changed")]
    x = grid((3, 6))
    pre = x.astype(np.float64) @ kernel + bias  # exact: small multiples of 1/16
    # x * hs(x) needs more than 24 bits: one float32 rounding of the exact factors, as the Multiply layer does.
    expected = pre.astype(np.float32) * exact_f32(hard_sigmoid(pre)).astype(np.float32)
    assert np.array_equal(np_(new(x)), expected)


def test_a_kernel_layer_is_not_split_for_a_key_that_is_off():
    i = keras.Input((6,))
    model = keras.Model(i, L.Dense(4, activation="sigmoid", name="fc")(i))
    _, graph, report = convert(model, HARD_SIGMOID, LEAKY, POOL)
    assert nodes(graph) == [("fc", "Dense")] and report.events == []
    assert graph.node("fc").op.get_config()["activation"] == "sigmoid"


# ---- LeakyReLU -----------------------------------------------------------------------------------------


def test_leaky_relu_0_1_gets_the_dpu_slope_and_other_slopes_are_kept():
    i = keras.Input((16,))
    model = keras.Model(i, [L.LeakyReLU(0.1, name="lr1")(i), L.LeakyReLU(0.2, name="lr2")(i)])
    new, graph, report = convert(model, LEAKY)
    assert sorted(nodes(graph)) == [("lr1", "LeakyReLU"), ("lr2", "LeakyReLU")]
    assert new.get_layer("lr1").get_config()["negative_slope"] == 26 / 256
    assert graph.node("lr2").op is model.get_layer("lr2")
    assert sorted(events(report)) == [(LEAKY, "lr1", "changed"), (LEAKY, "lr2", "skipped")]
    assert "0.2" in report.of(LEAKY, "skipped")[0].detail
    x = grid((3, 16))
    x64 = x.astype(np.float64)
    y1, y2 = new(x)
    assert exactly(y1, np.where(x64 >= 0, x64, x64 * 26 / 256))
    assert np.array_equal(np_(y2), np_(model(x)[1]))
    assert not np.array_equal(np_(y1), np_(model(x)[0]))


def test_a_relu_with_negative_slope_0_1_is_a_leaky_relu_and_gets_the_dpu_slope():
    """ReLU(negative_slope=0.1) computes LeakyReLU(0.1); a clipped or thresholded ReLU is not a leaky ReLU."""
    i = keras.Input((16,))
    outs = [L.ReLU(negative_slope=0.1, name="r1")(i), L.ReLU(max_value=6.0, negative_slope=0.1, name="r2")(i)]
    new, graph, report = convert(keras.Model(i, outs), LEAKY)
    assert sorted(nodes(graph)) == [("r1", "LeakyReLU"), ("r2", "ReLU")]
    assert events(report) == [(LEAKY, "r1", "changed")]
    x64 = grid((3, 16)).astype(np.float64)
    assert exactly(new(grid((3, 16)))[0], np.where(x64 >= 0, x64, x64 * 26 / 256))


# ---- average pooling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pool,strides,k,n",
    [
        ((3, 3), (1, 1), 7, 6),  # the DPU's table
        ((3, 3), (2, 2), 7, 6),
        ((3, 5), (2, 2), 17, 8),  # the rule, for K = 15
        ((9, 9), (1, 1), 101, 13),
    ],
)
def test_valid_average_pooling_becomes_the_dpu_version(pool, strides, k, n):
    i = keras.Input((9, 11, 2))
    model = keras.Model(i, L.AveragePooling2D(pool, strides, name="ap")(i))
    new, graph, report = convert(model, POOL)
    assert nodes(graph) == [("ap", "DPUAveragePooling2D")]
    layer = new.get_layer("ap")
    assert isinstance(layer, DPUAveragePooling2D) and layer.pool_size == pool and layer.strides == strides
    assert events(report) == [(POOL, "ap", "changed")]
    assert f"{k}/2^{n}" in report.events[0].detail
    x = grid((2, 9, 11, 2))
    assert exactly(new(x), window_sums(x, pool, strides) * k / 2**n)
    assert not np.array_equal(np_(new(x)), np_(model(x)))


@pytest.mark.parametrize(
    "shape,pool,strides,data_format",
    [
        ((7, 7, 2), 2, 2, "channels_last"),  # the last row and column of windows read padding
        ((8, 8, 2), 3, 1, "channels_last"),
        ((8, 7, 2), 2, 2, "channels_last"),  # padding along the width only
        ((2, 8, 7), 2, 2, "channels_first"),  # the same, channels first: (C, H, W)
        ((None, None, 2), 2, 2, "channels_last"),  # unknown size: border windows may read padding
    ],
)
def test_same_padding_that_reads_padding_is_kept(shape, pool, strides, data_format):
    i = keras.Input(shape)
    model = keras.Model(i, L.AveragePooling2D(pool, strides, padding="same", data_format=data_format, name="ap")(i))
    _, graph, report = convert(model, POOL)
    assert nodes(graph) == [("ap", "AveragePooling2D")]
    assert graph.node("ap").op is model.get_layer("ap")
    assert events(report) == [(POOL, "ap", "skipped")]
    assert "padding" in report.events[0].detail


@pytest.mark.parametrize(
    "shape,pool,strides,data_format",
    [
        ((9, 6, 2), 3, 3, "channels_last"),
        ((10, 5, 2), 5, 5, "channels_last"),
        ((2, 9, 6), 3, 3, "channels_first"),
    ],
)
def test_same_padding_that_reads_no_padding_is_converted(shape, pool, strides, data_format):
    i = keras.Input(shape)
    model = keras.Model(i, L.AveragePooling2D(pool, strides, padding="same", data_format=data_format, name="ap")(i))
    new, graph, report = convert(model, POOL)
    assert nodes(graph) == [("ap", "DPUAveragePooling2D")]
    assert new.get_layer("ap").padding == "valid"
    assert events(report) == [(POOL, "ap", "changed")]
    x = grid((2, *shape))
    x_nhwc = np.transpose(x, (0, 2, 3, 1)) if data_format == "channels_first" else x
    k, n = {3: (7, 6), 5: (10, 8)}[pool]
    expected = window_sums(x_nhwc, (pool, pool), (strides, strides)) * k / 2**n
    if data_format == "channels_first":
        expected = np.transpose(expected, (0, 3, 1, 2))
    assert exactly(new(x), expected)
    assert np_(model(x)).shape == expected.shape  # the float layer's "same" gives the same shape


@pytest.mark.parametrize(
    "shape,layer",
    [
        ((8, 8, 2), L.AveragePooling2D(2, name="pool")),
        ((8, 8, 2), L.AveragePooling2D((2, 4), strides=2, name="pool")),
        ((8, 8, 2), L.AveragePooling2D(2, padding="same", name="pool")),  # reads no padding
        ((8, 8, 2), L.GlobalAveragePooling2D(name="pool")),
        ((4, 2, 2), L.GlobalAveragePooling2D(keepdims=True, name="pool")),
    ],
    ids=["2x2", "2x4", "2x2_same", "global_8x8", "global_4x2"],
)
def test_power_of_two_windows_are_kept_the_dpu_average_is_exact_there(shape, layer):
    i = keras.Input(shape)
    model = keras.Model(i, layer(i))
    new, graph, report = convert(model, POOL)
    assert graph.node("pool").op is layer
    assert events(report) == [(POOL, "pool", "skipped")] and "power of 2" in report.events[0].detail
    x = grid((2, *shape))
    assert np.array_equal(np_(new(x)), np_(model(x)))


def test_a_pooling_window_above_255_is_kept():
    i = keras.Input((1, 256, 1))
    model = keras.Model(i, L.AveragePooling2D((1, 256), name="ap")(i))
    _, graph, report = convert(model, POOL)
    assert nodes(graph) == [("ap", "AveragePooling2D")]
    assert events(report) == [(POOL, "ap", "skipped")] and "255" in report.events[0].detail


@pytest.mark.parametrize(
    "shape,data_format,keepdims,k,n",
    [
        ((7, 7, 3), "channels_last", False, 21, 10),  # the DPU's table
        ((6, 4, 3), "channels_last", True, 85, 11),  # the rule, for K = 24
        ((5, 5, 3), "channels_last", False, 10, 8),
        ((3, 6, 4), "channels_first", False, 85, 11),  # (C, H, W): a 6x4 window
    ],
)
def test_global_average_pooling_becomes_the_dpu_version(shape, data_format, keepdims, k, n):
    i = keras.Input(shape)
    gap = L.GlobalAveragePooling2D(data_format=data_format, keepdims=keepdims, name="gap")
    model = keras.Model(i, gap(i))
    new, graph, report = convert(model, POOL)
    assert nodes(graph) == [("gap", "DPUGlobalAveragePooling2D")]
    assert isinstance(new.get_layer("gap"), DPUGlobalAveragePooling2D)
    assert events(report) == [(POOL, "gap", "changed")] and f"{k}/2^{n}" in report.events[0].detail
    x = grid((2, *shape))
    axes = (2, 3) if data_format == "channels_first" else (1, 2)
    assert exactly(new(x), x.astype(np.float64).sum(axis=axes, keepdims=keepdims) * k / 2**n)
    assert not np.array_equal(np_(new(x)), np_(model(x)))


def test_global_average_pooling_of_unknown_size_is_kept():
    i = keras.Input((None, None, 3))
    model = keras.Model(i, L.GlobalAveragePooling2D(name="gap")(i))
    _, graph, report = convert(model, POOL)
    assert nodes(graph) == [("gap", "GlobalAveragePooling2D")]
    assert events(report) == [(POOL, "gap", "skipped")] and "not known" in report.events[0].detail


# ---- each key converts its own layers ------------------------------------------------------------------

OWN = {
    SIGMOID: {"sig": "DPUHardSigmoid", "sw": "Multiply"},
    HARD_SIGMOID: {"hsig": "DPUHardSigmoid"},
    LEAKY: {"lr": "LeakyReLU"},
    POOL: {"ap": "DPUAveragePooling2D", "gap": "DPUGlobalAveragePooling2D"},
}


# The outputs of `everything_model` each key changes.
OWN_OUTPUTS = {SIGMOID: [0, 1], HARD_SIGMOID: [2, 3], LEAKY: [4], POOL: [5, 6]}


@pytest.mark.parametrize("key", ALL)
def test_each_key_converts_only_its_own_layers(key):
    model = everything_model()
    before = capture(model)
    new, graph, report = convert(model, key)
    after = dict(nodes(graph))
    pattern = {n.name for n in before.nodes if n.type_name == "Multiply"}  # the last node of the ops pattern
    own = {**OWN[key], **dict.fromkeys(pattern, "DPUHardSigmoid")} if key == HARD_SIGMOID else OWN[key]
    assert {e.node for e in report.events} == set(own)
    assert {(e.pass_name, e.kind) for e in report.events} == {(key, "changed")}
    for name, t in nodes(before):
        if name in own:
            assert after[name] == own[name], name
        elif key == HARD_SIGMOID and t in ("Add", "ReLU"):
            assert name not in after, name  # collapsed into the DPUHardSigmoid
        else:
            assert graph.node(name).op is before.node(name).op, name
    x = grid((2, 6, 6, 2))
    differ = [
        j for j, (a, b) in enumerate(zip(outputs(new, x), outputs(model, x), strict=True)) if not np.array_equal(a, b)
    ]
    assert differ == OWN_OUTPUTS[key]


def test_all_keys_together():
    model = everything_model()
    new, graph, report = convert(model, *ALL)
    kinds = [t for _, t in nodes(graph)]
    assert kinds.count("DPUHardSigmoid") == 4  # sigmoid, swish's, hard_sigmoid, the ops pattern
    assert "Add" not in kinds and "ReLU" not in kinds and "Activation" not in kinds
    assert {e.node for e in report.events if e.kind == "changed"} >= {"sig", "sw", "hsig", "lr", "ap", "gap"}
    x = grid((2, 6, 6, 2))
    x64 = x.astype(np.float64)
    ys = outputs(new, x)
    assert exactly(ys[0], hard_sigmoid(x))
    assert np.array_equal(ys[1], x * exact_f32(hard_sigmoid(x)).astype(np.float32))
    assert exactly(ys[2], hard_sigmoid(x)) and exactly(ys[3], hard_sigmoid(x))
    assert exactly(ys[4], np.where(x64 >= 0, x64, x64 * 26 / 256))
    assert exactly(ys[5], window_sums(x, (3, 3), (1, 1)) * 7 / 64)
    assert exactly(ys[6], x64.sum(axis=(1, 2)) * 7 / 256)


def test_pooling_with_unequal_strides_still_runs_after_conversion():
    i = keras.Input((9, 11, 2))
    model = keras.Model(i, L.AveragePooling2D((2, 3), strides=(1, 2), name="ap")(i))
    x = grid((2, 9, 11, 2))
    assert np_(model(x)).shape == (2, 8, 5, 2)  # the float layer runs
    new, graph, _ = convert(model, POOL)
    assert nodes(graph) == [("ap", "DPUAveragePooling2D")]
    k, n = 85, 9  # K = 6: the rule's nearest k / 2^n
    assert exactly(new(x), window_sums(x, (2, 3), (1, 2)) * k / 2**n)


# ---- shared layers -------------------------------------------------------------------------------------


def _shared_sigmoid_model():
    i, j = keras.Input((16,)), keras.Input((16,))
    act = L.Activation("sigmoid", name="act")
    return keras.Model([i, j], [act(i), act(j)])


def test_each_call_of_a_shared_sigmoid_becomes_a_hard_sigmoid():
    model = _shared_sigmoid_model()
    new, graph, report = convert(model, SIGMOID)
    assert [t for _, t in nodes(graph)] == ["DPUHardSigmoid", "DPUHardSigmoid"]
    assert [e.node for e in report.of(SIGMOID, "changed")] == ["act", "act@1"]
    x, y = grid((2, 16)), grid((2, 16), seed=1)
    a, b = new([x, y])
    assert exactly(a, hard_sigmoid(x)) and exactly(b, hard_sigmoid(y))


def test_the_layers_made_for_a_shared_sigmoid_have_no_call_marker_in_their_names():
    new, _, _ = convert(_shared_sigmoid_model(), SIGMOID)
    assert all("@" not in layer.name for layer in new.layers), [layer.name for layer in new.layers]


# ---- end to end: the quantize stage --------------------------------------------------------------------


def _sigmoid_pool_model():
    i = keras.Input((8, 8, 3))
    x = L.Activation("sigmoid", name="sig")(i)
    return keras.Model(i, L.AveragePooling2D(3, strides=1, name="pool")(x))


def _types(model):
    return {layer.name: type(layer).__name__ for layer in model.layers}


def test_pof2s_quantizes_the_dpu_versions():
    model = _sigmoid_pool_model()
    data = grid((8, 8, 8, 3))
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(data, verbose=0, include_bias_corr=False)
    types = _types(qmodel)
    assert types["sig"] == "DPUHardSigmoid" and types["pool"] == "DPUAveragePooling2D"
    assert "Activation" not in types.values() and "AveragePooling2D" not in types.values()
    notes = {name: q.report.layers[name].notes for name in ("sig", "pool")}
    assert any(n.startswith("DPU version: sigmoid -> DPUHardSigmoid") for n in notes["sig"])
    assert any(n.startswith("DPU version: 3x3 average -> sum * 7/2^6") for n in notes["pool"])
    # With its quantizers bypassed, the quantized model computes the DPU's float math exactly.
    assert set_quantizers_enabled(qmodel, False) > 0
    expected = window_sums(hard_sigmoid(data), (3, 3), (1, 1)) * 7 / 64
    assert exactly(qmodel(data), expected)


def test_pof2s_with_the_sigmoid_key_off_keeps_the_sigmoid():
    model = _sigmoid_pool_model()
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(
        grid((8, 8, 8, 3)), verbose=0, include_bias_corr=False, convert_sigmoid_to_hard_sigmoid=False
    )
    types = _types(qmodel)
    assert types["sig"] == "Activation" and qmodel.get_layer("sig").get_config()["activation"] == "sigmoid"
    assert types["pool"] == "DPUAveragePooling2D"
    assert not any("DPU version" in n for n in q.report.layers["sig"].notes)


def test_fs_converts_nothing():
    model = _sigmoid_pool_model()
    q = qstrat.Quantizer(model, "fs")
    qmodel = q.quantize_model(grid((8, 8, 8, 3)), verbose=0, include_bias_corr=False)
    types = _types(qmodel)
    assert types["sig"] == "Activation" and types["pool"] == "AveragePooling2D"
    assert not any(t.startswith("DPU") for t in types.values())
    assert not any("DPU version" in n for r in q.report.layers.values() for n in r.notes)


@pytest.mark.parametrize("kind", ["AveragePooling1D", "GlobalAveragePooling1D", "AveragePooling3D"])
def test_a_1d_or_3d_average_is_kept_with_a_note(kind):
    shape = (9, 3, 3) if kind == "AveragePooling3D" else (9,)
    i = keras.Input((*shape, 4))
    pool = getattr(L, kind)(name="pool") if kind.startswith("Global") else getattr(L, kind)(3, name="pool")
    new, graph, report = convert(keras.Model(i, pool(i)), POOL)
    assert events(report) == [(POOL, "pool", "skipped")]
    assert report.events[0].detail.startswith(f"kept: the DPU's average pooling is 2-D; {kind} divides exactly")
