"""QAT fake folding: a quantized conv that absorbed a BatchNormalization trains with the BatchNormalization back.

Why: ``fold_conv_bn`` folds each BatchNormalization into the conv before it,
which is right for inference and PTQ. Training the quantized model
(``train_with_bn``) wants batch statistics instead: each such conv becomes a
`qstrat.layers.FoldedConvBN` inside its `QuantizeWrapper`, which quantizes
the kernel folded with the moving statistics and rescales the output to the
batch's (Jacob et al. 2018; Krishnamoorthi 2018).

The fold layer is built from the optimized conv (after CLE) and the original
BatchNormalization, so that in inference it computes what the optimized conv
computed: with k = gamma / sqrt(moving_variance + epsilon) and CLE's output
channel scales s, its kernel is the optimized kernel / (k * s) (CLE's input
scaling stays in it), its gamma is gamma * s (a BatchNormalization normalizes
any output scale away, so CLE's must live in gamma), and its beta makes the
folded bias the optimized bias (the conv itself gets none: a bias before a
BatchNormalization cancels in training).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.graph.ir import Graph
from qstrat.graph.rewrite import built_layer
from qstrat.layers import FoldedConvBN, QuantizeWrapper
from qstrat.passes.optimize.channels import DEPTHWISE
from qstrat.passes.optimize.report import OptimizeReport

KEY = "train_with_bn"
# Layers FoldedConvBN trains with batch statistics; a folded ConvTranspose stays folded.
FAKE_FOLDABLE = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D", "Dense")


def _np(v) -> np.ndarray:
    return to_numpy(v).astype(np.float64)


def _out_channels(type_name: str, kernel: np.ndarray) -> np.ndarray:
    """The kernel as (taps, output channels); a depthwise output channel is in * multiplier + m."""
    if type_name in DEPTHWISE:
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    return kernel.reshape(-1, kernel.shape[-1])


def fold_layer(node, freeze_bn_delay: int) -> FoldedConvBN:
    """The `FoldedConvBN` standing for a folded conv node of the optimized (or quantized) graph."""
    wrapper = node.op
    conv = wrapper.layer if isinstance(wrapper, QuantizeWrapper) else wrapper
    _, bn = node.meta["folded_from"]
    channels = bn.moving_variance.shape[0]
    gamma = _np(bn.gamma) if bn.scale else np.ones(channels)
    mean, var = _np(bn.moving_mean), _np(bn.moving_variance)
    sigma = np.sqrt(var + bn.epsilon)
    s = np.broadcast_to(np.asarray(node.meta.get("cle_out_scale", 1.0), np.float64), (channels,))
    g = gamma * s
    factor = g / sigma  # kernel (fold input) * factor = the optimized kernel
    folded_kernel, folded_bias = _np(conv.kernel), _np(conv.bias)
    taps = _out_channels(node.type_name, folded_kernel)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(factor != 0, taps / factor, 0.0).reshape(folded_kernel.shape)
    dtype = np.dtype(str(conv.kernel.dtype))
    shape = node.in_tensors[0].shape
    new_conv = built_layer(type(conv), {**conv.get_config(), "use_bias": False}, shape, [raw.astype(dtype)])
    # folded bias = beta' + (0 - mean) * g / sigma
    new_beta = folded_bias + mean * factor
    bn_config = {**bn.get_config(), "scale": True, "center": True, "name": f"{conv.name}_bn"}
    rest = (None,) * (len(shape) - 2)
    cf = conv.get_config().get("data_format") == "channels_first"
    out_shape = (None, channels) + rest if cf else (None,) + rest + (channels,)
    new_bn = built_layer(type(bn), bn_config, out_shape, [a.astype(dtype) for a in (g, new_beta, mean, var)])
    # A BatchNormalization the user froze (trainable=False) runs in inference mode in Keras: its fold starts
    # frozen, on its moving statistics, which training then leaves as they are.
    delay = freeze_bn_delay if bn.trainable else 0
    return FoldedConvBN(new_conv, new_bn, freeze_bn_delay=delay, name=conv.name)


def fake_fold(qmodel, float_graph: Graph, freeze_bn_delay: int, report: OptimizeReport):
    """A copy of the calibrated ``qmodel`` with every conv that absorbed a BatchNormalization as a `FoldedConvBN`
    in its `QuantizeWrapper`; every quantizer keeps its state.

    ``float_graph`` is the optimized graph ``qmodel`` was built from: its nodes say which conv absorbed which
    BatchNormalization. The fold starts from the quantized model's own conv weights, so a bias that bias
    correction moved reaches the fold's beta.
    """
    from qstrat.graph.rebuild import copy_layer
    from qstrat.passes.refine.convert import _convert, keep

    folded = {n.layer_name: n for n in float_graph.nodes if "folded_from" in n.meta}
    chosen = set()
    for op in qmodel.layers:
        if not isinstance(op, QuantizeWrapper) or op.layer.name not in folded:
            continue
        bn_name = folded[op.layer.name].meta["folded_bn"]
        extra = sorted(set(op.quantizers) - {"kernel", "bias"})
        if type(op.layer).__name__ not in FAKE_FOLDABLE:
            report.skipped(KEY, bn_name, f"stays folded: {type(op.layer).__name__} is not fake-folded")
        elif extra:
            report.skipped(KEY, bn_name, f"stays folded: '{op.layer.name}' also quantizes {extra}")
        else:
            chosen.add(op.layer.name)
            report.changed(KEY, bn_name, f"trains with batch statistics in '{op.layer.name}' (fake folding)")

    def layer_copy(layer, node):
        if layer.name not in chosen:
            return copy_layer(layer)
        return fold_layer(replace(folded[layer.name], op=layer), freeze_bn_delay)

    model, _ = _convert(qmodel, keep, layer_copy)
    return model
