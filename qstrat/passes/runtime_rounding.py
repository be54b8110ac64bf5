"""``export_rounding``: activations round as the runtime an export targets rounds them.

A quantized model and its exported file compute the same values only if each
tensor is rounded the same way in both. Runtimes differ from the DPU (which
rounds activations half up) and from each other:

- ONNX: QuantizeLinear rounds half to even, everywhere.
- TFLite, with its default XNNPACK kernels: convolutions, dense layers and
  the input's QUANTIZE requantize in float32 and round half to even; ADD, SUB
  and MUL requantize in fixed point, adding half before a shift (half up);
  MEAN and AVERAGE_POOL_2D round half away from zero. A ReLU fused into one of
  them takes its rounding. Measured per tensor on the digits CNN and the
  mini-Xception (bench/export.py, tflite_test.py): every tensor then equals
  Keras exactly, except the output of TFLite's int8 softmax, a different
  algorithm (a lookup table), which no round mode reproduces. Ops it does
  not list (a ReLU TFLite cannot fuse, a requantizing max pool) keep half to
  even, which may not be what TFLite does for them.

This pass rewrites the round mode of every activation and input quantizer of
an annotation (weights and biases are stored as integers, so they keep
theirs), before calibration, so calibration sees the final quantizers.
"""

from __future__ import annotations

from dataclasses import replace

from qstrat.errors import ConfigError
from qstrat.graph.ir import Graph, Node

RUNTIMES = ("onnx", "tflite")
# TFLite ops that requantize in fixed point, by the Keras layer type they come from, and how they round.
_TFLITE_FIXED_POINT = {
    **{k: "HALF_UP" for k in ("Add", "Subtract", "Multiply", "Average")},  # (x + 2^(s-1)) >> s
    **{f"AveragePooling{d}D": "HALF_AWAY_FROM_ZERO" for d in (1, 2, 3)},
    **{f"GlobalAveragePooling{d}D": "HALF_AWAY_FROM_ZERO" for d in (1, 2, 3)},  # MEAN
}


def _fused(node: Node) -> bool:
    """A ReLU or ReLU6 TFLite fuses into the op before it."""
    if node.type_name == "ReLU":
        return float(node.op.negative_slope) == 0.0 and float(node.op.threshold) == 0.0
    return node.type_name == "Activation" and node.op.get_config().get("activation") in ("relu", "relu6")


def round_like(graph: Graph, annotation, runtime: str):
    """A copy of ``annotation`` whose activation and input quantizers round as ``runtime`` does."""
    if runtime not in RUNTIMES:
        raise ConfigError.expected("export_rounding", "one of " + ", ".join(f'"{r}"' for r in RUNTIMES), runtime)
    configs = {}
    for name, cfg in annotation.configs.items():
        node = graph.node(name) if name in graph else None
        targets = []
        for t in cfg.targets:
            if t.target_type in ("output", "input") and node is not None:
                mode = _mode(graph, node, t.target_name, runtime)
                if t.params.get("use_framework_quantizer") and mode != "HALF_UP":
                    raise ConfigError(
                        f"{name}.{t.target_name}",
                        f'export_rounding "{runtime}" needs {mode} here, and its quantizer uses the framework op '
                        "(use_framework_quantizer), which rounds half up only",
                        "Set use_framework_quantizer to false in the strategy, or leave export_rounding off and "
                        "read the export report's mismatch counts.",
                    )
                t = replace(
                    t,
                    params={**t.params, "round_mode": mode},
                    sources={**t.sources, "round_mode": f"export_rounding={runtime}"},
                )
            targets.append(t)
        configs[name] = replace(cfg, targets=tuple(targets))
    return replace(annotation, configs=configs)


def _mode(graph: Graph, node: Node, target: str, runtime: str) -> str:
    if runtime == "onnx":
        return "HALF_TO_EVEN"
    source = node
    if target.startswith("input"):  # a layer-input quantizer: the tensor was rounded where it was made
        index = int(target.split("_")[-1]) if target[-1].isdigit() else 0
        if index >= len(node.inputs):
            return "HALF_TO_EVEN"
        source = graph.node(node.inputs[index].node)
    while _fused(source) and len(source.inputs) == 1:
        source = graph.node(source.inputs[0].node)
    return _TFLITE_FIXED_POINT.get(source.type_name, "HALF_TO_EVEN")
