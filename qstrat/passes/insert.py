"""The quantize pass, its second half: put the quantizers `qstrat.passes.quantize.annotate` decided into a new graph.

`insert` returns a new graph in which

- layers with weight or bias targets are replaced by a `QuantizeWrapper`
  around a copy of the layer;
- output targets get a `FakeQuant` node after the layer (model inputs too,
  from ``input_quantize_config``);
- input targets get a `FakeQuant` node on that input, unless the producer's
  output is quantized already;
- tensor targets sharing a quantizer share one `FakeQuant` layer; weight and
  bias targets sharing one share one `QuantState` (its variables).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace

from qstrat.errors import ConfigError
from qstrat.graph.ir import Graph, Node, TensorRef, is_float_dtype, taken_names, unique_name
from qstrat.graph.rebuild import copy_layer
from qstrat.layers import FakeQuant, QuantizeWrapper, QuantState
from qstrat.passes.quantize import Annotation
from qstrat.passes.reads import input_indices
from qstrat.strategy import ResolvedTarget


def _spec(t: ResolvedTarget) -> dict:
    return {"type": t.quantizer_type, "params": dict(t.params)}


def insert(graph: Graph, annotation: Annotation) -> tuple[Graph, dict[str, tuple[TensorRef, ...]]]:
    """A new graph with wrappers and FakeQuant nodes where the annotation says.

    Also returns, for each FakeQuant layer (by name), the tensors of the float
    graph it quantizes: calibration observes those.
    """
    wrappers: dict[int, object] = {}
    shared_fq: dict[str, FakeQuant] = {}
    nodes: list[Node] = []
    renamed: dict[TensorRef, TensorRef] = {}
    quantized_refs: set[TensorRef] = set()
    taps: dict[int, list[TensorRef]] = {}  # FakeQuant -> the float tensors it quantizes
    names = taken_names(graph)

    def unique(name: str) -> str:
        return unique_name(name, names)

    firsts: dict[str, tuple] = {}  # shared key -> (kind, target, quantizer, ResolvedTarget) of its first target
    holders: dict[str, QuantState] = {}

    def check_shared(t: ResolvedTarget, target: str) -> None:
        """One shared state serves targets of one kind (weights and biases, or tensors), with one quantizer."""
        kind = "weight" if t.target_type in ("weight", "bias") else "tensor"
        quantizer = t.build(target)
        first = firsts.setdefault(t.shared_key, (kind, target, quantizer, t))
        if first[0] != kind:
            raise ConfigError(
                target,
                f'shares the quantizer "{t.shared_key}" with {first[1]}, a {"weight or bias" if first[0] == "weight" else "layer output or input"}',
                "A shared quantizer serves either weights and biases (one shared state) or tensors (one "
                "FakeQuant layer), not both: give the two kinds separate quantizers.",
            )
        if quantizer != first[2]:
            mine, theirs = quantizer.get_config(), first[2].get_config()
            diff = [k for k in {**mine, **theirs} if mine.get(k) != theirs.get(k)] or ["type"]
            said = "; ".join(
                f"{k}: {theirs.get(k)!r} there ({first[3].sources.get(k, 'default')}), {mine.get(k)!r} here "
                f"({t.sources.get(k, 'default')})"
                for k in diff
            )
            raise ConfigError(
                target,
                f'shares the quantizer "{t.shared_key}" with {first[1]}, but other settings reach it: {said}',
                "Targets that share one state need one quantizer: make the setting apply to both "
                "(or to neither), e.g. a layer_config or handy key for both layers.",
            )

    def shared_state(t: ResolvedTarget, target: str) -> QuantState:
        check_shared(t, target)
        if t.shared_key not in holders:
            name = unique(re.sub(r"[^A-Za-z0-9_.-]", "_", t.shared_key) + "_shared")
            # The key names the sharing in saved models: unique to this model, so two models loaded at once never merge.
            key = f"{t.shared_key}#{uuid.uuid4().hex[:12]}"
            holders[t.shared_key] = QuantState(_spec(t), key=key, name=name)
        return holders[t.shared_key]

    def fake_quant(t: ResolvedTarget, target: str) -> FakeQuant:
        if t.shared_key:
            check_shared(t, target)
        if t.shared_key and t.shared_key in shared_fq:
            fq = shared_fq[t.shared_key]
            fq.more_targets.append(target)
            return fq
        fq = FakeQuant(_spec(t), target=target, name=unique(re.sub(r"[^A-Za-z0-9_.-]", "_", target) + "_q"))
        if t.shared_key:
            shared_fq[t.shared_key] = fq
        return fq

    for node in graph.nodes:
        cfg = annotation.configs[node.name]
        targets = cfg.targets if cfg.quantized else ()
        inputs = [renamed.get(r, r) for r in node.inputs]
        # Input targets: quantize what this node reads, unless it is quantized already.
        for t in (t for t in targets if t.target_type == "input" and node.inputs):
            idx = input_indices(t.target_name, len(inputs))
            for i in idx:
                if i >= len(inputs) or inputs[i] in quantized_refs or not is_float_dtype(node.input_dtype(i)):
                    continue
                fq = fake_quant(t, f"{node.name}/input_{i}")
                fq_node = Node(fq.name, fq, (inputs[i],))
                taps.setdefault(id(fq), []).append(node.inputs[i])
                nodes.append(fq_node)
                inputs[i] = TensorRef(fq_node.name, 0)
                quantized_refs.add(inputs[i])
        op = node.op
        if cfg.dtype is not None:  # layer_config keeps this layer in another float type
            if id(node.op) not in wrappers:
                wrappers[id(node.op)] = copy_layer(node.op, dtype=cfg.dtype)
            op = wrappers[id(node.op)]
        weights = [t for t in targets if t.target_type in ("weight", "bias")]
        if weights:
            if id(node.op) not in wrappers:
                shape = node.in_tensors[0].shape if len(node.in_tensors) == 1 else None
                shared = {
                    t.target_name: shared_state(t, f"{node.name}/{t.target_name}") for t in weights if t.shared_key
                }
                wrappers[id(node.op)] = QuantizeWrapper(
                    copy_layer(node.op, shape),
                    {t.target_name: _spec(t) for t in weights},
                    shared,
                    name=unique(f"quant_{node.layer_name}"),
                )
            op = wrappers[id(node.op)]
        new = replace(node, op=op, inputs=tuple(inputs), meta=dict(node.meta))
        if op is not node.op:
            new.meta["own_op"] = True  # a new layer of the quantized model: rebuild calls it as it is
        nodes.append(new)
        outputs = [t for t in targets if t.target_type == "output" or (t.target_type == "input" and not node.inputs)]
        if outputs:
            t = outputs[0]
            fq = fake_quant(t, f"{node.name}/output")
            used = any(n.op is fq for n in nodes)
            fq_node = Node(unique(fq.name + "@call") if used else fq.name, fq, (TensorRef(node.name, 0),))
            taps.setdefault(id(fq), []).append(TensorRef(node.name, 0))
            nodes.append(fq_node)
            renamed[TensorRef(node.name, 0)] = TensorRef(fq_node.name, 0)
            quantized_refs.add(TensorRef(fq_node.name, 0))
    outputs = tuple(renamed.get(r, r) for r in graph.outputs)
    fqs = {id(n.op): n.op for n in nodes if isinstance(n.op, FakeQuant)}
    return Graph(tuple(nodes), graph.inputs, outputs, graph.name, graph.structure), {
        fqs[k].name: tuple(v) for k, v in taps.items()
    }
