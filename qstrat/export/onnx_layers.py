"""One function per Keras layer type: its ONNX nodes, computing what the layer computes.

Each emitter takes a `Call` (the layer, its input `Tensor`s, its output
shapes, its weights) and returns its output tensors. Weights come through
`Call.weight`, which stores a quantized weight as grid integers read through
DequantizeLinear (the QDQ form), and a float one as a float constant.

Where Keras computes with a particular order of float operations that
quantized values make exact (sums of grid values, a division by a count),
the nodes do the same: average pooling is a sum (a depthwise convolution
with ones) divided by the window's count, global average pooling a
ReduceSum divided by the count, hard sigmoid ``relu6(x + 3) / 6``. That
is what lets a power-of-2 model export bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from qstrat.errors import UnsupportedError, warn_at_caller
from qstrat.export.onnx_activations import ACTIVATION_EMITTERS, activation, refuse_settings
from qstrat.export.onnx_build import Call, Tensor, physical_axis
from qstrat.graph.ir import constant_operands
from qstrat.layers.bias_axis import keras_adds_channels_first_bias_last
from qstrat.layers.dpu import DPUAveragePooling2D, DPUGlobalAveragePooling2D

# ---- shapes and padding ---------------------------------------------------------------------------


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, list | tuple) else (int(v),) * n


def _pads(padding: str, sizes, kernel, strides, dilations) -> list[int]:
    """ONNX pads (begins then ends) for Keras "valid", "same" (TF: the extra pad at the end) or "causal"."""
    begins, ends = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        extent = (k - 1) * d + 1
        if padding == "same":
            out = -(-n // s)
            total = max((out - 1) * s + extent - n, 0)
            begins.append(total // 2)
            ends.append(total - total // 2)
        elif padding == "causal":
            begins.append(extent - 1)
            ends.append(0)
        else:
            begins.append(0)
            ends.append(0)
    return begins + ends


def _spatial(c: Call, x: Tensor) -> tuple[str, tuple]:
    """The layer's data format and its input's spatial sizes (which must be known)."""
    fmt = c.config("data_format", "channels_last")
    sizes = x.shape[1:-1] if fmt == "channels_last" else x.shape[2:]
    if any(s is None for s in sizes):
        raise UnsupportedError(f"{c.name}: the spatial size of its input is unknown ({x.shape}); export needs it.")
    return fmt, tuple(int(s) for s in sizes)


def _layout_in(c: Call, x: Tensor, fmt: str) -> Tensor:
    return c.b.to_cf(x) if fmt == "channels_last" else c.b.to_keras(x)


def _layout_out(fmt: str) -> str:
    return "cf" if fmt == "channels_last" else "keras"


# ---- convolutions and dense -------------------------------------------------------------------------


def _conv(c: Call, kind: str) -> list[Tensor]:
    b, layer = c.b, c.layer
    x = c.inputs[0]
    fmt, sizes = _spatial(c, x)
    x = _layout_in(c, x, fmt)
    n = len(sizes)
    kernel = _tuple(layer.kernel_size, n)
    strides, dil = _tuple(layer.strides, n), _tuple(layer.dilation_rate, n)
    attrs = {"strides": list(strides), "dilations": list(dil), "kernel_shape": list(kernel)}
    cin = int(x.shape[-1] if fmt == "channels_last" else x.shape[1])
    if kind == "depthwise":
        mult = int(layer.depth_multiplier)

        def to_onnx(a):  # (k..., cin, mult) -> (cin * mult, 1, k...)
            return np.expand_dims(np.moveaxis(a.reshape(*a.shape[:n], cin * mult), -1, 0), 1)

        w = c.weight("kernel", to_onnx, x, 0)
        attrs["group"] = cin
        channels = cin * mult
    elif kind == "transpose":
        w = c.weight("kernel", lambda a: np.transpose(a, (n + 1, n, *range(n))), x, 1)
        channels = int(layer.filters)
    else:
        w = c.weight("kernel", lambda a: np.transpose(a, (n + 1, n, *range(n))), x, 0)
        attrs["group"] = int(getattr(layer, "groups", 1))
        channels = int(layer.filters)
    if kind == "transpose":
        out_sizes = c.out_shapes[0][1:-1] if fmt == "channels_last" else c.out_shapes[0][2:]
        attrs.update(_transpose_pads(c, sizes, out_sizes, kernel, strides, dil))
        op = "ConvTranspose"
    else:
        attrs["pads"] = _pads(layer.padding, sizes, kernel, strides, dil)
        op = "Conv"
    ins = [x.name, w]
    if layer.use_bias:
        _warn_if_keras_misplaces_the_bias(c, fmt, channels)
        ins.append(c.bias(x, "kernel", (channels,)))
    y = c.out(b.one(op, ins, c.name, **attrs), _layout_out(fmt))
    return [activation(c, y, layer.activation)]


def _warn_if_keras_misplaces_the_bias(c: Call, fmt: str, channels: int) -> None:
    """Where Keras on this backend adds a channels_first layer's bias on its last axis
    (`qstrat.layers.bias_axis`), the file, which adds it on the channels, differs from the model."""
    out = c.out_shapes[0]
    if fmt == "channels_first" and out[-1] == channels and keras_adds_channels_first_bias_last():
        warn_at_caller(
            f"{c.name}: Keras on this backend adds this channels_first layer's bias on its last axis, which is "
            f"as long as its {channels} channels (keras.ops.add of a (1, C, 1, 1) bias). The ONNX file adds it "
            "on the channels, as the layer means, so the file's outputs differ from the Keras model's. Use "
            "channels_last, or the JAX or torch backend, where Keras adds it on the channels."
        )


def _transpose_pads(c: Call, sizes, out_sizes, kernel, strides, dil) -> dict:
    begins, ends, extra = [], [], []
    for n, o, k, s, d in zip(sizes, out_sizes, kernel, strides, dil, strict=True):
        full = s * (n - 1) + (k - 1) * d + 1
        if o is None:
            raise UnsupportedError(f"{c.name}: its output size is unknown; export needs it.")
        if full >= o:
            total = full - o
            begins.append(total // 2)
            ends.append(total - total // 2)
            extra.append(0)
        else:
            begins.append(0)
            ends.append(0)
            extra.append(o - full)
    attrs = {"pads": begins + ends}
    if any(extra):
        attrs["output_padding"] = extra
    return attrs


def _separable(c: Call) -> list[Tensor]:
    """SeparableConv (not split by the optimize stage): depthwise, then a 1x1 convolution."""
    b, layer = c.b, c.layer
    x = c.inputs[0]
    fmt, sizes = _spatial(c, x)
    x = _layout_in(c, x, fmt)
    n = len(sizes)
    cin = int(x.shape[-1] if fmt == "channels_last" else x.shape[1])
    mult = int(layer.depth_multiplier)
    kernel, strides, dil = _tuple(layer.kernel_size, n), _tuple(layer.strides, n), _tuple(layer.dilation_rate, n)
    dw = c.weight(
        "depthwise_kernel", lambda a: np.expand_dims(np.moveaxis(a.reshape(*a.shape[:n], cin * mult), -1, 0), 1), x, 0
    )
    pads = _pads(layer.padding, sizes, kernel, strides, dil)
    mid = b.one(
        "Conv", [x.name, dw], f"{c.name}/depthwise", group=cin, strides=list(strides), dilations=list(dil), pads=pads
    )
    pw = c.weight("pointwise_kernel", lambda a: np.transpose(a, (n + 1, n, *range(n))), None, 0)
    if layer.use_bias:
        _warn_if_keras_misplaces_the_bias(c, fmt, int(layer.filters))
    ins = [mid, pw] + ([c.bias(None, "pointwise_kernel", (int(layer.filters),))] if layer.use_bias else [])
    y = c.out(b.one("Conv", ins, c.name), _layout_out(fmt))
    return [activation(c, y, layer.activation)]


def _dense(c: Call) -> list[Tensor]:
    b, layer = c.b, c.layer
    x = b.to_keras(c.inputs[0])
    # ONNX Runtime (1.22 and later) turns a MatMul of an 8-bit weight that no integer kernel takes (its input is
    # not on an 8-bit grid) into MatMulNBits, which by default quantizes the input to 8 bits on the fly: wrong
    # for a 16-bit or float input. It takes no int32 weight, and DequantizeLinear reads one at any opset.
    narrow = x.grid is not None and x.grid.storage() in ("int8", "uint8")
    w = c.weight("kernel", None, x, 1, storage=None if narrow else "int32")
    y = b.one("MatMul", [x.name, w], c.name if not layer.use_bias else f"{c.name}/MatMul")
    if layer.use_bias:
        y = b.one("Add", [y, c.bias(x, "kernel", (int(layer.units),))], c.name)
    return [activation(c, c.out(y, "keras"), layer.activation)]


# ---- pooling, resizing, padding -------------------------------------------------------------------


def _pool(c: Call, kind: str) -> list[Tensor]:
    b, layer = c.b, c.layer
    x = c.inputs[0]
    fmt, sizes = _spatial(c, x)
    x = _layout_in(c, x, fmt)
    n = len(sizes)
    kernel = _tuple(layer.pool_size, n)
    strides = _tuple(layer.strides or layer.pool_size, n)
    pads = _pads(layer.padding, sizes, kernel, strides, (1,) * n)
    if kind == "max":
        y = b.one("MaxPool", [x.name], c.name, kernel_shape=list(kernel), strides=list(strides), pads=pads)
        return [c.out(y, _layout_out(fmt), grid=x.grid)]
    # Average: a sum over the window (a depthwise convolution with ones, exact on grid values), then / count.
    ch = int(x.shape[-1] if fmt == "channels_last" else x.shape[1])
    ones = b.const(np.ones((ch, 1, *kernel), np.float32), f"{c.name}/window")
    s = b.one("Conv", [x.name, ones], f"{c.name}/sum", group=ch, strides=list(strides), pads=pads)
    if isinstance(layer, DPUAveragePooling2D):  # the DPU's k / 2^n for 1 / count: exact on the sum
        y = b.one("Mul", [s, b.const(np.float32(layer._multiplier), f"{c.name}/multiplier")], c.name)
        return [c.out(y, _layout_out(fmt))]
    count = _window_counts(sizes, kernel, strides, pads)
    y = b.one("Div", [s, b.const(count.reshape(1, 1, *count.shape), f"{c.name}/count")], c.name)
    return [c.out(y, _layout_out(fmt))]


def _window_counts(sizes, kernel, strides, pads) -> np.ndarray:
    """How many input elements (not padding) each output window covers."""
    n = len(sizes)
    per_axis = []
    for i in range(n):
        size, k, s, lo, hi = sizes[i], kernel[i], strides[i], pads[i], pads[n + i]
        out = (size + lo + hi - k) // s + 1
        start = np.arange(out) * s - lo
        per_axis.append(np.minimum(start + k, size) - np.maximum(start, 0))
    counts = per_axis[0].astype(np.float32)
    for more in per_axis[1:]:
        counts = np.multiply.outer(counts, more.astype(np.float32))
    return counts.astype(np.float32)


def _global_pool(c: Call, kind: str) -> list[Tensor]:
    b, layer = c.b, c.layer
    x = c.inputs[0]
    fmt, sizes = _spatial(c, x)
    x = _layout_in(c, x, fmt)
    axes = list(range(2, 2 + len(sizes)))
    keep = int(bool(getattr(layer, "keepdims", False)))
    axes_in = b.const(np.array(axes, np.int64), f"{c.name}/axes")
    if kind == "max":
        if b.opset < 18:
            y = b.one("ReduceMax", [x.name], c.name, axes=axes, keepdims=keep)
        else:
            y = b.one("ReduceMax", [x.name, axes_in], c.name, keepdims=keep)
        return [c.out(y, "keras" if not keep else _layout_out(fmt), grid=x.grid)]
    s = b.one("ReduceSum", [x.name, axes_in], f"{c.name}/sum", keepdims=keep)
    if isinstance(layer, DPUGlobalAveragePooling2D):
        y = b.one("Mul", [s, b.const(np.float32(layer._multiplier), f"{c.name}/multiplier")], c.name)
        return [c.out(y, "keras" if not keep else _layout_out(fmt))]
    y = b.one("Div", [s, b.const(np.float32(math.prod(sizes)), f"{c.name}/count")], c.name)
    return [c.out(y, "keras" if not keep else _layout_out(fmt))]


def _upsampling(c: Call) -> list[Tensor]:
    b, layer = c.b, c.layer
    refuse_settings(c)
    x = c.inputs[0]
    fmt, sizes = _spatial(c, x)
    x = _layout_in(c, x, fmt)
    scales = b.const(np.array([1, 1, *_tuple(layer.size, len(sizes))], np.float32), f"{c.name}/scales")
    y = b.one(
        "Resize",
        [x.name, "", scales],
        c.name,
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )
    return [c.out(y, _layout_out(fmt), grid=x.grid)]


def _zero_padding(c: Call) -> list[Tensor]:
    b, layer = c.b, c.layer
    x = c.inputs[0]
    fmt, sizes = _spatial(c, x)
    x = _layout_in(c, x, fmt)
    pad = layer.padding
    pairs = [tuple(p) if isinstance(p, list | tuple) else (p, p) for p in (pad if len(sizes) > 1 else [pad])]
    pads = [0, 0, *[p[0] for p in pairs], 0, 0, *[p[1] for p in pairs]]
    y = b.one("Pad", [x.name, b.const(np.array(pads, np.int64), f"{c.name}/pads")], c.name)
    return [c.out(y, _layout_out(fmt), grid=x.grid)]


# ---- shapes ------------------------------------------------------------------------------------------


def _reshape(c: Call) -> list[Tensor]:
    x = c.b.to_keras(c.inputs[0])
    shape = c.b.const(np.array([0, *c.layer.target_shape], np.int64), f"{c.name}/shape")
    return [c.out(c.b.one("Reshape", [x.name, shape], c.name), "keras", grid=x.grid)]


def _flatten(c: Call) -> list[Tensor]:
    x = c.b.to_keras(c.inputs[0])
    return [c.out(c.b.one("Flatten", [x.name], c.name, axis=1), "keras", grid=x.grid)]


def _permute(c: Call) -> list[Tensor]:
    x = c.b.to_keras(c.inputs[0])
    y = c.b.one("Transpose", [x.name], c.name, perm=[0, *c.layer.dims])
    return [c.out(y, "keras", grid=x.grid)]


def _identity(c: Call) -> list[Tensor]:
    x = c.inputs[0]
    return [Tensor(x.name, tuple(c.out_shapes[0]), x.layout, x.grid)]


# ---- merging -----------------------------------------------------------------------------------------


def _merge(op: str):
    def emit(c: Call) -> list[Tensor]:
        xs = c.b.same_layout(list(c.inputs))
        y = xs[0].name
        for k, t in enumerate(xs[1:], 1):
            y = c.b.one(op, [y, t.name], c.name if k == len(xs) - 1 else f"{c.name}/{op}{k}")
        return [c.out(y, xs[0].layout)]

    return emit


def _variadic(op: str):
    def emit(c: Call) -> list[Tensor]:
        xs = c.b.same_layout(list(c.inputs))
        return [c.out(c.b.one(op, [t.name for t in xs], c.name), xs[0].layout)]

    return emit


def _average(c: Call) -> list[Tensor]:
    xs = c.b.same_layout(list(c.inputs))
    y = _merge("Add")(Call(f"{c.name}/sum", c.layer, xs, c.out_shapes, c.b))[0]
    n = c.b.const(np.float32(len(xs)), f"{c.name}/n")
    return [c.out(c.b.one("Div", [y.name, n], c.name), xs[0].layout)]


def _concatenate(c: Call) -> list[Tensor]:
    xs = c.b.same_layout(list(c.inputs))
    axis = physical_axis(int(c.layer.axis), xs[0])
    return [c.out(c.b.one("Concat", [t.name for t in xs], c.name, axis=axis), xs[0].layout)]


# ---- keras.ops arithmetic left in the graph (the optimize stage turns the rest into layers) ----------------

_OP_NODES = {"Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "Divide": "Div", "TrueDivide": "Div"}
_OP_NODES |= {"Maximum": "Max", "Minimum": "Min"}


def op_operands(node) -> list | None:
    """`qstrat.graph.ir.constant_operands` of a binary keras.ops arithmetic node ONNX has an operator for."""
    if type(node.op).__name__ not in _OP_NODES:
        return None
    return constant_operands(node)


def keras_op(c: Call, node) -> list[Tensor]:
    """A binary keras.ops operation with tensor and constant operands (``x * 0.5``), as Keras broadcasts it."""
    operands, x = op_operands(node), c.inputs[0]
    if any(o is not None and o.ndim > 0 for o in operands):
        x = c.b.to_keras(x)  # an array constant broadcasts against the channels-last layout
    names = [x.name if o is None else c.b.const(o, f"{c.name}/constant") for o in operands]
    return [c.out(c.b.one(_OP_NODES[type(node.op).__name__], names, c.name), x.layout)]


EMITTERS: dict[str, Callable[[Call], list[Tensor]]] = {
    **{f"Conv{d}D": (lambda c: _conv(c, "conv")) for d in (1, 2, 3)},
    **{f"DepthwiseConv{d}D": (lambda c: _conv(c, "depthwise")) for d in (1, 2)},
    **{f"Conv{d}DTranspose": (lambda c: _conv(c, "transpose")) for d in (1, 2, 3)},
    **{f"SeparableConv{d}D": _separable for d in (1, 2)},
    "Dense": _dense,
    **{f"MaxPooling{d}D": (lambda c: _pool(c, "max")) for d in (1, 2, 3)},
    **{f"AveragePooling{d}D": (lambda c: _pool(c, "avg")) for d in (1, 2, 3)},
    **{f"GlobalAveragePooling{d}D": (lambda c: _global_pool(c, "avg")) for d in (1, 2, 3)},
    "DPUAveragePooling2D": lambda c: _pool(c, "avg"),
    "DPUGlobalAveragePooling2D": lambda c: _global_pool(c, "avg"),
    **{f"GlobalMaxPooling{d}D": (lambda c: _global_pool(c, "max")) for d in (1, 2, 3)},
    "UpSampling2D": _upsampling,
    **{f"ZeroPadding{d}D": _zero_padding for d in (1, 2, 3)},
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Permute": _permute,
    **{k: _identity for k in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")},
    **{
        k: _identity for k in ("GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity")
    },
    "Add": _merge("Add"),
    "Subtract": _merge("Sub"),
    "Multiply": _merge("Mul"),
    "Maximum": _variadic("Max"),
    "Minimum": _variadic("Min"),
    "Average": _average,
    "Concatenate": _concatenate,
    **ACTIVATION_EMITTERS,
}
