"""`LayerView`s of a functional Keras model, from its public config.

Enough for matching and `explain`: each layer with the layers feeding its
first call. (The graph capture of the quantize pipeline has its own, fuller
representation, with one node per call of a shared layer.)
"""

from __future__ import annotations

from typing import Any

from qstrat.strategy.match import NodeView


def _history(obj: Any, out: list) -> None:
    """Collect the producing layer names of every Keras tensor in a call's arguments."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            out.append(obj["config"]["keras_history"][0])
            return
        for v in obj.values():
            _history(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _history(v, out)


def views_of_model(model) -> list[NodeView]:
    """One `NodeView` per layer of a functional or Sequential model, inputs from its first call."""
    config = model.get_config()
    layers = {layer.name: layer for layer in model.layers}
    sources: dict[str, list[str]] = {}
    for entry in config.get("layers", []):
        name = entry.get("name") or entry.get("config", {}).get("name")
        nodes = entry.get("inbound_nodes") or []
        srcs: list[str] = []
        if nodes:
            _history(nodes[0].get("args", []), srcs)
        sources[name] = srcs
    built: dict[str, NodeView] = {}

    def view(name: str) -> NodeView:
        if name not in built:
            built[name] = NodeView(name, layers.get(name), tuple(view(s) for s in sources.get(name, []) if s in layers))
        return built[name]

    return [view(layer.name) for layer in model.layers]
