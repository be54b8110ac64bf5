"""Strategy files in the reference tool's own JSON layout, converted to the seed's pattern layout.

vai_q_tensorflow2 ships and dumps strategies in an older layout than the
seed documents. `convert` turns such a file into the seed's layout, keeping a
map from each converted JSON path to the path in the user's file, so that
validation errors (`original_path`) name the place the user has to edit.

What maps where:

- ``optimize_pipeline_config``, ``quantize_pipeline_config``,
  ``refine_pipeline_config``: as they are; ``quantize_with_xcompiler: true``
  becomes false, with a warning (no Vitis compiler here).
- ``finalize_pipeline_config`` keys: into ``refine_pipeline_config`` (qstrat's
  export is its last refine step).
- ``user_quantize_config``: ``user_defined_quantize_config``;
  ``use_framework_quant`` sets ``use_framework_quantizer`` on every FS
  quantizer of the file; ``use_fixneuron_quant`` and ``data_format`` have no
  Keras 3 equivalent and are dropped with a warning.
- ``custom_layer_type``: each dotted class name must be a class passed in
  ``custom_objects``; nothing is quantized for it unless an entry names it.
- ``input_quantize_config.input_quantizer``: ``quantizer_config``.
- each ``layer_quantize_config`` entry: one pattern named after the class,
  ``layer_type`` the Keras 3 class name; ``quantizable_weights``/
  ``weight_quantizers`` become weight targets, ``quantizable_biases`` bias
  targets, ``quantizable_activations`` (the layer's activation output) and
  ``quantizable_outputs`` (output 0) output targets, ``quantizable_inputs``
  targets ``input_<i>``. Entries for the reference's own layer classes
  (``Vitis*``, ``TFOpLambda``) are dropped with a warning: qstrat does not
  create those classes.
- quantizers: ``quantizer_type``/``quantizer_params`` (the numeric ``method``
  and ``round_mode`` codes are read as the reference defines them), with the
  old class names (``LastValueQuantPosQuantizer``, ...) mapped to the new.

A file with a ``layer_quantize_config`` is a whole strategy: it starts from
nothing (``"base": ""``). Without one it overrides the built-in it is loaded over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qstrat.errors import ConfigError, did_you_mean
from qstrat.quantizers.grid import LEGACY_METHOD_CODES, LEGACY_ROUND_CODES
from qstrat.strategy.readers import check_known as _known
from qstrat.strategy.readers import expect_list as _list
from qstrat.strategy.readers import expect_object as _obj

REGISTRY = "quantize_registry_config"
SECTION_NAMES = ("optimize_pipeline_config", "quantize_pipeline_config", "refine_pipeline_config")
FINALIZE = "finalize_pipeline_config"
TOP_KEYS = ("_comment", *SECTION_NAMES, FINALIZE, REGISTRY)
REGISTRY_KEYS = (
    "_comment",
    "user_quantize_config",
    "custom_layer_type",
    "input_quantize_config",
    "layer_quantize_config",
)
# quantizable list key -> (quantizer list key, target type)
PAIRS = {
    "quantizable_weights": ("weight_quantizers", "weight"),
    "quantizable_biases": ("bias_quantizers", "bias"),
    "quantizable_activations": ("activation_quantizers", "output"),
    "quantizable_outputs": ("output_quantizers", "output"),
    "quantizable_inputs": ("input_quantizers", "input"),
}
ENTRY_KEYS = ("_comment", "layer_type", *PAIRS, *(q for q, _ in PAIRS.values()))
OLD_QUANTIZER_NAMES = {
    "LastValueQuantPosQuantizer": "Pof2SQuantizer",
    "LastValueMinMaxQuantizer": "FSQuantizer",
    "MovingAvgMinMaxQuantizer": "MAFSQuantizer",
    "LastValueLogThQuantizer": "TQTQuantizer",
}
PARAM_RENAMES = {"use_framework_quant": "use_framework_quantizer"}
DROPPED_PARAMS = {"use_fixneuron_quant": "the compiled FixNeuron op does not exist on Keras 3"}
DROPPED_USER_KEYS = {
    "use_fixneuron_quant": "the compiled FixNeuron op does not exist on Keras 3",
    "data_format": "it configures the reference's BFP strategy, which qstrat does not have",
}
# The reference's own layer classes: qstrat never creates them, so an entry for one matches nothing.
REFERENCE_ONLY_CLASSES = ("TFOpLambda", "SlicingOpLambda", "TensorFlowOpLayer")


def is_reference_layout(d: Mapping) -> bool:
    """True for a strategy dict in the reference tool's layout (recognised by keys the seed's layout lacks)."""
    if FINALIZE in d:
        return True
    reg = d.get(REGISTRY)
    if not isinstance(reg, Mapping):
        return False
    if "user_quantize_config" in reg or "custom_layer_type" in reg:
        return True
    iq = reg.get("input_quantize_config")
    if isinstance(iq, Mapping) and "input_quantizer" in iq:
        return True
    entries = reg.get("layer_quantize_config")
    return isinstance(entries, list) and any(isinstance(e, Mapping) and set(e) & set(ENTRY_KEYS[2:]) for e in entries)


@dataclass
class Conversion:
    """A converted strategy: the seed-layout dict, where each part came from, and what happened."""

    data: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)  # converted path prefix -> the user's path
    report: list[str] = field(default_factory=list)  # "what mapped where", one line each
    warnings: list[str] = field(default_factory=list)  # settings dropped or changed

    def original_path(self, path: str) -> str:
        """The user's path for a path of the converted dict (both start with ``$``)."""
        for prefix in sorted(self.paths, key=len, reverse=True):
            if path == prefix or path.startswith((prefix + ".", prefix + "[")):
                return self.paths[prefix] + path[len(prefix) :]
        return path

    def relocate(self, exc: ConfigError, prefix: str = "$") -> ConfigError:
        """``exc`` (raised on the converted dict under ``prefix``) with its path in the user's file."""
        if not exc.path.startswith(prefix):
            return exc
        return type(exc)(prefix + self.original_path("$" + exc.path[len(prefix) :])[1:], exc.problem, exc.hint)


def convert(d: Mapping, custom_types: Mapping[str, type] | None = None) -> Conversion:
    """The seed-layout dict for a reference-layout strategy ``d``; raises ConfigError with the user's paths."""
    d = _obj(d, "$")
    _known(d, "$", TOP_KEYS)
    conv = Conversion({})
    out = conv.data
    if "_comment" in d:
        out["_comment"] = d["_comment"]
    for section in SECTION_NAMES:
        if section in d:
            out[section] = dict(_obj(d[section], f"$.{section}"))
            conv.paths[f"$.{section}"] = f"$.{section}"
    q = out.get("quantize_pipeline_config", {})
    if q.get("quantize_with_xcompiler") is True:
        q["quantize_with_xcompiler"] = False
        conv.warnings.append(
            "quantize_pipeline_config.quantize_with_xcompiler: true became false: there is no Vitis AI compiler "
            "here; qstrat applies the DPU compiler's position constraints itself, in the refine stage (the "
            "adjust_dpu_* keys of refine_pipeline_config, on in pof2s and tqt)"
        )
    if FINALIZE in d:
        refine = out.setdefault("refine_pipeline_config", {})
        for key, value in _obj(d[FINALIZE], f"$.{FINALIZE}").items():
            if key == "_comment":
                continue
            refine[key] = value
            conv.paths[f"$.refine_pipeline_config.{key}"] = f"$.{FINALIZE}.{key}"
            conv.report.append(f"{FINALIZE}.{key} -> refine_pipeline_config.{key}")
    if REGISTRY in d:
        _registry(_obj(d[REGISTRY], f"$.{REGISTRY}"), conv, dict(custom_types or {}))
    return conv


def _registry(reg: Mapping, conv: Conversion, custom_types: dict[str, type]) -> None:
    path = f"$.{REGISTRY}"
    _known(reg, path, REGISTRY_KEYS)
    out: dict[str, Any] = {}
    conv.data[REGISTRY] = out
    framework = None
    if "user_quantize_config" in reg:
        user = {}
        for key, value in _obj(reg["user_quantize_config"], f"{path}.user_quantize_config").items():
            if key == "use_framework_quant":
                framework = value
                if value is not None and not isinstance(value, bool):
                    raise ConfigError.expected(f"{path}.user_quantize_config.{key}", "true, false or null", value)
                continue
            if key in DROPPED_USER_KEYS:
                if value:  # null, 0 and false are the reference's "off": nothing is lost
                    conv.warnings.append(f"user_quantize_config.{key} dropped: {DROPPED_USER_KEYS[key]}")
                continue
            user[key] = _decoded(key, value)
        out["user_defined_quantize_config"] = user
        conv.paths[f"{path}.user_defined_quantize_config"] = f"{path}.user_quantize_config"
        conv.report.append("user_quantize_config -> user_defined_quantize_config")
    for i, dotted in enumerate(_list(reg.get("custom_layer_type", []), f"{path}.custom_layer_type")):
        name = _class_name(dotted, f"{path}.custom_layer_type[{i}]")
        if name not in custom_types:
            raise _unknown_class(dotted, name, f"{path}.custom_layer_type[{i}]")
        conv.report.append(
            f"custom_layer_type {dotted!r} -> custom class {name} (quantized only where an entry names it)"
        )
    if "input_quantize_config" in reg:
        ipath = f"{path}.input_quantize_config"
        iq = _obj(reg["input_quantize_config"], ipath)
        _known(iq, ipath, ("_comment", "input_layers", "input_quantizer"))
        new = {"input_layers": iq.get("input_layers", [])}
        if "input_quantizer" in iq:
            new["quantizer_config"] = _quantizer(iq["input_quantizer"], f"{ipath}.input_quantizer", conv, framework)
            _map_quantizer(conv, f"{ipath}.quantizer_config", f"{ipath}.input_quantizer")
        out["input_quantize_config"] = new
        conv.paths[ipath] = ipath
        conv.report.append("input_quantize_config.input_quantizer -> input_quantize_config.quantizer_config")
    if "layer_quantize_config" in reg:
        conv.data["base"] = ""  # a whole registry: the strategy starts from nothing
        names: set[str] = set()
        patterns = []
        for i, entry in enumerate(_list(reg["layer_quantize_config"], f"{path}.layer_quantize_config")):
            where = f"{path}.layer_quantize_config[{len(patterns)}]"
            pattern = _entry(entry, f"{path}.layer_quantize_config[{i}]", where, conv, custom_types, framework, names)
            if pattern is not None:
                conv.paths[where] = f"{path}.layer_quantize_config[{i}]"
                patterns.append(pattern)
        out["layer_quantize_config"] = patterns
    elif framework is not None:
        conv.warnings.append(
            "user_quantize_config.use_framework_quant applies to the file's own FS quantizers, and it has none: "
            "set use_framework_quantizer in the built-in's quantizer params instead"
        )


def _class_name(dotted, path: str) -> str:
    if not isinstance(dotted, str) or not dotted:
        raise ConfigError.expected(path, 'a layer class name, e.g. "tensorflow.keras.layers.Conv2D"', dotted)
    return dotted.rsplit(".", 1)[-1]


def _unknown_class(dotted: str, name: str, path: str) -> ConfigError:
    from qstrat.strategy.layer_types import keras_layer_classes

    close = did_you_mean(name, keras_layer_classes())
    return ConfigError(
        path,
        f'"{dotted}" names no Keras 3 layer class ({name})',
        (f"{close} " if close else "") + f"If {name} is your own layer class, pass it in custom_objects "
        f'(Quantizer(..., custom_objects={{"{name}": {name}}}), or --custom-objects on the command line).',
    )


def _entry(entry, path, where, conv: Conversion, custom_types, framework, names: set[str]) -> dict | None:
    """The pattern for one entry at ``path`` of the user's file (``where`` in the converted one), or None if dropped."""
    from qstrat.strategy.layer_types import keras_layer_classes

    entry = _obj(entry, path)
    _known(entry, path, ENTRY_KEYS)
    if "layer_type" not in entry:
        raise ConfigError(
            path, 'missing key "layer_type"', 'Name the layer class, e.g. "tensorflow.keras.layers.Conv2D".'
        )
    dotted = entry["layer_type"]
    name = _class_name(dotted, f"{path}.layer_type")
    if name.startswith("Vitis") or name in REFERENCE_ONLY_CLASSES:
        conv.warnings.append(
            f"{path[2:]} ({dotted}) dropped: qstrat does not create the reference's own layer classes; its "
            "DPU layer versions are its own (the convert_*_to_dpu_version keys of quantize_pipeline_config)"
        )
        return None
    if name not in keras_layer_classes() and name not in custom_types:
        raise _unknown_class(dotted, name, f"{path}.layer_type")
    pattern_name = name if name not in names else f"{name}_{len(names)}"
    names.add(pattern_name)
    targets, seen = [], {}
    for listed, (qkey, target_type) in PAIRS.items():
        items = _list(entry.get(listed, []), f"{path}.{listed}")
        quantizers = _list(entry.get(qkey, []), f"{path}.{qkey}")
        if len(items) != len(quantizers):
            raise ConfigError(
                f"{path}.{qkey}",
                f"{listed} lists {len(items)} and {qkey} {len(quantizers)}: they pair up one by one",
                "Give one quantizer per listed item.",
            )
        for j, (item, q) in enumerate(zip(items, quantizers, strict=True)):
            target = _target_name(item, target_type, f"{path}.{listed}[{j}]")
            if target in seen:
                raise ConfigError(
                    f"{path}.{listed}[{j}]",
                    f"quantizes {target}, which {seen[target]} quantizes already",
                    "Keep one of the two.",
                )
            seen[target] = f"{listed}[{j}]"
            qpath = f"{path}.{qkey}[{j}]"
            conv.paths[f"{where}.quant_config[{len(targets)}]"] = qpath
            _map_quantizer(conv, f"{where}.quant_config[{len(targets)}].quantizer_config", qpath)
            targets.append(
                {
                    "target_name": target,
                    "target_type": target_type,
                    "quantizer_config": _quantizer(q, qpath, conv, framework),
                }
            )
            conv.report.append(
                f"{path[2:]}.{listed}[{j}] ({item}) -> pattern {pattern_name}: {target_type} target {target}"
            )
    return {"pattern_name": pattern_name, "layer_type": name, "quant_config": targets}


def _decoded(key: str, value):
    """The reference's integer ``method`` / ``round_mode`` codes as qstrat's names (other values as they are)."""
    codes = {"method": LEGACY_METHOD_CODES, "round_mode": LEGACY_ROUND_CODES}
    for suffix, table in codes.items():
        if (key == suffix or key.endswith(f"_{suffix}")) and isinstance(value, int) and not isinstance(value, bool):
            return table.get(value, value)  # an unknown code stays, and validation names it
    return value


def _map_quantizer(conv: Conversion, new: str, old: str) -> None:
    """Paths inside a converted quantizer config, to the reference's spelling of them."""
    conv.paths[new] = old
    conv.paths[f"{new}.type"] = f"{old}.quantizer_type"
    conv.paths[f"{new}.params"] = f"{old}.quantizer_params"
    for reference_name, qstrat_name in PARAM_RENAMES.items():
        conv.paths[f"{new}.params.{qstrat_name}"] = f"{old}.quantizer_params.{reference_name}"


def _target_name(item, target_type: str, path: str) -> str:
    if target_type in ("weight", "bias"):
        if not isinstance(item, str) or not item:
            raise ConfigError.expected(path, 'a weight attribute name, e.g. "kernel"', item)
        return item
    if target_type == "output":
        if item in (0, "0", "activation"):
            return "output"
        raise ConfigError(path, f"qstrat quantizes a layer's first output only, got {item!r}", "Use 0.")
    index = int(item) if isinstance(item, (int, str)) and str(item).isdigit() else None
    if index is None:
        raise ConfigError.expected(path, "an input index (0, 1, ...)", item)
    return f"input_{index}"


def _quantizer(q, path: str, conv: Conversion, framework) -> dict:
    q = _obj(q, path)
    _known(q, path, ("_comment", "quantizer_type", "quantizer_params"))
    if "quantizer_type" not in q:
        raise ConfigError(path, 'missing key "quantizer_type"', 'Name a quantizer, e.g. "Pof2SQuantizer".')
    qtype = q["quantizer_type"]
    if isinstance(qtype, str):
        qtype = qtype.rsplit(".", 1)[-1]
        qtype = OLD_QUANTIZER_NAMES.get(qtype, qtype)
    params = {}
    for key, value in _obj(q.get("quantizer_params", {}), f"{path}.quantizer_params").items():
        if key in DROPPED_PARAMS:
            conv.warnings.append(f"{path[2:]}.quantizer_params.{key} dropped: {DROPPED_PARAMS[key]}")
            continue
        params[PARAM_RENAMES.get(key, key)] = _decoded(key, value)
    if framework is not None and qtype == "FSQuantizer":
        params["use_framework_quantizer"] = framework
    return {"type": qtype, "params": params}
