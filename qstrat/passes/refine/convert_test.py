"""Refine's quantizer conversions: Pof2S/TQT -> FS and TQT -> Pof2S keep every output bit."""

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.passes import quantize_test
from qstrat.passes.refine.convert import FRAMEWORK_NOTE, to_float_scale, to_pof2s

pytestmark = pytest.mark.portable

POF2 = ("Pof2SQuantizer", "TQTQuantizer")
GRID_KEYS = ("bit_width", "data_format", "round_mode", "method", "symmetry", "unsigned", "narrow_range", "per_channel")


def np_(t):
    return keras.ops.convert_to_numpy(t)


def net():
    """Conv, ReLU, a conv shared by two branches, depthwise, Add and Dense."""
    keras.utils.set_random_seed(3)
    i = keras.Input((10, 10, 3), name="image")
    x = L.ReLU(name="relu1")(L.Conv2D(8, 3, padding="same", name="conv1")(i))
    shared = L.Conv2D(8, 3, padding="same", name="shared_conv")
    a = shared(x)
    b = shared(L.DepthwiseConv2D(3, padding="same", name="dw")(x))
    x = L.GlobalAveragePooling2D(name="gap")(L.Add(name="add")([a, b]))
    return keras.Model(i, L.Dense(5, name="head")(x))


def images(n=24, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 10, 10, 3)).astype("float32")


def quantized(strategy, *custom, model=None, **overrides):
    return qstrat.Quantizer(model or net(), strategy, *custom).quantize_model(images(), verbose=0, **overrides)


@pytest.fixture(scope="module", params=["pof2s", "tqt"])
def qmodel(request):
    return quantized(request.param)


def targets(info, types):
    return sorted((layer, t) for layer, ts in info.items() for t, d in ts.items() if d["quantizer"] in types)


def snapshot(model):
    return [np.array(w) for w in model.get_weights()], qstrat.get_quantize_info(model)


def assert_unchanged(model, before):
    weights, info = snapshot(model)
    assert all(np.array_equal(a, b) for a, b in zip(weights, before[0], strict=True))
    assert info == before[1]


def assert_same_outputs(a, b, x=None):
    x = images(8, seed=9) if x is None else x
    assert np.array_equal(np_(a(x)), np_(b(x)))


# ---- built-in strategies ------------------------------------------------------------------------


def test_to_float_scale_converts_every_power_of_2_quantizer_with_the_same_grid_and_outputs(qmodel):
    before = snapshot(qmodel)
    new, report = to_float_scale(qmodel)
    old_info, new_info = before[1], qstrat.get_quantize_info(new)
    assert len(report.converted()) == len(targets(old_info, POF2)) > 10
    assert sorted((c.layer, c.target) for c in report.converted()) == targets(old_info, POF2)
    assert report.not_converted() == []
    assert targets(new_info, ("FSQuantizer",)) == targets(old_info, POF2)
    for layer, target in targets(old_info, POF2):
        old, fs = old_info[layer][target], new_info[layer][target]
        assert {k: fs[k] for k in GRID_KEYS} == {k: old[k] for k in GRID_KEYS}
        assert np.array_equal(np.asarray(fs["scale"]), 2.0 ** -np.asarray(old["quantize_pos"], np.float64))
        assert np.all(np.asarray(fs["zero_point"]) == 0.0)
    assert [layer.name for layer in new.layers] == [layer.name for layer in qmodel.layers]
    assert_same_outputs(qmodel, new)
    assert_unchanged(qmodel, before)


def test_to_pof2s_freezes_trained_thresholds_at_their_positions(qmodel):
    before = snapshot(qmodel)
    new, report = to_pof2s(qmodel)
    old_info, new_info = before[1], qstrat.get_quantize_info(new)
    tqt = targets(old_info, ("TQTQuantizer",))
    assert sorted((c.layer, c.target) for c in report.converted()) == tqt
    assert len(report.not_converted()) == len(targets(old_info, ("Pof2SQuantizer",)))
    assert all(c.note == "already a Pof2SQuantizer" for c in report.not_converted())
    assert targets(new_info, ("TQTQuantizer",)) == []
    for layer, target in tqt:
        old, new_target = old_info[layer][target], new_info[layer][target]
        assert new_target["quantize_pos"] == old["quantize_pos"]
        assert {k: new_target[k] for k in GRID_KEYS} == {k: old[k] for k in GRID_KEYS}
    assert_same_outputs(qmodel, new)
    assert_unchanged(qmodel, before)


def test_converted_model_saves_and_loads_with_the_same_outputs(qmodel, tmp_path):
    for convert in (to_float_scale, to_pof2s):
        new, _ = convert(qmodel)
        path = tmp_path / f"{convert.__name__}.keras"
        new.save(path)
        loaded = qstrat.load_model(path)
        assert qstrat.get_quantize_info(loaded) == qstrat.get_quantize_info(new)
        assert_same_outputs(loaded, new)
        assert_same_outputs(loaded, qmodel)


def test_framework_quantizer_only_where_the_round_mode_and_bit_width_allow_it():
    qmodel = quantized("pof2s")
    new, report = to_float_scale(qmodel, framework=True)
    kinds = set()
    for layer in new.layers:
        pairs = [(layer.quantizer, layer.name)] if isinstance(layer, FakeQuant) else []
        if isinstance(layer, QuantizeWrapper):
            pairs = [(q, f"{layer.name}.{a}") for a, q in layer.quantizers.items()]
        for q, where in pairs:
            p = q.params
            allowed = p.round_mode.value == "HALF_UP" and 2 <= p.bit_width <= 16
            assert p.use_framework_quantizer == allowed, where
            kinds.add(p.round_mode.value)
    assert kinds == {"HALF_UP", "HALF_AWAY_FROM_ZERO"}  # the weights keep the DPU's rounding
    off = [c for c in report.converted() if "left off" in c.note]
    assert off and all('rounds HALF_UP only, got "HALF_AWAY_FROM_ZERO"' in c.note for c in off)
    assert {c.target for c in off} == {"kernel", "bias"}
    assert all(c.note == FRAMEWORK_NOTE for c in report.converted() if c not in off)


def test_the_framework_quantizer_can_move_a_near_tie_one_level_which_the_report_says():
    i = keras.Input((3,), name="x")
    spec = {"type": "Pof2SQuantizer", "params": {"round_mode": "HALF_UP"}}  # pos 0: step 1, grid [-128, 127]
    model = keras.Model(i, FakeQuant(spec, target="x", name="x_q")(i))
    x = np.array([[0.49999997, 1.4999999, -0.50000006]], "float32")
    assert np.array_equal(np_(model(x)), [[0.0, 1.0, -1.0]])
    exact, _ = to_float_scale(model)
    assert np.array_equal(np_(exact(x)), np_(model(x)))
    framework, report = to_float_scale(model, framework=True)
    # x - min = 128.49999997 rounds to the float32 128.5 before the op rounds it up.
    assert np.array_equal(np_(framework(x)), [[1.0, 2.0, 0.0]])
    assert [c.note for c in report.converted()] == [FRAMEWORK_NOTE]


def test_float_scale_quantizers_are_kept_and_reported():
    qmodel = quantized("fs")
    new, report = to_float_scale(qmodel, framework=True)
    info = qstrat.get_quantize_info(qmodel)
    assert report.converted() == []
    assert len(report.not_converted()) == sum(len(ts) for ts in info.values())
    assert all(c.note.startswith("already a float-scale quantizer") for c in report.not_converted())
    assert qstrat.get_quantize_info(new) == info
    assert_same_outputs(qmodel, new)
    _, report = to_pof2s(qmodel)
    assert report.converted() == [] and all("has a float scale" in c.note for c in report.not_converted())


def test_enabled_flags_are_kept():
    qmodel = quantized("pof2s")
    fq = next(la for la in qmodel.layers if isinstance(la, FakeQuant) and la.target == "relu1/output")
    wrapper = next(la for la in qmodel.layers if isinstance(la, QuantizeWrapper) and la.layer.name == "dw")
    fq.enabled.assign(0.0)
    wrapper.enabled["kernel"].assign(0.0)
    for convert in (to_float_scale, to_pof2s):
        new, _ = convert(qmodel)
        assert float(np_(new.get_layer(fq.name).enabled)) == 0.0
        flags = {a: float(np_(v)) for a, v in new.get_layer(wrapper.name).enabled.items()}
        assert flags == {"kernel": 0.0, "bias": 1.0}
        assert_same_outputs(qmodel, new)


# ---- shared quantizer state ---------------------------------------------------------------------


def twins():
    """Two parallel convs that share their weight, bias and output quantizers, feeding an Add."""
    keras.utils.set_random_seed(2)
    i = keras.Input((10, 10, 3), name="image")
    a = L.Conv2D(4, 3, padding="same", name="conv_a")(i)
    b = L.Conv2D(4, 3, padding="same", name="conv_b")(i)
    return keras.Model(i, L.Add(name="add")([a, b]))


def sharing_strategy(qtype):
    """Every target of conv_a shared with conv_b, all of one quantizer type."""
    return quantize_test.sharing_strategy(qtype, qtype, round_mode="HALF_UP")


@pytest.mark.parametrize("qtype", ["Pof2SQuantizer", "TQTQuantizer"])
def test_wrappers_that_shared_a_state_still_share_one(qtype, tmp_path):
    qmodel = quantized("pof2s", sharing_strategy(qtype), model=twins())
    before = snapshot(qmodel)
    for convert in (to_float_scale, to_pof2s):
        new, report = convert(qmodel)
        if convert is to_pof2s and qtype == "Pof2SQuantizer":
            assert report.converted() == []
        path = tmp_path / f"{qtype}_{convert.__name__}.keras"
        new.save(path)
        for model in (new, qstrat.load_model(path)):
            wa, wb = model.get_layer("quant_conv_a"), model.get_layer("quant_conv_b")
            for attr in ("kernel", "bias"):
                state = wa.shared_states[attr]
                assert state is wb.shared_states[attr]
                assert state is not qmodel.get_layer("quant_conv_a").shared_states[attr]
                assert all(wa.state[attr][k] is wb.state[attr][k] for k in wa.state[attr])
            (fq,) = [layer for layer in model.layers if isinstance(layer, FakeQuant)]  # one for both outputs
            assert [fq.target, *fq.more_targets] == ["conv_a/output", "conv_b/output"]
            assert_same_outputs(qmodel, model)
    assert_unchanged(qmodel, before)


# ---- grids built by hand ------------------------------------------------------------------------


def hand_built():
    """FakeQuants on grids the built-in strategies do not make, with their states set by hand."""
    specs = {
        "asym": ("Pof2SQuantizer", dict(symmetry=False, per_channel=True, round_mode="HALF_UP")),
        "tqt_u4": ("TQTQuantizer", dict(bit_width=4, unsigned=True)),
        "narrow6": ("Pof2SQuantizer", dict(bit_width=6, narrow_range=True, round_mode="HALF_TO_ZERO")),
        "wide32": ("Pof2SQuantizer", dict(bit_width=32, symmetry=False, round_mode="HALF_UP")),
        "far": ("Pof2SQuantizer", dict(round_mode="FLOOR")),
        "half": ("Pof2SQuantizer", dict(round_mode="HALF_AWAY_FROM_ZERO")),
    }
    keras.utils.set_random_seed(4)
    i = keras.Input((6,), name="x")
    x = i
    for name, (qtype, params) in specs.items():
        x = FakeQuant({"type": qtype, "params": params}, target=f"{name}/output", name=f"{name}_q")(x)
        x = L.Dense(6, name=f"{name}_dense")(x) if name != "half" else x
    model = keras.Model(i, x)
    g = model.get_layer
    g("asym_q").state["pos"].assign(np.array([3, 4, 5, 6, 2, 7], "float32"))
    g("asym_q").state["zero_point"].assign(np.array([-10, 0, 5, 20, -3, 1], "float32"))
    g("tqt_u4_q").state["log_th"].assign(0.3)
    g("narrow6_q").state["pos"].assign(3.0)
    g("wide32_q").state["pos"].assign(20.0)
    g("wide32_q").state["zero_point"].assign(-12345.0)
    g("far_q").state["pos"].assign(127.0)
    g("half_q").state["pos"].assign(2.5)
    return model


def test_hand_built_grids_convert_bit_for_bit_or_say_why_not():
    model = hand_built()
    x = (np.random.default_rng(1).normal(size=(64, 6)) * 4).astype("float32")
    x[0, :] = [0.5, -0.5, 1.5, 0.25, -0.75, 3.0]  # ties at common steps
    before = snapshot(model)
    new, report = to_float_scale(model, framework=True)
    assert [c.layer for c in report.converted()] == ["asym", "tqt_u4", "narrow6", "wide32"]
    reasons = {c.layer: c.note for c in report.not_converted()}
    assert reasons == {
        "far": "its position 127.0 is outside [-126, 126], so 2^-pos is no normal float32 scale",
        "half": "its position 2.5 is not an integer",
    }
    notes = {c.layer: c.note for c in report.converted()}
    assert notes["asym"] == FRAMEWORK_NOTE
    assert "rounds HALF_UP only" in notes["tqt_u4"] and "rounds HALF_UP only" in notes["narrow6"]
    assert "needs bit_width 2 to 16, got 32" in notes["wide32"]
    asym = new.get_layer("asym_q")
    assert np.array_equal(np_(asym.state["scale"]), 2.0 ** -np.array([3, 4, 5, 6, 2, 7], np.float64))
    assert np.array_equal(np_(asym.state["zero_point"]), [-10, 0, 5, 20, -3, 1])
    assert float(np_(new.get_layer("tqt_u4_q").state["scale"])) == 2.0**-3  # 4 - ceil(0.3)
    assert new.get_layer("far_q").quantizer.type_name == "Pof2SQuantizer"
    assert_unchanged(model, before)
    # Without the framework op every converted quantizer computes the same bits.
    exact, _ = to_float_scale(model)
    assert_same_outputs(model, exact, x)
    pof2, report = to_pof2s(model)
    assert [(c.layer, c.position) for c in report.converted()] == [("tqt_u4", 3)]
    assert float(np_(pof2.get_layer("tqt_u4_q").state["pos"])) == 3.0
    assert_same_outputs(model, pof2, x)
    assert "tqt_u4" in report.table() and "already a Pof2SQuantizer" in report.table()
