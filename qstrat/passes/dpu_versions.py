"""The quantize stage's DPU layer versions: replace layers by what the DPU computes for them.

Why: the ``pof2s`` strategy simulates the DPU, which has no exponential and
no divider. Its float outputs differ from the Keras layers', so the
simulation has to compute what the DPU computes (`qstrat.layers.dpu`). Each
conversion has its key in ``quantize_pipeline_config``:

- ``convert_sigmoid_to_hard_sigmoid``: ``Activation("sigmoid")`` becomes
  `DPUHardSigmoid`; ``Activation("swish")`` / ``"silu"`` becomes
  ``Multiply([x, DPUHardSigmoid(x)])``;
- ``convert_hard_sigmoid_to_dpu_version``: ``Activation("hard_sigmoid")``,
  the keras.ops pattern ``ReLU(6)(x + 3) * (1/6)`` (MobileNetV3's) or
  ``/ 6``, become `DPUHardSigmoid`; ``"hard_silu"`` / ``"hard_swish"``
  become ``Multiply([x, DPUHardSigmoid(x)])``;
- ``convert_leaky_relu_to_dpu_version``: ``LeakyReLU`` with slope 0.1 (or a ``ReLU`` with that
  ``negative_slope``, no threshold and no maximum)
  gets the DPU's 26/256; other slopes are kept, with a note (the DPU has
  no other);
- ``convert_average_pooling2d_to_dpu_version``: ``AveragePooling2D`` whose
  windows never read padding, and ``GlobalAveragePooling2D`` of a known
  size, become `DPUAveragePooling2D` / `DPUGlobalAveragePooling2D`. Other
  pooling layers are kept, with a note saying why (1-D and 3-D averages
  among them: the DPU's are 2-D); so are windows of a
  power-of-2 size, where the DPU's multiplier is exactly 1/K and the plain
  layer computes the same (and exports to TFLite, which has no kernel for
  the DPU versions).

A conv or Dense layer that still holds one of these activations (when the
optimize stage's ``separate_conv_act`` is off) is split first. Replacements
keep the replaced layer's name; a swish's hard sigmoid is named
``<layer>_hard_sigmoid``. The pass returns a new graph and one event per
layer it converted or kept, which the quantize report shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from qstrat.arrays import to_numpy
from qstrat.graph.ir import KERNEL_LAYERS, Graph, Node, TensorRef
from qstrat.graph.rewrite import Editor, built_layer, new_node
from qstrat.layers.dpu import (
    LEAKY_RELU_SLOPE,
    DPUAveragePooling2D,
    DPUGlobalAveragePooling2D,
    DPUHardSigmoid,
    avgpool_multiplier,
    is_dpu_leaky_slope,
)
from qstrat.passes.optimize.report import OptimizeReport

KEYS = (
    "convert_sigmoid_to_hard_sigmoid",
    "convert_hard_sigmoid_to_dpu_version",
    "convert_leaky_relu_to_dpu_version",
    "convert_average_pooling2d_to_dpu_version",
)
# Activation name -> (key, what it becomes): "hs" a hard sigmoid, "swish" x times a hard sigmoid.
_ACTIVATIONS = {
    "sigmoid": ("convert_sigmoid_to_hard_sigmoid", "hs"),
    "swish": ("convert_sigmoid_to_hard_sigmoid", "swish"),
    "silu": ("convert_sigmoid_to_hard_sigmoid", "swish"),
    "hard_sigmoid": ("convert_hard_sigmoid_to_dpu_version", "hs"),
    "hard_silu": ("convert_hard_sigmoid_to_dpu_version", "swish"),
    "hard_swish": ("convert_hard_sigmoid_to_dpu_version", "swish"),
}
_SIXTH = 1 / 6


def to_dpu_versions(graph: Graph, config: Mapping) -> tuple[Graph, OptimizeReport]:
    """The graph with the DPU versions ``config`` (``quantize_pipeline_config``) switches on, and what changed."""
    report = OptimizeReport()
    on = {k for k in KEYS if config.get(k)}
    if not on:
        return graph, report
    ed = Editor(graph)
    _split_conv_activations(ed, on, report)
    for node in ed.walk():
        if node.name not in {n.name for n in ed.nodes}:
            continue  # removed by a pattern matched earlier in this walk
        kind = _activation_kind(node)
        if kind is not None and _ACTIVATIONS[kind][0] in on:
            _replace_activation(ed, node, kind, report)
        elif "convert_hard_sigmoid_to_dpu_version" in on and _is_sixth(node):
            _collapse_hard_sigmoid(ed, node, report)
        elif "convert_leaky_relu_to_dpu_version" in on and _is_leaky(node):
            _leaky_relu(ed, node, report)
        elif "convert_average_pooling2d_to_dpu_version" in on:
            _pooling(ed, node, report)
    report.passes_run.extend(sorted(on))
    return ed.graph(), report


# ---- activations ------------------------------------------------------------------------------------


def _activation_kind(node: Node) -> str | None:
    """The activation name of an ``Activation`` layer this pass converts, else None."""
    import keras

    if type(node.op) is not keras.layers.Activation:
        return None
    act = node.op.get_config().get("activation")
    return act if isinstance(act, str) and act in _ACTIVATIONS else None


def _split_conv_activations(ed: Editor, on: set[str], report: OptimizeReport) -> None:
    """Conv/Dense(activation=f) -> Conv/Dense(linear) + Activation(f), for the f this pass converts."""
    import keras

    linear: dict[int, object] = {}
    for node in ed.walk():
        if node.type_name not in KERNEL_LAYERS:
            continue
        act = node.op.get_config().get("activation")
        if not (isinstance(act, str) and act in _ACTIVATIONS and _ACTIVATIONS[act][0] in on):
            continue
        if id(node.op) not in linear:
            cfg = {**node.op.get_config(), "activation": "linear"}
            weights = [to_numpy(w) for w in node.op.weights]
            linear[id(node.op)] = built_layer(type(node.op), cfg, node.in_tensors[0].shape, weights)
        op = linear[id(node.op)]
        ed.replace(node.name, replace(node, op=op, meta=dict(node.meta)))
        name = ed.unique(f"{node.layer_name}_{act}")
        ed.redirect(TensorRef(node.name, 0), TensorRef(name, 0))
        shape = op.compute_output_shape(node.in_tensors[0].shape)
        meta = {"origin": node.meta.get("origin") or node.layer_name}
        layer = keras.layers.Activation(act, name=name)
        ed.insert_after(node.name, new_node(name, layer, [TensorRef(node.name, 0)], [shape], meta=meta))
        report.changed(_ACTIVATIONS[act][0], node.name, f"activation '{act}' moved to {name}, to convert it")


def _replace_activation(ed: Editor, node: Node, kind: str, report: OptimizeReport) -> None:
    key, becomes = _ACTIVATIONS[kind]
    shape = node.in_tensors[0].shape
    meta = {**node.meta, "origin": node.meta.get("origin") or node.layer_name}
    if becomes == "hs":
        layer = DPUHardSigmoid(name=node.layer_name if "@" not in node.name else ed.unique(node.name.replace("@", "_")))
        ed.replace(node.name, new_node(layer.name, layer, node.inputs, [shape], meta=meta))
        report.changed(key, node.name, f"{kind} -> DPUHardSigmoid (relu6(x + 3) * 2731/16384)")
        return
    import keras

    hs_name = ed.unique(f"{node.name.replace('@', '_')}_hard_sigmoid")
    hs = new_node(hs_name, DPUHardSigmoid(name=hs_name), node.inputs, [shape], meta=dict(meta))
    mul = keras.layers.Multiply(
        name=node.layer_name if "@" not in node.name else ed.unique(node.name.replace("@", "_"))
    )
    ed.replace(node.name, new_node(mul.name, mul, [node.inputs[0], TensorRef(hs_name, 0)], [shape, shape], meta=meta))
    ed.nodes.insert(ed.nodes.index(ed.node(mul.name)), hs)  # the hard sigmoid right before the Multiply reading it
    report.changed(key, node.name, f"{kind} -> x * DPUHardSigmoid(x) ({hs_name})")


def _op_constant(node: Node, types: tuple[str, ...]) -> float | None:
    """The scalar constant of a keras.ops node of one of ``types`` with one tensor and one number (``x + 3``).

    Python numbers are cast to the tensor's float32, so ``x * (1 / 6)`` is read as it is computed.
    """
    import keras
    import numpy as np

    if node.type_name not in types or not type(node.op).__module__.startswith("keras.src.ops"):
        return None
    args = node.arguments.args if node.arguments is not None else ()
    if node.arguments is None or node.arguments.kwargs or len(args) != 2:
        return None
    tensors = [isinstance(a, keras.KerasTensor) for a in args]
    if sum(tensors) != 1 or node.output_dtype(0) != "float32":
        return None
    if node.type_name in ("Divide", "TrueDivide", "Subtract") and not tensors[0]:
        return None  # 6 / x or 3 - x
    try:
        const = np.asarray(args[tensors.index(False)], np.float64)
    except (TypeError, ValueError):
        return None
    return float(const.reshape(())) if const.size == 1 else None


def _is_sixth(node: Node) -> bool:
    """``y * (1/6)`` or ``y / 6``: the last node of a hard-sigmoid pattern."""
    c = _op_constant(node, ("Multiply",))
    if c is not None:
        return abs(c - _SIXTH) < 1e-6
    return _op_constant(node, ("Divide", "TrueDivide")) == 6.0


def _is_relu6(node: Node) -> bool:
    import keras

    op = node.op
    if type(op) is keras.layers.ReLU:
        cfg = op.get_config()
        plain = not cfg.get("negative_slope") and not cfg.get("threshold")
        return cfg.get("max_value") is not None and float(cfg["max_value"]) == 6.0 and plain
    return type(op) is keras.layers.Activation and op.get_config().get("activation") == "relu6"


def _collapse_hard_sigmoid(ed: Editor, last: Node, report: OptimizeReport) -> None:
    """``ReLU(6)(x + 3) * (1/6)`` (each step read by the next only) -> ``DPUHardSigmoid()(x)``."""
    relu = ed.node(last.inputs[0].node)
    if not _is_relu6(relu) or ed.sole_consumer(relu.name) is not last or len(relu.inputs) != 1:
        return
    add = ed.node(relu.inputs[0].node)
    if _op_constant(add, ("Add",)) != 3.0 or ed.sole_consumer(add.name) is not relu:
        return
    x = add.inputs[0]
    name = last.name if "@" not in last.name else ed.unique(last.name.replace("@", "_"))
    layer = DPUHardSigmoid(name=name)
    meta = {**last.meta, "origin": last.meta.get("origin") or last.layer_name}
    ed.replace(last.name, new_node(name, layer, [x], [add.in_tensors[0].shape], meta=meta))
    ed.remove(relu.name)
    ed.remove(add.name)
    report.changed(
        "convert_hard_sigmoid_to_dpu_version",
        last.name,
        f"{add.name} + {relu.name} + {last.name} (relu6(x + 3) / 6) -> DPUHardSigmoid",
    )


# ---- LeakyReLU and pooling ---------------------------------------------------------------------------


def _is_leaky(node: Node) -> bool:
    """A LeakyReLU, or a ReLU that is one (a negative slope, no threshold, no maximum)."""
    if node.type_name == "LeakyReLU":
        return True
    op = node.op
    return (
        node.type_name == "ReLU"
        and float(op.negative_slope) != 0.0
        and op.max_value is None
        and float(op.threshold) == 0.0
    )


def _leaky_relu(ed: Editor, node: Node, report: OptimizeReport) -> None:
    key = "convert_leaky_relu_to_dpu_version"
    slope = float(node.op.negative_slope)
    if not is_dpu_leaky_slope(slope):
        report.skipped(key, node.name, f"kept: slope {slope:g} is not the DPU's 0.1, and the DPU runs no other")
        return
    import keras

    cfg = node.op.get_config()
    layer = keras.layers.LeakyReLU(
        negative_slope=LEAKY_RELU_SLOPE, name=cfg["name"], dtype=cfg.get("dtype"), trainable=cfg.get("trainable", True)
    )
    ed.replace(node.name, replace(node, op=layer, meta=dict(node.meta)))
    report.changed(key, node.name, f"{node.type_name} slope 0.1 -> LeakyReLU 26/256 (0.1015625)")


_OTHER_AVERAGES = ("AveragePooling1D", "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling3D")


def _pooling(ed: Editor, node: Node, report: OptimizeReport) -> None:
    import keras

    key = "convert_average_pooling2d_to_dpu_version"
    op, shape = node.op, node.in_tensors[0].shape if node.in_tensors else None
    if type(op) is keras.layers.AveragePooling2D:
        cfg = op.get_config()
        why = _padded_windows(cfg, shape)
        if why is None and avgpool_multiplier(*cfg["pool_size"]) is None:
            why = "a window side above 255 has no DPU multiplier"
        if why is None and _exact(*cfg["pool_size"]):
            why = f"a window of {math.prod(cfg['pool_size'])} values, a power of 2: the DPU's average is exact there"
        if why:
            report.skipped(key, node.name, f"kept: {why}")
            return
        layer = DPUAveragePooling2D.from_config({**cfg, "padding": "valid"})
        k, n = avgpool_multiplier(*cfg["pool_size"])
        detail = f"{cfg['pool_size'][0]}x{cfg['pool_size'][1]} average -> sum * {k}/2^{n}"
    elif type(op) is keras.layers.GlobalAveragePooling2D:
        cfg = op.get_config()
        spatial = shape[2:4] if cfg.get("data_format") == "channels_first" else shape[1:3]
        if any(s is None for s in spatial):
            report.skipped(
                key,
                node.name,
                "kept: the input's height and width are not known, and the DPU's multiplier depends on them",
            )
            return
        mult = avgpool_multiplier(*spatial)
        if mult is None:
            report.skipped(key, node.name, "kept: a side above 255 has no DPU multiplier")
            return
        if _exact(*spatial):
            report.skipped(
                key,
                node.name,
                f"kept: {spatial[0]}x{spatial[1]} values, a power of 2: the DPU's average is exact there",
            )
            return
        layer = DPUGlobalAveragePooling2D.from_config(cfg)
        detail = f"{spatial[0]}x{spatial[1]} global average -> sum * {mult[0]}/2^{mult[1]}"
    else:
        if type(op).__name__ in _OTHER_AVERAGES:
            report.skipped(
                key,
                node.name,
                f"kept: the DPU's average pooling is 2-D; {type(op).__name__} divides exactly here, which the DPU "
                "does only for windows of a power-of-2 size",
            )
        return
    ed.replace(node.name, replace(node, op=layer, meta=dict(node.meta)))
    report.changed(key, node.name, detail)


def _exact(kh: int, kw: int) -> bool:
    """True when the DPU's k / 2^n is exactly 1 / (kh * kw) (a power-of-2 window): the layer stays as it is."""
    k, n = avgpool_multiplier(kh, kw)
    return k * kh * kw == 2**n


def _padded_windows(cfg: Mapping, shape) -> str | None:
    """Why an AveragePooling2D has windows that read padding (the DPU's average there is not documented)."""
    if cfg["padding"] == "valid":
        return None
    spatial = shape[2:4] if cfg.get("data_format") == "channels_first" else shape[1:3]
    if any(s is None for s in spatial):
        return "padding 'same' on an input of unknown size: border windows may read padding"
    for size, pool, stride in zip(spatial, cfg["pool_size"], cfg["strides"], strict=True):
        out = -(-size // stride)
        if max((out - 1) * stride + pool - size, 0):
            return (
                "padding 'same' gives border windows that read padding, and how the DPU averages a partly "
                "padded window is not documented"
            )
    return None
