"""A quantize strategy as frozen data: what `load.py` returns and every stage reads.

JSON layout (the seed's, with qstrat's pipeline keys):

    {
      "base": "pof2s",
      "optimize_pipeline_config": {...},
      "quantize_pipeline_config": {...},
      "refine_pipeline_config": {...},
      "quantize_registry_config": {
        "user_defined_quantize_config": {"weight_bit": 4, "ignore_layers": [...], ...},
        "input_quantize_config": {"input_layers": [], "quantizer_config": {...}},
        "layer_quantize_config": [pattern, ...]
      }
    }

`Strategy.to_dict()` writes the canonical form; loading it gives an equal
strategy, so dump -> load -> dump is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

TARGET_TYPES = ("weight", "bias", "output", "input")


def freeze(value: Any) -> Any:
    """Deep-freeze JSON data: dicts become read-only mappings, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The inverse of `freeze`: plain dicts and lists, ready for json.dumps."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class QuantizerSpec:
    """A quantizer as a strategy names it: ``{"name", "type", "params"}``.

    ``params`` holds only what the strategy wrote; the quantizer's own defaults
    fill the rest when it is built (and `explain` says which is which).
    """

    type: str
    params: Mapping[str, Any]
    name: str = ""
    comment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {} if self.comment is None else {"_comment": self.comment}
        d.update({"name": self.name, "type": self.type, "params": thaw(self.params)})
        return d


@dataclass(frozen=True)
class QuantTarget:
    """Where a quantizer goes: a layer weight, its bias, its output or an input."""

    target_name: str
    target_type: str
    quantizer: QuantizerSpec | None = None  # None: shares another target's quantizer
    shared_quantizer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target_name": self.target_name, "target_type": self.target_type}
        if self.shared_quantizer is not None:
            d["shared_quantizer"] = self.shared_quantizer
        else:
            d["quantizer_config"] = self.quantizer.to_dict() if self.quantizer else None
        return d


@dataclass(frozen=True)
class PatternRef:
    """``{"pattern": name}`` inside ``layer_inputs``: another top-level pattern."""

    pattern: str

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern}


@dataclass(frozen=True)
class LayerPattern:
    """One entry of ``layer_quantize_config`` (or an anonymous nested input entry)."""

    pattern_name: str | None
    layer_type: tuple[str, ...]  # alternatives; empty matches any layer
    layer_name: str  # regex, full match; "" matches any name
    layer_params: Mapping[str, Any]
    layer_inputs: tuple[LayerPattern | PatternRef, ...]
    quant_config: tuple[QuantTarget, ...]
    comment: str | None = None

    @property
    def by_name(self) -> bool:
        """True for a rule that names layers: it beats rules that only name types."""
        return bool(self.layer_name)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.comment is not None:
            d["_comment"] = self.comment
        if self.pattern_name is not None:
            d["pattern_name"] = self.pattern_name
        d.update(
            {
                "layer_type": "|".join(self.layer_type),
                "layer_name": self.layer_name,
                "layer_params": thaw(self.layer_params),
                "layer_inputs": [i.to_dict() for i in self.layer_inputs],
                "quant_config": [t.to_dict() for t in self.quant_config],
            }
        )
        return d


@dataclass(frozen=True)
class InputQuantizeConfig:
    """The quantizer on model inputs (all of them, or those named in ``input_layers``)."""

    input_layers: tuple[str, ...]
    quantizer: QuantizerSpec | None
    comment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {} if self.comment is None else {"_comment": self.comment}
        d["input_layers"] = list(self.input_layers)
        d["quantizer_config"] = self.quantizer.to_dict() if self.quantizer else None
        return d


@dataclass(frozen=True)
class UserConfig:
    """``user_defined_quantize_config``: the handy keys and the partition keys."""

    values: Mapping[str, Any]  # every user key, None where unset

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def to_dict(self) -> dict[str, Any]:
        return thaw(self.values)


@dataclass(frozen=True)
class Strategy:
    """A validated, immutable quantize strategy."""

    base: str
    optimize: Mapping[str, Any]
    quantize: Mapping[str, Any]
    refine: Mapping[str, Any]
    user: UserConfig
    input_quantize: InputQuantizeConfig
    patterns: tuple[LayerPattern, ...]
    comments: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def pattern(self, name: str) -> LayerPattern:
        for p in self.patterns:
            if p.pattern_name == name:
                return p
        raise KeyError(name)

    def to_dict(self, verbose: int = 2) -> dict[str, Any]:
        """Canonical JSON. verbose 0: user config only; 1: + pipelines; 2: everything."""
        registry: dict[str, Any] = {"user_defined_quantize_config": self.user.to_dict()}
        out: dict[str, Any] = {}
        if "" in self.comments:
            out["_comment"] = self.comments[""]
        out["base"] = self.base
        if verbose >= 1:
            out["optimize_pipeline_config"] = thaw(self.optimize)
            out["quantize_pipeline_config"] = thaw(self.quantize)
            out["refine_pipeline_config"] = thaw(self.refine)
        if verbose >= 2:
            registry["input_quantize_config"] = self.input_quantize.to_dict()
            registry["layer_quantize_config"] = [p.to_dict() for p in self.patterns]
        out["quantize_registry_config"] = registry
        return out
