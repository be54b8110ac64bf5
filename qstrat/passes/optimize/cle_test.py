"""Cross-layer equalization: float equivalence, balanced ranges, the links it accepts, bias absorption."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.graph import capture, rebuild
from qstrat.graph.rewrite import Editor
from qstrat.layers.bias_axis import keras_adds_channels_first_bias_last
from qstrat.passes.optimize import OptimizeReport
from qstrat.passes.optimize.channels import per_in_channel, per_out_channel
from qstrat.passes.optimize.cle import cross_layer_equalization, find_pairs
from qstrat.passes.optimize.conftest import rand, randomize_bn
from qstrat.passes.optimize.fold_bn import fold_conv_bn

pytestmark = pytest.mark.portable
L = keras.layers
CFG = {"cle_steps": 10, "cle_balance_method": "max", "cle_weight_threshold": 0.1}


def _unbalanced(model, seed=0):
    """Scale c1's and dw's output channels by factors spanning 100x; the next layer compensates (through ReLU)."""
    rng = np.random.default_rng(seed)
    for head, tail in (("c1", "dw"), ("dw", "pw")):
        head, tail = model.get_layer(head), model.get_layer(tail)
        k, b = head.get_weights()
        r = 10 ** rng.uniform(-1, 1, size=b.shape[0])
        r[0], r[-1] = 0.1, 10.0
        head.set_weights([k * r.reshape(k.shape[-2:]) if isinstance(head, L.DepthwiseConv2D) else k * r, b * r])
        t = tail.get_weights()
        tail.set_weights([t[0] / r.reshape(-1, 1), *t[1:]])
    return model


def _chain_model(shape=(10, 10, 3), data_format="channels_last"):
    i = keras.Input(shape)
    f = {"data_format": data_format}
    x = L.Conv2D(8, 3, bias_initializer="random_normal", name="c1", **f)(i)
    x = L.ZeroPadding2D(1, name="pad", **f)(L.ReLU(name="r1")(x))
    x = L.DepthwiseConv2D(3, bias_initializer="random_normal", name="dw", **f)(x)
    x = L.Activation("relu", name="r2")(x)
    x = L.Conv2D(6, 1, activation="relu", bias_initializer="random_normal", name="pw", **f)(x)
    x = L.Flatten()(x)
    return keras.Model(i, L.Dense(4, name="fc")(x))


def test_cle_is_float_equivalent_and_balances_ranges(run_pass):
    model = _unbalanced(_chain_model())
    new, report, rel = run_pass(cross_layer_equalization, model, rand(4, 10, 10, 3), **CFG)
    assert rel <= 1e-5, rel
    assert [e.node for e in report.of("include_cle")] == ["c1", "dw"]
    for head, tail in (("c1", "dw"), ("dw", "pw")):
        h, t = new.get_layer(head), new.get_layer(tail)
        hk = np.vstack([np.abs(per_out_channel(type(h).__name__, np.asarray(h.kernel))), np.abs(np.asarray(h.bias))])
        rh, rt = hk.max(0), np.abs(per_in_channel(np.asarray(t.kernel))).max(0)
        np.testing.assert_allclose(rh, rt, rtol=1e-3)  # each channel's two ranges meet in the middle
    before = np.abs(np.asarray(model.get_layer("c1").kernel)).max((0, 1, 2))
    after = np.abs(np.asarray(new.get_layer("c1").kernel)).max((0, 1, 2))
    assert before.max() / before.min() > 50 and after.max() / after.min() < before.max() / before.min() / 5


def test_channels_first_layers_equalize_as_their_channels_last_twins(run_pass):
    """The kernels are laid out alike in both formats: CLE gives the same kernels, bit for bit, and a
    channels_first model it leaves float-equivalent (its channels on axis 1, which the padding leaves alone)."""
    last = _unbalanced(_chain_model((10, 11, 3)))
    first = _chain_model((3, 10, 11), "channels_first")  # outputs (8, 8, 9), ...: no axis as long as the channels
    first.set_weights(last.get_weights())
    new_last, _, _ = run_pass(cross_layer_equalization, last, rand(2, 10, 11, 3), **CFG)
    new_first, report, rel = run_pass(cross_layer_equalization, first, rand(4, 3, 10, 11), **CFG)
    assert rel <= 1e-5, rel
    assert [e.node for e in report.of("include_cle", "changed")] == ["c1", "dw"]
    for a, b in zip(new_last.get_weights(), new_first.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_no_pair_across_layouts_or_a_padding_of_the_channels():
    """A channels_first conv's channels are on axis 1: a Dense reads the last axis, and a ZeroPadding2D in the
    other layout pads the channel axis; neither is a pair. With the padding in the conv's layout, it is one."""
    i = keras.Input((3, 5, 7))
    x = L.ReLU()(L.Conv1D(4, 1, data_format="channels_first", name="head")(L.Reshape((3, 35))(i)))
    assert find_pairs(Editor(capture(keras.Model(i, L.Dense(2, name="tail")(x))))) == []
    for fmt, pairs in (("channels_last", 0), ("channels_first", 1)):
        y = L.ZeroPadding2D(1, data_format=fmt)(L.ReLU()(L.Conv2D(4, 1, data_format="channels_first", name="a")(i)))
        model = keras.Model(i, L.Conv2D(2, 1, data_format="channels_first", name="b")(y))
        assert len(find_pairs(Editor(capture(model)))) == pairs, fmt


def test_a_channels_first_layer_as_wide_as_its_channels_equalizes_only_where_keras_adds_its_bias_there(run_pass):
    model = _unbalanced(_chain_model((3, 10, 10), "channels_first"))  # c1's output is (8, 8, 8)
    new, report, rel = run_pass(cross_layer_equalization, model, rand(4, 3, 10, 10), **CFG)
    assert rel <= 1e-5, rel
    changed = [e.node for e in report.of("include_cle", "changed")]
    if keras_adds_channels_first_bias_last():  # c1 and dw (8, 8, 8) are left out; pw (6, 8, 8) has no pair
        assert changed == [] and [e.node for e in report.of("include_cle", "skipped")][:2] == ["c1", "dw"]
    else:
        assert changed == ["c1", "dw"]


def test_avg_method_and_threshold(run_pass):
    model = _unbalanced(_chain_model())
    x = rand(4, 10, 10, 3)
    new, _, rel = run_pass(cross_layer_equalization, model, x, **{**CFG, "cle_balance_method": "avg"})
    assert rel <= 1e-5
    assert not np.allclose(np.asarray(new.get_layer("c1").kernel), np.asarray(model.get_layer("c1").kernel))
    same, _, _ = run_pass(cross_layer_equalization, model, x, **{**CFG, "cle_weight_threshold": 1e9})
    for name in ("c1", "dw", "pw"):
        np.testing.assert_allclose(np.asarray(same.get_layer(name).kernel), np.asarray(model.get_layer(name).kernel))


def test_relu6_links_only_with_cle_to_relu6():
    i = keras.Input((6, 6, 2))
    x = L.ReLU(max_value=6.0)(L.Conv2D(4, 1, name="a")(i))
    model = keras.Model(i, L.Conv2D(3, 1, name="b")(x))
    ed = Editor(capture(model))
    assert find_pairs(ed) == []
    (pair,) = find_pairs(ed, to_relu6=True)
    assert (pair.head, pair.tail) == ("a", "b")


def test_no_pair_is_reported_and_leaves_the_graph(run_pass):
    i = keras.Input((6, 6, 2))
    model = keras.Model(i, L.MaxPooling2D()(L.Conv2D(4, 1)(i)))
    new, report, rel = run_pass(cross_layer_equalization, model, rand(2, 6, 6, 2), **CFG)
    assert rel == 0.0 and report.of("include_cle", "skipped")


def test_bias_absorption_moves_the_offset_and_keeps_outputs():
    i = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.RandomNormal(0, 0.01), name="head")(i)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    model = keras.Model(i, L.Conv2D(5, 1, name="tail")(x))
    bn = model.get_layer("bn")
    # BN output about N(10, 0.1^2): the ReLU never clips, so the 9.7 offset can move to the tail.
    bn.set_weights(
        [np.full(4, 0.1, "float32"), np.full(4, 10.0, "float32"), np.zeros(4, "float32"), np.full(4, 0.01, "float32")]
    )
    report = OptimizeReport()
    cfg = {**CFG, "cle_bias_absorption": True}
    folded = fold_conv_bn(capture(model), cfg, report)
    new = rebuild(cross_layer_equalization(folded, cfg, report))
    x = rand(8, 6, 6, 3)
    y0, y1 = ops.convert_to_numpy(model(x)), ops.convert_to_numpy(new(x))
    assert np.abs(y0 - y1).max() <= 1e-4 * np.abs(y0).max()
    (event,) = report.of("cle_bias_absorption")
    assert "moved 4 channel offsets" in event.detail
    head_out = keras.Model(new.input, new.get_layer("head").output)
    assert ops.convert_to_numpy(head_out(x)).max() < 1.0  # was about 10 before absorption


def test_bias_absorption_skips_a_padded_tail():
    i = keras.Input((6, 6, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="head")(i)))
    model = randomize_bn(keras.Model(i, L.Conv2D(2, 3, padding="same", name="tail")(x)))
    model.get_layer("bn").set_weights(
        [np.full(4, 0.1, "float32"), np.full(4, 5.0, "float32"), np.zeros(4, "float32"), np.ones(4, "float32")]
    )
    report = OptimizeReport()
    cfg = {**CFG, "cle_bias_absorption": True}
    cross_layer_equalization(fold_conv_bn(capture(model), cfg, report), cfg, report)
    (event,) = report.of("cle_bias_absorption")
    assert event.kind == "skipped" and "zero padding" in event.detail


@pytest.mark.parametrize(
    "type_name, shape", [("Conv2D", (3, 3, 4, 6)), ("DepthwiseConv2D", (3, 3, 4, 2)), ("Dense", (5, 7))]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_channel_ranges_follow_the_scales_as_if_the_kernel_were_scaled(type_name, shape, with_bias):
    from qstrat.passes.optimize.channels import scale_in, scale_out
    from qstrat.passes.optimize.cle import _Ranges

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=shape)
    bias = (
        rng.normal(size=shape[-2] * shape[-1] if type_name == "DepthwiseConv2D" else shape[-1]) if with_bias else None
    )
    first = _Ranges(type_name, kernel, bias)
    in_scale = rng.uniform(0.1, 10, size=first.in_scale.shape)
    out_scale = rng.uniform(0.1, 10, size=first.out_scale.shape)
    scaled = scale_out(type_name, scale_in(kernel, in_scale), out_scale)
    H = np.abs(per_out_channel(type_name, scaled))
    if with_bias:
        H = np.vstack([H, np.abs(bias * out_scale)[None, :]])
    T = np.abs(per_in_channel(scaled))
    # The same float64 products and sums in another order: a few ulps per term, at most ~54 terms here.
    for use_max, reduce in ((True, np.max), (False, np.mean)):
        r = _Ranges(type_name, kernel, bias, use_max)  # "max" keeps no sums
        r.in_scale, r.out_scale = in_scale, out_scale
        rh, hmax = r.out_ranges(use_max)
        rt, tmax = r.in_ranges(use_max)
        np.testing.assert_allclose(rh, reduce(H, axis=0), rtol=1e-13)
        np.testing.assert_allclose(rt, reduce(T, axis=0), rtol=1e-13)
        np.testing.assert_allclose(hmax, H.max(0), rtol=1e-13)
        np.testing.assert_allclose(tmax, T.max(0), rtol=1e-13)


def test_equalized_layers_are_made_in_model_order(monkeypatch):
    """Every process makes them in the same order (workers of one tf.distribute cluster create, and broadcast,
    their variables in that order); a set's order would change with the process's string hashing."""
    from qstrat.passes.optimize import cle

    made = []

    def recording(cls, config, *args, **kwargs):
        made.append(config["name"])
        return built_layer(cls, config, *args, **kwargs)

    built_layer = cle.built_layer
    monkeypatch.setattr(cle, "built_layer", recording)
    graph = capture(_unbalanced(_chain_model()))
    cross_layer_equalization(graph, CFG, OptimizeReport())
    assert made == ["c1", "dw", "pw"]


@pytest.mark.parametrize("method", ["max", "avg"])
def test_float32_weights_give_what_float64_copies_give_bit_for_bit(monkeypatch, method):
    """CLE reads the weights in their own dtype; products with its float64 scales promote them, so the result
    is that of float64 copies made first (which cost a pass and twice the memory on a large model)."""
    from qstrat.passes.optimize import cle

    model = _unbalanced(_chain_model())
    cfg = {**CFG, "cle_balance_method": method}

    def weights():
        out = rebuild(cross_layer_equalization(capture(model), cfg, OptimizeReport()))
        return [np.asarray(w) for w in out.get_weights()]

    own = weights()
    monkeypatch.setattr(cle, "_np", lambda v: np.asarray(v.numpy(), dtype=np.float64))
    copies = weights()
    assert len(own) == len(copies) == 8  # c1, dw, pw and fc: kernel and bias
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(own, copies, strict=True))
