"""The graph walk behind `export_onnx`: each node of qstrat's graph becomes ONNX nodes.

Tensors quantized by a `FakeQuant` become QDQ pairs; wrapped layers get their
weights as grid integers through DequantizeLinear (`Call.weight`) and their
bias as `onnx_export` describes; every layer's nodes come from
`onnx_layers.EMITTERS`. Along the way it records what the export report
needs: each quantizer, each bias stored at the accumulator scale, and the
int16 pair-sum bound of each layer ONNX Runtime may run on integer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.export.onnx_build import Builder, Tensor, per_axis
from qstrat.export.onnx_layers import EMITTERS, Call, keras_op
from qstrat.export.onnx_report import ExportReport
from qstrat.export.qdq import INT16_MAX, Grid, grid_of, pair_sum_bound, u8_activation_range
from qstrat.layers import FakeQuant, QuantizeWrapper

DEFAULT_OPSET = 13


@dataclass
class _Kernel:
    grid: Grid
    integers: np.ndarray  # in the ONNX layout
    out_axis: int
    scale: np.ndarray  # per output channel


class Writer:
    def __init__(self, graph, opset: int | None):
        self.graph = graph
        self.requested = opset
        self.b = Builder(opset or DEFAULT_OPSET)
        self.report = ExportReport("", self.b.opset)
        self.env: dict[Any, Tensor] = {}
        self.weights: dict[tuple, tuple[str, _Kernel | None]] = {}

    def run(self):
        self._choose_opset()
        for n in self.graph.nodes:
            op = n.op
            if type(op).__name__ == "InputLayer":
                # Images go channels-first at once, before any QuantizeLinear (ONNX Runtime's QDQ
                # rewrites mishandle a Transpose between QuantizeLinear and DequantizeLinear from opset 21).
                t = Tensor(n.name, n.meta["shapes"][0], "keras")
                self.env[(n.name, 0)] = self.b.to_cf(t) if t.rank in (4, 5) and _is_float(n) else t
                continue
            ins = [self._float_input(self.env[(r.node, r.index)], r, n) for r in n.inputs]
            if isinstance(op, FakeQuant):
                outs = [self._fake_quant(n, ins[0])]
            else:
                outs = self._layer(n, ins)
            for i, t in enumerate(outs):
                self.env[(n.name, i)] = t
        self.outputs = [self.b.to_keras(self.env[(r.node, r.index)]) for r in self.graph.outputs]
        return self, self.report

    def model(self, metadata: dict[str, str]):
        """The ModelProto, checked with onnx.checker (full check)."""
        import onnx
        from onnx import helper

        from qstrat.export.onnx_build import ONNX_TYPES

        inputs, renames = [], []
        keys = _input_names(self.graph)
        for r, key in zip(self.graph.inputs, keys, strict=True):
            node = self.graph.node(r.node)
            dtype = node.meta["dtypes"][0]
            if dtype not in ONNX_TYPES:
                raise UnsupportedError(
                    f"input {node.name}: dtype {dtype} has no ONNX export (its inputs are float32 or integers). "
                    f"Give the float model a float32 Input (keras.Input(..., dtype='float32')) and quantize it again."
                )
            inputs.append(helper.make_tensor_value_info(key, ONNX_TYPES[dtype], _dims(node.meta["shapes"][0])))
            if key != node.name:
                renames.append(helper.make_node("Identity", [key], [node.name], name=f"{key}/input"))
        outputs, nodes = [], renames + list(self.b.nodes)
        produced, fed = {v for n in nodes for v in n.output}, {i.name for i in inputs}
        taken = produced | fed | {t.name for t in self.b.initializers}
        # A computed value already named as the output (a layer with no output quantizer) is the output itself.
        computed = produced - fed
        names = _output_names(self.graph, taken, [t.name if t.name in computed else None for t in self.outputs])
        for t, name, r in zip(self.outputs, names, self.graph.outputs, strict=True):
            if name != t.name:
                nodes.append(helper.make_node("Identity", [t.name], [name], name=f"{name}/output"))
            # Integer outputs (an int input passed on) keep their type; every computed output is float32.
            dtype = (self.graph.node(r.node).meta.get("dtypes") or ("float32",) * (r.index + 1))[r.index]
            kind = ONNX_TYPES[dtype] if "int" in dtype and dtype in ONNX_TYPES else onnx.TensorProto.FLOAT
            outputs.append(helper.make_tensor_value_info(name, kind, _dims(t.shape)))
        g = helper.make_graph(nodes, self.graph.name, inputs, outputs, self.b.initializers)
        opsets = [helper.make_opsetid("", self.b.opset)]
        model = helper.make_model(g, opset_imports=opsets, producer_name="qstrat", producer_version=version())
        model.ir_version = helper.find_min_ir_version_for(opsets)
        helper.set_model_props(model, metadata)
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise UnsupportedError(
                f"the ONNX model qstrat built for '{self.graph.name}' does not pass onnx.checker at opset "
                f"{self.b.opset}: {str(exc).splitlines()[0][:300]}. Try a later opset, or report it as a bug."
            ) from None
        return model

    # ---- opset --------------------------------------------------------------------------------------

    def _grids(self):
        for n in self.graph.nodes:
            if isinstance(n.op, FakeQuant) and _enabled(n.op.enabled):
                yield n, grid_of(n.op.quantizer, {k: _np(v) for k, v in n.op.state.items()}, n.name)

    def _choose_opset(self):
        need = DEFAULT_OPSET
        for n, g in self._grids():
            op = g.quantize_opset()
            if op is None:
                raise UnsupportedError(
                    f"{n.name}: a {g.bits}-bit activation grid has no ONNX QuantizeLinear type (at most 16 bits)."
                )
            need = max(need, op)
        if self.requested is not None and self.requested < need:
            raise ConfigError(
                "opset", f"opset {self.requested} cannot hold this model's grids", f"Use opset {need} or later."
            )
        if not 13 <= (self.requested or need) <= 23:
            raise ConfigError.expected("opset", "an ONNX opset from 13 to 23", self.requested)
        self.b.opset = self.requested or need
        self.report.opset = self.b.opset

    # ---- quantizers ----------------------------------------------------------------------------------

    def _fake_quant(self, n, x: Tensor) -> Tensor:
        layer = n.op
        k = int(n.name.rsplit("@", 1)[1]) if "@" in n.name else 0
        targets = [layer.target or layer.name, *layer.more_targets]
        target = targets[k] if k < len(targets) else f"{layer.name}@{k}"
        if not _enabled(layer.enabled):
            return x
        grid = grid_of(layer.quantizer, {k: _np(v) for k, v in layer.state.items()}, target)
        what = target.partition("/")[2]
        self._record(target, "input" if what.startswith("input") or not what else "output", grid)
        return self.b.quantize_dequantize(x, grid, target)

    def _record(self, target: str, kind: str, grid: Grid, storage: str | None = None):
        self.report.quantizers.append(
            {
                "target": target,
                "target_type": kind,
                "storage": storage or grid.storage(),
                "bits": grid.bits,
                "per_channel": grid.per_channel,
                "scale": np.asarray(grid.scale).tolist(),
                "zero_point": np.asarray(grid.zero_point).tolist(),
                "round_mode": grid.round_mode.value,
                "exact_rounding": kind in ("weight", "bias") or grid.onnx_exact,
            }
        )

    # ---- layers ---------------------------------------------------------------------------------------

    def _float_input(self, t: Tensor, r, n) -> Tensor:
        """``t`` cast to float32 where an integer tensor (uint8 images, say) feeds a layer that casts it to
        float in Keras (`CASTS_INTEGERS`): ONNX operators take operands of one type."""
        import onnx

        op = n.op.layer if isinstance(n.op, QuantizeWrapper) else n.op
        dtypes = self.graph.node(r.node).meta.get("dtypes") or ()
        if type(op).__name__ not in CASTS_INTEGERS or r.index >= len(dtypes) or "int" not in str(dtypes[r.index]):
            return t
        name = self.b.one("Cast", [t.name], f"{n.name}/to_float{r.index}", to=onnx.TensorProto.FLOAT)
        return Tensor(name, t.shape, t.layout)

    def _layer(self, n, ins: list[Tensor]) -> list[Tensor]:
        import keras

        op = n.op
        if not isinstance(op, keras.layers.Layer):  # a keras.ops operation with a constant operand
            return keras_op(Call(n.name, op, ins, list(n.meta["shapes"]), self.b), n)
        wrapper = op if isinstance(op, QuantizeWrapper) else None
        layer = op.layer if wrapper else op
        # Named after the Keras layer (not its wrapper), "@k" for the k-th call of a shared one.
        name = layer.name + (f"@{n.name.rsplit('@', 1)[1]}" if "@" in n.name else "") if wrapper else n.name
        call = Call(name, layer, ins, list(n.meta["shapes"]), self.b)
        seen: dict[str, Any] = {"x": None, "kernel": None, "bias": "none"}

        def weight(attr, to_onnx=None, x=None, out_axis=0, storage=None):
            name, kern = self._weight(n, wrapper, layer, attr, to_onnx, out_axis, storage)
            if x is not None and kern is not None and seen["kernel"] is None:
                seen.update(x=x, kernel=kern, attr=attr)
            return name

        def bias(x, kernel_attr, shape):
            name, kind = self._bias(n, wrapper, layer, x, seen)
            seen["bias"] = kind
            return name

        call.weight, call.bias = weight, bias
        outs = EMITTERS[type(layer).__name__](call)
        # ONNX Runtime's integer kernels: a Dense (MatMul) on a 3-D or wider input always
        # (MatMulIntegerToFloat, whatever its bias), a 2-D one unless an int8 or float bias keeps it a
        # float Gemm; a convolution when a QuantizeLinear reads its output directly (QLinearConv).
        linear = (
            getattr(layer, "activation", None) in (None, "linear")
            or getattr(getattr(layer, "activation", None), "__name__", "") == "linear"
        )
        readers = [m for m in self.graph.nodes if any(r.node == n.name for r in m.inputs)]
        quantized_out = linear and bool(readers) and all(isinstance(m.op, FakeQuant) for m in readers)
        dense = type(layer).__name__ == "Dense"
        if dense and ins[0].rank > 2:
            seen["bias"] = "none"  # the Add after the MatMul does not keep it in float
        if dense or quantized_out:
            self._saturation(name, seen)
        return outs

    def _weight(self, n, wrapper, layer, attr, to_onnx, out_axis, storage=None):
        """``storage``: the integers' ONNX type where not the grid's own (`Grid.weight_storage`)."""
        key = (id(layer), attr, storage)
        if key in self.weights:
            return self.weights[key]
        f = to_onnx or (lambda a: a)
        quantized = wrapper is not None and attr in wrapper.quantizers and _enabled(wrapper.enabled[attr])
        where = f"{layer.name}/{attr}"
        if not quantized:
            value = _np(getattr(layer, attr))
            result = (self.b.const(f(value.astype(np.float32)), where), None)
        else:
            value = _np(wrapper.quantized_weight(attr))
            grid = grid_of(wrapper.quantizers[attr], {k: _np(v) for k, v in wrapper.state[attr].items()}, where)
            ints = grid.integers(value).astype(storage or grid.weight_storage())
            s_full, z_full, c_full = grid.full(value.shape)
            ints_o = f(ints)
            s, z, axis = per_axis(
                f(np.array(s_full)), f(np.array(z_full)), None if c_full is None else f(np.array(c_full))
            )
            name = self.b.dequantized(ints_o, s, z, axis, grid, where)
            self._record(where, "bias" if attr == "bias" else "weight", grid)
            per_out = (
                np.broadcast_to(np.asarray(s, np.float32), (ints_o.shape[out_axis],)) if out_axis is not None else None
            )
            if axis is not None and axis != out_axis:
                per_out = None  # not per output channel: no integer kernel takes it
            result = (name, _Kernel(grid, ints_o, out_axis, per_out))
        self.weights[key] = result
        return result

    def _bias(self, n, wrapper, layer, x: Tensor | None, seen) -> tuple[str, str]:
        key = (id(layer), "bias", None if x is None or x.grid is None else np.asarray(x.grid.scale).tobytes())
        if key not in self.weights:
            self.weights[key] = self._new_bias(n, wrapper, layer, x, seen)
        return self.weights[key]

    def _new_bias(self, n, wrapper, layer, x: Tensor | None, seen) -> tuple[str, str]:
        where = f"{layer.name}/bias"
        quantized = wrapper is not None and "bias" in wrapper.quantizers and _enabled(wrapper.enabled["bias"])
        if not quantized:
            return self.b.const(_np(layer.bias).astype(np.float32), where), "float"
        value = _np(wrapper.quantized_weight("bias")).astype(np.float32)
        grid = grid_of(wrapper.quantizers["bias"], {k: _np(v) for k, v in wrapper.state["bias"].items()}, where)
        storage = grid.storage()
        kern: _Kernel | None = seen["kernel"]
        fused = (
            x is not None
            and x.grid is not None
            and not x.grid.per_channel
            and x.grid.storage() in ("int8", "uint8")
            and kern is not None
            and kern.scale is not None
            and kern.grid.storage() in ("int8", "uint8")
        )
        if storage in ("int8", "uint8"):
            s_full, z_full, _ = grid.full(value.shape)
            axis = 0 if grid.per_channel else None
            s = s_full if axis == 0 else s_full.flat[0]
            z = z_full if axis == 0 else z_full.flat[0]
            self._record(where, "bias", grid)
            return self.b.dequantized(grid.integers(value), s, z, axis, grid, where), storage
        if fused:
            acc = (np.float32(x.grid.scale) * kern.scale).astype(np.float32)
            q = np.rint(value.astype(np.float64) / acc.astype(np.float64))
            if np.abs(q).max(initial=0) >= 2**31:
                raise UnsupportedError(f"{where}: the bias does not fit int32 at the accumulator scale.")
            err = float(np.abs(q * acc.astype(np.float64) - value).max(initial=0))
            if err:
                self.report.bias_requantized.append(
                    {"layer": layer.name, "max_error": err, "max_error_steps": float(err / acc.max())}
                )
            self._record(where, "bias", grid, "int32")
            name = self.b.dequantized(q.astype(np.int32), acc, np.zeros(acc.shape, np.int32), 0, grid, where)
            return name, "int32-acc"
        s_full, z_full, _ = grid.full(value.shape)
        ints = grid.integers(value).astype(np.int32)
        axis = 0 if grid.per_channel else None
        self._record(where, "bias", grid, "int32")
        s = s_full if axis == 0 else s_full.flat[0]
        z = (z_full if axis == 0 else z_full.flat[0]).astype(np.int32)
        return self.b.dequantized(ints, s, z, axis, grid, where), "int32"

    def _saturation(self, name: str, seen) -> None:
        """Bound the int16 pair sums of a layer ONNX Runtime may run with u8 x s8 integer kernels."""
        x, kern = seen["x"], seen["kernel"]
        if x is None or x.grid is None or kern is None or x.grid.per_channel:
            return
        if seen["bias"] not in ("none", "int32-acc"):
            return  # an int8 or float bias keeps ONNX Runtime on its float path for this (2-D) layer
        if x.grid.storage() not in ("int8", "uint8") or kern.grid.storage() != "int8":
            return
        a_max = u8_activation_range(x.grid)[1]
        bound = pair_sum_bound(kern.integers, kern.out_axis, a_max)
        risky = int(np.sum(bound > INT16_MAX))
        if risky:
            self.report.saturation_risk.append(
                {"layer": name, "channels": risky, "of": int(bound.size), "bound": int(bound.max())}
            )


# Layers that take integer inputs and compute in float, casting them first (an Embedding reads ids as they are).
CASTS_INTEGERS = frozenset({"Rescaling", "Normalization"})


def _is_float(node) -> bool:
    return "float" in node.meta["dtypes"][0]


def _dims(shape) -> list:
    """The ONNX dimensions of a Keras shape. The batch axis is always free, as the Keras model takes any batch
    (a Sequential built by calling it on one sample records a batch of 1)."""
    return ["batch" if i == 0 else (f"d{i}" if d is None else int(d)) for i, d in enumerate(shape)]


def _input_names(graph) -> list[str]:
    """The file's input names: the model's own keys where it takes a dict of inputs (as Keras is fed), else the
    Inputs' names; the Inputs' names also where a key is the name of another value of the graph."""
    own = [graph.node(r.node).name for r in graph.inputs]
    skeleton = graph.structure[0] if graph.structure is not None else None
    if not isinstance(skeleton, dict) or not all(isinstance(i, int) for i in skeleton.values()):
        return own
    keys = dict.fromkeys(own)
    for key, i in skeleton.items():
        keys[own[i]] = str(key)
    names = [keys[name] for name in own]
    if any(name != mine and name in graph for name, mine in zip(names, own, strict=True)):
        return own
    return names


def _output_names(graph, taken: set[str], own: list[str | None]) -> list[str]:
    """Unique output names: the model's own keys where it returns a dict of outputs, else the producing
    layer's (Keras's `output_names`), with ":k" for a second output of the same node; "_out1" added only where
    the file already has another value of that name (``taken``; ``own[i]``: the name of output i's own value,
    when it may be the output itself)."""
    skeleton = graph.structure[1] if graph.structure is not None else None
    keys = {i: str(k) for k, i in skeleton.items()} if isinstance(skeleton, dict) else {}
    names, seen = [], set()
    for i, r in enumerate(graph.outputs):
        name = keys.get(i, str(r).replace("@", "_call"))
        base, k = name, 1
        while name in seen or (name in taken and name != own[i]):
            name = f"{base}_out{k}" if name in taken and k == 1 else f"{base}_{k}"
            k += 1
        seen.add(name)
        names.append(name)
    return names


def _enabled(flag) -> bool:
    return float(_np(flag)) > 0.5


def _np(v) -> np.ndarray:

    return to_numpy(v)


def version() -> str:
    from qstrat import __version__

    return __version__
