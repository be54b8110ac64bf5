"""`get_quantize_info`: every quantizer of a quantized model, its target and its state, as plain values."""

from __future__ import annotations

from typing import Any

from qstrat.errors import ConfigError
from qstrat.layers import FakeQuant, QuantizeWrapper


def get_quantize_info(qmodel) -> dict[str, dict[str, dict[str, Any]]]:
    """Every quantizer of a quantized model: ``{layer: {target: {target_type, quantizer, bit_width, ...}}}``."""
    import keras

    if not isinstance(qmodel, keras.Model):
        raise ConfigError("get_quantize_info", f"expected a quantized keras.Model, got {type(qmodel).__name__}")
    info: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in qmodel.layers:
        if isinstance(layer, QuantizeWrapper):
            entry = info.setdefault(layer.layer.name, {})
            for attr, q in layer.quantizers.items():
                kind = "bias" if attr == "bias" else "weight"
                entry[attr] = {"target_type": kind, **_describe(q, layer.state[attr])}
        elif isinstance(layer, FakeQuant):
            for target in [layer.target or layer.name, *layer.more_targets]:
                owner, _, what = target.partition("/")
                kind = "input" if what.startswith("input") or not what else "output"
                info.setdefault(owner, {})[what or "output"] = {
                    "target_type": kind,
                    **_describe(layer.quantizer, layer.state),
                }
    return info


def _describe(q, state) -> dict[str, Any]:
    d = q.describe(state)
    if "pos" in d:
        pos = d.pop("pos")
        d["quantize_pos"] = int(pos) if isinstance(pos, float) else [int(p) for p in pos]
    return d
