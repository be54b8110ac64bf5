"""Building blocks of the ONNX writer: named nodes and constants, tensor layouts, QDQ pairs.

Keras tensors are channels-last; ONNX's Conv, pooling and Resize are
channels-first. A `Tensor` records which layout it is in: ``"keras"`` (as
Keras has it) or ``"cf"`` (a channels-last Keras tensor stored channels-first).
Layers that need channels-first convert their inputs once; elementwise
layers and QDQ pairs work in either layout; layers that see the axes
(Reshape, Flatten, Dense on images) and the model outputs convert back. An
image model thus gets one Transpose after its input and one before its
Flatten or at its output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qstrat.errors import UnsupportedError
from qstrat.export.qdq import Grid

ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int16": TensorProto.INT16,
    "uint16": TensorProto.UINT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
}


@dataclass(frozen=True)
class Tensor:
    """A value of the ONNX graph: its name, its Keras (logical) shape, its layout.

    ``grid`` is set when the value is the output of a DequantizeLinear: the
    grid it came from (integer kernels need it to pair with a weight's grid).
    """

    name: str
    shape: tuple
    layout: str = "keras"
    grid: Grid | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)


def cf_perm(rank: int) -> list[int]:
    """Channels-last to channels-first: (0, r-1, 1, ..., r-2)."""
    return [0, rank - 1, *range(1, rank - 1)]


def keras_perm(rank: int) -> list[int]:
    return [0, *range(2, rank), 1]


def physical_axis(axis: int, tensor: Tensor) -> int:
    """Where a Keras axis of ``tensor`` is in its ONNX layout."""
    r = tensor.rank
    axis %= r
    if tensor.layout == "keras" or axis == 0:
        return axis
    return 1 if axis == r - 1 else axis + 1


class Builder:
    """Collects nodes and initializers with unique, readable names."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._moved: dict[tuple[str, str], str] = {}

    def fresh(self, name: str) -> str:
        base, k = name, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        return name

    def const(self, array, name: str, dtype: str | None = None) -> str:
        """An initializer (identical constants under one name are stored once)."""
        array = np.asarray(array, dtype=dtype) if dtype else np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        self._consts[key] = name
        return name

    def node(self, op: str, inputs, name: str, outputs: int = 1, **attrs) -> list[str]:
        name = self.fresh(name)
        outs = [name] if outputs == 1 else [self.fresh(f"{name}:{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs

    def one(self, op: str, inputs, name: str, **attrs) -> str:
        return self.node(op, inputs, name, **attrs)[0]

    # ---- layouts ----------------------------------------------------------------------------------

    def to_cf(self, t: Tensor) -> Tensor:
        if t.layout == "cf" or t.rank < 3:
            return t
        key = (t.name, "cf")
        if key not in self._moved:
            self._moved[key] = self.one("Transpose", [t.name], f"{t.name}/to_channels_first", perm=cf_perm(t.rank))
        return replace(t, name=self._moved[key], layout="cf")

    def to_keras(self, t: Tensor) -> Tensor:
        if t.layout == "keras":
            return t
        key = (t.name, "keras")
        if key not in self._moved:
            self._moved[key] = self.one("Transpose", [t.name], f"{t.name}/to_channels_last", perm=keras_perm(t.rank))
        return replace(t, name=self._moved[key], layout="keras")

    def same_layout(self, tensors: list[Tensor]) -> list[Tensor]:
        """Inputs of an elementwise op in one layout: channels-first if any is."""
        if any(t.layout == "cf" for t in tensors) and all(t.rank == tensors[0].rank for t in tensors):
            return [self.to_cf(t) for t in tensors]
        return [self.to_keras(t) for t in tensors]

    # ---- QDQ ------------------------------------------------------------------------------------

    def grid_consts(self, grid: Grid, scale, zp, name: str, dtype: str | None = None) -> tuple[str, str]:
        s = self.const(np.asarray(scale, np.float32), f"{name}/scale")
        z = self.const(np.asarray(zp).astype(dtype or grid.storage()), f"{name}/zero_point")
        return s, z

    def quantize_dequantize(self, t: Tensor, grid: Grid, name: str) -> Tensor:
        """QuantizeLinear + DequantizeLinear; a grid narrower than its type is clipped first.

        The clip is in float, to the grid's end values (qmin - zp) * scale and
        (qmax - zp) * scale as float32: QuantizeLinear maps each of them to its
        grid end exactly, so clip-then-quantize is quantize-then-clip (an integer
        Clip would need an int16 kernel ONNX Runtime does not have).
        """
        s, z = self.grid_consts(grid, grid.scale, grid.zero_point, name)
        axis = physical_axis(grid.axis, t) if grid.per_channel else None
        kw = {} if axis is None else {"axis": axis}
        x = t.name
        if grid.clipped:
            scale, zp = np.asarray(grid.scale, np.float32), np.asarray(grid.zero_point, np.float32)
            lo = ((np.float32(grid.qmin) - zp) * scale).astype(np.float32)
            hi = ((np.float32(grid.qmax) - zp) * scale).astype(np.float32)
            if axis is not None:
                shape = [1] * (t.rank - 1)
                shape[axis - 1] = -1
                lo, hi = lo.reshape(shape), hi.reshape(shape)
            x = self.one("Max", [x, self.const(lo, f"{name}/grid_min")], f"{name}/grid_min")
            x = self.one("Min", [x, self.const(hi, f"{name}/grid_max")], f"{name}/grid_max")
        q = self.one("QuantizeLinear", [x, s, z], f"{name}/QuantizeLinear", **kw)
        d = self.one("DequantizeLinear", [q, s, z], f"{name}/DequantizeLinear", **kw)
        return replace(t, name=d, grid=grid)

    def dequantized(self, integers: np.ndarray, scale, zp, axis, grid: Grid, name: str) -> str:
        """A weight stored as integers (in their dtype), read through DequantizeLinear (``axis`` None: per tensor)."""
        q = self.const(integers, f"{name}/quantized")
        s, z = self.grid_consts(grid, scale, zp, name, str(integers.dtype))
        kw = {} if axis is None else {"axis": int(axis)}
        return self.one("DequantizeLinear", [q, s, z], f"{name}/DequantizeLinear", **kw)


def per_axis(scale_full: np.ndarray, zp_full: np.ndarray, channel_full: np.ndarray | None = None):
    """(scale, zp, axis) of full-shape scale and zero-point arrays, moved with a weight into its ONNX layout.

    ``channel_full``, for a per-channel grid, holds each element's channel
    index (moved the same way): it names the axis even where every channel
    has the same scale. Otherwise a uniform scale is per tensor (axis None), as is a weight of one channel.
    """
    s, z = np.asarray(scale_full), np.asarray(zp_full)
    if channel_full is None:
        if s.size == 0 or (np.all(s == s.flat[0]) and np.all(z == z.flat[0])):
            return s.flat[0], z.flat[0], None
        raise ValueError("a per-tensor grid with scales that vary")
    c = np.asarray(channel_full)
    if c.size and np.all(c == c.flat[0]):  # one channel (Dense(1), a 1-filter transposed conv): its one grid
        return s.flat[0], z.flat[0], None
    for axis in range(c.ndim):
        first = tuple(0 if a != axis else slice(None) for a in range(c.ndim))
        shape = [1] * c.ndim
        shape[axis] = -1
        if np.array_equal(np.broadcast_to(c[first].reshape(shape), c.shape), c):
            return s[first], z[first], axis
    raise ValueError("the weight's channels do not lie along one axis of its ONNX layout")


# ---- what an emitter gets -------------------------------------------------------------------------


@dataclass
class Call:
    """One call of a layer, as the emitters see it."""

    name: str
    layer: Any
    inputs: list[Tensor]
    out_shapes: list[tuple]
    b: Builder
    weight: Callable[..., str] = None  # weight(attr, to_onnx=None, x=None, out_axis=0) -> tensor name
    bias: Callable[..., str] = None  # bias(x, kernel_attr, shape) -> tensor name
    notes: list[str] = field(default_factory=list)

    def config(self, key, default=None):
        return getattr(self.layer, key, default)

    def out(self, name: str, layout: str, index: int = 0, grid=None) -> Tensor:
        return Tensor(name, tuple(self.out_shapes[index]), layout, grid)


def unsupported(c: Call, what: str) -> UnsupportedError:
    return UnsupportedError(f"{c.name}: {type(c.layer).__name__} {what} has no ONNX export yet.")


def channel_const(b: Builder, t: Tensor, vec, name: str, axis: int = -1) -> str:
    """A per-channel vector (on Keras ``axis``) shaped to broadcast against ``t`` in its layout."""
    vec = np.asarray(vec, np.float32)
    if vec.ndim == 0:
        return b.const(vec, name)
    shape = [1] * (t.rank - 1)
    shape[physical_axis(axis, t) - 1] = -1
    return b.const(vec.reshape(shape), name)
