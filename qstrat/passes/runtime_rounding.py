"""``export_rounding``: activations round as the runtime an export targets rounds them.

A quantized model and its exported file compute the same values only if each
tensor is rounded the same way in both. Runtimes differ from the DPU (which
rounds activations half up) and from each other:

- ONNX: QuantizeLinear rounds half to even, everywhere.
- TFLite, with its default XNNPACK kernels: convolutions, dense layers, MUL
  and the input's QUANTIZE requantize in float32 and round half to even; ADD
  requantizes in fixed point, adding half before a shift (half up); MEAN and
  AVERAGE_POOL_2D round half away from zero. A ReLU fused into its producer
  (the producer's only reader) takes its rounding. ADD, MUL and MEAN were
  measured on ties; SUB and Average are taken to round as ADD, unmeasured.
  Ops it does not list (a ReLU TFLite cannot fuse, a requantizing max pool)
  keep half to even, which may not be what TFLite does for them; TFLite's
  int8 softmax is another algorithm (a lookup table) that no round mode
  reproduces. A bias finer than the accumulator's grid is rounded again by
  TFLite (int32 at input scale x weight scale), which can also move a step.

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
    **{k: "HALF_UP" for k in ("Add", "Subtract", "Average")},  # (x + 2^(s-1)) >> s
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
    configs, shared = {}, {}
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
                if t.shared_key is not None:
                    first = shared.setdefault(t.shared_key, (f"{name}.{t.target_name}", mode))
                    if first[1] != mode:
                        raise ConfigError(
                            f"{name}.{t.target_name}",
                            f'shares the quantizer "{t.shared_key.rsplit("/", 1)[-1]}" with {first[0]}, and export_rounding "{runtime}" '
                            f"rounds the two tensors differently ({first[1]} there, {mode} here)",
                            "One quantizer has one round mode: give these tensors their own quantizers, or leave "
                            "export_rounding off.",
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
    if not target.startswith("input"):
        return _tflite_mode(graph, node)
    # A layer-input quantizer: each tensor was rounded where it was made. "input" serves every input.
    indices = [int(target.rsplit("_", 1)[1])] if target[-1].isdigit() else range(len(node.inputs))
    modes = {_tflite_mode(graph, graph.node(node.inputs[i].node)) for i in indices if i < len(node.inputs)}
    if len(modes) > 1:
        raise ConfigError(
            f"{node.name}.{target}",
            f"one quantizer serves inputs that TFLite rounds differently ({', '.join(sorted(modes))})",
            "Give each input its own quantizer (input_0, input_1, ...) in the strategy, or leave export_rounding off.",
        )
    return modes.pop() if modes else "HALF_TO_EVEN"


def _tflite_mode(graph: Graph, source: Node) -> str:
    """How TFLite rounds the tensor ``source`` makes: through a fused ReLU, as the op it is fused into."""
    while _fused(source) and len(source.inputs) == 1:
        producer = graph.node(source.inputs[0].node)
        if len(graph.consumers(source.inputs[0])) != 1:
            break  # the producer's output is read elsewhere too: TFLite does not fuse
        source = producer
    return _TFLITE_FIXED_POINT.get(source.type_name, "HALF_TO_EVEN")
