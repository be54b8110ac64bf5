"""The DPU position rules on quantized models: every bound holds after refine, nothing moves where none is violated.

The bounds are recomputed here from `qstrat.get_quantize_info` and the
model's connections (the test's own reading, not `positions.py`'s), for
every rule: conv shift_cut and shift_bias (LeakyReLU variant), Add/Multiply
shift_read and shift_write, swish, hard sigmoid, concat and pool alignment.
"""

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat.graph.capture import capture
from qstrat.layers import DPUHardSigmoid, FakeQuant, QuantizeWrapper
from qstrat.passes.refine.constraints import RULES
from qstrat.passes.refine.positions import apply_constraints

pytestmark = pytest.mark.portable

ALL_ON = dict.fromkeys(RULES, True)
ALL_OFF = dict.fromkeys(RULES, False)
CONV = ("Conv2D", "DepthwiseConv2D", "Dense")


def model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 3))
    c1 = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    a = L.LeakyReLU(0.1, name="leaky")(L.Conv2D(8, 1, name="c_leaky")(c1))
    b = L.Activation("sigmoid", name="gate")(L.Conv2D(8, 1, name="c_gate")(c1))
    s = L.Add(name="add")([a, b])
    m = L.Multiply(name="mul")([s, L.Conv2D(8, 1, name="c_mul")(c1)])
    w = L.Activation("swish", name="swish")(L.DepthwiseConv2D(1, name="dw")(c1))
    p = L.MaxPooling2D(2, name="maxpool")(L.Concatenate(name="cat")([m, w]))
    p = L.AveragePooling2D(3, strides=1, name="avgpool")(p)  # 3x3: a DPU average
    out = L.Dense(4, name="head")(L.Flatten(name="flat")(p))
    return keras.Model(x, out)


DATA = np.random.default_rng(0).uniform(-1, 1, (32, 8, 8, 3)).astype("float32")


def quantize(strategy="pof2s", **overrides):
    q = qstrat.Quantizer(model(), strategy)
    return q, q.quantize_model(DATA, verbose=0, calib_batch_size=16, **overrides)


# ---- the test's own reading of the bounds ---------------------------------------------------------


def _inner(node):
    return node.op.layer if isinstance(node.op, QuantizeWrapper) else node.op


def _fq_pos(node, info):
    fq = node.op
    k = int(node.name.rsplit("@", 1)[1]) if "@" in node.name else 0
    owner, _, what = [fq.target or fq.name, *fq.more_targets][k].partition("/")
    return info[owner][what or "output"]["quantize_pos"]


def violations(qmodel) -> list[tuple[str, str]]:
    """(rule, layer) for every bound the model's positions break."""
    info, g = qstrat.get_quantize_info(qmodel), capture(qmodel)

    def tensor(ref):
        node = g.node(ref.node)
        while type(node.op).__name__ in ("Flatten", "Reshape"):
            node = g.node(node.inputs[0].node)
        return _fq_pos(node, info) if isinstance(node.op, FakeQuant) else None

    def output(node):
        users = g.consumers(type(node.inputs[0])(node.name, 0))
        if (
            users
            and not isinstance(users[0].op, FakeQuant)
            and type(users[0].op).__name__ in ("ReLU", "LeakyReLU", "Activation")
        ):
            return output(users[0])[0], users[0]
        return (_fq_pos(users[0], info) if users and isinstance(users[0].op, FakeQuant) else None), None

    def source(ref):
        node = g.node(ref.node)
        return source(node.inputs[0]) if isinstance(node.op, FakeQuant) else ref

    found = []
    for node in g.nodes:
        kind, layer = type(_inner(node)).__name__, _inner(node).name
        if kind in CONV and isinstance(node.op, QuantizeWrapper):
            i, w, b = tensor(node.inputs[0]), info[layer]["kernel"]["quantize_pos"], info[layer]["bias"]["quantize_pos"]
            o, act = output(node)
            sc = w + i - o
            if not 0 <= sc <= 16:
                found.append(("adjust_dpu_shift_cut", layer))
            if not min(0, sc - 16) <= w + i - b <= 16:
                found.append(("adjust_dpu_shift_bias", layer))
            if act is not None and type(act.op).__name__ == "LeakyReLU" and not 0 <= w + i - b <= 16:
                found.append(("adjust_dpu_shift_bias_leakyrelu", layer))
        elif isinstance(node.op, DPUHardSigmoid):
            i, (o, _) = tensor(node.inputs[0]), output(node)
            if not (0 <= i <= 15 and o >= 7 and 14 + i - o >= 0):
                found.append(("adjust_dpu_sigmoid", layer))
        elif kind in ("Add", "Multiply"):
            ins, (o, _) = [tensor(r) for r in node.inputs], output(node)
            if max(ins) - min(ins) > 15:
                found.append(("adjust_dpu_shift_read", layer))
            if not -15 <= min(ins) - o <= 15:
                found.append(("adjust_dpu_shift_write", layer))
            srcs = [source(r) for r in node.inputs]
            hs = [k for k in (0, 1) if isinstance(g.node(srcs[k].node).op, DPUHardSigmoid)]
            if kind == "Multiply" and hs and source(g.node(srcs[hs[0]].node).inputs[0]) == srcs[1 - hs[0]]:
                if not 0 <= sum(ins) - o <= 15:
                    found.append(("adjust_dpu_shift_swish", layer))
        elif kind == "Concatenate":
            if len({*[tensor(r) for r in node.inputs], output(node)[0]}) != 1:
                found.append(("align_concat", layer))
        elif kind in ("MaxPooling2D", "AveragePooling2D", "DPUAveragePooling2D"):
            if tensor(node.inputs[0]) != output(node)[0]:
                found.append(("align_pool", layer))
    return found


def scramble(qmodel, seed: int, spread: int = 14) -> None:
    """Move every per-tensor power-of-2 position by a random step in [-spread, spread] (in place)."""
    rng = np.random.default_rng(seed)
    for layer in qmodel.layers:
        states = [layer.state] if isinstance(layer, FakeQuant) else []
        states += list(layer.state.values()) if isinstance(layer, QuantizeWrapper) else []
        for state in states:
            pos = state["pos"].numpy() + rng.integers(-spread, spread + 1)
            state["pos"].assign(np.asarray(pos, "float32"))


def test_the_model_has_every_rules_layers():
    _, qmodel = quantize(**ALL_OFF)
    types = {type(_inner(n)).__name__ for n in capture(qmodel).nodes}
    assert {"DPUHardSigmoid", "Add", "Multiply", "Concatenate", "MaxPooling2D", "DPUAveragePooling2D"} <= types
    assert {"Conv2D", "DepthwiseConv2D", "Dense", "LeakyReLU"} <= types


@pytest.mark.parametrize("seed", range(6))
def test_every_bound_holds_after_the_rules(seed):
    _, qmodel = quantize(**ALL_OFF, include_bias_corr=False)
    scramble(qmodel, seed)
    before = violations(qmodel)
    assert before, "the scrambled positions should break some bound"
    changes = apply_constraints(qmodel, ALL_ON)
    assert changes
    assert violations(qmodel) == []
    # Where every bound holds, the rules move nothing.
    assert apply_constraints(qmodel, ALL_ON) == []


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_moves_only_positions_of_layers_that_break_it(rule):
    _, qmodel = quantize(**ALL_OFF, include_bias_corr=False)
    for seed in range(4):
        scramble(qmodel, 100 + seed)
        broken = {layer for r, layer in violations(qmodel) if r == rule}
        changes = apply_constraints(qmodel, {rule: True})
        assert {c.layer for c in changes} <= broken
        assert not [v for v in violations(qmodel) if v[0] == rule]
        if broken:
            assert changes


def test_quantize_model_leaves_every_bound_satisfied():
    q, qmodel = quantize()  # pof2s: every rule on, bias correction on (which re-checks the bias positions)
    assert violations(qmodel) == []
    info = qstrat.get_quantize_info(qmodel)
    for c in q.position_changes:
        owner, what = c.quantizer.split("/")
        assert c.rule in RULES and owner in info and what in info[owner]
    # The same model without the rules breaks some bound: the rules did the work.
    _, unconstrained = quantize(**ALL_OFF)
    assert violations(unconstrained)


def test_tqt_thresholds_move_with_their_positions():
    _, qmodel = quantize("tqt", **ALL_OFF, include_bias_corr=False)
    for layer in qmodel.layers:  # positions from thresholds: log_th = 7 - pos - 0.5 for 8 bits
        if isinstance(layer, FakeQuant) and "log_th" in layer.state:
            layer.state["log_th"].assign(np.asarray(7 - 25 - 0.5, "float32"))  # position 25
    apply_constraints(qmodel, ALL_ON)
    assert violations(qmodel) == []


def test_rules_that_cannot_both_hold_warn():
    """A hard sigmoid's output (position 7 at least) concatenated with a tensor of range 100 (position 0):
    concat alignment lowers it, the sigmoid rule raises it again. No position satisfies both, and the
    rules say so rather than stop at whichever ran last."""
    keras.utils.set_random_seed(0)
    x = keras.Input((4, 4, 3))
    gate = L.Activation("sigmoid", name="gate")(L.Conv2D(4, 1, name="pre")(x))
    big = L.Conv2D(4, 1, name="big")(x)
    net = keras.Model(x, L.Concatenate(name="cat")([gate, big]))
    kernel, bias = net.get_layer("big").get_weights()
    net.get_layer("big").set_weights([kernel * 100, bias])
    with pytest.warns(UserWarning, match=r"conflict on .*gate/output"):
        qstrat.Quantizer(net, "pof2s").quantize_model(DATA[:, :4, :4], verbose=0, include_bias_corr=False)


def test_a_conv_feeding_a_16_bit_grid_is_left_to_itself():
    """The shift rules model the 8-bit datapath. A conv whose (fused) output grid is int16 keeps its kernel
    position: applied anyway, shift_cut = wpos + ipos - opos < 0 moved the 8-bit kernel up until it clipped."""
    x = keras.Input((8, 8, 3))
    conv = L.Conv2D(2, 1, name="conv")
    y = L.Dense(4, name="head")(L.Flatten()(L.ReLU(name="act")(conv(x))))
    net = keras.Model(x, y)
    # Large weights and inputs (positions about 7), small outputs (an int16 position about 21): the
    # one large weight reads the one near-zero input channel.
    kernel = np.full((1, 1, 3, 2), 1e-3, "float32")
    kernel[0, 0, 0, :] = 0.9
    conv.set_weights([kernel, np.zeros(2, "float32")])
    data = DATA.copy()
    data[..., 0] *= 0.01
    info = {}
    for config in ({}, {"act": "int16"}):
        q = qstrat.Quantizer(net, "pof2s")
        qmodel = q.quantize_model(data, verbose=0, calib_batch_size=16, layer_config=config, include_cle=False)
        info[bool(config)] = qstrat.get_quantize_info(qmodel)
        if config:
            assert info[True]["act"]["output"]["bit_width"] == 16
            assert not [c for c in q.position_changes if c.quantizer == "conv/kernel"]
    (model_input,) = set(info[True]) - {"conv", "act", "head"}
    where = ((model_input, "output"), ("conv", "kernel"), ("act", "output"))
    i, w, o = (info[True][k][t]["quantize_pos"] for k, t in where)
    assert w + i - o < 0  # the bound the 8-bit rule would have enforced
    assert w == info[False]["conv"]["kernel"]["quantize_pos"]
