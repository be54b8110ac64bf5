"""Match registry patterns against layers.

A pattern matches a layer when every given constraint holds:

- ``layer_type``: the layer is an instance of one of the ``|``-separated
  classes (subclasses match); ``""`` matches any layer;
- ``layer_name``: the regex matches the whole layer name;
- ``layer_params``: each key equals the layer's config value (lists and
  tuples compare equal);
- ``layer_inputs``: the layer has exactly that many inputs and input i
  matches entry i, recursively; ``{"pattern": name}`` stands for a whole
  top-level pattern.

Which rule sets what, and how rules combine, is `qstrat.strategy.resolve`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qstrat.strategy.layer_types import resolve_layer_class
from qstrat.strategy.schema import LayerPattern, PatternRef, Strategy, thaw


class LayerView(Protocol):
    """What matching needs to know about one call of a layer."""

    name: str
    layer: Any
    inputs: Sequence[LayerView]


@dataclass(frozen=True)
class NodeView:
    """A plain `LayerView`: a layer, its name and the views of its inputs.

    ``origin`` is the user's layer this one was made from by an optimize pass
    (a SeparableConv2D's two halves, a conv's separated activation): names in
    ``layer_name``, ``ignore_layers`` and ``layer_config`` match it too.
    """

    name: str
    layer: Any
    inputs: tuple[NodeView, ...] = ()
    origin: str | None = None


def layer_names(name: str, layer, origin: str | None) -> tuple[str, ...]:
    own = getattr(layer, "name", name)
    return (own,) if not origin or origin == own else (own, origin)


def norm(v):
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, Mapping):
        return {k: norm(x) for k, x in v.items()}
    return v


def config_of(layer) -> dict:
    try:
        return layer.get_config()
    except Exception:  # noqa: BLE001 - a layer without a usable config matches no layer_params
        return {}


def param_value(config: Mapping, key: str):
    value = config.get(key)
    if key == "activation" and isinstance(value, Mapping):  # a serialized activation function
        value = value.get("config", {}).get("name", value.get("class_name"))
    return value


class Matcher:
    """Matches one strategy's patterns; caches resolved layer classes."""

    def __init__(self, strategy: Strategy, custom_types: Mapping[str, type] | None = None):
        self.strategy = strategy
        self.custom_types = dict(custom_types or {})
        self._classes: dict[str, type | None] = {}

    def _cls(self, token: str) -> type | None:
        if token not in self._classes:
            cls = resolve_layer_class(token, self.custom_types)
            self._classes[token] = cls if isinstance(cls, type) else None
        return self._classes[token]

    def type_matches(self, pattern: LayerPattern, layer) -> bool:
        if not pattern.layer_type:
            return True
        for token in pattern.layer_type:
            cls = self._cls(token)
            if cls is not None and isinstance(layer, cls):
                return True
            if cls is None and type(layer).__name__ == token.rpartition(".")[2]:
                return True
        return False

    def match(self, pattern: LayerPattern | PatternRef, node: LayerView, bindings: list) -> bool:
        """True if ``pattern`` matches ``node``; appends (entry, node) for every matched entry."""
        if isinstance(pattern, PatternRef):
            pattern = self.strategy.pattern(pattern.pattern)
        if not self.type_matches(pattern, node.layer):
            return False
        if pattern.layer_name and not any(
            re.fullmatch(pattern.layer_name, n)
            for n in layer_names(node.name, node.layer, getattr(node, "origin", None))
        ):
            return False
        if pattern.layer_params:
            config = config_of(node.layer)
            for key, want in pattern.layer_params.items():
                if norm(param_value(config, key)) != norm(thaw(want)):
                    return False
        mark = len(bindings)
        if pattern.layer_inputs:
            if len(node.inputs) != len(pattern.layer_inputs):
                return False
            for entry, child in zip(pattern.layer_inputs, node.inputs, strict=True):
                if not self.match(entry, child, bindings):
                    del bindings[mark:]
                    return False
        bindings.append((pattern, node))
        return True
