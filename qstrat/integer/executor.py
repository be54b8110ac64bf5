"""`simulate_integer`: run a power-of-2 quantized model with integers only, as the DPU would.

Why: a fake-quant Keras model computes in float32 and claims to be the
integer hardware's computation; this executor is the integer computation
itself (int64 NumPy arrays, shifts, the quantizers' rounding), so the claim
can be checked bit for bit, tensor by tensor.

How: the quantized graph (`qstrat.graph.capture`) is walked in order. The
model inputs are quantized by their FakeQuant with the NumPy twin (the one
float step); every later tensor is an `IntTensor` (integers at a position).
Each layer takes its integer form (`qstrat.integer.layers`); each FakeQuant
rounds and clips exactly (`tensors.requantize`). A layer with no integer form
(softmax, tanh, bilinear upsampling, a layer the strategy left float) runs in
float: its inputs are dequantized (exactly), the Keras layer itself is called,
and the float result goes on to the next FakeQuant, which quantizes it with
the NumPy twin. Those layers are listed in `IntegerRun.float_layers`.

Only power-of-2 quantizers (Pof2S, TQT), enabled and symmetric, have an
integer form; anything else is an `UnsupportedError` naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from keras import ops

from qstrat.errors import UnsupportedError
from qstrat.graph import capture
from qstrat.graph.rebuild import float32_policy
from qstrat.integer.layers import Context, check_enabled, integer_layer, numpy_state, quantizer_position
from qstrat.integer.tensors import IntTensor, as_pos, from_grid, requantize, to_float
from qstrat.layers.fake_quant import FakeQuant, require_quantizers
from qstrat.layers.wrapper import QuantizeWrapper
from qstrat.quantizers.reference import expand


@dataclass
class IntegerRun:
    """What `run_integer` computed.

    Attributes:
        outputs: the model's outputs as ``model.predict`` gives them (one array, a list, or the
            model's own dict or tuple), dequantized at the very end (float32).
        tensors: ``{FakeQuant node name: (int64 grid integers, position)}`` for every FakeQuant
            node of the quantized graph (a shared one once per call: ``name@1``, ...); the
            position is an int, or a vector over the last axis when per channel.
        float_layers: the graph nodes run in float (no integer form), in order.
        accumulator_overflow: the layers whose accumulator left the int32 range.
    """

    outputs: np.ndarray | list[np.ndarray] | dict | tuple
    tensors: dict[str, tuple[np.ndarray, int | np.ndarray]]
    float_layers: list[str]
    accumulator_overflow: list[str]


def simulate_integer(qmodel, x, batch_size: int | None = None):
    """The quantized model's outputs, computed with integers only (see `run_integer`).

    Args:
        qmodel: a model quantized with power-of-2 quantizers (``Quantizer(model, "pof2s")``, or TQT).
        x: the input array, or a list (or a dict, keyed as ``qmodel.predict`` takes it) for several inputs.
            The outputs come nested as ``qmodel.predict`` returns them (a dict keeps its keys).
        batch_size: samples per step (None: all at once).

    Example:
        >>> qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(calib)
        >>> y = simulate_integer(qmodel, images)     # == qmodel.predict(images), bit for bit
    """
    with float32_policy():
        return run_integer(qmodel, x, batch_size).outputs


def run_integer(qmodel, x, batch_size: int | None = None) -> IntegerRun:
    """Run ``qmodel`` on ``x`` with integers, keeping every FakeQuant's integers and position.

    Raises:
        UnsupportedError: a quantizer that is not power-of-2, bypassed or asymmetric, or a
            layer with no integer form on the DPU that cannot run in float either (the
            message names the layer and what to do).

    Example:
        >>> run = run_integer(qmodel, images)
        >>> ints, pos = run.tensors["conv1_output_q"]     # conv1's output is ints * 2^-pos
    """
    with float32_policy():
        from qstrat.calibration.data import check_count
        from qstrat.calibration.inputs import checked_arrays

        batch_size = check_count(batch_size, "run_integer batch_size", allow_none=True)
        graph = capture(qmodel)
        require_quantizers(qmodel)
        check_quantizers(graph)
        inputs = checked_arrays(x, qmodel, "simulate_integer x")
        n = inputs[0].shape[0] if inputs else 0
        step = n if batch_size is None else batch_size
        ctx, floats, parts = Context(), [], []
        for start in range(0, max(n, 1), max(step, 1)):
            batch = [a[start : start + step] for a in inputs]
            parts.append(_walk(graph, batch, ctx, floats))
        outputs = [np.concatenate([p[0][i] for p in parts]) for i in range(len(graph.outputs))]
        tensors = {}
        for name, (_, pos) in parts[0][1].items():
            tensors[name] = (np.concatenate([p[1][name][0] for p in parts]), pos)
        return IntegerRun(graph.nested_outputs(outputs), tensors, floats, list(ctx.overflow))


def check_quantizers(graph) -> None:
    """Raise `UnsupportedError` for any quantizer without an integer form (before any work)."""
    for node in graph.nodes:
        if isinstance(node.op, FakeQuant):
            check_enabled(node.op.enabled, node.name)
            quantizer_position(node.op.quantizer, numpy_state(node.op.state), node.name)
        elif isinstance(node.op, QuantizeWrapper):
            for attr, q in node.op.quantizers.items():
                where = f"{node.op.layer.name}.{attr}"
                check_enabled(node.op.enabled[attr], where)
                quantizer_position(q, numpy_state(node.op.state[attr]), where)


def _walk(graph, inputs: list[np.ndarray], ctx: Context, floats: list[str]):
    """One batch through the graph: (outputs, {FakeQuant node: (ints, pos)})."""
    values: dict = {(r.node, r.index): a for r, a in zip(graph.inputs, inputs, strict=True)}
    tensors = {}
    for node in graph.nodes:
        if (node.name, 0) in values and not node.inputs:
            continue  # a model input
        ins = [values[(r.node, r.index)] for r in node.inputs]
        if isinstance(node.op, FakeQuant):
            out = _fake_quant(node, ins[0])
            tensors[node.name] = (out.values, out.pos)
            values[(node.name, 0)] = out
            continue
        result = None
        if node.num_outputs == 1 and ins and all(isinstance(t, IntTensor) for t in ins):
            result = integer_layer(node.op, ins, ctx)
        if result is not None:
            values[(node.name, 0)] = result
            continue
        if node.name not in floats:
            floats.append(node.name)
        for i, out in enumerate(_float_island(node, ins)):
            values[(node.name, i)] = out
    outputs = []
    for r in graph.outputs:
        v = values[(r.node, r.index)]
        outputs.append(to_float(v) if isinstance(v, IntTensor) else np.asarray(v))
    return outputs, tensors


def _fake_quant(node, x) -> IntTensor:
    """A FakeQuant on integers (exact rounding and clipping) or on float values (the NumPy twin)."""
    q = node.op.quantizer
    state = numpy_state(node.op.state)
    pos = quantizer_position(q, state, node.name)
    ndim = len(x.shape)
    if q.axis is not None and q.axis % ndim != ndim - 1:
        raise UnsupportedError(
            f"{node.name}: per-channel positions on axis {q.axis} of an activation; the integer "
            "executor keeps them on the last (channel) axis only. Use channel_axis -1."
        )
    if isinstance(x, IntTensor):
        return requantize(x, as_pos(pos), q.grid, q.params.round_mode)
    y = q.reference(np.asarray(x, np.float32), state)
    return IntTensor(from_grid(y, expand(pos, y.ndim, q.axis)), as_pos(pos))


def _float_island(node, ins) -> list[np.ndarray]:
    """Call the node's Keras layer on float inputs (integer ones dequantized exactly)."""
    tensors = [ops.convert_to_tensor(to_float(t) if isinstance(t, IntTensor) else t) for t in ins]
    if node.arguments is not None:
        mapping = {id(t): n for t, n in zip(node.in_tensors, tensors, strict=True)}
        args, kwargs = node.arguments.fill_in(mapping)
        out = node.op(*args, **kwargs)
    else:
        out = node.op(tensors[0] if len(tensors) == 1 else tensors)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [np.asarray(ops.convert_to_numpy(o)) for o in outs]
