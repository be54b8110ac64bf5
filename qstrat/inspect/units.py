"""The quantized layers of a quantized model, found from its quantizers, with the tensors analysis taps.

A *unit* is one layer of the float graph that carries quantizers in the
quantized model: the weights and bias of its `QuantizeWrapper` and the
`FakeQuant` layers whose target names it (``"conv1/output"``,
``"add/input_1"``). Its *tapped tensor* is what the layers after it read:
the output of its output quantizer, or else the layer's own output.

Every quantizer has an ``enabled`` flag (a variable), so one traced model
serves every analysis run: a run turns some flags on and the rest off, and
with a flag off the quantizer passes its input through exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.errors import ConfigError
from qstrat.layers import FakeQuant, QuantizeWrapper

BIG = 1e30  # far beyond any grid: a quantizer maps it to its grid's end


@dataclass
class Quant:
    """One quantizer of a unit: what it quantizes, its flag, and how to reach its state."""

    target: str  # "conv1/kernel", "relu1/output"
    kind: str  # weight | bias | output | input
    flag: object  # the enabled variable
    quantizer: object
    state: dict
    layer: object  # the FakeQuant, or the QuantizeWrapper
    attr: str | None = None  # the wrapper's attribute
    call: int = 0  # which call of a shared FakeQuant
    input: object = None  # a FakeQuant call's input: the tensor it quantizes

    @property
    def bit_width(self) -> int | None:
        return getattr(getattr(self.quantizer, "params", None), "bit_width", None)

    def grid_ends(self, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest values the quantizer can give, broadcastable against a tensor like ``like``.

        Found by quantizing ``-BIG`` and ``+BIG``: it works for any quantizer,
        per tensor or per channel, custom ones included.
        """
        from keras import ops

        probe = np.full(like.shape, BIG, np.float32)
        lo = np.asarray(ops.convert_to_numpy(self.quantizer(ops.convert_to_tensor(-probe), self.state)), np.float64)
        hi = np.asarray(ops.convert_to_numpy(self.quantizer(ops.convert_to_tensor(probe), self.state)), np.float64)
        return lo, hi


@dataclass
class Unit:
    """A layer of the float graph with its quantizers in the quantized model."""

    name: str
    layer_type: str
    quants: list[Quant] = field(default_factory=list)
    tap: object = None  # the symbolic tensor the next layers read

    @property
    def kinds(self) -> set[str]:
        return {"weight" if q.kind in ("weight", "bias") else "activation" for q in self.quants}

    def flags(self, kind: str | None = None) -> list:
        """The unit's flags: all, or those of ``"weight"`` (weights and biases) or ``"activation"`` quantizers."""
        out = []
        for q in self.quants:
            mine = "weight" if q.kind in ("weight", "bias") else "activation"
            if (kind is None or kind == mine) and all(q.flag is not f for f in out):
                out.append(q.flag)
        return out


def model_nodes(model) -> list:
    """The model's own call nodes, inputs first (the order of its layers' calls)."""
    by_depth = model._nodes_by_depth
    return [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]]


def find_units(qmodel) -> list[Unit]:
    """Every unit of ``qmodel``, in model order, with its quantizers and tapped tensor."""
    import keras

    if not isinstance(qmodel, keras.Model) or not hasattr(qmodel, "_nodes_by_depth"):
        raise ConfigError("analyze", f"expected a quantized functional keras.Model, got {type(qmodel).__name__}", None)
    units: dict[str, Unit] = {}
    outputs: dict[str, object] = {}  # layer name -> its output tensor
    out_fq: dict[str, object] = {}  # owner -> the output of its output quantizer
    calls: dict[int, int] = {}
    for node in model_nodes(qmodel):
        op = node.operation
        if isinstance(op, QuantizeWrapper):
            name = op.layer.name
            unit = units.setdefault(name, Unit(name, type(op.layer).__name__))
            for attr, q in op.quantizers.items():
                kind = "bias" if attr == "bias" else "weight"
                unit.quants.append(Quant(f"{name}/{attr}", kind, op.enabled[attr], q, op.state[attr], op, attr))
            outputs[name] = node.output_tensors[0]
        elif isinstance(op, FakeQuant):
            k = calls.get(id(op), 0)
            calls[id(op)] = k + 1
            targets = [op.target or op.name, *op.more_targets]
            target = targets[min(k, len(targets) - 1)]
            owner, _, what = target.partition("/")
            what = what or "output"
            kind = "input" if what.startswith("input") else "output"
            unit = units.setdefault(owner, Unit(owner, ""))
            unit.quants.append(
                Quant(
                    f"{owner}/{what}", kind, op.enabled, op.quantizer, op.state, op, call=k, input=node.input_tensors[0]
                )
            )
            if kind == "output":
                out_fq[owner] = node.output_tensors[0]
        else:
            outputs.setdefault(op.name, node.output_tensors[0])
    layer_types = {n.operation.name: type(n.operation).__name__ for n in model_nodes(qmodel)}
    for unit in units.values():
        unit.tap = out_fq.get(unit.name, outputs.get(unit.name))
        if not unit.layer_type:
            unit.layer_type = layer_types.get(unit.name, "")
    found = [u for u in units.values() if u.quants and u.tap is not None]
    if not found:
        raise ConfigError(
            "analyze", f"{qmodel.name} has no quantizers", "Pass the model quantize_model or get_qat_model returned."
        )
    return found


class Flags:
    """Every quantizer flag of a model and every bias correction in it, restored by ``restore``.

    The float reference is the quantized model with every quantizer bypassed
    and every bias correction taken back out (`QuantizeWrapper.corrections`):
    with the corrections left in, the reference would carry the very mean
    shift they compensate, and hide their effect.
    """

    def __init__(self, qmodel):
        from qstrat.layers import FakeQuant, QuantizeWrapper

        self.flags, self.corrections = [], []  # corrections: (variable, what was added)
        inner = {layer.layer.name: layer.layer for layer in qmodel.layers if isinstance(layer, QuantizeWrapper)}
        for layer in qmodel.layers:
            if isinstance(layer, FakeQuant):
                self.flags.append(layer.enabled)
            elif isinstance(layer, QuantizeWrapper):
                self.flags.extend(layer.enabled.values())
                for where, added in layer.corrections.items():
                    if where == "bias":
                        var = layer.layer.bias
                    else:
                        bn_name = where.rsplit(".", 1)[0]
                        bn = inner.get(bn_name) or qmodel.get_layer(bn_name)
                        var = bn.moving_mean
                    self.corrections.append((var, np.asarray(added, np.float64)))
        self.initial = {id(f): float(to_numpy(f)) for f in self.flags}
        self.values = {id(v): np.array(to_numpy(v)) for v, _ in self.corrections}

    def only(self, flags: list | None, corrections: bool = False) -> None:
        """Bypass every quantizer except ``flags`` (at their initial values) and take every bias correction
        out unless ``corrections``; ``None``: the model as it came.

        A layer alone runs without its bias correction too: the correction compensates the mean shift of
        every quantized layer upstream of it as well, so on its own it would over-correct.
        """
        keep = None if flags is None else {id(f) for f in flags}
        for f in self.flags:
            f.assign(self.initial[id(f)] if keep is None or id(f) in keep else 0.0)
        for var, added in self.corrections:
            value = self.values[id(var)]
            if flags is not None and not corrections:
                value = (value.astype(np.float64) - added.reshape(value.shape)).astype(value.dtype)
            var.assign(value)

    def restore(self) -> None:
        self.only(None)
