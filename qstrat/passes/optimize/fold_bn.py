"""BatchNormalization folding, and the conversion of a BatchNormalization that cannot be folded.

In inference a BatchNormalization computes ``y = x * k + (beta - mean * k)``
with ``k = gamma / sqrt(variance + epsilon)`` per channel. Folded into the
linear layer before it: ``W' = W * k`` on the output-channel axis (see
`channels`) and ``b' = beta + (b - mean) * k``.

A fold needs a Conv/Depthwise/ConvTranspose/Dense producer that is linear,
called once, read only by the BatchNormalization, and a BatchNormalization
on the producer's channel axis: the last, or axis 1 after a channels_first
layer (the kernel's layout is the same in both). Otherwise the fold is
skipped with the reason.

The folded node remembers the BatchNormalization's output statistics
(``meta["bn_stats"]`` = per-channel beta and |gamma|): CLE bias absorption uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.graph.ir import Graph, Node
from qstrat.graph.rewrite import Editor, built_layer
from qstrat.layers.bias_axis import MISPLACED, misplaces_bias
from qstrat.passes.optimize.channels import (
    FOLDABLE,
    channel_axis,
    misplaced_bias,
    scale_out,
)
from qstrat.passes.optimize.report import OptimizeReport


def _np(v) -> np.ndarray:
    return to_numpy(v).astype(np.float64)


def _gamma_beta(bn) -> tuple[np.ndarray, np.ndarray]:
    """gamma (1 without ``scale``) and beta (0 without ``center``), per channel."""
    ones = np.ones(bn.moving_variance.shape)
    gamma = _np(bn.gamma) if bn.scale else ones
    beta = _np(bn.beta) if bn.center else 0.0 * ones
    return gamma, beta


def bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """(k, shift) with ``bn(x) == x * k + shift`` in inference."""
    gamma, beta = _gamma_beta(bn)
    k = gamma / np.sqrt(_np(bn.moving_variance) + bn.epsilon)
    return k, beta - _np(bn.moving_mean) * k


def _bn_stats(bn) -> tuple[np.ndarray, np.ndarray]:
    """The BN output's per-channel mean and spread: beta and |gamma|."""
    gamma, beta = _gamma_beta(bn)
    return beta, np.abs(gamma)


def _bn_axis(bn_node: Node) -> int | None:
    """The one axis the BatchNormalization normalizes, counted from 0; None for several."""
    rank = len(bn_node.in_tensors[0].shape)
    axis = bn_node.op.axis
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    return axis % rank if isinstance(axis, int) else None


def _fold_problem(ed: Editor, bn_node: Node) -> str | None:
    if len(ed.calls(bn_node.op)) > 1:
        return "the BatchNormalization layer is shared by several calls"
    prod = ed.node(bn_node.inputs[0].node)
    if prod.type_name not in FOLDABLE:
        return f"its input comes from {prod.type_name} '{prod.name}', which has no kernel to fold into"
    want = channel_axis(prod)
    if _bn_axis(bn_node) != want:
        layout = "channels_first " if prod.op.get_config().get("data_format") == "channels_first" else ""
        return f"BatchNormalization axis {bn_node.op.axis} is not the channel axis ({want}) of {layout}'{prod.name}'"
    if misplaced_bias(prod):
        return f"'{prod.name}': {MISPLACED}; a folded bias would not land on the channels"
    if len(ed.calls(prod.op)) > 1:
        return f"'{prod.layer_name}' is shared by several calls (one kernel cannot hold two folds)"
    if ed.sole_consumer(prod.name) is not bn_node:
        return f"the output of '{prod.name}' is also used elsewhere"
    cfg = prod.op.get_config()
    if cfg.get("activation", "linear") not in ("linear", None):
        return f"'{prod.name}' has activation '{cfg['activation']}' (turn on separate_conv_act)"
    return None


def fold_conv_bn(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """Fold every foldable BatchNormalization into the Conv/Depthwise/ConvTranspose/Dense before it."""
    ed = Editor(graph)
    for bn_node in ed.walk():
        if bn_node.type_name != "BatchNormalization":
            continue
        problem = _fold_problem(ed, bn_node)
        if problem:
            report.skipped("fold_conv_bn", bn_node.name, f"not folded: {problem}")
            continue
        prod = ed.node(bn_node.inputs[0].node)
        layer = prod.op
        k, shift = bn_affine(bn_node.op)
        kernel = _np(layer.kernel)
        bias = _np(layer.bias) if layer.use_bias else np.zeros_like(k)
        dtype = np.dtype(str(layer.kernel.dtype))
        new_kernel = scale_out(prod.type_name, kernel, k).astype(dtype)
        new_bias = (bias * k + shift).astype(dtype)
        folded = built_layer(
            type(layer),
            {**layer.get_config(), "use_bias": True},
            prod.in_tensors[0].shape,
            [new_kernel, new_bias],
        )
        # The layers before the fold, for QAT's fake folding (`qstrat.passes.optimize.fake_fold`).
        meta = {
            **prod.meta,
            "bn_stats": _bn_stats(bn_node.op),
            "folded_bn": bn_node.name,
            "folded_from": (layer, bn_node.op),
        }
        ed.replace(prod.name, replace(prod, op=folded, meta=meta))
        ed.bypass(bn_node.name)
        report.changed("fold_conv_bn", bn_node.name, f"folded into {prod.name}", partner=prod.name)
    return ed.graph()


def convert_bn_to_dwconv(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """Every remaining BatchNormalization becomes a 1x1 DepthwiseConv2D (4-D) or a `ScaleShift` layer."""
    import keras

    from qstrat.layers import ScaleShift

    ed = Editor(graph)
    done: dict[int, object] = {}
    for node in ed.walk():
        if node.type_name != "BatchNormalization":
            continue
        bn = node.op
        shape = node.in_tensors[0].shape
        axis = _bn_axis(node)
        channels_first = axis == 1 and len(shape) == 4
        if axis != len(shape) - 1 and not channels_first:
            report.skipped(
                "convert_bn_to_dwconv",
                node.name,
                f"axis {bn.axis} is neither the last axis nor the channel axis (1) of a 4-D tensor",
            )
            continue
        if channels_first and misplaces_bias(shape):
            why = MISPLACED.replace("this channels_first layer", "a channels_first depthwise conv made of it")
            report.skipped("convert_bn_to_dwconv", node.name, why)
            continue
        if len({tuple(n.in_tensors[0].shape[1:]) for n in ed.calls(bn)}) > 1:
            report.skipped("convert_bn_to_dwconv", node.name, "shared by calls on tensors of different shapes")
            continue
        if id(bn) not in done:
            k, shift = bn_affine(bn)
            k, shift = k.astype(np.float32), shift.astype(np.float32)
            if len(shape) == 4:
                cfg_dw = {
                    "name": bn.name,
                    "kernel_size": 1,
                    "use_bias": True,
                    "data_format": "channels_first" if channels_first else "channels_last",
                    "dtype": bn.get_config().get("dtype"),
                }
                done[id(bn)] = built_layer(keras.layers.DepthwiseConv2D, cfg_dw, shape, [k.reshape(1, 1, -1, 1), shift])
            else:
                done[id(bn)] = built_layer(ScaleShift, {"name": bn.name}, shape, [k, shift])
        new = done[id(bn)]
        meta = {**node.meta, "bn_stats": _bn_stats(bn)}
        ed.replace(node.name, replace(node, op=new, arguments=None, meta=meta))
        report.changed("convert_bn_to_dwconv", node.name, f"BatchNormalization -> {type(new).__name__}")
    return ed.graph()
