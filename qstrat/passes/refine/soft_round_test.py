"""Adaptive rounding: it starts at the weights, its hard choice is nearest rounding at the start, it ends on the grid."""

import keras
import numpy as np
import pytest

import qstrat
from qstrat.passes.refine.soft_round import SoftRounding
from qstrat.quantizers.affine import affine_of

pytestmark = pytest.mark.portable


def _wrapper(strategy: str, **overrides):
    keras.utils.set_random_seed(0)
    i = keras.Input((12,))
    model = keras.Model(i, keras.layers.Dense(6, name="d")(i))
    x = np.random.default_rng(0).normal(size=(32, 12)).astype("float32")
    qmodel = qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0, include_bias_corr=False, **overrides)
    return qmodel.get_layer("quant_d")


def _rounding(wrapper):
    w = keras.ops.convert_to_numpy(wrapper.layer.kernel)
    logits = keras.Variable(np.zeros(w.shape, "float32"))
    hard = keras.Variable(0.0)
    r = SoftRounding(wrapper.quantizers["kernel"], wrapper.state["kernel"], w, logits, hard, "d.kernel")
    logits.assign(r.start)
    return r, w, logits, hard


def _call(r, w):
    return keras.ops.convert_to_numpy(r(keras.ops.convert_to_tensor(w), {}))


@pytest.mark.parametrize("strategy,overrides", [("pof2s", {"weight_bit": 4}), ("pof2s", {}), ("fs", {})])
def test_it_starts_at_the_weights_and_its_hard_choice_is_the_nearest_grid_value(strategy, overrides):
    wrapper = _wrapper(strategy, **overrides)
    r, w, _, hard = _rounding(wrapper)
    # Soft: (floor + h - zp) * s with h the fractional position, through a float32 sigmoid and its logit:
    # a few float32 ulps of h (below 1e-6), times the step, and the float32 roundings of the sum and the
    # product (an ulp of the largest weight each); weights beyond the grid's ends sit on the end.
    q, state = (
        wrapper.quantizers["kernel"],
        {k: keras.ops.convert_to_numpy(v) for k, v in wrapper.state["kernel"].items()},
    )
    big = np.full(w.shape, 1e30, "float32")
    ends = np.clip(w, q.reference(-big, state), q.reference(big, state))
    atol = 2 * float(np.spacing(np.float32(np.max(np.abs(w))))) + float(np.max(r.scale)) * 1e-5
    np.testing.assert_allclose(_call(r, w), ends, rtol=0, atol=atol)
    hard.assign(1.0)
    nearest = keras.ops.convert_to_numpy(wrapper.quantized_weight("kernel"))
    # The training path, within one float32 ulp (on JAX, XLA computes fs's non-power-of-2 product its own
    # way); what fast finetune writes, weight(), bit for bit. No weight sits on a tie in this draw.
    np.testing.assert_allclose(_call(r, w), nearest, rtol=0, atol=float(np.spacing(np.float32(np.max(np.abs(w))))))
    # What fast finetune writes, weight(), is the grid value (q - zp) * s rounded once. Keras' framework
    # fake-quant (fs's) can land two float32 ulps off it (qstrat.quantizers.affine: ulp_off); the others on it.
    _, _, ulp_off = affine_of(q, state, "d.kernel")
    ulps = 2 * float(np.spacing(np.float32(np.max(np.abs(w))))) if ulp_off else 0.0
    np.testing.assert_allclose(r.weight(), nearest, rtol=0, atol=ulps)


def test_its_weights_are_grid_values_below_or_above():
    wrapper = _wrapper("pof2s", weight_bit=4)
    r, w, logits, _ = _rounding(wrapper)
    q, state = wrapper.quantizers["kernel"], wrapper.state["kernel"]
    state = {k: keras.ops.convert_to_numpy(v) for k, v in state.items()}
    step = float(np.max(r.scale))
    for value in (-10.0, 10.0):
        logits.assign(np.full(w.shape, value, "float32"))
        chosen = r.weight()
        np.testing.assert_array_equal(q.reference(chosen, state), chosen)  # on the grid: the quantizer keeps it
        lo, hi = q.reference(np.full(1, -1e30, "float32"), state), q.reference(np.full(1, 1e30, "float32"), state)
        within = np.clip(np.floor(w / step) * step if value < 0 else np.ceil(w / step) * step, lo, hi)
        np.testing.assert_array_equal(chosen, within.astype("float32"))


def test_the_regularizer_is_zero_on_a_decided_rounding_and_counts_the_undecided():
    wrapper = _wrapper("pof2s")
    r, w, logits, _ = _rounding(wrapper)
    logits.assign(np.full(w.shape, 10.0, "float32"))  # h clipped to 1
    assert float(keras.ops.convert_to_numpy(r.regularizer(2.0))) == 0.0
    logits.assign(np.zeros(w.shape, "float32"))  # h = 0.5: each weight adds 1
    assert float(keras.ops.convert_to_numpy(r.regularizer(2.0))) == pytest.approx(w.size, rel=1e-6)
