"""Apply the DPU compiler's position constraints (`constraints`) to a calibrated quantized model.

Each rule whose key is on in ``refine_pipeline_config`` runs over the whole
model, in the reference tool's order (`constraints.RULES`), reading the
positions as the rules before it left them. Positions are read from and
written to the quantizers' own state: a tensor's position is the one of the
`FakeQuant` that quantizes it (looked up through Reshape, Flatten, Permute
and ZeroPadding, which keep their input's grid); a conv whose activation is
fused has the activation's output quantizer as its output position.

Rules skip what they cannot see: per-channel positions, tensors without a
power-of-2 quantizer (float, or float-scale), bypassed quantizers. A change
to a shared quantizer (``shared_quantizer``, or a tensor read by several
layers) applies to every user of it, as on the DPU, where a tensor has one
position. The model is changed in place; every change is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.graph.capture import capture
from qstrat.graph.ir import Graph, Node, TensorRef
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.layers.dpu import DPUHardSigmoid
from qstrat.passes.refine import constraints as C
from qstrat.quantizers import Pof2SQuantizer, TQTQuantizer

TRANSPARENT = ("Reshape", "Flatten", "Permute", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D")
CONV_LIKE = (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "Dense",
)
FUSED_ACTIVATIONS = ("ReLU", "LeakyReLU", "Activation")
MAX_ROUNDS = 10
POOLS = ("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D")


@dataclass(frozen=True)
class PositionChange:
    """One position a rule moved.

    ``layer`` is the layer the rule checked; ``quantizer`` the position it moved, as
    ``"<layer>/<target>"`` of `qstrat.get_quantize_info` (another layer's output for an input position).
    """

    rule: str
    layer: str
    quantizer: str
    old: int
    new: int

    def __str__(self) -> str:
        return f"{self.rule}: {self.layer}: {self.quantizer} position {self.old} -> {self.new}"


class _Slot:
    """A power-of-2 position held in a quantizer's state: read and write it as an int.

    Reads go through ``values`` (the model's cache of state values, by variable), so that the rules,
    which look at every position several times, read each variable from the backend once.
    """

    def __init__(self, quantizer, state: dict, target: str, values: _Values):
        self.quantizer, self.state, self.target, self.values = quantizer, state, target, values

    def get(self) -> int:
        if isinstance(self.quantizer, TQTQuantizer):
            return int(self.quantizer.position({"log_th": self.values.read(self.state["log_th"])}))
        return int(self.values.read(self.state["pos"]))

    def set(self, pos: int) -> None:
        if isinstance(self.quantizer, TQTQuantizer):
            value = self.quantizer._state(pos)["log_th"]
            self.values.write(self.state["log_th"], np.asarray(value, self.state["log_th"].dtype))
        else:
            self.values.write(self.state["pos"], np.asarray(pos, self.state["pos"].dtype))


class _Values:
    """Quantizer state variables' values, each read from the backend once; writes go to both."""

    def __init__(self):
        self._cache: dict[int, tuple[object, np.ndarray]] = {}  # id(variable) -> (variable, value)

    def read(self, var) -> np.ndarray:
        hit = self._cache.get(id(var))
        if hit is None:
            hit = self._cache[id(var)] = (var, to_numpy(var))
        return hit[1]

    def write(self, var, value: np.ndarray) -> None:
        var.assign(value)
        self._cache[id(var)] = (var, np.array(value))


def _slot(quantizer, state, target: str, enabled, values: _Values) -> _Slot | None:
    """The slot of a per-tensor, enabled power-of-2 quantizer; None for anything else."""
    if not isinstance(quantizer, (Pof2SQuantizer, TQTQuantizer)) or float(values.read(enabled)) < 0.5:
        return None
    if isinstance(quantizer, Pof2SQuantizer) and values.read(state["pos"]).size != 1:
        return None
    return _Slot(quantizer, state, target, values)


class _Model:
    """The quantized model's graph with position look-ups."""

    def __init__(self, qmodel):
        self.graph: Graph = capture(qmodel)
        self.changes: list[PositionChange] = []
        self.pinned: set[int] = set()  # the states alignment set: later rounds do not move them up
        self.values = _Values()

    def producer(self, ref: TensorRef) -> Node:
        return self.graph.node(ref.node)

    def tensor_slot(self, ref: TensorRef) -> _Slot | None:
        """The position of a tensor: its FakeQuant's, through layers that keep their input's grid."""
        node = self.producer(ref)
        while node.type_name in TRANSPARENT and node.inputs:
            node = self.producer(node.inputs[0])
        if isinstance(node.op, FakeQuant):
            fq = node.op
            return _slot(fq.quantizer, fq.state, fq.target or fq.name, fq.enabled, self.values)
        return None

    def readers(self, node: Node) -> list[Node]:
        return self.graph.consumers(TensorRef(node.name, 0))

    def output_slot(self, node: Node, through_activation: bool = False) -> tuple[_Slot | None, Node | None]:
        """The position of a layer's output: the FakeQuant right after it, or after its fused activation."""
        users = self.readers(node)
        if len(users) != 1:
            return None, None
        user = users[0]
        act = None
        if through_activation and user.type_name in FUSED_ACTIVATIONS and not isinstance(user.op, FakeQuant):
            act, nxt = user, self.readers(user)
            if len(nxt) != 1:
                return None, act
            user = nxt[0]
        if isinstance(user.op, FakeQuant):
            op = user.op
            return _slot(op.quantizer, op.state, op.target or op.name, op.enabled, self.values), act
        return None, act

    def weight_slot(self, node: Node, attr: str) -> _Slot | None:
        w = node.op
        if not isinstance(w, QuantizeWrapper) or attr not in w.quantizers:
            return None
        return _slot(w.quantizers[attr], w.state[attr], f"{w.layer.name}/{attr}", w.enabled[attr], self.values)

    def move(self, rule: str, layer: Node, slot: _Slot | None, new: int) -> None:
        if slot is None:
            return
        old = slot.get()
        if new != old:
            slot.set(new)
            owner, _, what = slot.target.partition("/")
            self.changes.append(PositionChange(rule, _layer_name(layer), f"{owner}/{what or 'output'}", old, new))


def _layer_name(node: Node) -> str:
    return node.op.layer.name if isinstance(node.op, QuantizeWrapper) else node.layer_name


def layer_type(node: Node) -> str:
    op = node.op.layer if isinstance(node.op, QuantizeWrapper) else node.op
    return type(op).__name__


def apply_constraints(qmodel, refine_config) -> list[PositionChange]:
    """Apply the rules ``refine_config`` switches on to ``qmodel``'s positions (in place); returns the changes.

    The rules run in the reference tool's order, then again while any of them
    moved a position: a later rule can break an earlier one's bound (pool
    alignment moves a concat's output; concat alignment moves a conv's
    input), and the reference tool's single pass left such layers in
    violation. Rules only lower alignment positions and clamp shifts, so this
    settles in a few rounds; if it has not after `MAX_ROUNDS`, the rules
    conflict on some tensor and a warning names them.
    """
    m = _Model(qmodel)
    rules = [r for r in C.RULES if refine_config.get(r)]
    for _ in range(MAX_ROUNDS):
        start = len(m.changes)
        for rule in rules:
            for node in m.graph.nodes:
                _RULES[rule](m, node)
        if len(m.changes) == start:
            break
    else:
        last = m.changes[start:]
        import warnings

        warnings.warn(
            f"the DPU position rules still moved positions after {MAX_ROUNDS} rounds, so some bounds may not "
            "hold: they conflict on "
            + ", ".join(sorted({f"{c.quantizer} ({c.rule})" for c in last})[:6])
            + ". Switch one of the conflicting rules off, or quantize those layers differently.",
            stacklevel=2,
        )
    return m.changes


def idle_rules(qmodel, refine_config) -> list[str]:
    """The rules switched on for a model without power-of-2 quantizers, where they have no position to adjust."""
    on = [r for r in C.RULES if refine_config.get(r)]
    if not on:
        return []
    for layer in qmodel.layers:
        quantizers = [layer.quantizer] if isinstance(layer, FakeQuant) else []
        quantizers += list(layer.quantizers.values()) if isinstance(layer, QuantizeWrapper) else []
        if any(isinstance(q, (Pof2SQuantizer, TQTQuantizer)) for q in quantizers):
            return []
    return on


def _sigmoid(m: _Model, node: Node) -> None:
    if not isinstance(node.op, DPUHardSigmoid):
        return
    ins, (out, _) = m.tensor_slot(node.inputs[0]), m.output_slot(node)
    if ins is None or out is None:
        return
    ipos, opos = C.sigmoid_positions(ins.get(), out.get())
    m.move("adjust_dpu_sigmoid", node, ins, ipos)
    m.move("adjust_dpu_sigmoid", node, out, opos)


def _merge_inputs(m: _Model, node: Node) -> list[_Slot] | None:
    if layer_type(node) not in ("Add", "Multiply") or len(node.inputs) < 2:
        return None
    slots = [m.tensor_slot(r) for r in node.inputs]
    return None if any(s is None for s in slots) else slots


def _shift_read(m: _Model, node: Node) -> None:
    slots = _merge_inputs(m, node)
    if slots:
        for slot, pos in zip(slots, C.shift_read([s.get() for s in slots]), strict=True):
            m.move("adjust_dpu_shift_read", node, slot, pos)


def _shift_write(m: _Model, node: Node) -> None:
    slots = _merge_inputs(m, node)
    out, _ = m.output_slot(node, through_activation=True)
    if not slots or out is None:
        return
    opos = C.shift_write([s.get() for s in slots], out.get())
    if opos > out.get() and id(out.state) in m.pinned:  # aligned: the inputs come down instead
        for slot in slots:
            m.move("adjust_dpu_shift_write", node, slot, min(slot.get(), out.get() - C.SHIFT_WRITE_RANGE[0]))
        return
    m.move("adjust_dpu_shift_write", node, out, opos)


def _source(m: _Model, ref: TensorRef) -> TensorRef:
    """The tensor a FakeQuant (or a chain of them) quantizes."""
    node = m.producer(ref)
    while isinstance(node.op, FakeQuant):
        ref = node.inputs[0]
        node = m.producer(ref)
    return ref


def _shift_swish(m: _Model, node: Node) -> None:
    if layer_type(node) != "Multiply" or len(node.inputs) != 2:
        return
    sources = [_source(m, r) for r in node.inputs]
    for k in (0, 1):
        hs = m.producer(sources[1 - k])
        if isinstance(hs.op, DPUHardSigmoid) and _source(m, hs.inputs[0]) == sources[k]:
            x, s = m.tensor_slot(node.inputs[k]), m.tensor_slot(node.inputs[1 - k])
            out, _ = m.output_slot(node, through_activation=True)
            if x is None or s is None or out is None:
                return
            opos = C.shift_swish(x.get(), s.get(), out.get())
            if opos > out.get() and id(out.state) in m.pinned:  # aligned: x, then the sigmoid, come down
                top = out.get() + C.SHIFT_SWISH_RANGE[1]
                m.move("adjust_dpu_shift_swish", node, x, max(min(x.get(), top - s.get()), C.SIGMOID_INPUT_RANGE[0]))
                m.move("adjust_dpu_shift_swish", node, s, max(top - x.get(), C.SIGMOID_MIN_OUTPUT))
                return
            m.move("adjust_dpu_shift_swish", node, out, opos)
            return


def _bits(slot: _Slot) -> int:
    return getattr(getattr(slot.quantizer, "params", None), "bit_width", 8)


def _conv(m: _Model, node: Node):
    """(input, kernel, bias, output slots, fused activation) of a conv-like layer, or None.

    None too when its input, kernel or output grid is wider than 8 bits (a ``layer_config`` int16, mixed
    precision): the shift rules model the DPU's 8-bit datapath and 24-bit accumulator, which such a layer
    does not run on, and applying them anyway moves 8-bit kernels far off their range.
    """
    if not isinstance(node.op, QuantizeWrapper) or layer_type(node) not in CONV_LIKE or not node.inputs:
        return None
    i, w = m.tensor_slot(node.inputs[0]), m.weight_slot(node, "kernel")
    out, act = m.output_slot(node, through_activation=True)
    if i is None or w is None or out is None or max(_bits(i), _bits(w), _bits(out)) > 8:
        return None
    return i, w, m.weight_slot(node, "bias"), out, act


def _shift_cut(m: _Model, node: Node) -> None:
    found = _conv(m, node)
    if found:
        i, w, _, out, _ = found
        m.move("adjust_dpu_shift_cut", node, w, C.shift_cut(w.get(), i.get(), out.get()))


def _shift_bias(m: _Model, node: Node) -> None:
    found = _conv(m, node)
    if found and found[2] is not None:
        i, w, b, out, _ = found
        m.move("adjust_dpu_shift_bias", node, b, C.shift_bias(w.get(), i.get(), b.get(), out.get()))


def _shift_bias_leakyrelu(m: _Model, node: Node) -> None:
    found = _conv(m, node)
    if found and found[2] is not None and found[4] is not None and found[4].type_name == "LeakyReLU":
        i, w, b, _, _ = found
        m.move("adjust_dpu_shift_bias_leakyrelu", node, b, C.shift_bias_leakyrelu(w.get(), i.get(), b.get()))


def _align_concat(m: _Model, node: Node) -> None:
    if layer_type(node) != "Concatenate":
        return
    slots = [m.tensor_slot(r) for r in node.inputs]
    out, _ = m.output_slot(node)
    if out is None or any(s is None for s in slots):
        return
    pos = C.align_concat([s.get() for s in slots], out.get())
    for s in [*slots, out]:
        m.move("align_concat", node, s, pos)
        m.pinned.add(id(s.state))


def _align_pool(m: _Model, node: Node) -> None:
    if not isinstance(node.op, tuple(_pool_classes())) or not node.inputs:
        return
    i, (out, _) = m.tensor_slot(node.inputs[0]), m.output_slot(node)
    if i is None or out is None:
        return
    pos = C.align_pool(i.get(), out.get())
    for s in (i, out):
        m.move("align_pool", node, s, pos)
        m.pinned.add(id(s.state))


def _pool_classes():
    import keras

    return [getattr(keras.layers, name) for name in POOLS]


_RULES = {
    "adjust_dpu_sigmoid": _sigmoid,
    "adjust_dpu_shift_read": _shift_read,
    "adjust_dpu_shift_write": _shift_write,
    "adjust_dpu_shift_swish": _shift_swish,
    "adjust_dpu_shift_cut": _shift_cut,
    "adjust_dpu_shift_bias": _shift_bias,
    "adjust_dpu_shift_bias_leakyrelu": _shift_bias_leakyrelu,
    "align_concat": _align_concat,
    "align_pool": _align_pool,
}
