"""MAFS: its moving average runs over calibration and training batches and is frozen at inference.

Tolerances. The keras path averages in float32: b <- b - (b - r)(1 - d),
then min = b / w with w = -expm1(n log d). With u = 2^-24 and M the largest
|batch min/max| so far, each update rounds three times (b - r, the product,
the difference) and holds 1 - d to float32 (relative u), an error of at most
u|b| + 6u(1 - d)M <= 7u w_n M, where w_n = 1 - d^n >= w_k; decay d < 1 only
shrinks old errors, so after n updates |b_n - b_exact| <= 7 n u w_n M, plus
u w_n M for a starting state rounded to float32. Dividing by w (expm1 within
2 ulps on every backend, the product and the division one each) adds 4u M:

    |min - min_exact| <= (7n + 8) u M,

and the same for max. That bounds the distance to the float64 EMA (the
calibration observer) and, by the triangle inequality twice over, to the
float32 NumPy twin `reference_train` (which differs from the backends only by
fused multiply-adds and the expm1 implementation, so tighter in practice).
The quantized output of a training step is compared exactly with the twin's
`reference` applied to the state the step wrote, since the step quantized with
those very values.
"""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat  # noqa: F401 - registers the layers
from qstrat.calibration import make_observer
from qstrat.errors import UnsupportedError
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.quantizers import MAFSQuantizer, reference
from qstrat.quantizers.float_scale import _FloatScale

pytestmark = pytest.mark.portable

U = 2.0**-24

CASES = [
    {"per_channel": False},  # symmetric, per tensor (the defaults)
    {"per_channel": True, "channel_axis": -1, "symmetry": False},
]


def np_(t):
    return np.asarray(ops.convert_to_numpy(t))


def batches(n, size=8, channels=4, seed=0):
    """Batches whose ranges drift, per channel, so every update moves the average."""
    rng = np.random.default_rng(seed)
    spread = np.linspace(0.5, 3.0, channels)
    return [(rng.normal(0.3 * i, 1.0 + 0.4 * i, size=(size, channels)) * spread).astype(np.float32) for i in range(n)]


def spec(decay=0.9, **kw):
    return {"type": "MAFSQuantizer", "params": {"bit_width": 8, "ema_decay": decay, **kw}}


def state_of(layer) -> dict:
    return {k: np_(v) for k, v in layer.state.items()}


def float64_ema(q, bs):
    """The exact moving average of the batches' min/max: the calibration observer (float64)."""
    obs = make_observer(MAFSQuantizer(**{**q.get_config(), "method": "No_OF"}).observer_spec())
    for b in bs:
        obs.update(b)
    return obs.result()


def tol(n, bs):
    return (7 * n + 8) * U * max(float(np.abs(b).max()) for b in bs)


def assert_range_close(q, state, lo, hi, bound):
    got_lo, got_hi = q.moving_range(state)
    assert np.abs(got_lo - lo).max() <= bound, (got_lo, lo)
    assert np.abs(got_hi - hi).max() <= bound, (got_hi, hi)


def model_with_mafs(kw, decay=0.9):
    """Input -> FakeQuant(MAFS) -> Dense: the quantizer sees the raw batches during fit."""
    inp = keras.Input((4,))
    fq = FakeQuant(spec(decay, **kw), target="x/input", name="fq")
    out = keras.layers.Dense(1, name="d")(fq(inp))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model, fq


def fit(model, bs):
    x = np.concatenate(bs)
    model.fit(x, x.sum(axis=1, keepdims=True), batch_size=len(bs[0]), epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("kw", CASES)
def test_fit_updates_the_moving_average_like_the_numpy_ema(kw):
    model, fq = model_with_mafs(kw)
    q = fq.quantizer
    bs = batches(3)
    fit(model, bs)
    state = state_of(fq)
    assert state["steps"] == 3
    exact = float64_ema(q, bs)
    assert exact.steps == 3
    assert_range_close(q, state, exact.min, exact.max, tol(3, bs))
    # The float32 twin, step by step from the initial state.
    twin = q.initial_state((None, 4))
    for b in bs:
        _, twin = q.reference_train(b, twin)
    assert_range_close(q, state, *q.moving_range(twin), 2 * tol(3, bs))
    # Scale and zero point are those of the averaged range (scale is linear in it, |d s / d range| <= 1/127).
    assert np.abs(state["scale"] - twin["scale"]).max() <= 2 * tol(3, bs) / 127 + 4 * U * twin["scale"].max()
    assert np.array_equal(state["zero_point"], twin["zero_point"])
    # Inference uses what training left: the twin with that state, bit for bit.
    x = batches(1, seed=7)[0] * 2
    assert np.array_equal(np_(fq(x, training=False)), q.reference(x, state))


@pytest.mark.parametrize("kw", CASES)
def test_a_training_step_quantizes_with_the_updated_range(kw):
    fq = FakeQuant(spec(0.5, **kw), name="fq")
    fq.build((None, 4))
    q = fq.quantizer
    b0, b1 = batches(2)
    for v, value in zip(fq.state.values(), q.state_from_tensor(b0).values(), strict=True):
        v.assign(value)
    before = state_of(fq)
    y = np_(fq(b1, training=True))
    after = state_of(fq)
    assert after["steps"] == before["steps"] + 1
    assert not np.array_equal(after["scale"], before["scale"])
    assert np.array_equal(y, q.reference(b1, after))
    y_twin, twin = q.reference_train(b1, before)
    assert_range_close(q, after, *q.moving_range(twin), 2 * tol(2, [b0, b1]))
    assert np.array_equal(after["zero_point"], twin["zero_point"])
    # The twin's scale may differ in its last bits, so an output may round to the neighbouring level.
    assert np.abs(y - y_twin).max() <= 1.01 * twin["scale"].max()


@pytest.mark.parametrize("kw", CASES)
def test_predict_reads_the_state_and_leaves_it_unchanged(kw):
    model, fq = model_with_mafs(kw)
    q = fq.quantizer
    fit(model, batches(2))
    frozen = state_of(fq)
    x = batches(3, seed=5)[2] * 3  # a wider range than the average: clips
    model.predict(x, batch_size=4, verbose=0)
    fq(x, training=False)
    after = state_of(fq)
    assert all(np.array_equal(after[k], frozen[k]) for k in frozen)
    assert np.array_equal(np_(fq(x)), q.reference(x, frozen))
    assert np.array_equal(
        np_(fq(x)), np_(_FloatScale.__call__(q, ops.convert_to_tensor(x), frozen))
    )  # inference is plain FS


@pytest.mark.parametrize("kw", CASES)
def test_calibration_then_training_is_one_moving_average(kw):
    model, fq = model_with_mafs(kw)
    q = fq.quantizer
    bs = batches(5)
    obs = make_observer(q.observer_spec())  # what passes/calibrate.py does
    for b in bs[:3]:
        obs.update(b)
    stats = obs.result()
    calibrated = q.state_from_stats(stats)
    # Calibration results are what they were: scale and zero point of the debiased range.
    plain = q.state_from_range(stats.min, stats.max)
    assert all(np.array_equal(calibrated[k], plain[k]) for k in plain)
    assert calibrated["steps"] == 3
    for k, v in calibrated.items():
        fq.state[k].assign(v)
    fit(model, bs[3:])
    state = state_of(fq)
    assert state["steps"] == 5
    exact = float64_ema(q, bs)
    assert_range_close(q, state, exact.min, exact.max, tol(5, bs))


def test_state_from_tensor_and_plain_stats_start_an_average_of_one_batch():
    q = MAFSQuantizer(ema_decay=0.99, per_channel=False)
    x = batches(1)[0]
    st = q.state_from_tensor(x)
    assert st["steps"] == 1
    lo, hi = q.moving_range(st)
    assert abs(lo - x.min()) <= 4 * U * abs(x.min()) and abs(hi - x.max()) <= 4 * U * abs(x.max())
    assert set(st) == set(q.state_spec(x.shape))
    assert "min" in q.describe(st) and q.describe(q.initial_state(x.shape)).get("min") is None


def test_first_training_step_from_an_uncalibrated_state_takes_the_batch_range():
    """Zero-debiasing: with steps = 0 the accumulators' zeros carry no weight."""
    fq = FakeQuant(spec(0.999, per_channel=False), name="fq")
    fq.build((None, 4))
    b = batches(1)[0]
    fq(b, training=True)
    lo, hi = fq.quantizer.moving_range(state_of(fq))
    assert abs(lo - b.min()) <= 4 * U * abs(b.min()) and abs(hi - b.max()) <= 4 * U * abs(b.max())


def test_training_needs_variables_to_update():
    q = MAFSQuantizer()
    x = batches(1)[0]
    with pytest.raises(UnsupportedError, match="training=True updates the moving average"):
        q(x, q.state_from_tensor(x), training=True)


def grad_in_training(layer, x, w):
    """d sum(layer(x, training=True) * w) / dx on any backend (JAX: the update stays in a scope)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        t = tf.constant(x)  # a tensor, as a layer is fed; the tape watches it
        with tf.GradientTape() as tape:
            tape.watch(t)
            out = ops.sum(layer(t, training=True) * w)
        return np_(tape.gradient(out, t))
    if backend == "torch":
        import torch

        t = torch.tensor(x, requires_grad=True)
        (g,) = torch.autograd.grad(ops.sum(layer(t, training=True) * ops.convert_to_tensor(w)), [t])
        return np_(g)
    import jax

    def f(t):
        with keras.StatelessScope():
            return ops.sum(layer(t, training=True) * w)

    return np_(jax.grad(f)(x))


@pytest.mark.parametrize("kw", CASES)
def test_training_gradient_is_the_clipped_straight_through_estimator(kw):
    fq = FakeQuant(spec(0.5, **kw), name="fq")
    fq.build((None, 4))
    q = fq.quantizer
    b0 = batches(1)[0]
    for k, v in q.state_from_tensor(b0).items():
        fq.state[k].assign(v)
    before = state_of(fq)
    x = b0 * 3  # half the average's growth: the tails clip
    w = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    g = grad_in_training(fq, x, w)
    _, twin = q.reference_train(x, before)
    mask = reference.ste_mask_np(x, twin["scale"], twin["zero_point"], q.grid, q.params.round_mode, q.axis)
    assert 0 < mask.sum() < mask.size
    assert np.array_equal(g, w * mask)


def test_fit_updates_a_weight_quantizer_every_step():
    """MAFS on a kernel (QuantizeWrapper): one average update per training step, none in predict."""
    inp = keras.Input((4,))
    dense = keras.layers.Dense(3, name="d")
    wrapper = QuantizeWrapper(dense, {"kernel": spec(0.9, per_channel=True, channel_axis=-1)})
    model = keras.Model(inp, wrapper(inp))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x = np.concatenate(batches(4))
    model.fit(x, x[:, :3], batch_size=8, epochs=1, shuffle=False, verbose=0)
    state = {k: np_(v) for k, v in wrapper.state["kernel"].items()}
    assert state["steps"] == 4
    model.predict(x, verbose=0)
    assert np_(wrapper.state["kernel"]["steps"]) == 4
    kernel = np_(dense.kernel)
    q = wrapper.quantizers["kernel"]
    assert np.array_equal(np_(wrapper.quantized_weight("kernel")), q.reference(kernel, state))
