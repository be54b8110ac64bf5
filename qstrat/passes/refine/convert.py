"""Convert a quantized model's power-of-2 quantizers: to float scales, or trained thresholds to positions.

Why: the seed's refine step "convert the quantizers to framework quantizers"
(``convert_to_fs_quantize_strategy``) hands a DPU-style model to targets that
rescale in float: an `FSQuantizer` with scale 2^-pos is the same grid, and with
``use_framework_quantizer`` it runs Keras' ``fake_quant_with_min_max_vars``,
which becomes a TensorFlow FakeQuant op that converters recognise.
``convert_to_pof2s_quantize_strategy`` freezes a QAT model's trained
thresholds (`TQTQuantizer`) into plain positions (`Pof2SQuantizer`).

The reference tool forced round_mode HALF_UP on every converted quantizer
(its framework op rounds only that way), so weights the DPU rounds
HALF_AWAY_FROM_ZERO silently got other values. Here a conversion keeps the
grid (bit_width, unsigned, narrow_range, per_channel, channel_axis, symmetry),
the zero point and the round mode, with scale exactly 2^-pos: 2^-pos and its
reciprocal are exact float32s for |pos| <= 126, so the new model computes the
same bits on every backend (the sign of a zero result aside, which the
kernels leave open). ``framework=True`` turns the framework op on only where
`qstrat.quantizers.params` allows it with the quantizer's own round mode and
bit width; elsewhere the report says why it stayed off. The framework op
rounds (x - min) / scale rather than x / scale, and x - min is rounded to
float32 first, so even where it is allowed an input within float rounding of
a tie can land one level over; the report says so for each such target.

The input model is not changed: the new one is rebuilt from its graph with
new quantizer layers and copies of the other layers, sharing kept (one
`QuantState` for the wrappers that shared one, one `FakeQuant` per shared
tensor quantizer), names, targets and ``enabled`` flags kept.

Example:
    >>> fs_model, report = to_float_scale(qmodel, framework=True)
    >>> print(report.table())
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qstrat.errors import ConfigError
from qstrat.graph.capture import capture
from qstrat.graph.rebuild import copier, copy_layer, rebuild
from qstrat.layers import FakeQuant, QuantizeWrapper, make_quantizer
from qstrat.layers.shared_state import QuantState
from qstrat.quantizers import FSQuantizer, MAFSQuantizer, Pof2SQuantizer, TQTQuantizer
from qstrat.quantizers.base import _to_numpy
from qstrat.quantizers.params import QuantizerParams

# 2^-pos and 2^pos are both normal float32s, so scale and 1 / scale are exact.
MAX_ABS_POSITION = 126
FRAMEWORK_NOTE = (
    "use_framework_quantizer on: Keras' op rounds (x - min) / scale, so an input within float32 "
    "rounding of a tie can land one level over"
)


@dataclass(frozen=True)
class TargetConversion:
    """One quantizer target: converted (``to_type`` set, with its position) or kept, and why."""

    layer: str  # as `qstrat.get_quantize_info` names it
    target: str  # "kernel", "bias", "output", "input_0", ...
    from_type: str
    to_type: str | None  # None: not converted
    position: int | list[int] | None = None  # the scale is 2^-position
    note: str = ""  # why it was not converted, or what a converted one should know


@dataclass
class ConvertReport:
    """Every quantizer target of the model, in graph order."""

    targets: list[TargetConversion] = field(default_factory=list)

    def converted(self) -> list[TargetConversion]:
        return [t for t in self.targets if t.to_type is not None]

    def not_converted(self) -> list[TargetConversion]:
        return [t for t in self.targets if t.to_type is None]

    def table(self) -> str:
        rows = [f"{'layer':<28} {'target':<10} {'from':<16} {'to':<16} detail"]
        for t in self.targets:
            detail = "" if t.position is None else f"scale 2^-pos, pos {t.position}"
            detail = "; ".join(s for s in (detail, t.note) if s)
            rows.append(f"{t.layer:<28} {t.target:<10} {t.from_type:<16} {t.to_type or '-':<16} {detail}")
        return "\n".join(rows)


@dataclass(frozen=True)
class _Plan:
    """A quantizer's new spec and state, and its report fields (``to_type`` None: kept as it was)."""

    spec: dict
    state: dict[str, np.ndarray]
    to_type: str | None = None
    position: int | list[int] | None = None
    note: str = ""


# A conversion: (quantizer, its state as NumPy) -> (new spec, new state, position, note), or why not.
Convert = Callable[[Any, dict], "tuple[dict, dict, np.ndarray, str] | str"]


def to_float_scale(qmodel, *, framework: bool = False):
    """Every Pof2S and TQT quantizer of ``qmodel`` as an `FSQuantizer` with scale 2^-pos: the same outputs.

    Args:
        qmodel: a quantized model (not changed).
        framework: set ``use_framework_quantizer`` on the converted quantizers
            where it is allowed (HALF_UP, bit_width 2 to 16); the report names
            the others. The framework op can round an input within float32
            rounding of a tie one level over (0.49999997 at step 1 gives 1,
            not 0), so its report entries say so.

    Returns:
        (the new model, a `ConvertReport`).
    """
    return _convert(qmodel, lambda q, state: _to_fs(q, state, framework))


def to_pof2s(qmodel):
    """Every TQT quantizer of ``qmodel`` as a `Pof2SQuantizer` at its trained position: the same outputs.

    Returns:
        (the new model, a `ConvertReport`).
    """
    return _convert(qmodel, _to_pof2s)


def _position(q, state) -> np.ndarray | str:
    """The integer position(s) of a power-of-2 quantizer's state, or why they cannot be a float32 scale."""
    pos = q.position(state) if isinstance(q, TQTQuantizer) else np.asarray(state["pos"], np.float64)
    if not np.all(pos == np.round(pos)):
        return f"its position {pos.tolist()} is not an integer"
    if np.any(np.abs(pos) > MAX_ABS_POSITION):
        return (
            f"its position {pos.tolist()} is outside [-{MAX_ABS_POSITION}, {MAX_ABS_POSITION}], "
            "so 2^-pos is no normal float32 scale"
        )
    return pos.astype(np.int64)


def _to_fs(q, state, framework: bool):
    if isinstance(q, (FSQuantizer, MAFSQuantizer)):
        return f"already a float-scale quantizer ({q.type_name})"
    if not isinstance(q, (Pof2SQuantizer, TQTQuantizer)):
        return f"{q.type_name} is not a power-of-2 quantizer"
    pos = _position(q, state)
    if isinstance(pos, str):
        return pos
    params = {k: v for k, v in q.get_config().items() if k in FSQuantizer.accepted}
    note = ""
    if framework:
        try:
            make_quantizer({"type": "FSQuantizer", "params": {**params, "use_framework_quantizer": True}})
        except ConfigError as e:
            note = f"use_framework_quantizer left off: {e.problem} (changing it would change the results)"
        else:
            params["use_framework_quantizer"] = True
            note = FRAMEWORK_NOTE
    zp = np.asarray(state.get("zero_point", np.zeros(pos.shape)), np.float32)
    new_state = {"scale": np.ldexp(np.ones(pos.shape), -pos).astype(np.float32), "zero_point": zp}
    return {"type": "FSQuantizer", "params": params}, new_state, pos, note


def _to_pof2s(q, state):
    if isinstance(q, Pof2SQuantizer):
        return "already a Pof2SQuantizer"
    if isinstance(q, (FSQuantizer, MAFSQuantizer)):
        return f"{q.type_name} has a float scale, which no power-of-2 position gives"
    if not isinstance(q, TQTQuantizer):
        return f"{q.type_name} is not a TQTQuantizer"
    pos = _position(q, state)
    if isinstance(pos, str):
        return pos
    params = {k: v for k, v in q.get_config().items() if k in Pof2SQuantizer.accepted}
    # The bounds only steer a later calibration; widened where the trained position lies outside them.
    params["min_quantize_pos"] = min(QuantizerParams.min_quantize_pos, int(pos))
    params["max_quantize_pos"] = max(QuantizerParams.max_quantize_pos, int(pos))
    return {"type": "Pof2SQuantizer", "params": params}, {"pos": pos.astype(np.float32)}, pos, ""


def _plan(spec: dict, q, variables: dict, convert: Convert) -> _Plan:
    state = {k: np.array(_to_numpy(v)) for k, v in variables.items()}
    done = convert(q, state)
    if isinstance(done, str):
        return _Plan(dict(spec), state, note=done)
    new_spec, new_state, pos, note = done
    return _Plan(new_spec, new_state, new_spec["type"], pos.tolist(), note)


def _fill(variables: dict, values: dict) -> None:
    for k, v in values.items():
        variables[k].assign(v)


def keep(q, state) -> str:
    """A `Convert` that keeps every quantizer as it is (for `_convert`'s copy with other layers)."""
    return "kept"


def _convert(qmodel, convert: Convert, layer_copy: Callable[[Any, Any], Any] | None = None):
    """A new model with each quantizer planned by ``convert`` and each wrapped layer copied by ``layer_copy``
    (``(layer, its graph node) -> new layer``; default `copy_layer`)."""
    graph = capture(qmodel)
    report = ConvertReport()
    copy = copier()
    made: dict[int, Any] = {}
    states: dict[int, tuple[QuantState, _Plan]] = {}  # id(old QuantState) -> (new one, its plan)
    fills: list[Callable[[], None]] = []  # run once the new layers are built

    def add(layer: str, target: str, q, plan: _Plan) -> None:
        report.targets.append(TargetConversion(layer, target, q.type_name, plan.to_type, plan.position, plan.note))

    def fake_quant(old: FakeQuant) -> FakeQuant:
        plan = _plan(old.quantizer_spec, old.quantizer, old.state, convert)
        for target in [old.target or old.name, *old.more_targets]:
            owner, _, what = target.partition("/")
            add(owner, what or "output", old.quantizer, plan)
        new = FakeQuant(
            plan.spec,
            target=old.target,
            more_targets=list(old.more_targets),
            name=old.name,
            trainable=old.trainable,
            dtype=old.dtype_policy,
        )
        enabled = np.array(_to_numpy(old.enabled))

        def fill():
            _fill(new.state, plan.state)
            new.enabled.assign(enabled)

        fills.append(fill)
        return new

    def shared(old: QuantState, plan: _Plan) -> QuantState:
        if id(old) not in states:
            # A fresh key: the saved model's sharing must not merge with the input model's in one load.
            key = f"{re.sub(r'#[0-9a-f]+$', '', old.key)}#{uuid.uuid4().hex[:12]}"
            states[id(old)] = (QuantState(plan.spec, key=key, name=old.name), plan)
        return states[id(old)][0]

    def wrapper(old: QuantizeWrapper, node) -> QuantizeWrapper:
        plans, sharing = {}, {}
        for attr, q in old.quantizers.items():
            source = old.shared_states.get(attr)
            if source is not None and id(source) in states:
                plans[attr] = states[id(source)][1]  # planned once, from the state all sharers read
            else:
                plans[attr] = _plan(old.weight_quantizers[attr], q, old.state[attr], convert)
            if source is not None:
                sharing[attr] = shared(source, plans[attr])
            add(old.layer.name, attr, q, plans[attr])
        new = QuantizeWrapper(
            copy_layer(old.layer) if layer_copy is None else layer_copy(old.layer, node),
            {attr: p.spec for attr, p in plans.items()},
            sharing,
            name=old.name,
            trainable=old.trainable,
            dtype=old.dtype_policy,
        )
        enabled = {attr: np.array(_to_numpy(v)) for attr, v in old.enabled.items()}

        def fill():
            for attr, plan in plans.items():
                if attr not in sharing:
                    _fill(new.state[attr], plan.state)
                new.enabled[attr].assign(enabled[attr])

        fills.append(fill)
        return new

    def op_for(node):
        op = node.op
        if not isinstance(op, (FakeQuant, QuantizeWrapper)):
            return copy(node)
        if id(op) not in made:
            made[id(op)] = fake_quant(op) if isinstance(op, FakeQuant) else wrapper(op, node)
        return made[id(op)]

    model = rebuild(graph, op_for)
    for fill in fills:
        fill()
    for state, plan in states.values():
        _fill(state.state, plan.state)
    return model, report
