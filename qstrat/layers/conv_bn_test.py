"""FoldedConvBN: float equivalence with Conv + BatchNormalization, the correction factor, the freeze, saving.

Tolerances. Two float32 computations of one exact value are compared. A value
computed through float32 sums of n terms t_i (and a few elementwise ops) is
within about n * u * sum|t_i| of the exact value (the worst-case bound for
recursive summation, Higham, Accuracy and Stability of Numerical Algorithms,
§4.2), with u = 2**-24. So two of them differ by at most 2 * n * u * A, where
A bounds sum|t_i| elementwise (the same computation on absolute values) and n
adds up the lengths of the sums on the way: K taps of the conv, N batch
elements per channel in the moments (and again in the backward pass), K' taps
in the input gradient, plus 16 for the elementwise ops. The normalization
divides by sigma_B, whose own relative error enters multiplied by the
normalized value x_hat, so A carries a factor (1 + max|x_hat|)**2. The bound is
worst-case (typical errors grow like sqrt(n)), so it is not tuned to pass, and
it is far below what any real mistake (a wrong statistic, a missing factor)
changes: those move results by a fraction of A, not by n * u.
"""

import contextlib

import keras
import numpy as np
import pytest
from keras import ops

import qstrat  # noqa: F401 - registers the layers for loading
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.layers import FoldedConvBN, QuantizeWrapper
from qstrat.layers.bias_axis import keras_adds_channels_first_bias_last
from qstrat.passes.weight_calibration import calibrate_weight_group, calibrate_weights

pytestmark = pytest.mark.portable
L = keras.layers
U = 2.0**-24  # float32 unit roundoff
POF2_PC = {
    "type": "Pof2SQuantizer",
    "params": {"bit_width": 4, "method": "Min_MSE", "round_mode": "HALF_UP", "per_channel": True},
}
POF2 = {"type": "Pof2SQuantizer", "params": {"bit_width": 8, "method": "Min_MSE", "round_mode": "HALF_UP"}}
TQT = {"type": "TQTQuantizer", "params": {"bit_width": 4}}


def np_(t):
    return np.asarray(ops.convert_to_numpy(t), np.float64)


def grads(fn, args):
    """The gradient of the scalar ``fn(*args)`` with respect to each argument, as NumPy, on any backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        ts = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(ts)
            loss = fn(*ts)
        return [np_(g) for g in tape.gradient(loss, ts)]
    if backend == "jax":
        import jax

        return [np_(g) for g in jax.grad(fn, argnums=tuple(range(len(args))))(*args)]
    import torch

    ts = [torch.tensor(np.asarray(a), requires_grad=True) for a in args]
    return [g.detach().cpu().numpy().astype(np.float64) for g in torch.autograd.grad(fn(*ts), ts)]


def stateless(layer, x, values: dict):
    """``layer``'s training output with some variables (by id) replaced by ``values``; nothing is assigned."""
    tv = [values.get(id(v), v.value) for v in layer.trainable_variables]
    ntv = [values.get(id(v), v.value) for v in layer.non_trainable_variables]
    kwargs = {"training": True} if "training" in layer._call_signature.parameters else {}
    return layer.stateless_call(tv, ntv, x, **kwargs)[0]


def assert_within(a, b, n, magnitude, what):
    """|a - b| <= 2 n u A elementwise (module doc)."""
    bound = 2 * n * U * np.asarray(magnitude, np.float64)
    excess = np.abs(np_(a) - np_(b)) - bound
    assert np.all(excess <= 0), f"{what}: off by {excess.max():.3g} more than the float32 bound"


CASES = {
    "conv2d": (lambda b: L.Conv2D(4, 3, use_bias=b, name="c"), (2, 6, 6, 3), True, {}),
    "conv2d_no_bias": (lambda b: L.Conv2D(4, 3, use_bias=b, name="c"), (2, 6, 6, 3), False, {}),
    "conv2d_bn_no_scale_no_center": (
        lambda b: L.Conv2D(4, 3, use_bias=b, name="c"),
        (2, 6, 6, 3),
        True,
        {"scale": False, "center": False},
    ),
    "depthwise_m2": (lambda b: L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=b, name="c"), (2, 6, 6, 3), True, {}),
    "depthwise_m2_no_bias": (
        lambda b: L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=b, name="c"),
        (2, 6, 6, 3),
        False,
        {},
    ),
    "conv1d_causal_dilated": (
        lambda b: L.Conv1D(3, 3, padding="causal", dilation_rate=2, use_bias=b, name="c"),
        (2, 10, 4),
        True,
        {},
    ),
    "conv2d_same_strided": (
        lambda b: L.Conv2D(4, 3, strides=2, padding="same", use_bias=b, name="c"),
        (2, 7, 7, 3),
        True,
        {},
    ),
    # 1x1 kernels with strides: computed at stride 1 on the pixels they read (qstrat.layers.strided).
    "conv2d_1x1_strided": (
        lambda b: L.Conv2D(4, 1, strides=2, padding="same", use_bias=b, name="c"),
        (2, 7, 7, 3),
        True,
        {},
    ),
    "conv1d_1x1_strided_causal": (
        lambda b: L.Conv1D(3, 1, strides=3, padding="causal", use_bias=b, name="c"),
        (2, 10, 4),
        False,
        {},
    ),
    "conv2d_wide": (lambda b: L.Conv2D(4, 3, use_bias=b, name="c"), (2, 6, 7, 3), True, {}),
    "conv2d_same_strided_wide": (
        lambda b: L.Conv2D(4, 3, strides=2, padding="same", use_bias=b, name="c"),
        (2, 7, 9, 3),
        True,
        {},
    ),
    "dense": (lambda b: L.Dense(5, use_bias=b, name="c"), (8, 7), True, {}),
    "dense_no_bias_no_scale": (lambda b: L.Dense(5, use_bias=b, name="c"), (8, 7), False, {"scale": False}),
}


def make(case, seed=0):
    """A built conv and BatchNormalization with random weights and moving statistics, and an input."""
    make_conv, shape, use_bias, bn_kw = CASES[case]
    rng = np.random.default_rng(seed)
    conv = make_conv(use_bias)
    conv.build(shape)
    conv.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in conv.get_weights()])
    bn = L.BatchNormalization(momentum=0.9, name="bn", **bn_kw)
    bn.build(conv.compute_output_shape(shape))
    c = bn.moving_mean.shape[0]
    values = {
        "gamma": rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c),
        "beta": rng.normal(0, 1, c),
        "moving_mean": rng.normal(0, 0.5, c),
        "moving_variance": rng.uniform(0.5, 2.0, c),
    }
    bn.set_weights([values[v.name].astype("float32") for v in bn.weights])
    x = rng.normal(0, 1, shape).astype("float32")
    return conv, bn, x


def plain_conv(conv, shape):
    """The conv without bias, for magnitudes: ``lin(x, W)`` is its linear map."""
    p = type(conv).from_config({**conv.get_config(), "use_bias": False, "name": "plain"})
    p.build(shape)
    return lambda x, w: p.stateless_call([w], [], x)[0]


def bn_params(bn, c):
    gamma = np_(bn.gamma) if bn.scale else np.ones(c)
    beta = np_(bn.beta) if bn.center else np.zeros(c)
    return gamma, beta


def magnitudes(conv, bn, x):
    """The float32 error bound's ingredients (module doc) for a conv + BatchNormalization in training."""
    kernel = np_(conv.kernel)
    c = bn.moving_mean.shape[0]
    lin = plain_conv(conv, x.shape)
    m = {"lin": lin, "abs_lin": np_(lin(np.abs(x), np.abs(kernel).astype("float32")))}  # sum |x| |W| per output
    m["bias"] = np_(conv.bias) if conv.use_bias else np.zeros(c)
    m["z"] = np_(lin(x, kernel.astype("float32"))) + m["bias"]
    m["axes"] = tuple(range(m["z"].ndim - 1))
    m["K"], m["N"], m["K'"] = kernel.size // c, m["z"].size // c, kernel.size // kernel.shape[-2]
    m["mu"], var_b = m["z"].mean(m["axes"]), m["z"].var(m["axes"])
    m["sigma_b"] = np.sqrt(var_b + bn.epsilon)
    m["x_hat"] = (m["z"] - m["mu"]) / m["sigma_b"]
    m["F"] = (1 + np.abs(m["x_hat"]).max()) ** 2
    m["gamma"], m["beta"] = bn_params(bn, c)
    m["g"] = np.abs(m["gamma"]) / m["sigma_b"]
    m["y_size"] = m["g"] * (m["abs_lin"] + np.abs(m["bias"]) + np.abs(m["mu"])) * m["F"] + np.abs(m["beta"])
    return m


def statistics_sizes(m, bn):
    """The bound's A for the moving mean and variance after one training step (module doc)."""
    axes, bias = m["axes"], m["bias"]
    mean_ma, var_ma = np_(bn.moving_mean), np_(bn.moving_variance)
    mean_size = (1 - bn.momentum) * np.mean(m["abs_lin"] + np.abs(bias), axes) + np.abs(mean_ma)
    dev = np.abs(m["z"] - m["mu"]) + m["abs_lin"] + np.abs(bias) + np.abs(m["mu"])
    return mean_size, np.mean(dev**2, axes) + var_ma


def gradient_sizes(m, conv, x, r):
    """The bound's A for d/dx and for each parameter's gradient of sum(output * r) in training."""
    axes = m["axes"]
    # dL/dz of BatchNormalization is g (r - mean r - x_hat mean(r x_hat)): its terms' size, per element.
    ar, x_hat = np.abs(r), m["x_hat"]
    a_dz = (m["g"] * (ar + ar.mean(axes) + np.abs(x_hat) * np.abs(r * x_hat).mean(axes)) * m["F"]).astype("float32")
    kernel = ops.convert_to_numpy(conv.kernel)
    _, a_dw = grads(lambda xt, w: ops.sum(ops.multiply(m["lin"](xt, w), a_dz)), [np.abs(x), kernel])
    a_dx, _ = grads(lambda xt, w: ops.sum(ops.multiply(m["lin"](xt, w), a_dz)), [x, np.abs(kernel)])
    sizes = {
        "kernel": a_dw,
        "bias": a_dz.sum(axes),
        "gamma": (ar * np.abs(x_hat)).sum(axes) * m["F"],
        "beta": ar.sum(axes),
    }
    return a_dx, sizes


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_quantizers_it_is_conv_then_batch_norm(case):
    conv, bn, x = make(case)
    fold = FoldedConvBN(conv, bn)
    m = magnitudes(conv, bn, x)
    K, N, bias = m["K"], m["N"], m["bias"]

    # Inference: conv(x, W k) + beta + (b - mean) k against bn(conv(x)).
    mean_ma, var_ma = np_(bn.moving_mean), np_(bn.moving_variance)
    k = m["gamma"] / np.sqrt(var_ma + bn.epsilon)
    size = np.abs(k) * (m["abs_lin"] + np.abs(bias) + np.abs(mean_ma)) + np.abs(m["beta"])
    assert_within(fold(x), bn(conv(x), training=False), K + 16, size, "inference output")

    # Training: the gradients first (stateless), then the outputs and the moving statistics (stateful).
    r = np.random.default_rng(5).normal(size=m["z"].shape).astype("float32")
    params = list(fold.trainable_variables)
    ref_params = list(conv.trainable_variables) + list(bn.trainable_variables)
    assert [v.name for v in params] == [v.name for v in ref_params]

    def fold_loss(xt, *ps):
        return ops.sum(ops.multiply(stateless(fold, xt, {id(v): p for v, p in zip(params, ps, strict=True)}), r))

    def ref_loss(xt, *ps):
        values = {id(v): p for v, p in zip(ref_params, ps, strict=True)}
        return ops.sum(ops.multiply(stateless(bn, stateless(conv, xt, values), values), r))

    start = [x] + [ops.convert_to_numpy(v) for v in params]
    got, want = grads(fold_loss, start), grads(ref_loss, start)

    mean_size, var_size = statistics_sizes(m, bn)  # the moving statistics before this step
    assert_within(fold(x, training=True), bn(conv(x), training=True), K + N + 16, m["y_size"], "training output")
    assert_within(fold.moving_mean, bn.moving_mean, K + N + 16, mean_size, "moving_mean")
    assert_within(fold.moving_variance, bn.moving_variance, K + N + 16, var_size, "moving_variance")
    assert int(ops.convert_to_numpy(fold.step)) == 1

    a_dx, sizes = gradient_sizes(m, conv, x, r)
    n_back = K + m["K'"] + 2 * N + 32
    assert_within(got[0], want[0], n_back, a_dx, "d/dx")
    for v, a, b in zip(params, got[1:], want[1:], strict=True):
        assert_within(a, b, n_back, sizes[v.name], f"d/d{v.name}")


def channels_first_twin(conv, bn, x):
    """The channels_first copies of ``make``'s conv and BN (the same weights, the BN on axis 1), and x so laid out."""
    xf = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    cf_conv = type(conv).from_config({**conv.get_config(), "data_format": "channels_first"})
    cf_conv.build(xf.shape)
    cf_conv.set_weights(conv.get_weights())
    cf_bn = L.BatchNormalization.from_config({**bn.get_config(), "axis": 1})
    cf_bn.build(cf_conv.compute_output_shape(xf.shape))
    cf_bn.set_weights(bn.get_weights())
    return cf_conv, cf_bn, xf


# No channels_first output here has a last axis as long as its channels: FoldedConvBN refuses those where
# Keras's TensorFlow add puts a bias on the last axis (the last test).
@pytest.mark.parametrize(
    "case", ["conv2d_wide", "depthwise_m2_no_bias", "conv1d_causal_dilated", "conv2d_same_strided_wide"]
)
def test_a_channels_first_fold_is_its_channels_last_twin_transposed(case):
    """The same fold on the same weights, channels on axis 1: its outputs, moving statistics and gradients are
    the channels_last fold's (which the test above holds to conv + BN) up to float32 rounding, twice the
    bound of one computation against the exact value."""
    conv, bn, x = make(case)
    cf_conv, cf_bn, xf = channels_first_twin(conv, bn, x)
    last, first = FoldedConvBN(conv, bn), FoldedConvBN(cf_conv, cf_bn)
    m = magnitudes(conv, bn, x)
    K, N = m["K"], m["N"]

    def to_last(t):
        return np.moveaxis(np_(t), 1, -1)

    mean_ma, var_ma = np_(bn.moving_mean), np_(bn.moving_variance)
    k = m["gamma"] / np.sqrt(var_ma + bn.epsilon)
    size = np.abs(k) * (m["abs_lin"] + np.abs(m["bias"]) + np.abs(mean_ma)) + np.abs(m["beta"])
    assert_within(to_last(first(xf)), last(x), 2 * (K + 16), size, "inference output")

    r = np.random.default_rng(5).normal(size=m["z"].shape).astype("float32")
    rf = np.ascontiguousarray(np.moveaxis(r, -1, 1))

    def loss(fold, rr):
        ps = list(fold.trainable_variables)
        return lambda xt, *vs: ops.sum(
            ops.multiply(stateless(fold, xt, {id(v): p for v, p in zip(ps, vs, strict=True)}), rr)
        )

    start = [ops.convert_to_numpy(v) for v in last.trainable_variables]
    got, want = grads(loss(first, rf), [xf, *start]), grads(loss(last, r), [x, *start])
    mean_size, var_size = statistics_sizes(m, bn)
    assert_within(to_last(first(xf, training=True)), last(x, training=True), 2 * (K + N + 16), m["y_size"], "training")
    assert_within(first.moving_mean, last.moving_mean, 2 * (K + N + 16), mean_size, "moving_mean")
    assert_within(first.moving_variance, last.moving_variance, 2 * (K + N + 16), var_size, "moving_variance")
    a_dx, sizes = gradient_sizes(m, conv, x, r)
    n_back = 2 * (K + m["K'"] + 2 * N + 32)
    assert_within(to_last(got[0]), want[0], n_back, a_dx, "d/dx")
    for v, a, b in zip(last.trainable_variables, got[1:], want[1:], strict=True):
        assert_within(a, b, n_back, sizes[v.name], f"d/d{v.name}")


def conv2d_np(x, w):
    """A valid, stride-1 2-D convolution in float64 NumPy."""
    kh, kw = w.shape[:2]
    h, wd = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, wd, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,cf->nhwf", x[:, i : i + h, j : j + wd, :], w[i, j])
    return out


class Spy:
    """A quantizer that records the tensors it quantizes."""

    def __init__(self, q):
        self.q, self.seen = q, []

    def __call__(self, x, state, training=False):
        self.seen.append(np_(x))
        return self.q(x, state, training=training)


@pytest.mark.parametrize("kernel_q", [POF2_PC, TQT], ids=["pof2s_per_channel", "tqt"])
def test_training_quantizes_on_the_moving_grid_and_rescales_to_the_batch(kernel_q):
    conv, bn, x = make("conv2d")
    kernel, bias = np_(conv.kernel), np_(conv.bias)
    gamma, beta = bn_params(bn, 4)
    mean_ma, sigma_ma = np_(bn.moving_mean), np.sqrt(np_(bn.moving_variance) + bn.epsilon)
    w = QuantizeWrapper(FoldedConvBN(conv, bn), {"kernel": kernel_q, "bias": POF2})
    w.build(x.shape)
    for attr in ("kernel", "bias"):
        calibrate_weight_group([(w, attr)])
    state = {a: {k: np_(s) for k, s in w.state[a].items()} for a in ("kernel", "bias")}
    qk, qb = w.quantizers["kernel"], w.quantizers["bias"]
    # Calibration and quantized_weight use the kernel and bias folded with the moving statistics.
    w_ma = (kernel * gamma / sigma_ma).astype("float32")
    b_ma = (beta + (bias - mean_ma) * gamma / sigma_ma).astype("float32")
    for attr, q, value in (("kernel", qk, w_ma), ("bias", qb, b_ma)):
        assert all(np.allclose(state[attr][k], v, atol=1e-6) for k, v in q.state_from_tensor(value).items())
    np.testing.assert_array_equal(np_(w.quantized_weight("kernel")), qk.reference(w_ma, state["kernel"]))

    spies = {a: Spy(w.quantizers[a]) for a in ("kernel", "bias")}
    w.quantizers.update(spies)
    y = np_(w(x, training=True))
    # A quantizer may set its state from the batch in training (Pof2S Min_MSE does): the state after
    # the call is the one the call used.
    state = {a: {k: np_(s) for k, s in w.state[a].items()} for a in ("kernel", "bias")}

    z = conv2d_np(x.astype(np.float64), kernel) + bias
    mu_b, sigma_b = z.mean((0, 1, 2)), np.sqrt(z.var((0, 1, 2)) + bn.epsilon)
    assert np.abs(sigma_b / sigma_ma - 1).min() > 0.1  # the batch grid is far from the moving one
    (seen_w,) = spies["kernel"].seen
    np.testing.assert_allclose(seen_w, w_ma, rtol=8 * U, atol=0)  # not kernel * gamma / sigma_B
    b_batch = beta + (bias - mu_b) * gamma / sigma_b
    # The bias quantizer sees the moving-statistics fold too, the bias inference quantizes (so a position taken
    # from it in training is the one inference applies); the batch statistics' difference is added in float.
    (seen_b,) = spies["bias"].seen
    assert_within(seen_b, b_ma, 4, np.abs(beta) + np.abs(bias - mean_ma) * np.abs(gamma) / sigma_ma, "bias")
    abs_z = conv2d_np(np.abs(x.astype(np.float64)), np.abs(kernel)) + np.abs(bias)
    n = 9 * 3 + z.size // 4 + 16
    x_hat = (z - mu_b) / sigma_b
    f = (1 + np.abs(x_hat).max()) ** 2
    qw = qk.reference(w_ma, state["kernel"])
    qb_ma = qb.reference(seen_b, state["bias"])
    want = (sigma_ma / sigma_b) * conv2d_np(x.astype(np.float64), qw) + qb_ma + (b_batch - seen_b)
    batch_size = np.abs(gamma) / sigma_b * (abs_z.max((0, 1, 2)) + np.abs(mu_b)) * f + np.abs(beta)
    size = (sigma_ma / sigma_b) * conv2d_np(np.abs(x.astype(np.float64)), np.abs(qw)) + batch_size + np.abs(seen_b)
    assert_within(y, want, n, size * f, "output")


def test_moving_statistics_freeze_after_freeze_bn_delay_training_calls():
    conv, bn, x = make("conv2d")
    fold = FoldedConvBN(conv, bn, freeze_bn_delay=2)
    w = QuantizeWrapper(fold, {"kernel": POF2_PC, "bias": POF2})
    w.build(x.shape)
    for attr in w.quantizers:
        calibrate_weight_group([(w, attr)])
    rng = np.random.default_rng(1)
    before = np_(fold.moving_mean), np_(fold.moving_variance)
    history = []
    for _ in range(4):
        w(rng.normal(0, 1, x.shape).astype("float32"), training=True)
        history.append((np_(fold.moving_mean), np_(fold.moving_variance)))
    changed = [
        not np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])
        for a, b in zip([before, *history[:-1]], history, strict=True)
    ]
    assert changed == [True, True, False, False]
    assert int(ops.convert_to_numpy(fold.step)) == 4
    np.testing.assert_array_equal(np_(w(x, training=True)), np_(w(x, training=False)))
    # freeze_bn_delay=0: frozen from the first call.
    fold0 = FoldedConvBN(conv, bn, freeze_bn_delay=0)
    fold0(x, training=True)
    np.testing.assert_array_equal(np_(fold0.moving_mean), np_(bn.moving_mean))
    np.testing.assert_array_equal(np_(fold0(x, training=True)), np_(fold0(x)))


def _x64():
    """A context in which float64 is float64 (JAX's is off by default), or None where there is none."""
    if keras.backend.backend() != "jax":
        return contextlib.nullcontext()
    import jax

    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else None


@pytest.mark.parametrize("case", ["conv2d", "depthwise_m2"])
def test_gradients_match_finite_differences(case):
    context = _x64()
    dtype = "float32" if context is None else "float64"
    with context or contextlib.nullcontext():
        conv, bn, x = make(case)
        fold = FoldedConvBN(conv, bn, dtype=dtype)  # no quantizers: what a bypassed wrapper computes
        m = magnitudes(conv, bn, x)
        x = x.astype(dtype)
        r = np.random.default_rng(2).normal(size=m["z"].shape).astype(dtype)
        u = float(np.finfo(dtype).eps) / 2
        # Each loss is a float sum of r * y over all outputs: within n u A of the exact loss.
        n_loss = m["K"] + m["N"] + r.size + 16
        a_loss = float(np.sum(np.abs(r) * m["y_size"]))
        assert ops.convert_to_numpy(stateless(fold, x, {})).dtype == dtype
        for var, picks in ((fold.gamma, None), (fold.kernel, 8)):
            value = np.asarray(ops.convert_to_numpy(var.value), dtype)

            def loss(v, var=var):
                return ops.sum(ops.multiply(stateless(fold, x, {id(var): v}), r))

            (g,) = grads(loss, [value])
            rng = np.random.default_rng(3)
            flat = np.arange(value.size) if picks is None else rng.choice(value.size, picks, replace=False)
            h = u ** (1 / 3)  # balances truncation (~h**2) and rounding (~u / h)
            for i in flat:
                fd = []
                for step_size in (h, h / 2):
                    step = np.zeros(value.size, dtype)
                    step[i] = step_size
                    plus = float(np_(loss(value + step.reshape(value.shape))))
                    minus = float(np_(loss(value - step.reshape(value.shape))))
                    fd.append((plus - minus) / (2 * step_size))
                # Central differences err by c h**2 + O(h**4): the h/2 estimate is within about a third of
                # the two estimates' difference (Richardson), plus rounding, n u A_loss / (h/2).
                tol = abs(fd[0] - fd[1]) + n_loss * u * a_loss / (h / 2)
                assert abs(g.reshape(-1)[i] - fd[1]) <= tol, (var.name, int(i), g.reshape(-1)[i], fd)


def _model(freeze_bn_delay=-1):
    conv, bn, _ = make("conv2d")
    i = keras.Input((6, 6, 3))
    q = QuantizeWrapper(FoldedConvBN(conv, bn, freeze_bn_delay=freeze_bn_delay), {"kernel": TQT, "bias": POF2})
    y = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(q(i)))
    m = keras.Model(i, y)
    calibrate_weights(m)
    return m


def test_saves_loads_and_keeps_training_identically(tmp_path):
    m = _model(freeze_bn_delay=1)
    x = np.random.default_rng(4).normal(size=(4, 6, 6, 3)).astype("float32")
    t = np.random.default_rng(5).normal(size=(4, 2)).astype("float32")
    path = tmp_path / "fold.keras"
    m.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert isinstance(loaded.layers[1].layer, FoldedConvBN)
    np.testing.assert_array_equal(np_(m(x)), np_(loaded(x)))
    for model in (m, loaded):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        for _ in range(2):
            model.train_on_batch(x, t)
    for a, b in zip(m.weights, loaded.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(np_(a), np_(b), err_msg=a.path)
    assert int(ops.convert_to_numpy(loaded.layers[1].layer.step)) == 2
    np.testing.assert_array_equal(np_(m(x)), np_(loaded(x)))


@pytest.mark.parametrize(
    "case",
    [
        "conv2d",
        "conv2d_no_bias",
        "depthwise_m2",
        "dense_no_bias_no_scale",
        "conv2d_1x1_strided",
        "conv1d_1x1_strided_causal",
    ],
)
def test_folded_weights_are_fold_bn_s_fold(case):
    from qstrat.graph import capture, rebuild
    from qstrat.passes.optimize import OptimizeReport
    from qstrat.passes.optimize.fold_bn import fold_conv_bn

    conv, bn, x = make(case)
    fold = FoldedConvBN(conv, bn)
    i = keras.Input(x.shape[1:])
    model = keras.Model(i, bn(conv(i)))
    folded = rebuild(fold_conv_bn(capture(model), {}, OptimizeReport())).get_layer("c")
    kernel, bias = fold.folded_weights()
    assert kernel.dtype == bias.dtype == np.float32
    # fold_bn rounds float64 products once; the layer computes k = gamma / sqrt(var + eps) and the
    # products in float32: a handful of roundings, each within u relative.
    c = bias.shape[0]
    gamma, beta = bn_params(bn, c)
    k = np.abs(gamma) / np.sqrt(np_(bn.moving_variance) + bn.epsilon)
    b = np.abs(np_(conv.bias)) if conv.use_bias else 0.0
    assert_within(kernel, np_(folded.kernel), 4, np.abs(np_(folded.kernel)), "kernel")
    assert_within(bias, np_(folded.bias), 4, np.abs(beta) + (b + np.abs(np_(bn.moving_mean))) * k, "bias")
    # A plain conv with them computes the fold's inference output, bit for bit.
    plain = type(conv).from_config({**conv.get_config(), "use_bias": True, "name": "plain"})
    plain.build(x.shape)
    plain.set_weights([kernel, bias])
    np.testing.assert_array_equal(np_(plain(x)), np_(fold(x)))
    np.testing.assert_array_equal(np_(fold.target_value("kernel")), kernel)
    np.testing.assert_array_equal(np_(fold.target_value("bias")), bias)


def test_config_round_trip_and_built_copies():
    conv, bn, x = make("depthwise_m2")
    fold = FoldedConvBN(conv, bn, freeze_bn_delay=5, name="fold")
    again = FoldedConvBN.from_config(fold.get_config())
    again.build(x.shape)
    again.set_weights(fold.get_weights())
    assert again.name == "fold" and again.freeze_bn_delay == 5 and type(again.conv) is L.DepthwiseConv2D
    np.testing.assert_array_equal(np_(again(x)), np_(fold(x)))
    # The fold owns copies: training it leaves the source layers alone.
    kernel = np_(conv.kernel)
    fold(x, training=True)
    np.testing.assert_array_equal(np_(conv.kernel), kernel)
    assert FoldedConvBN(L.Dense(3, name="d"), L.BatchNormalization()).name == "d"


def test_a_bypassed_wrapper_is_the_fold_exactly():
    conv, bn, x = make("depthwise_m2")
    fold = FoldedConvBN(conv, bn)
    w = QuantizeWrapper(fold, {"kernel": POF2_PC, "bias": POF2})
    w.build(x.shape)
    for attr, flag in w.enabled.items():
        calibrate_weight_group([(w, attr)])
        flag.assign(0.0)
    np.testing.assert_array_equal(np_(w(x)), np_(fold(x)))
    np.testing.assert_array_equal(np_(stateless(w, x, {})), np_(stateless(fold, x, {})))


def test_unsupported_layers_are_errors():
    bn = L.BatchNormalization()
    with pytest.raises(UnsupportedError, match="got Conv2DTranspose"):
        FoldedConvBN(L.Conv2DTranspose(3, 3), bn)
    with pytest.raises(UnsupportedError, match="activation 'relu'"):
        FoldedConvBN(L.Conv2D(3, 3, activation="relu"), bn)
    with pytest.raises(UnsupportedError, match=r"axis -1 is not the channel axis \(1\) of its channels_first"):
        FoldedConvBN(L.Conv2D(3, 3, data_format="channels_first"), bn).build((None, 2, 6, 6))
    with pytest.raises(UnsupportedError, match=r"axis 1 is not the channel axis \(last\)"):
        FoldedConvBN(L.Conv2D(3, 3), L.BatchNormalization(axis=1))
    with pytest.raises(UnsupportedError, match="expected a BatchNormalization, got LayerNormalization"):
        FoldedConvBN(L.Conv2D(3, 3), L.LayerNormalization())
    with pytest.raises(ConfigError, match=r"freeze_bn_delay: expected an int >= 0 .* got -2"):
        FoldedConvBN(L.Conv2D(3, 3), bn, freeze_bn_delay=-2)
    w = QuantizeWrapper(FoldedConvBN(L.Dense(3, name="d"), bn), {"gamma": POF2})
    with pytest.raises(ConfigError, match='d.gamma: FoldedConvBN quantizes only its folded "kernel" and "bias"'):
        w.build((2, 4))


def test_a_channels_first_conv_whose_bias_keras_adds_on_the_last_axis_is_refused_where_it_does():
    """Its output (6, 6, 6): the fold adds the bias per channel, a plain deployed conv per column."""
    conv = L.Conv2D(6, 3, data_format="channels_first", name="c")
    fold = FoldedConvBN(conv, L.BatchNormalization(axis=1))
    if keras_adds_channels_first_bias_last():
        with pytest.raises(UnsupportedError, match=r"FoldedConvBN\(c\): Keras on this backend adds the bias"):
            fold.build((None, 2, 8, 8))
    else:
        fold.build((None, 2, 8, 8))
        assert fold.built
    FoldedConvBN(conv, L.BatchNormalization(axis=1)).build((None, 2, 8, 9))  # (6, 6, 7): every backend
