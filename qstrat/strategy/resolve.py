"""Resolve each layer's quantize config from the patterns that match it (`qstrat.strategy.match`).

``quant_config`` entries of nested entries apply to the matched input layers.

Precedence for each field of a layer's quantize config, lowest first:

1. type rules (patterns without ``layer_name``), in list order;
2. the handy keys of ``user_defined_quantize_config`` (``weight_bit``, ...);
3. name rules (patterns with ``layer_name``), in list order;
4. ``layer_config`` precision (``"int16"``) for that layer.

A later rule beats an earlier one; a name rule beats a type rule whatever
the order. `explain` prints which rule set each field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qstrat.errors import ConfigError
from qstrat.quantizers import Quantizer, get_quantizer_class
from qstrat.strategy.match import LayerView, Matcher, NodeView, config_of, layer_names, param_value
from qstrat.strategy.parse_registry import check_target_bit_width
from qstrat.strategy.schema import LayerPattern, PatternRef, QuantTarget, Strategy, thaw
from qstrat.strategy.user_keys import HANDY_KEYS

RELU_ACTIVATIONS = ("relu", "relu6")


@dataclass(frozen=True)
class ResolvedTarget:
    """One quantizer a layer gets, with where each of its fields came from."""

    target_name: str
    target_type: str
    quantizer_type: str
    params: Mapping[str, Any]
    sources: Mapping[str, str]
    shared_key: str | None = None

    def build(self, where: str = "") -> Quantizer:
        """The quantizer object (parameters checked again after merging)."""
        cls = get_quantizer_class(self.quantizer_type)
        label = where or f"{self.target_name}"
        try:
            return cls.from_params(dict(self.params), label)
        except ConfigError as exc:
            setters = ", ".join(f"{k} <- {v}" for k, v in self.sources.items() if k != "type")
            raise ConfigError(exc.path, exc.problem, f"{exc.hint or ''} Set by: {setters}.".strip()) from None


@dataclass(frozen=True)
class LayerQuantConfig:
    """A layer's resolved quantize config: its quantizers, or why it has none."""

    layer_name: str
    targets: tuple[ResolvedTarget, ...] = ()
    rules: tuple[str, ...] = ()
    skip_reason: str | None = None
    dtype: str | None = None  # a float dtype the layer is kept in (layer_config)
    missing_weights: tuple[tuple[str, str], ...] = ()  # (target_name, rule): no such attribute on the layer

    @property
    def quantized(self) -> bool:
        return self.skip_reason is None

    def target(self, name: str) -> ResolvedTarget:
        for t in self.targets:
            if t.target_name == name:
                return t
        raise KeyError(name)


@dataclass
class _Draft:
    target_type: str
    qtype: str
    params: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    shared_key: str | None = None
    disabled_by: str | None = None


@dataclass(frozen=True)
class _Contribution:
    rule: str
    by_name: bool
    order: int
    targets: tuple[QuantTarget, ...]
    named: Mapping[str, Any]  # quantizer name -> QuantizerSpec, within the pattern match
    scope: str  # identifies this pattern match, for shared quantizers
    shared_names: frozenset


def _quantizer_names(pattern: LayerPattern | PatternRef, strategy: Strategy, out: dict):
    if isinstance(pattern, PatternRef):
        pattern = strategy.pattern(pattern.pattern)
    for t in pattern.quant_config:
        if t.quantizer is not None and t.quantizer.name:
            out[t.quantizer.name] = t.quantizer
    for entry in pattern.layer_inputs:
        _quantizer_names(entry, strategy, out)


def _is_relu_like(layer) -> bool:
    """Its output is never negative: a ReLU with no negative slope (Keras allows no negative threshold), or a layer
    whose activation is relu or relu6."""
    if type(layer).__name__ == "ReLU":
        return float(layer.negative_slope) == 0.0
    cfg = config_of(layer)
    act = param_value(cfg, "activation")
    return isinstance(act, str) and act in RELU_ACTIVATIONS


def resolve_views(
    strategy: Strategy, views: Sequence[LayerView], custom_types: Mapping[str, type] | None = None
) -> dict[str, LayerQuantConfig]:
    """Resolve the quantize config of every layer call in ``views`` (keyed by view name)."""
    matcher = Matcher(strategy, custom_types)
    contributions: dict[str, list[_Contribution]] = {v.name: [] for v in views}
    matched_rules: dict[str, list[str]] = {v.name: [] for v in views}
    for view in views:
        for i, pattern in enumerate(strategy.patterns):
            bindings: list = []
            if not matcher.match(pattern, view, bindings):
                continue
            named: dict = {}
            _quantizer_names(pattern, strategy, named)
            shared = frozenset(
                t.shared_quantizer for entry, _ in bindings for t in entry.quant_config if t.shared_quantizer
            )
            rule = f"layer_quantize_config[{i}] ({pattern.pattern_name})"
            for entry, node in bindings:
                if node.name not in contributions:
                    contributions[node.name] = []
                    matched_rules[node.name] = []
                if entry is pattern or entry.quant_config:
                    label = rule if entry is pattern else f"{rule} via input of {view.name}"
                    matched_rules[node.name].append(label)
                    contributions[node.name].append(
                        _Contribution(
                            label,
                            pattern.by_name or entry.by_name,
                            i,
                            entry.quant_config,
                            named,
                            f"{pattern.pattern_name}@{view.name}",
                            shared,
                        )
                    )
    layers = {v.name: v.layer for v in views}
    origins = {v.name: getattr(v, "origin", None) for v in views}
    return {
        name: _resolve_one(
            strategy, name, layers.get(name), contributions[name], matched_rules[name], origins.get(name)
        )
        for name in contributions
    }


def _apply(drafts: dict, c: _Contribution) -> None:
    for t in c.targets:
        key = t.target_name
        spec = t.quantizer
        shared_key = None
        if t.shared_quantizer is not None:
            spec = c.named[t.shared_quantizer]
            shared_key = f"{c.scope}/{t.shared_quantizer}"
        elif spec is not None and spec.name and spec.name in c.shared_names:
            shared_key = f"{c.scope}/{spec.name}"
        if spec is None:
            drafts[key] = _Draft(t.target_type, "", disabled_by=c.rule)
            continue
        d = drafts.get(key)
        if d is None or d.qtype != spec.type or d.disabled_by:
            d = _Draft(t.target_type, spec.type, sources={"type": c.rule})
            drafts[key] = d
        d.sources["type"] = c.rule
        for p, v in spec.params.items():
            d.params[p] = thaw(v)
            d.sources[p] = c.rule
        d.shared_key = shared_key


def _apply_handy(strategy: Strategy, drafts: dict, layer, fill_only: bool = False) -> None:
    user = strategy.user
    for key, (family_target, param) in HANDY_KEYS.items():
        value = user[key]
        if value is None:
            continue
        for d in drafts.values():
            if d.disabled_by or d.target_type != family_target:
                continue
            cls = get_quantizer_class(d.qtype)
            if param not in cls.accepted:
                continue  # only where the quantizer has that parameter
            if param == "unsigned" and family_target == "output" and not _is_relu_like(layer):
                continue  # unsigned activations only after ReLU-like layers
            if fill_only and param in d.params:
                continue
            d.params[param] = value
            d.sources[param] = f"user_defined_quantize_config.{key}"


def _check_bit_width(layer_name: str, target_name: str, d: _Draft) -> None:
    """Raise ConfigError where a target other than a bias ends up above 16 bits.

    Every rule was checked when loaded; this catches what they combine into
    (a weight sharing a bias's quantizer, a custom quantizer class's default).
    """
    bits = d.params.get("bit_width", get_quantizer_class(d.qtype).defaults.get("bit_width"))
    if bits is not None:
        source = d.sources.get("bit_width", f"the {d.qtype} default")
        check_target_bit_width(d.target_type, bits, f"{layer_name}.{target_name}.bit_width", f"Set by {source}.")


def _has_weight(layer, attr: str) -> bool:
    """A weight target applies only where the layer has that weight (Conv2D(use_bias=False) has no bias)."""
    if layer is None or not getattr(layer, "built", False):
        return True  # unbuilt: its weights are not known yet
    try:
        value = getattr(layer, attr, None)
    except Exception:  # noqa: BLE001 - a property that fails means no such weight
        return False
    return value is not None and hasattr(value, "shape") and hasattr(value, "assign")


def _resolve_one(
    strategy: Strategy, name: str, layer, contribs: list, rules: list, origin: str | None = None
) -> LayerQuantConfig:
    user = strategy.user
    names = layer_names(name, layer, origin)  # the k-th call of a shared layer is "name@k"; its layer is "name"
    if any(n in user["ignore_layers"] for n in names):
        return LayerQuantConfig(name, (), tuple(rules), "ignored by user_defined_quantize_config.ignore_layers")
    layer_name = next((n for n in names if n in user["layer_config"]), names[0])
    precision = user["layer_config"].get(layer_name)
    if precision is not None and precision.startswith(("float", "bfloat")):
        return LayerQuantConfig(
            name, (), tuple(rules), f"kept in {precision} by user_defined_quantize_config.layer_config", precision
        )
    drafts: dict[str, _Draft] = {}
    iq = strategy.input_quantize
    if (
        type(layer).__name__ == "InputLayer"
        and iq.quantizer is not None
        and (not iq.input_layers or name in iq.input_layers)
    ):
        d = _Draft("input", iq.quantizer.type, sources={"type": "input_quantize_config"})
        for p, v in iq.quantizer.params.items():
            d.params[p] = thaw(v)
            d.sources[p] = "input_quantize_config"
        drafts["output"] = d
        rules = ["input_quantize_config", *rules]
    elif not contribs:
        return LayerQuantConfig(name, (), (), "no pattern in layer_quantize_config matches this layer")
    for c in sorted((c for c in contribs if not c.by_name), key=lambda c: c.order):
        _apply(drafts, c)
    _apply_handy(strategy, drafts, layer)
    before = {k: id(d) for k, d in drafts.items()}
    for c in sorted((c for c in contribs if c.by_name), key=lambda c: c.order):
        _apply(drafts, c)
    # A name rule that made a target anew (another quantizer type, or one the type rules have not) gets the handy
    # keys where it sets nothing itself: it wins field by field, as over a type rule's target.
    _apply_handy(strategy, {k: d for k, d in drafts.items() if before.get(k) != id(d)}, layer, fill_only=True)
    if precision is not None:
        bits = int(precision[3:])
        for d in drafts.values():
            if d.target_type == "bias" and d.params.get("bit_width", 0) > bits:
                continue  # a wider bias (bias_bit=32) stays: layer_config raises a layer's precision
            if not d.disabled_by:
                d.params["bit_width"] = bits
                d.sources["bit_width"] = f"user_defined_quantize_config.layer_config.{layer_name}"
    live = {t: d for t, d in drafts.items() if not d.disabled_by}
    for tname, d in live.items():
        _check_bit_width(name, tname, d)
    missing = tuple(
        (t, d.sources.get("type", ""))
        for t, d in live.items()
        if d.target_type in ("weight", "bias") and layer is not None and not hasattr(layer, t)
    )
    targets = tuple(
        ResolvedTarget(tname, d.target_type, d.qtype, dict(d.params), dict(d.sources), d.shared_key)
        for tname, d in live.items()
        if d.target_type not in ("weight", "bias") or _has_weight(layer, tname)
    )
    return LayerQuantConfig(name, targets, tuple(rules), missing_weights=missing)


def weight_names(layer) -> list[str]:
    """The attribute names under which a layer holds its variables (for "did you mean" hints)."""
    out = []
    for attr in dir(layer):
        if attr.startswith("_") or attr in ("weights", "variables", "trainable_weights", "non_trainable_weights"):
            continue
        try:
            value = getattr(layer, attr)
        except Exception:  # noqa: BLE001 - a property that fails is not a weight
            continue
        if hasattr(value, "assign") and hasattr(value, "shape") and hasattr(value, "path"):
            out.append(attr)
    return out


def explain(strategy: Strategy, layer, model=None, custom_types=None) -> str:
    """Say which rule set each field of a layer's quantize config.

    Args:
        strategy: a loaded strategy.
        layer: a Keras layer, a layer name (with ``model``), or a `LayerView`.
        model: the functional model the layer belongs to; needed for patterns
            with ``layer_inputs`` and for nested rules.
    """
    from qstrat.strategy.views import views_of_model

    if isinstance(layer, str):
        if model is None:
            raise ConfigError("explain", f'a layer name ("{layer}") needs the model it belongs to', "Pass model=...")
        name = layer
    else:
        name = getattr(layer, "name", None)
    views = views_of_model(model) if model is not None else [NodeView(name, layer)]
    resolved = resolve_views(strategy, views, custom_types)
    if name not in resolved:
        raise ConfigError("explain", f'no layer named "{name}" in the model', None)
    cfg = resolved[name]
    lines = [f"{name}: " + ("quantized" if cfg.quantized else f"not quantized ({cfg.skip_reason})")]
    if cfg.rules:
        lines.append("  matched: " + "; ".join(cfg.rules))
    for t in cfg.targets:
        q = t.build(f"{name}.{t.target_name}")
        shared = f", shared as {t.shared_key}" if t.shared_key else ""
        lines.append(f"  {t.target_name} ({t.target_type}): {t.quantizer_type} <- {t.sources['type']}{shared}")
        for p, v in q.get_config().items():
            src = t.sources.get(p, "quantizer default")
            lines.append(f"    {p:<18} = {v!r:<22} <- {src}")
    return "\n".join(lines)
