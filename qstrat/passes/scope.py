"""The part of a model to quantize: ``input_layers`` and ``output_layers`` of ``user_defined_quantize_config``.

As the reference tool defines the part: walk back from the output layers (the
model's outputs when none are named) through the producers, stopping at the
input layers, which belong to it. Layers the walk does not reach stay in
float; the tensors that enter the part at an input layer get the quantizer of
``input_quantize_config``, as model inputs do.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

from qstrat.errors import ConfigError, did_you_mean
from qstrat.graph.ir import Graph
from qstrat.strategy import LayerQuantConfig, ResolvedTarget, Strategy
from qstrat.strategy.schema import thaw


def _named(graph: Graph, names) -> dict[str, str]:
    """{node: the name it answers to} for the nodes whose layer (or the layer they came from in optimize, as
    the two halves of a split SeparableConv2D, or a conv and its separated activation) has one of ``names``."""
    names, out = set(names), {}
    for n in graph.nodes:
        if n.meta.get("origin") in names:
            out[n.name] = n.meta["origin"]
        elif n.layer_name in names:
            out[n.name] = n.layer_name
    return out


def _scope(graph: Graph, strategy: Strategy) -> tuple[set[str], set[str]]:
    """(nodes outside the part to quantize, input layers that read from outside) for input_layers / output_layers.

    As the reference defines the part: walk back from the output layers (the
    model's outputs when none are named) through producers, stopping at the input
    layers (which are part of it). Nodes the walk does not reach stay in float.
    """
    user = strategy.user
    if not user["input_layers"] and not user["output_layers"]:
        return set(), set()
    starts = _named(graph, user["input_layers"])
    if user["output_layers"]:
        ends = _named(graph, user["output_layers"])
        if not ends:
            known = [n.layer_name for n in graph.nodes]
            raise ConfigError(
                "user_defined_quantize_config.output_layers",
                f"no layer of the optimized model is named {', '.join(map(repr, user['output_layers']))}, "
                "so nothing would be quantized",
                did_you_mean(user["output_layers"][0], known) or f"Its layers: {', '.join(known[:12])}, ...",
            )
    else:
        ends = {r.node for r in graph.outputs}
    inside, todo = set(), list(ends)
    while todo:
        name = todo.pop()
        if name in inside:
            continue
        inside.add(name)
        producers = [r.node for r in graph.node(name).inputs]
        # An input layer belongs to the part whole: the walk stops where it leaves the layer's nodes.
        todo.extend(p for p in producers if name not in starts or starts.get(p) == starts[name])
    unreached = sorted({starts[n] for n in starts.keys() - inside})
    if unreached:
        warnings.warn(
            f"user_defined_quantize_config.input_layers names {', '.join(map(repr, unreached))}, which the walk back "
            "from the output layers never reaches, so it does not start the part to quantize: the part starts at "
            "the model inputs on those paths instead. Check input_layers against output_layers.",
            stacklevel=5,
        )
    outside = {n.name for n in graph.nodes} - inside
    return outside, {n for n in starts.keys() & inside if any(r.node in outside for r in graph.node(n).inputs)}


def limit_to_scope(graph: Graph, strategy: Strategy, configs: dict[str, LayerQuantConfig]) -> None:
    """Leave the nodes outside input_layers..output_layers in float; quantize what enters the part."""
    outside, starts = _scope(graph, strategy)
    reason = "outside the part between user_defined_quantize_config.input_layers and output_layers"
    for name in outside:
        configs[name] = LayerQuantConfig(name, (), configs[name].rules, reason)
    iq = strategy.input_quantize.quantizer
    for name in starts:
        cfg, node = configs[name], graph.node(name)
        if iq is None or not cfg.quantized or not node.inputs or any(t.target_type == "input" for t in cfg.targets):
            continue
        source = "input_quantize_config (what enters user_defined_quantize_config.input_layers)"
        params = thaw(iq.params)
        entry = ResolvedTarget("input", "input", iq.type, params, {"type": source, **dict.fromkeys(params, source)})
        configs[name] = replace(cfg, targets=(entry, *cfg.targets))
