"""The quantize pass, its first half: decide every layer's quantizers from the strategy.

`annotate` resolves each node's quantize config with the strategy's registry
and applies the pipeline's fusion rules (no quantizer between a conv and its
activation, or an Add and its activation). Every node ends up in the report:
quantized, or skipped with a stated reason. `qstrat.passes.insert` then puts
the quantizers into a new graph.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field, replace

from qstrat.errors import ConfigError, did_you_mean, warn_at_caller
from qstrat.graph.ir import KERNEL_LAYERS, Graph, Node, TensorRef, is_float_dtype, views
from qstrat.passes.reads import drop_requantized_inputs, input_indices, note_float_reads
from qstrat.passes.scope import limit_to_scope
from qstrat.quantizers import DEFAULT_POSITION_POLICY
from qstrat.quantizers.grid import LEGACY_METHOD_CODES
from qstrat.strategy import LayerQuantConfig, Strategy, resolve_views
from qstrat.strategy.resolve import weight_names
from qstrat.strategy.user_keys import HANDY_KEYS

ADD_LIKE = ("Add", "Multiply")
RELU_LIKE_ACTS = ("relu", "relu6", "linear")


class Skip(str, enum.Enum):
    UNSUPPORTED_LAYER = "unsupported layer type: no pattern in the strategy matches it"
    NO_QUANTIZERS = "supported with no quantizer of its own (keeps its input's grid)"
    INTEGER = "integer and boolean tensors are never quantized"
    LAMBDA = "a Lambda layer runs its Python function as it is, in float: qstrat cannot see inside it"


def _no_pattern_reason(node: Node, strategy: Strategy) -> str:
    """Why no pattern matched: the strategy quantizes only some layers' inputs, or has no rule for this type."""
    if node.type_name == "Lambda":
        return Skip.LAMBDA.value
    kinds = {t.target_type for p in strategy.patterns for t in p.quant_config}
    if kinds and "output" not in kinds:
        types = sorted({t for p in strategy.patterns for t in p.layer_type})
        return (
            "left in float: this strategy quantizes only the inputs and weights of "
            f"{', '.join(types) or 'the layers its patterns name'} layers"
        )
    return (
        f"{Skip.UNSUPPORTED_LAYER.value} ({node.type_name}), so it runs in float. To quantize it, add a pattern "
        f'to layer_quantize_config with "layer_type": "{node.type_name}" and its quant_config '
        "(README: Quantize strategies)"
    )


@dataclass
class LayerReport:
    """What happened to one node: its quantizers, or why it has none, plus notes."""

    node: str
    layer_type: str
    status: str  # "quantized" | "skipped"
    reason: str | None = None
    targets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class QuantizeReport:
    layers: dict[str, LayerReport] = field(default_factory=dict)

    def quantized(self) -> list[str]:
        return [n for n, r in self.layers.items() if r.status == "quantized"]

    def skipped(self) -> dict[str, str]:
        return {n: r.reason for n, r in self.layers.items() if r.status == "skipped"}

    def table(self) -> str:
        rows = [f"{'layer':<28} {'type':<24} {'status':<10} detail"]
        for r in self.layers.values():
            detail = ", ".join(r.targets) if r.status == "quantized" else r.reason
            if r.notes:
                detail = f"{detail}; " + "; ".join(r.notes) if detail else "; ".join(r.notes)
            rows.append(f"{r.node:<28} {r.layer_type:<24} {r.status:<10} {detail}")
        return "\n".join(rows)


@dataclass(frozen=True)
class Annotation:
    """The quantize decision for a graph: resolved configs after fusion, and the report."""

    configs: dict[str, LayerQuantConfig]
    report: QuantizeReport


def _is_fusable_activation(node: Node) -> bool:
    t = node.type_name
    if t in ("ReLU", "LeakyReLU"):
        return True
    if t == "Activation":
        act = node.op.get_config().get("activation")
        return isinstance(act, str) and act in RELU_LIKE_ACTS
    return False


def _carry_named_output(conv: Node, act: Node, configs, strategy: Strategy, notes) -> None:
    """Where ``act`` was split off ``conv`` (``separate_conv_act``), the quantizer after it is the user's layer's
    output: what a rule naming that layer (a name rule, ``layer_config``) set on the conv's output moves there."""
    own = conv.meta.get("origin") or conv.layer_name
    if act.meta.get("origin") != own:
        return
    named = {f"layer_quantize_config[{i}] ({p.pattern_name})" for i, p in enumerate(strategy.patterns) if p.by_name}
    src = next(t for t in configs[conv.name].targets if t.target_type == "output")
    picked = [k for k, v in src.sources.items() if v in named or v.startswith("user_defined_quantize_config.layer_")]
    if not picked:
        return
    cfg = configs[act.name]
    dst = next(t for t in cfg.targets if t.target_type == "output")
    base = dst
    if "type" in picked and src.quantizer_type != dst.quantizer_type:
        base = replace(src, target_name=dst.target_name, shared_key=dst.shared_key)
    params = {**base.params, **{k: src.params[k] for k in picked if k in src.params}}
    new = replace(base, params=params, sources={**base.sources, **{k: src.sources[k] for k in picked}})
    configs[act.name] = replace(cfg, targets=tuple(new if t is dst else t for t in cfg.targets))
    notes[act.name].append(f"output: {', '.join(picked)} as set for {own}, the layer it was split from")


def _drop_output(cfg: LayerQuantConfig) -> LayerQuantConfig:
    return replace(cfg, targets=tuple(t for t in cfg.targets if t.target_type != "output"))


def _check_dtypes(configs: dict[str, LayerQuantConfig]) -> None:
    """A layer kept in float64 needs a backend that computes in float64."""
    import keras

    for cfg in configs.values():
        if cfg.dtype != "float64" or keras.backend.backend() != "jax":
            continue
        import jax

        if not jax.config.jax_enable_x64:
            raise ConfigError(
                f"user_defined_quantize_config.layer_config.{cfg.layer_name}",
                "float64 on JAX needs 64-bit mode, which is off, so the layer would silently compute in float32",
                'Call jax.config.update("jax_enable_x64", True) before building the model, or use "float32".',
            )


def _warn_missing_weights(graph: Graph, configs: dict[str, LayerQuantConfig]) -> None:
    """Warn, once per rule and name, about weight targets that name no weight of the layer ("kernal")."""
    seen = set()
    for node in graph.nodes:
        for target, rule in configs[node.name].missing_weights:
            key = (rule, target, node.type_name)
            if key in seen:
                continue
            seen.add(key)
            have = weight_names(node.op)
            hint = did_you_mean(target, have) or ""
            warnings.warn(
                f'{rule} quantizes weight "{target}", but {node.type_name} layer "{node.layer_name}" has no '
                f"weight of that name, so the target does nothing. {hint} "
                f"Its weights: {', '.join(have) or 'none'}.".replace("  ", " "),
                stacklevel=3,
            )


def _warn_unused_handy_keys(strategy: Strategy, configs: dict[str, LayerQuantConfig]) -> None:
    """Warn about each handy key (``weight_bit``, ...) that is set but sets no quantizer of this model."""
    used = {src for cfg in configs.values() for t in cfg.targets for src in t.sources.values()}
    for key, (target_type, param) in HANDY_KEYS.items():
        value = strategy.user[key]
        if value is None:
            continue
        if f"user_defined_quantize_config.{key}" in used:
            if param == "method_percentile":
                _warn_percentile_unused(key, value, target_type, configs)
            continue
        warnings.warn(
            f"user_defined_quantize_config.{key} = {value!r} sets no quantizer of this model, so it does nothing: "
            f"no {target_type} target here has a quantizer with the parameter {param!r}"
            + (" (unsigned outputs apply only after ReLU-like layers)" if key == "activation_unsigned" else "")
            + ", or a rule by layer name sets it instead. See qstrat.strategy.explain for what sets each parameter.",
            stacklevel=4,
        )


def _warn_percentile_unused(key: str, value, target_type: str, configs: dict[str, LayerQuantConfig]) -> None:
    """``<family>_method_percentile`` set where no quantizer of the family uses method Percentile."""
    methods = {
        LEGACY_METHOD_CODES.get(t.params.get("method"), t.params.get("method"))
        for cfg in configs.values()
        for t in cfg.targets
        if t.target_type == target_type
    }
    if "Percentile" not in methods:
        family = key.removesuffix("_method_percentile")
        warnings.warn(
            f"user_defined_quantize_config.{key} = {value!r} does nothing: no {target_type} quantizer here uses "
            f'method "Percentile" (theirs: {", ".join(sorted(str(m) for m in methods))}). Set {family}_method '
            '"Percentile" too.',
            stacklevel=5,
        )


def _warn_unused_precisions(strategy: Strategy, configs: dict[str, LayerQuantConfig]) -> None:
    """Warn about each integer ``layer_config`` entry for a layer with no quantizer for it to widen (a Flatten,
    a max pool: their outputs keep their input's grid)."""
    used = {src for cfg in configs.values() for t in cfg.targets for src in t.sources.values()}
    for name, precision in strategy.user["layer_config"].items():
        if not precision.startswith("int") or f"user_defined_quantize_config.layer_config.{name}" in used:
            continue
        mine = [cfg for n, cfg in configs.items() if n == name or n.startswith(f"{name}@")]
        if not mine:  # no such layer: warn_unknown_layer_names says so
            continue
        why = next((cfg.skip_reason for cfg in mine if cfg.skip_reason), None)
        warnings.warn(
            f"user_defined_quantize_config.layer_config.{name} = {precision!r} does nothing: {name} has no "
            "quantizer " + (f"({why})" if why else "of its own (its output keeps its input's grid)") + ". Set it "
            "on the layer that writes its input, or see qstrat.strategy.explain for what quantizes it.",
            stacklevel=4,
        )


def _warn_inapplicable_keys(strategy: Strategy, configs: dict[str, LayerQuantConfig]) -> None:
    """Warn about quantize keys set to act on quantizers this strategy does not put on the model."""
    q = strategy.quantize
    targets = [t for cfg in configs.values() if cfg.quantized for t in cfg.targets]
    pof2 = ("Pof2SQuantizer", "TQTQuantizer")
    if q["calib_position_policy"] != DEFAULT_POSITION_POLICY and not any(
        t.quantizer_type in pof2 and t.target_type in ("output", "input") for t in targets
    ):
        warnings.warn(
            f"quantize_pipeline_config.calib_position_policy = {q['calib_position_policy']!r} does nothing: no "
            "power-of-2 quantizer calibrates a layer output or input here, and it is a rule for their positions.",
            stacklevel=4,
        )
    if not any(t.target_type == "output" for t in targets):
        for key in ("no_quant_in_conv_bn_act", "no_quant_in_conv_act", "no_quant_in_add_act"):
            if q[key] is False:
                warnings.warn(
                    f"quantize_pipeline_config.{key} = false does nothing: no layer output is quantized here, "
                    "so there is no quantizer to keep or drop before an activation.",
                    stacklevel=4,
                )


def _float_targets(node: Node, cfg: LayerQuantConfig) -> tuple[LayerQuantConfig, list[str]]:
    """Drop the targets on integer or boolean tensors (token ids, masks): those are never quantized."""
    keep, notes = [], []
    for t in cfg.targets:
        if t.target_type == "output" or (t.target_type == "input" and not node.inputs):
            dtypes = [node.output_dtype(0)]
        elif t.target_type == "input":
            idx = input_indices(t.target_name, len(node.inputs))
            if any(i >= len(node.inputs) for i in idx):
                warn_at_caller(
                    f"{node.type_name} layer {node.layer_name!r} reads {len(node.inputs)} input(s), numbered from "
                    f"0 (input_0 to input_{len(node.inputs) - 1}), so target {t.target_name} of "
                    f"{t.sources.get('type', 'its rule')} quantizes nothing there."
                )
                notes.append(f"{t.target_name}: no such input (it has {len(node.inputs)})")
                continue
            dtypes = [node.input_dtype(i) for i in idx]
        else:
            dtypes = ["float32"]  # weights: the layer's own variables
        if dtypes and not any(is_float_dtype(d) for d in dtypes):
            notes.append(f"{t.target_name}: {dtypes[0]} tensor, not quantized ({Skip.INTEGER.value})")
            continue
        keep.append(t)
    return replace(cfg, targets=tuple(keep)), notes


def annotate(graph: Graph, strategy: Strategy, custom_types=None) -> Annotation:
    """Resolve every node's quantizers and apply the strategy's fusion rules."""
    configs = resolve_views(strategy, views(graph), custom_types)
    limit_to_scope(graph, strategy, configs)
    _warn_unused_handy_keys(strategy, configs)
    _warn_unused_precisions(strategy, configs)
    _warn_inapplicable_keys(strategy, configs)
    _check_dtypes(configs)
    _warn_missing_weights(graph, configs)
    q = strategy.quantize
    report = QuantizeReport()
    notes: dict[str, list[str]] = {n.name: [] for n in graph.nodes}
    dropped: dict[str, list[str]] = {}
    for node in graph.nodes:
        cfg = configs[node.name]
        if cfg.quantized and cfg.targets:
            configs[node.name], dropped[node.name] = _float_targets(node, cfg)

    def has_output(name: str) -> bool:
        cfg = configs[name]
        return cfg.quantized and any(t.target_type in ("output", "input") for t in cfg.targets)

    def sole_consumer(node: Node) -> Node | None:
        users = graph.consumers(TensorRef(node.name, 0))
        return users[0] if len(users) == 1 and node.name not in {r.node for r in graph.outputs} else None

    bn_chains = 0  # conv -> BatchNormalization -> activation chains, whichever way no_quant_in_conv_bn_act is set
    for node in graph.nodes:
        nxt = sole_consumer(node)
        if nxt is None:
            continue
        if node.type_name in KERNEL_LAYERS:
            chain = [node]
            if nxt.type_name == "BatchNormalization":
                after = sole_consumer(nxt)
                if after is not None and _is_fusable_activation(after) and has_output(after.name):
                    bn_chains += 1
                    if q["no_quant_in_conv_bn_act"]:
                        chain.append(nxt)
                        nxt = after
            rule_on = q["no_quant_in_conv_bn_act"] if len(chain) > 1 else q["no_quant_in_conv_act"]
            if rule_on and _is_fusable_activation(nxt) and has_output(nxt.name):
                for c in chain:
                    if has_output(c.name):
                        _carry_named_output(c, nxt, configs, strategy, notes)
                        configs[c.name] = _drop_output(configs[c.name])
                        notes[c.name].append(f"output fused with {nxt.name}: quantized after it")
        elif node.type_name in ADD_LIKE and q["no_quant_in_add_act"]:
            if _is_fusable_activation(nxt) and has_output(nxt.name) and has_output(node.name):
                configs[node.name] = _drop_output(configs[node.name])
                notes[node.name].append(f"output fused with {nxt.name}: quantized after it")
    if q["no_quant_in_conv_bn_act"] is False and not bn_chains and any(has_output(n.name) for n in graph.nodes):
        warn_at_caller(
            "quantize_pipeline_config.no_quant_in_conv_bn_act = false does nothing here: no BatchNormalization is "
            "left between a conv and a ReLU-like activation (the optimize stage folds them into the conv). Such a "
            "conv's output quantizer is set by no_quant_in_conv_act."
        )

    drop_requantized_inputs(graph, configs, notes)
    note_float_reads(graph, configs, notes)
    for node in graph.nodes:
        cfg = configs[node.name]
        if not cfg.quantized:
            reason = cfg.skip_reason
            if reason and reason.startswith("no pattern"):
                reason = _no_pattern_reason(node, strategy)
            report.layers[node.name] = LayerReport(node.name, node.type_name, "skipped", reason, notes=notes[node.name])
        elif not cfg.targets and dropped.get(node.name):
            report.layers[node.name] = LayerReport(node.name, node.type_name, "skipped", "; ".join(dropped[node.name]))
        elif not cfg.targets and not notes[node.name]:
            report.layers[node.name] = LayerReport(node.name, node.type_name, "skipped", Skip.NO_QUANTIZERS.value)
        else:
            targets = [f"{t.target_name} ({t.quantizer_type}, {t.params.get('bit_width', 8)}-bit)" for t in cfg.targets]
            report.layers[node.name] = LayerReport(
                node.name, node.type_name, "quantized", None, targets, notes[node.name] + dropped.get(node.name, [])
            )
    return Annotation(configs, report)


def cast_annotation(graph: Graph, dtype: str, strategy: Strategy) -> Annotation:
    """No quantizer anywhere: every layer computes in ``dtype`` (``convert_datatype``).

    The same mechanism as a ``layer_config`` float type, for every layer. Model
    inputs keep their dtype (the first layers cast what they read); layers in
    ``ignore_layers`` keep theirs, and a float type in ``layer_config`` wins for
    its layer. The keys that configure quantizers have nothing to act on: a
    warning lists those that are set.
    """
    user = strategy.user
    reason = f"cast to {dtype} by quantize_pipeline_config.convert_datatype"
    configs, report = {}, QuantizeReport()
    for node in graph.nodes:
        names = {node.layer_name, node.meta.get("origin")}
        own = next((user["layer_config"][n] for n in names if n in user["layer_config"]), None)
        if node.type_name == "InputLayer":
            target, why = None, "a model input: keeps its dtype"
        elif names & set(user["ignore_layers"]):
            target, why = None, "ignored by user_defined_quantize_config.ignore_layers: keeps its dtype"
        elif own is not None and own.startswith(("float", "bfloat")):
            target, why = own, f"kept in {own} by user_defined_quantize_config.layer_config"
        else:
            target, why = dtype, reason
        configs[node.name] = LayerQuantConfig(node.name, (), (), why, target)
        report.layers[node.name] = LayerReport(node.name, node.type_name, "skipped", why)
    _check_dtypes(configs)
    unused = [k for k in HANDY_KEYS if user[k] is not None]
    unused += [k for k in ("input_layers", "output_layers") if user[k]]
    unused += [f"layer_config.{n} = {v!r}" for n, v in user["layer_config"].items() if v.startswith("int")]
    if unused:
        warnings.warn(
            f"convert_datatype = {dtype!r} casts the model and quantizes nothing, so these settings do nothing: "
            + ", ".join(unused),
            stacklevel=4,
        )
    return Annotation(configs, report)
