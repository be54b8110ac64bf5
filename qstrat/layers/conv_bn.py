"""`FoldedConvBN`: a conv and the BatchNormalization after it, fake-folded for quantization-aware training.

Why: a deployed model folds each BatchNormalization into the conv before it, so
the quantizer must see the folded kernel ``W * gamma / sigma``. Training with
batch statistics still needs the BatchNormalization. Fake folding (Jacob et
al. 2018, §3.2 of Krishnamoorthi 2018) keeps both: the kernel is folded with
the moving statistics and quantized on that long-term grid, and the output is
rescaled to the batch statistics. With ``sigma = sqrt(variance + epsilon)``:

    training:  y = (sigma_MA / sigma_B) * conv(x, Q_w(W * gamma / sigma_MA))
                   + Q_b(beta + (b - mu_B) * gamma / sigma_B)
    inference: y = conv(x, Q_w(W * gamma / sigma_MA)) + Q_b(beta + (b - mean_MA) * gamma / sigma_MA)

mu_B and sigma_B are the (biased) batch statistics of the float ``conv(x, W) + b``,
and gradients flow through them as in BatchNormalization. sigma_MA in training
is the moving variance at the start of the step, before this step's update:
Krishnamoorthi's running estimate, the grid inference would use at that moment,
and a constant for the step's gradients. Training also updates the moving
statistics as BatchNormalization does, until ``freeze_bn_delay`` training calls
have run (never with -1); from then on training computes the inference formula.
Without quantizers (``Q`` the identity) the layer is exactly the conv followed
by the BatchNormalization.

Protocol with `QuantizeWrapper`: ``call_with_quantizers(inputs, quantize, training)``
calls ``quantize(attr, tensor)`` for "kernel" and "bias"; ``target_value(attr)``
is what that quantizer sees in inference (calibration quantizes it);
``folded_weights()`` gives the plain conv's kernel and bias for deployment.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
from keras import ops

from qstrat.arrays import to_numpy
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.layers import strided
from qstrat.layers.bias_axis import MISPLACED, misplaces_bias

L = keras.layers
# Each supported conv class: its kind, and the rank of its input (None: any, for Dense).
_CONVS = {
    L.Conv1D: ("conv", 3),
    L.Conv2D: ("conv", 4),
    L.Conv3D: ("conv", 5),
    L.DepthwiseConv1D: ("depthwise", 3),
    L.DepthwiseConv2D: ("depthwise", 4),
    L.Dense: ("dense", None),
}
QUANTIZED = ("kernel", "bias")


def _layer(obj):
    return keras.saving.deserialize_keras_object(dict(obj)) if isinstance(obj, Mapping) else obj


def _serialized(layer) -> dict:
    """The layer's serialization without its build config: build copies the weights, or loading sets them."""
    return {k: v for k, v in keras.saving.serialize_keras_object(layer).items() if k != "build_config"}


def _np(v) -> np.ndarray:
    return to_numpy(v)


def _check(conv, bn, freeze_bn_delay) -> None:
    names = ", ".join(c.__name__ for c in _CONVS)
    if type(conv) not in _CONVS:
        raise UnsupportedError(f"FoldedConvBN: expected the conv to be one of {names}, got {type(conv).__name__}.")
    cfg = conv.get_config()
    if cfg.get("activation", "linear") not in ("linear", None):
        raise UnsupportedError(
            f"FoldedConvBN({conv.name}): the conv has activation {cfg['activation']!r}; a BatchNormalization "
            "after it can only be folded into a linear conv. Move the activation after the BatchNormalization."
        )
    if type(bn) is not L.BatchNormalization:
        raise UnsupportedError(f"FoldedConvBN({conv.name}): expected a BatchNormalization, got {type(bn).__name__}.")
    bcfg = bn.get_config()
    if bcfg.get("renorm") or bcfg.get("synchronized"):
        raise UnsupportedError(
            f"FoldedConvBN({conv.name}): BatchNormalization '{bn.name}' uses renorm or synchronized statistics, "
            "which fake folding does not model. Turn them off, or keep the BatchNormalization unfolded."
        )
    if not isinstance(freeze_bn_delay, (int, np.integer)) or isinstance(freeze_bn_delay, bool) or freeze_bn_delay < -1:
        raise ConfigError.expected(
            f"FoldedConvBN({conv.name}).freeze_bn_delay",
            "an int >= 0 (training calls before the moving statistics freeze) or -1 (never)",
            freeze_bn_delay,
        )


@keras.saving.register_keras_serializable(package="qstrat")
class FoldedConvBN(keras.layers.Layer):
    """A linear conv (or Dense) and the BatchNormalization after it, fake-folded for QAT (see the module doc).

    The layer owns copies of the two layers (``conv`` and ``bn``; the layers passed
    in are left alone) and a step counter. It never calls the copies: it computes
    with their variables, which ``kernel``, ``bias``, ``gamma``, ``beta``,
    ``moving_mean`` and ``moving_variance`` name (gamma and beta are None without
    scale or center, as in BatchNormalization, and count as 1 and 0). ``bias``
    always has the output-channel shape (C,), since `QuantizeWrapper` builds the
    bias quantizer's state from it: the conv's bias, or a non-trainable zero when
    the conv has none. The bias quantizer itself sees the folded bias.

    Args:
        conv: a Conv1D/2D/3D, DepthwiseConv1D/2D (either data_format) or Dense with linear activation,
            or its serialized config (built: its weights are copied).
        bn: a BatchNormalization on the conv's channel axis (the last, or 1 for channels_first), or its
            serialized config (built: its weights are copied).
        freeze_bn_delay: training calls that update the moving statistics before they freeze and
            training switches to them; -1 never freezes.

    Example:
        >>> fold = FoldedConvBN(conv, bn, freeze_bn_delay=2000)
        >>> q = QuantizeWrapper(fold, {"kernel": pof2_kernel, "bias": pof2_bias})
        >>> kernel, bias = fold.folded_weights()  # for a plain conv after training
    """

    def __init__(self, conv, bn, freeze_bn_delay: int = -1, **kwargs):
        conv, bn = _layer(conv), _layer(bn)
        _check(conv, bn, freeze_bn_delay)
        kwargs.setdefault("name", conv.name)
        super().__init__(**kwargs)
        self.freeze_bn_delay = int(freeze_bn_delay)
        self._kind, self._rank = _CONVS[type(conv)]
        self._axis = bn.axis
        self._channels_first = conv.get_config().get("data_format") == "channels_first"
        if self._rank is not None:
            self._check_axis(self._rank)
        # Copies, owned by this layer (the layers passed in are left alone), in this layer's dtype if given.
        dtype = {"dtype": kwargs["dtype"]} if kwargs.get("dtype") is not None else {}
        self.conv = type(conv).from_config({**conv.get_config(), **dtype})
        self.bn = L.BatchNormalization.from_config({**bn.get_config(), **dtype})
        self.epsilon, self.momentum = float(bn.epsilon), float(bn.momentum)
        self.use_bias, self.scale, self.center = bool(conv.use_bias), bool(bn.scale), bool(bn.center)
        cfg = conv.get_config()
        self._geom = {k: cfg.get(k) for k in ("strides", "padding", "dilation_rate", "kernel_size")}
        # Weights of built layers, copied by build.
        self._initial = (conv.get_weights() if conv.built else None, bn.get_weights() if bn.built else None)
        shape = conv.get_build_config().get("input_shape") if conv.built else None
        if shape is not None:
            self.build(tuple(shape))

    def _check_axis(self, rank: int) -> None:
        axis = self._axis
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        want, where = (1, "(1) of its channels_first") if self._channels_first else (rank - 1, "(last) of its")
        if not isinstance(axis, int) or axis % rank != want:
            raise UnsupportedError(
                f"FoldedConvBN({self.name}): BatchNormalization axis {axis} is not the channel axis {where} "
                f"rank-{rank} input; only a BatchNormalization of the conv's channels folds."
            )

    def _check_bias_axis(self, input_shape) -> None:
        """This layer adds its folded bias on the channels; the plain conv that `folded_weights` makes would not
        where Keras adds it on the last axis (`qstrat.layers.bias_axis`): refused, so that
        training and the deployed model compute the same."""
        if self._channels_first and misplaces_bias(self.conv.compute_output_shape(input_shape)):
            raise UnsupportedError(
                f"FoldedConvBN({self.name}): {MISPLACED}: a plain conv with the folded bias would not compute what "
                "this layer trains. Give it channels_last data, or use the JAX or torch backend."
            )

    def _per_channel(self, v, rank: int):
        """A (C,) vector shaped to broadcast over the conv's output channels (axis 1 when channels_first)."""
        return ops.reshape(v, (-1,) + (1,) * (rank - 2)) if self._channels_first else v

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_axis(len(input_shape))
        self._check_bias_axis(input_shape)
        self.conv.build(input_shape)
        self.bn.build(self.conv.compute_output_shape(input_shape))
        for layer, weights in zip((self.conv, self.bn), self._initial, strict=True):
            if weights is not None:
                layer.set_weights(weights)
        if not self.use_bias:  # a zero with the output-channel shape, for the bias quantizer's state
            self._zero_bias = self.add_weight(
                name="bias", shape=self.bn.moving_mean.shape, initializer="zeros", trainable=False
            )
        self.step = self.add_weight(name="step", shape=(), dtype="int32", initializer="zeros", trainable=False)
        self._initial = (None, None)
        self.built = True

    # The variables, for QuantizeWrapper (``kernel``, ``bias``) and for reading. Properties, not attributes:
    # an attribute would track each variable twice.
    @property
    def kernel(self):
        return self.conv.kernel

    @property
    def bias(self):
        """The conv's bias, or a non-trainable zero of the same (output-channel) shape when it has none."""
        return self.conv.bias if self.use_bias else self._zero_bias

    @property
    def gamma(self):
        return self.bn.gamma

    @property
    def beta(self):
        return self.bn.beta

    @property
    def moving_mean(self):
        return self.bn.moving_mean

    @property
    def moving_variance(self):
        return self.bn.moving_variance

    # --- the math (keras.ops only) -------------------------------------------------------------

    def _linear(self, x, kernel, training: bool = False):
        """The conv's linear map (no bias) with ``kernel``."""
        if self._kind == "dense":
            return ops.matmul(x, kernel)
        g = self._geom
        fmt = "channels_first" if self._channels_first else "channels_last"
        if self._kind == "depthwise":
            return ops.depthwise_conv(x, kernel, g["strides"], g["padding"], fmt, g["dilation_rate"])
        strides = strided.pointwise_strides(self.conv) if training else None
        if strides is not None:  # TensorFlow's oneDNN gradient of this conv can crash: see qstrat.layers.strided
            return strided.conv(x, kernel, strides)
        padding = g["padding"]
        if padding == "causal":  # as Conv1D does: pad the steps on the left, then a valid convolution
            left = g["dilation_rate"][0] * (g["kernel_size"][0] - 1)
            pads = [[0, 0], [0, 0], [left, 0]] if self._channels_first else [[0, 0], [left, 0], [0, 0]]
            x, padding = ops.pad(x, pads), "valid"
        return ops.conv(x, kernel, list(g["strides"]), padding, fmt, g["dilation_rate"])

    def _scale_out(self, kernel, k):
        """Multiply output channel c of the kernel by ``k[c]`` (depthwise: channel in * multiplier + m)."""
        if self._kind == "depthwise":
            k = ops.reshape(k, tuple(self.kernel.shape[-2:]))
        return ops.multiply(kernel, k)

    def _params(self, dtype):
        kernel, b = ops.cast(self.kernel.value, dtype), ops.cast(self.bias.value, dtype)
        ones = ops.ones(b.shape, dtype)
        gamma = ops.cast(self.gamma.value, dtype) if self.scale else ones
        beta = ops.cast(self.beta.value, dtype) if self.center else ops.zeros_like(ones)
        mean, var = ops.cast(self.moving_mean.value, dtype), ops.cast(self.moving_variance.value, dtype)
        return kernel, b, gamma, beta, mean, ops.sqrt(ops.add(var, self.epsilon))

    def _moving_fold(self, dtype):
        """(kernel, bias) folded with the moving statistics, and the parameters they came from."""
        kernel, b, gamma, beta, mean, sigma = self._params(dtype)
        k = ops.divide(gamma, sigma)
        return self._scale_out(kernel, k), beta + (b - mean) * k, (kernel, b, gamma, beta, mean, sigma)

    def call_with_quantizers(self, inputs, quantize, training: bool = False):
        """The layer's output, with ``quantize(attr, tensor)`` applied to the folded kernel and bias (module doc).

        Each training call increments ``step``, and updates the moving statistics until the freeze.

        Args:
            inputs: the input tensor.
            quantize: ``quantize(attr, tensor) -> tensor``, called once for "kernel" and once for "bias".
            training: a Python bool; True normalizes with the batch statistics until the freeze.
        """
        x = ops.cast(inputs, self.compute_dtype)
        w, folded_bias, (kernel, b, gamma, beta, mean_ma, sigma_ma) = self._moving_fold(x.dtype)
        y = self._linear(x, quantize("kernel", w), training)
        rank = len(y.shape)
        if not training:
            return y + self._per_channel(quantize("bias", folded_bias), rank)
        # Read before any assign: sigma_MA, mean_MA and the step are the values at the start of the step.
        var_ma = ops.cast(self.moving_variance.value, x.dtype)
        step = ops.convert_to_tensor(self.step.value)
        z = self._linear(x, kernel, training) + self._per_channel(b, rank)
        channel = 1 if self._channels_first else rank - 1
        mu_b, var_b = ops.moments(z, axes=[a for a in range(rank) if a != channel])
        sigma_b = ops.sqrt(ops.add(var_b, self.epsilon))
        # 1.0 once freeze_bn_delay training calls have run (never with -1), as a float blend: x*1 + y*0 == x.
        if self.freeze_bn_delay < 0:
            frozen = ops.zeros((), x.dtype)
        else:
            frozen = ops.cast(ops.greater_equal(step, self.freeze_bn_delay), x.dtype)
        live = 1.0 - frozen
        m = self.momentum  # BatchNormalization's update: moving * momentum + batch * (1 - momentum)
        new_mean = frozen * mean_ma + live * (mean_ma * m + mu_b * (1.0 - m))
        new_var = frozen * var_ma + live * (var_ma * m + var_b * (1.0 - m))
        self.moving_mean.assign(ops.cast(new_mean, self.moving_mean.dtype))
        self.moving_variance.assign(ops.cast(new_var, self.moving_variance.dtype))
        self.step.assign(step + 1)
        mean = frozen * mean_ma + live * mu_b
        sigma = frozen * sigma_ma + live * sigma_b
        scale = self._per_channel(sigma_ma / sigma, rank)
        # The bias inference quantizes (the moving-statistics fold) is what its quantizer sees, so a power-of-2
        # position taken in training is the one inference applies; the batch statistics' difference is added in
        # float, as the output's rescaling is, and is 0 once frozen.
        batch_bias = beta + (b - mean) * (gamma / sigma)
        bias = quantize("bias", folded_bias) + (batch_bias - folded_bias)
        return scale * y + self._per_channel(bias, rank)

    def call(self, inputs, training=None):
        return self.call_with_quantizers(inputs, lambda attr, tensor: tensor, bool(training))

    def target_value(self, attr: str):
        """What the quantizer of ``attr`` ("kernel" or "bias") sees in inference: the moving-statistics fold."""
        if attr not in QUANTIZED:
            raise ConfigError(
                f"{self.name}.{attr}",
                f'FoldedConvBN quantizes only its folded "kernel" and "bias", got a quantizer for "{attr}"',
                "Quantize the kernel and bias only.",
            )
        w, b, _ = self._moving_fold(self.compute_dtype)
        return w if attr == "kernel" else b

    def folded_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel, bias) folded with the moving statistics, as float32 NumPy: the plain conv replacing this layer.

        They are fold_bn's formula, computed as the layer computes ``target_value`` in inference (float32,
        where fold_bn rounds float64 products), so the plain conv with the same quantizers gives the same outputs.
        """
        w, b, _ = self._moving_fold("float32")
        return _np(w).astype(np.float32), _np(b).astype(np.float32)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "conv": _serialized(self.conv),
            "bn": _serialized(self.bn),
            "freeze_bn_delay": self.freeze_bn_delay,
        }
