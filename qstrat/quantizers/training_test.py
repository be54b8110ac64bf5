"""Pof2S and FS in training: each batch's position, running extremes, frozen state elsewhere.

The keras versions (`qstrat.quantizers.batch_ranges`, which computes the
per-batch state in keras.ops) are compared with the quantizers' NumPy twins
``reference_train``, which calibrate on the batch (Pof2S: ``state_from_tensor``)
or widen the state's range in float32 (FS). Both sides compute the same
values, so every comparison is exact: positions and zero points are integers
decided by exact comparisons, the FS scale is the same float32 operations in
the same order, and the output is the fake-quant kernel, equal to its twin bit
for bit for a given state.
"""

import contextlib
from unittest import mock

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import qstrat  # noqa: F401 - registers the layers
from qstrat.errors import UnsupportedError
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.quantizers import FSQuantizer, Pof2SQuantizer, batch_ranges, ranges, reference
from qstrat.quantizers.float_scale import _NumPyOps
from qstrat.quantizers.grid import RoundMode
from qstrat.quantizers.mafs_test import grad_in_training

pytestmark = pytest.mark.portable

SHAPE = (6, 5, 4)  # per_channel: channel_axis -1, four channels


def np_(t):
    return np.asarray(ops.convert_to_numpy(t))


def variables(q, shape=SHAPE, state=None):
    """Keras variables holding ``state`` (default: the initial state), as a layer holds them."""
    state = q.initial_state(shape) if state is None else state
    return {k: keras.Variable(np.asarray(v, np.float32)) for k, v in state.items()}


def values(state) -> dict:
    return {k: np_(v) for k, v in state.items()}


def train_step(q, state, x):
    """One training call; returns its output as NumPy."""
    return np_(q(ops.convert_to_tensor(x), state, training=True))


def assert_step_equals_twin(q, state, x):
    """One training step on the variables ``state`` against ``reference_train``: the same output and state."""
    before = values(state)
    y = train_step(q, state, x)
    want_y, want = q.reference_train(x, before)
    got = values(state)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(y, want_y)
    return got


def batch(rng, scale=1.0, unsigned=False, grid_step=None):
    """Heavy-tailed values; with ``grid_step``, snapped to that grid (exact ties between candidate positions)."""
    x = rng.standard_t(3, size=SHAPE) * scale * np.array([0.3, 1.0, 2.0, 5.0]) + rng.normal() * scale
    if grid_step is not None:
        x = np.round(x / grid_step) * grid_step
    return (np.abs(x) if unsigned else x).astype(np.float32)


ROUND_MODES = [m.value for m in RoundMode]


# ---- Pof2S: each batch's position -------------------------------------------------------


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["No_OF", "Min_MSE"]),
    per_channel=st.booleans(),
    symmetry=st.booleans(),
    unsigned=st.booleans(),
    narrow=st.booleans(),
    bits=st.sampled_from([3, 4, 8]),
    round_mode=st.sampled_from(ROUND_MODES),
    log_scale=st.integers(-8, 8),
    snapped=st.booleans(),
    together=st.booleans(),
    digits=st.booleans(),
)
def test_pof2s_training_steps_equal_the_twin(
    seed, method, per_channel, symmetry, unsigned, narrow, bits, round_mode, log_scale, snapped, together, digits
):
    """``together``: Min_MSE's candidates computed at once (as for weights) or one at a time (as for activations);
    ``digits``: its error sums in base-256 digits, as where the backend has no float64 (`in_digits`)."""
    q = Pof2SQuantizer(
        method=method,
        per_channel=per_channel,
        symmetry=symmetry,
        unsigned=unsigned,
        narrow_range=narrow and not unsigned,
        bit_width=bits,
        round_mode=round_mode,
    )
    rng = np.random.default_rng(seed)
    state = variables(q)
    scale = 2.0**log_scale
    with mock.patch.object(batch_ranges, "_TOGETHER", 2**20 if together else 0), in_digits(digits):
        for _ in range(3):
            assert_step_equals_twin(q, state, batch(rng, scale, unsigned, scale / 4 if snapped else None))


@pytest.mark.parametrize("method", ["No_OF", "Min_MSE"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"narrow_range": True}, {"unsigned": True}, {"symmetry": False}, {"bit_width": 3, "symmetry": False}],
)
def test_pof2s_positions_at_the_grid_edges(kw, method):
    """Ranges exactly on qmin * 2^-p, qmax * 2^-p or (qmax - qmin) * 2^-p, and one float32 either side."""
    q = Pof2SQuantizer(method=method, **kw)
    g = q.grid
    for p in (-3, 6):
        step = np.float32(2.0**-p)
        ends = [g.qmax * step, (g.qmax - g.qmin) * step / 2]
        if g.qmin < 0:
            ends.append(g.qmin * step)
        for end in np.array(ends, np.float32):
            for v in (end, np.nextafter(end, np.float32(np.inf)), np.nextafter(end, np.float32(-np.inf))):
                x = np.array([v, -v / 3, v / 7, 0.0], np.float32)
                state = variables(q, x.shape)
                assert_step_equals_twin(q, state, x)


def mse_errors(q, x):
    """The candidates of Min_MSE on a one-channel batch and their summed squared errors (float64, exact here)."""
    p = q.params
    rows = x.reshape(1, -1)
    lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
    pos_range = (p.min_quantize_pos, p.max_quantize_pos)
    p0 = ranges.nonoverflow_pos(lo, hi, q.grid, p.symmetry, p.epsilon, pos_range)
    cands = [np.minimum(p0 + d, pos_range[1]) for d in range(ranges.MSE_POS_CANDIDATES)]
    errs = [
        ranges.tensor_sse(
            rows, np.ldexp(1.0, -c), ranges.pof2_zero_point(lo, c, q.grid, p.symmetry, hi), q.grid, p.round_mode
        )[0]
        for c in cands
    ]
    return [int(c[0]) for c in cands], errs


def in_digits(digits: bool = True):
    """Within: Min_MSE sums its errors in base-256 digits (``digits``), or as the backend allows."""
    return mock.patch.object(batch_ranges, "sums_in_float64", lambda: False) if digits else contextlib.nullcontext()


def test_min_mse_sums_in_float64_on_every_backend():
    """The float64 sums are the fast path: every backend here takes it, and within `float64_enabled` a float64
    cast is float64 (on JAX too, whose arrays are float32 unless x64 is on)."""
    assert batch_ranges.sums_in_float64() is True
    with batch_ranges.float64_enabled():
        sums = ops.sum(ops.cast(ops.convert_to_tensor(np.array([2.0**24, 1.0], np.float32)), "float64"))
        assert keras.backend.standardize_dtype(sums.dtype) == "float64"
        assert float(np_(sums)) == 2.0**24 + 1  # float32 would round it to 2^24


@pytest.mark.parametrize("digits", [False, True], ids=["float64", "digits"])
def test_min_mse_sums_past_2_53_pick_the_twins_position(digits):
    """Batches of 16384 values spread evenly: the finer candidates clip most of them, by up to thousands of steps,
    so their integer sums (2^24 times the error in finest steps squared) pass 2^53, where float64 sums round and
    the digit sums carry far past int32; both ways of summing still pick the twin's position. (Those candidates
    lose by far, so float64's rounding cannot decide here; it is the digits' carries this checks.)"""
    rng = np.random.default_rng(5)
    q = Pof2SQuantizer(method="Min_MSE")
    past = 0
    for k in range(4):
        x = (rng.uniform(-1, 1, size=(16, 32, 32)) * 3.0**k).astype(np.float32)
        cands, errs = mse_errors(q, x)
        past += max(errs) * 2.0 ** (2 * max(cands)) * 2**24 > 2**53  # the largest sum, in the compared units
        with in_digits(digits):
            assert_step_equals_twin(q, variables(q, x.shape), x)
    assert past == 4


def test_min_mse_takes_float64_sums_up_to_8_bits_and_digits_beyond():
    """Which way `mse_pos` sums: float64 on grids up to 8 bits, where every term stays below 2^53; digits on wider
    grids, whose terms need not. Either way the position is the twin's."""
    from qstrat.quantizers import digit_sums

    x = batch(np.random.default_rng(7))
    for bits, want_digits in ((8, False), (4, False), (12, True)):
        q = Pof2SQuantizer(method="Min_MSE", bit_width=bits)
        with mock.patch.object(digit_sums, "error_digits", wraps=digit_sums.error_digits) as digit_calls:
            assert_step_equals_twin(q, variables(q), x)
        assert bool(digit_calls.call_count) is want_digits, bits


@pytest.mark.parametrize("digits", [False, True], ids=["float64", "digits"])
def test_min_mse_exact_ties_go_to_the_lowest_position(digits):
    """Batches on a coarse grid where two candidate positions have the same error, to the last bit."""
    q = Pof2SQuantizer(method="Min_MSE", bit_width=3)
    rng = np.random.default_rng(0)
    ties = 0
    for _ in range(400):
        x = (rng.integers(-12, 13, size=5) / 4).astype(np.float32)
        cands, errs = mse_errors(q, x)
        best = min(errs)
        tied = {c for c, e in zip(cands, errs, strict=True) if e == best}
        if len(tied) < 2:
            continue
        ties += 1
        state = variables(q, x.shape)
        with in_digits(digits):
            train_step(q, state, x)
        assert np_(state["pos"]) == min(tied)
    assert ties >= 5  # the search found tied batches to check


def test_pof2s_weights_and_constant_batches():
    """All-zero and constant batches (the epsilon floor), and a weight-shaped tensor per channel on axis -1."""
    for kw in ({}, {"symmetry": False}, {"per_channel": True, "method": "Min_MSE"}):
        q = Pof2SQuantizer(**kw)
        for x in (np.zeros(SHAPE, np.float32), np.full(SHAPE, 0.75, np.float32)):
            assert_step_equals_twin(q, variables(q), x)
    q = Pof2SQuantizer(per_channel=True, method="Min_MSE", round_mode="HALF_AWAY_FROM_ZERO")
    w = (np.random.default_rng(3).normal(size=(3, 3, 4, 8)) * np.linspace(0.01, 1, 8)).astype(np.float32)
    assert_step_equals_twin(q, variables(q, w.shape), w)


def test_wide_asymmetric_pof2s_training_is_refused():
    q = Pof2SQuantizer(bit_width=26, symmetry=False)
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(UnsupportedError, match="up to 24"):
        train_step(q, variables(q), x)
    with pytest.raises(UnsupportedError, match="up to 24"):
        q.reference_train(x, q.initial_state(SHAPE))
    assert_step_equals_twin(Pof2SQuantizer(bit_width=26), variables(Pof2SQuantizer(bit_width=26)), x)


# ---- FS: running extremes -----------------------------------------------------------------------


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**16),
    per_channel=st.booleans(),
    symmetry=st.booleans(),
    unsigned=st.booleans(),
    narrow=st.booleans(),
    bits=st.sampled_from([4, 8, 16]),
    round_mode=st.sampled_from(ROUND_MODES),
    calibrated=st.booleans(),
)
def test_fs_training_steps_equal_the_twin(seed, per_channel, symmetry, unsigned, narrow, bits, round_mode, calibrated):
    q = FSQuantizer(
        per_channel=per_channel,
        symmetry=symmetry,
        unsigned=unsigned,
        narrow_range=narrow and not unsigned,
        bit_width=bits,
        round_mode=round_mode,
    )
    rng = np.random.default_rng(seed)
    first = batch(rng, 1.0, unsigned)
    state = variables(q, state=q.state_from_tensor(first) if calibrated else None)
    for k in range(4):
        assert_step_equals_twin(q, state, batch(rng, 1.0 + k, unsigned))


@pytest.mark.parametrize("kw", [{"symmetry": True, "per_channel": False}, {}])
def test_fs_range_widens_and_an_uncalibrated_state_takes_the_first_batch(kw):
    q = FSQuantizer(**kw)
    rng = np.random.default_rng(1)
    x0 = batch(rng)
    state = variables(q)  # scale 1, zero point 0: no range yet
    assert_step_equals_twin(q, state, x0)
    rows = x0.reshape(-1, 4).T if q.axis is not None else x0.reshape(1, -1)
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    if q.axis is None:
        lo, hi = lo[0], hi[0]
    s, zp = q._scale_zp(_NumPyOps, lo, hi)  # the first batch's range alone
    np.testing.assert_array_equal(np_(state["scale"]), s)
    np.testing.assert_array_equal(np_(state["zero_point"]), zp)
    # A batch inside the held range leaves the state as it is; one beyond it widens the range.
    held = values(state)
    assert_step_equals_twin(q, state, x0 * np.float32(0.5))
    for k in held:
        np.testing.assert_array_equal(np_(state[k]), held[k])
    assert_step_equals_twin(q, state, x0 * np.float32(2.0))
    assert np.all(np_(state["scale"]) > held["scale"])


# ---- inference, frozen methods, variables ------------------------------------------------------


@pytest.mark.parametrize(
    "q",
    [Pof2SQuantizer(method="Min_MSE", per_channel=True, symmetry=False), FSQuantizer()],
    ids=["pof2s", "fs"],
)
def test_inference_reads_the_state_and_leaves_it(q):
    rng = np.random.default_rng(2)
    state = variables(q)
    train_step(q, state, batch(rng))
    held = values(state)
    x = batch(rng, 3.0)
    y = np_(q(ops.convert_to_tensor(x), state, training=False))
    np.testing.assert_array_equal(y, q.reference(x, held))
    for k in held:
        np.testing.assert_array_equal(np_(state[k]), held[k])


FROZEN = [
    Pof2SQuantizer(method="Min_KL"),
    Pof2SQuantizer(method="Percentile", per_channel=True),
    FSQuantizer(method="Min_MSE"),
    FSQuantizer(method="Min_KL", symmetry=True),
    FSQuantizer(method="Percentile"),
    FSQuantizer(data_format="BF16", bit_width=16),
    FSQuantizer(use_framework_quantizer=True, round_mode="HALF_UP", per_channel=False),
]


@pytest.mark.parametrize(
    "q", FROZEN, ids=lambda q: f"{q.type_name}-{q.params.method.value}-{q.params.data_format.value}"
)
def test_frozen_methods_keep_their_state_in_training(q):
    rng = np.random.default_rng(4)
    calibrated = q.state_from_tensor(batch(rng))
    state = variables(q, state=calibrated)
    x = batch(rng, 4.0)
    y = train_step(q, state, x)
    for k in calibrated:
        np.testing.assert_array_equal(np_(state[k]), calibrated[k])
    np.testing.assert_array_equal(y, np_(q(ops.convert_to_tensor(x), state, training=False)))
    y_twin, new = q.reference_train(x, calibrated)
    for k in calibrated:
        np.testing.assert_array_equal(new[k], calibrated[k])
    if not q.params.use_framework_quantizer:  # the framework op has its own rounding (see quantizers_test)
        np.testing.assert_array_equal(y, y_twin)


@pytest.mark.parametrize("q", [Pof2SQuantizer(), Pof2SQuantizer(method="Min_MSE"), FSQuantizer()])
def test_training_needs_variables_to_write_the_state(q):
    x = batch(np.random.default_rng(5))
    with pytest.raises(UnsupportedError, match="are not variables"):
        q(ops.convert_to_tensor(x), q.state_from_tensor(x), training=True)


# ---- in a layer, in model.fit -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "Pof2SQuantizer", "params": {"method": "Min_MSE", "bit_width": 4}},
        {"type": "Pof2SQuantizer", "params": {"symmetry": False, "per_channel": True}},
        {"type": "FSQuantizer", "params": {"bit_width": 4}},
        {"type": "FSQuantizer", "params": {"use_framework_quantizer": True, "round_mode": "HALF_UP"}},
    ],
    ids=["pof2s-min_mse", "pof2s-asymmetric", "fs", "fs-framework"],
)
def test_training_gradient_is_the_clipped_straight_through_estimator(spec):
    """The same mask on every backend; Keras' own gradient of its framework op differs at the range's ends."""
    layer = FakeQuant(spec, name="fq")
    layer.build((None, *SHAPE[1:]))
    q = layer.quantizer
    x = batch(np.random.default_rng(6))
    x[0, 0, 0] = 40.0  # an outlier Min_MSE clips
    w = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
    before = values(layer.state)
    g = grad_in_training(layer, x, w)
    _, twin = q.reference_train(x, before)
    if "pos" in twin:
        scale, zp = reference.pof2_scale_np(twin["pos"]), twin.get("zero_point", 0.0)
    else:
        scale, zp = twin["scale"], twin["zero_point"]
    mask = reference.ste_mask_np(x, scale, zp, q.grid, q.params.round_mode, q.axis)
    if q.params.method.value == "Min_MSE":
        assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(g, w * mask)


def fit_through(spec, x, batch_size=8, epochs=1, lr=0.05):
    """Input -> FakeQuant(spec) -> Dense, trained with fit (no shuffling): the FakeQuant sees x's batches in order."""
    inp = keras.Input(x.shape[1:])
    layer = FakeQuant(spec, name="fq")
    model = keras.Model(inp, keras.layers.Dense(2)(layer(inp)))
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    y = np.zeros((len(x), 2), np.float32)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model, layer


def test_fit_leaves_pof2s_with_the_last_batch_position():
    spec = {"type": "Pof2SQuantizer", "params": {"method": "Min_MSE", "per_channel": True, "symmetry": False}}
    x = np.concatenate([batch(np.random.default_rng(s), 2.0**s).reshape(-1, 4)[:8] for s in range(3)])
    model, layer = fit_through(spec, x)
    want = layer.quantizer.state_from_tensor(x[16:24])
    for k, v in want.items():
        np.testing.assert_array_equal(np_(layer.state[k]), v)
    # Inference (predict) reads that state and leaves it.
    model.predict(x, verbose=0)
    for k, v in want.items():
        np.testing.assert_array_equal(np_(layer.state[k]), v)


def test_fit_leaves_fs_with_the_running_extremes():
    spec = {"type": "FSQuantizer", "params": {"per_channel": True}}
    rng = np.random.default_rng(8)
    x = np.concatenate([batch(rng, 1.0 + s).reshape(-1, 4)[:8] for s in range(3)])
    _, layer = fit_through(spec, x, epochs=2)
    q = layer.quantizer
    state = q.initial_state((None, 4))
    for _ in range(2):
        for k in range(0, len(x), 8):
            _, state = q.reference_train(x[k : k + 8], state)
    for k, v in state.items():
        np.testing.assert_array_equal(np_(layer.state[k]), v)


def test_fit_recomputes_weight_positions_every_step():
    """A kernel's Pof2S position (QuantizeWrapper) is recomputed from the kernel at each step."""
    inp = keras.Input((4,))
    spec = {"type": "Pof2SQuantizer", "params": {"method": "Min_MSE", "per_channel": True}}
    wrapper = QuantizeWrapper(keras.layers.Dense(3, name="d"), {"kernel": spec})
    model = keras.Model(inp, wrapper(inp))
    wrapper.state["kernel"]["pos"].assign(np.zeros(3, np.float32))  # not the kernel's position
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # the kernel stays as it is
    x = batch(np.random.default_rng(9)).reshape(-1, 4)[:8]
    model.fit(x, x[:, :3], batch_size=8, epochs=1, verbose=0)
    want = wrapper.quantizers["kernel"].state_from_tensor(np_(wrapper.layer.kernel))
    np.testing.assert_array_equal(np_(wrapper.state["kernel"]["pos"]), want["pos"])
