"""The integer form of each Keras layer a power-of-2 quantized model holds.

Why: `qstrat.integer.executor` walks the quantized graph; for each layer it
asks `integer_layer` for the integer result, or None when the layer has no
integer form (softmax, bilinear upsampling, a layer the strategy left float),
which the executor then runs in float (a float island).

Positions follow the layer: a convolution's accumulator sits at the input
position plus the weight position, an elementwise sum at the finest position
of its inputs, a product at the sum of positions, the DPU's ``k / 2^n``
multipliers at ``pos + n``. Nothing is rounded here: the next FakeQuant does
that (`tensors.requantize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import keras
import numpy as np

from qstrat.arrays import to_numpy
from qstrat.errors import UnsupportedError
from qstrat.integer import kernels as K
from qstrat.integer.activations import activate, hard_sigmoid, leaky, relu_layer
from qstrat.integer.tensors import (
    IntTensor,
    align,
    as_pos,
    common_pos,
    from_grid,
    full_den,
    int32_overflow,
    scalar_den,
    shift_left,
    uniform,
)
from qstrat.layers.dpu import (
    DPUAveragePooling2D,
    DPUGlobalAveragePooling2D,
    DPUHardSigmoid,
    avgpool_multiplier,
)
from qstrat.layers.wrapper import QuantizeWrapper
from qstrat.quantizers import Pof2SQuantizer, TQTQuantizer
from qstrat.quantizers.reference import expand

L = keras.layers


def _ranks(*names: str) -> tuple:
    """The 1-D, 2-D and 3-D Keras layers of each name: ``_ranks("Cropping")`` is Cropping1D .. Cropping3D."""
    return tuple(getattr(L, f"{name}{d}D") for name in names for d in (1, 2, 3))


DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
KERNEL_LAYERS = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D, *DEPTHWISE, *SEPARABLE, *TRANSPOSE)
DPU_POOLING = (DPUAveragePooling2D, DPUGlobalAveragePooling2D)
POOLING = (*DPU_POOLING, *_ranks("MaxPooling", "AveragePooling", "GlobalMaxPooling", "GlobalAveragePooling"))
LAYOUT = (*_ranks("UpSampling", "ZeroPadding", "Cropping"), L.Reshape, L.Flatten, L.Permute)
IDENTITY = (L.Dropout, *_ranks("SpatialDropout"), L.GaussianNoise, L.Identity)
MERGING = (L.Add, L.Subtract, L.Average, L.Multiply, L.Maximum, L.Minimum, L.Concatenate)
NEEDS_POF2 = "simulate_integer needs power-of-2 quantizers (the pof2s or tqt strategy)"


def numpy_state(state) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in state.items()}


def quantizer_position(q, state, where: str) -> np.ndarray:
    """The integer position(s) of a power-of-2 quantizer; an error for any other quantizer."""
    if not isinstance(q, (Pof2SQuantizer, TQTQuantizer)):
        raise UnsupportedError(f"{where}: a {q.type_name} has float scales; {NEEDS_POF2}.")
    if not q.params.symmetry or "zero_point" in state:
        raise UnsupportedError(
            f"{where}: an asymmetric grid (a zero point) has no shift-only integer form. "
            "Quantize it with symmetry true."
        )
    pos = q.position(state) if isinstance(q, TQTQuantizer) else state["pos"]
    return np.round(np.asarray(pos, np.float64)).astype(np.int64)


def check_enabled(flag, where: str) -> None:
    if float(to_numpy(flag)) < 0.5:
        raise UnsupportedError(
            f"{where}: the quantizer is bypassed (enabled is 0), so the layer computes in float; {NEEDS_POF2} "
            "on every tensor. Enable it (qstrat.layers.set_quantizers_enabled(model, True))."
        )


@dataclass
class Context:
    """What layers share during one run: weight integers (computed once) and overflowing accumulators."""

    overflow: list[str] = field(default_factory=list)
    weights: dict = field(default_factory=dict)

    def weight(self, wrapper, attr: str) -> tuple[np.ndarray, np.ndarray]:
        """(integers, positions shaped to broadcast against them) of a quantized weight."""
        key = (id(wrapper), attr)
        if key not in self.weights:
            where = f"{wrapper.layer.name}.{attr}"
            q, state = wrapper.quantizers[attr], numpy_state(wrapper.state[attr])
            check_enabled(wrapper.enabled[attr], where)
            w = to_numpy(getattr(wrapper.layer, attr))
            pos = expand(quantizer_position(q, state, where), w.ndim, q.axis)
            self.weights[key] = (from_grid(q.reference(w, state), pos), pos)
        return self.weights[key]

    def accumulator(self, name: str, values: np.ndarray) -> None:
        if int32_overflow(values) and name not in self.overflow:
            self.overflow.append(name)


def keep_positions(ints, pos, keep: tuple[int, ...]):
    """Weights with one position along every axis but ``keep``: coarser ones shifted left (exact).

    Returns the integers and the positions over the kept axes, flattened (or an int).
    """
    ndim = ints.ndim
    reduce = tuple(a for a in range(ndim) if a not in {k % ndim for k in keep})
    pos = np.broadcast_to(pos, (1,) * (ndim - np.ndim(pos)) + np.shape(pos))
    top = np.max(pos, axis=reduce, keepdims=True) if reduce else pos
    kept = np.broadcast_to(top, tuple(ints.shape[a] if a not in reduce else 1 for a in range(ndim)))
    return shift_left(ints, top - pos), as_pos(kept.reshape(-1))


# ---- layers with weights --------------------------------------------------------------------------


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedError(
            f"{layer.name}: data_format channels_first has no integer kernel here. Use channels_last."
        )


def _activation_name(layer) -> str:
    act = layer.get_config().get("activation", "linear")
    return act if isinstance(act, str) else "custom"


def wrapped(wrapper: QuantizeWrapper, x: IntTensor, ctx: Context):
    """A quantized Conv/Dense/PReLU: integer weights, accumulator at input + weight position, bias aligned."""
    layer = wrapper.layer
    if isinstance(layer, L.PReLU):
        return _prelu(wrapper, x, ctx)
    if not isinstance(layer, KERNEL_LAYERS) or _activation_name(layer) not in ("linear", "relu", "relu6"):
        return None
    attrs = {"depthwise_kernel", "pointwise_kernel"} if isinstance(layer, SEPARABLE) else {"kernel"}
    attrs |= {"bias"} if getattr(layer, "use_bias", False) else set()
    if not attrs <= set(wrapper.quantizers):
        return None  # a weight left float: the layer computes in float
    _check_channels_last(layer)
    den = scalar_den(x, layer.name)
    x = uniform(x)
    acc, pos = _accumulate(layer, x, ctx.weight, wrapper)
    if "bias" in attrs:
        b, bpos = keep_positions(*ctx.weight(wrapper, "bias"), keep=(-1,))
        top = common_pos(pos, bpos)
        acc = shift_left(acc, np.asarray(top) - np.asarray(pos)) + shift_left(
            b * den, np.asarray(top) - np.asarray(bpos)
        )
        pos = top
    ctx.accumulator(wrapper.layer.name, acc)
    t = IntTensor(acc, pos, den)
    return activate(t, _activation_name(layer))


def _accumulate(layer, x: IntTensor, weight, wrapper):
    """(accumulator, position) of the layer's weights applied to x (uniform position)."""
    v = x.values
    if isinstance(layer, L.Dense):
        w, wpos = keep_positions(*weight(wrapper, "kernel"), keep=(-1,))
        return K.dense(v, w), as_pos(np.asarray(wpos) + x.pos)
    conv_args = (layer.strides, layer.padding, layer.dilation_rate)
    if isinstance(layer, DEPTHWISE):
        w, wpos = keep_positions(*weight(wrapper, "kernel"), keep=(-2, -1))
        return K.depthwise_conv(v, w, *conv_args), as_pos(np.asarray(wpos) + x.pos)
    if isinstance(layer, SEPARABLE):
        dw, dpos = keep_positions(*weight(wrapper, "depthwise_kernel"), keep=(-2, -1))
        mid = IntTensor(K.depthwise_conv(v, dw, *conv_args), np.asarray(dpos) + x.pos)
        mid = uniform(mid)  # the pointwise conv sums over the depthwise channels
        pw, ppos = keep_positions(*weight(wrapper, "pointwise_kernel"), keep=(-1,))
        return K.conv(mid.values, pw), as_pos(np.asarray(ppos) + mid.pos)
    if isinstance(layer, TRANSPOSE):
        w, wpos = keep_positions(*weight(wrapper, "kernel"), keep=(-2,))
        acc = K.conv_transpose(v, w, *conv_args, output_padding=layer.output_padding)
        return acc, as_pos(np.asarray(wpos) + x.pos)
    w, wpos = keep_positions(*weight(wrapper, "kernel"), keep=(-1,))
    return K.conv(v, w, *conv_args, groups=layer.groups), as_pos(np.asarray(wpos) + x.pos)


def _prelu(wrapper, x: IntTensor, ctx: Context):
    """Negatives times alpha (at pos + apos), non-negatives shifted to the same position."""
    if "alpha" not in wrapper.quantizers:
        return None
    a, apos = keep_positions(*ctx.weight(wrapper, "alpha"), keep=(-1,))
    neg_pos = as_pos(np.asarray(apos) + x.pos)
    top = common_pos(neg_pos, x.pos)
    neg = shift_left(x.values * a, np.asarray(top) - neg_pos)
    nonneg = shift_left(x.values, np.asarray(top) - x.pos)
    return IntTensor(np.where(x.values < 0, neg, nonneg), top, x.den)


# ---- merging --------------------------------------------------------------------------------------


def _aligned(ts: list[IntTensor]):
    """The tensors at one position (per channel where any is) and one ``den``: (values list, pos, den)."""
    top = common_pos(*(t.pos for t in ts))
    dens = [t.den for t in ts]
    if all(not isinstance(d, np.ndarray) for d in dens) and len({int(d) for d in dens}) == 1:
        den = dens[0]
        return [align(t, top).values for t in ts], top, den
    den = math.prod(np.asarray(d, np.int64) for d in dens)
    values = [align(t, top).values * (den // np.asarray(t.den, np.int64)) for t in ts]
    return values, top, den


def _merge(layer, ts: list[IntTensor]):
    if isinstance(layer, (L.Add, L.Subtract, L.Average)):
        values, pos, den = _aligned(ts)
        if isinstance(layer, L.Subtract):
            return IntTensor(values[0] - values[1], pos, den)
        out = sum(values[1:], values[0])
        return IntTensor(out, pos, den * len(ts) if isinstance(layer, L.Average) else den)
    if isinstance(layer, L.Multiply):
        out = ts[0]
        for t in ts[1:]:
            bits = (
                int(np.max(np.abs(out.values), initial=0)).bit_length()
                + int(np.max(np.abs(t.values), initial=0)).bit_length()
            )
            if bits > 62:
                raise UnsupportedError(f"{layer.name}: the product of its inputs leaves int64")
            pos = as_pos(np.asarray(out.pos) + np.asarray(t.pos))
            out = IntTensor(out.values * t.values, pos, np.asarray(out.den) * np.asarray(t.den))
        return out
    if isinstance(layer, (L.Maximum, L.Minimum)):
        values, pos, den = _aligned(ts)
        pick = np.maximum if isinstance(layer, L.Maximum) else np.minimum
        return IntTensor(pick.reduce(values), pos, den)
    if isinstance(layer, L.Concatenate):
        ts = [uniform(t) for t in ts]
        top = max(t.pos for t in ts)
        values = [align(t, top).values for t in ts]
        dens = {int(t.den) for t in ts if not isinstance(t.den, np.ndarray)}
        if len(dens) == 1 and all(not isinstance(t.den, np.ndarray) for t in ts):
            den = dens.pop()
        else:
            den = np.concatenate([full_den(t) for t in ts], axis=layer.axis)
        return IntTensor(np.concatenate(values, axis=layer.axis), top, den)
    return None


# ---- pooling and layout ---------------------------------------------------------------------------


def _spatial_axes(t: IntTensor) -> tuple[int, ...]:
    return tuple(range(1, t.values.ndim - 1))


def _pooling(layer, t: IntTensor):
    _check_channels_last(layer)
    if isinstance(layer, DPUAveragePooling2D):
        k, n = avgpool_multiplier(*layer.pool_size)
        sums = K.sum_pool(t.values, layer.pool_size, layer.strides, "valid")
        return IntTensor(sums * k, as_pos(np.asarray(t.pos) + n), scalar_den(t, layer.name))
    if isinstance(layer, DPUGlobalAveragePooling2D):
        k, n = avgpool_multiplier(*t.shape[1:3])
        sums = np.sum(t.values, axis=(1, 2), keepdims=layer.keepdims)
        return IntTensor(sums * k, as_pos(np.asarray(t.pos) + n), scalar_den(t, layer.name))
    den = scalar_den(t, layer.name)
    if isinstance(layer, _ranks("MaxPooling")):
        return IntTensor(K.max_pool(t.values, layer.pool_size, layer.strides, layer.padding), t.pos, den)
    if isinstance(layer, _ranks("AveragePooling")):
        sums = K.sum_pool(t.values, layer.pool_size, layer.strides, layer.padding)
        count = K.window_count(t.shape[1:-1], layer.pool_size, layer.strides, layer.padding)
        return IntTensor(sums, t.pos, den * np.asarray(count) if np.ndim(count) else den * count)
    axes = _spatial_axes(t)
    keepdims = getattr(layer, "keepdims", False)
    if isinstance(layer, _ranks("GlobalMaxPooling")):
        return IntTensor(np.max(t.values, axis=axes, keepdims=keepdims), t.pos, den)
    count = math.prod(t.shape[a] for a in axes)
    return IntTensor(np.sum(t.values, axis=axes, keepdims=keepdims), t.pos, den * count)


def _per_element(t: IntTensor, fn, den_fill=1, keep_channels=True) -> IntTensor:
    """A layout operation on the values (and on ``den`` where it is an array)."""
    if not keep_channels:
        t = uniform(t)
    den = t.den if not isinstance(t.den, np.ndarray) else fn(full_den(t), den_fill)
    return IntTensor(fn(t.values, 0), t.pos, den)


def _pairs(v, n: int):
    return [tuple(p) for p in v] if n > 1 else [tuple(v)]


def _layout(layer, t: IntTensor):
    if isinstance(layer, _ranks("UpSampling")):
        if getattr(layer, "interpolation", "nearest") != "nearest":
            return None
        _check_channels_last(layer)
        return _per_element(t, lambda a, _: K.upsample(a, layer.size))
    if isinstance(layer, _ranks("ZeroPadding")):
        _check_channels_last(layer)
        pads = _pairs(layer.padding, t.values.ndim - 2)
        return _per_element(t, lambda a, fill: K.zero_pad(a, pads, fill))
    if isinstance(layer, _ranks("Cropping")):
        _check_channels_last(layer)
        crops = _pairs(layer.cropping, t.values.ndim - 2)
        return _per_element(t, lambda a, _: K.crop(a, crops))
    batch = t.shape[0]
    if isinstance(layer, L.Reshape):
        return _per_element(t, lambda a, _: a.reshape(batch, *layer.target_shape), keep_channels=False)
    if isinstance(layer, L.Flatten):
        _check_channels_last(layer)
        return _per_element(t, lambda a, _: a.reshape(batch, -1), keep_channels=False)
    if isinstance(layer, L.Permute):
        return _per_element(t, lambda a, _: np.transpose(a, (0, *layer.dims)), keep_channels=False)
    return None


def integer_layer(op, inputs: list[IntTensor], ctx: Context) -> IntTensor | None:
    """The integer result of the Keras layer ``op`` on ``inputs``, or None when it has no integer form."""
    if isinstance(op, MERGING):
        return _merge(op, inputs)
    if len(inputs) != 1:
        return None
    t = inputs[0]
    if isinstance(op, QuantizeWrapper):
        return wrapped(op, t, ctx)
    if isinstance(op, IDENTITY):
        return t
    if isinstance(op, L.ReLU):
        return relu_layer(op, t)
    if isinstance(op, L.LeakyReLU):
        return leaky(t, op.negative_slope, op.name)
    if type(op) is L.Activation:
        name = _activation_name(op)
        return activate(t, name) if name in ("linear", "relu", "relu6") else None
    if isinstance(op, DPUHardSigmoid):
        return hard_sigmoid(t)
    if isinstance(op, POOLING):
        return _pooling(op, t)
    if isinstance(op, LAYOUT):
        return _layout(op, t)
    return None
