"""What quantized layers read: float tensors no quantizer grids, and input targets on tensors already quantized.

A power-of-2 strategy quantizes what layers write; a layer no pattern
matches (a Rescaling after an integer model input, a Lambda, an attention
layer) writes float values, and the layer after it then computes on them,
where an integer accelerator reads integers. `note_float_reads` follows each
float tensor through the layers that keep their input's grid back to where it
comes from, notes each such read in the quantize report and warns once.

An input target on a tensor that its producer's output quantizer already
quantizes is not inserted (the tensor is read on that grid);
`drop_requantized_inputs` takes it out of the layer's config, so the report
and `get_quantize_info` say what the model does, and warns where it asked
for another quantizer than the one there.
"""

from __future__ import annotations

from dataclasses import replace

from qstrat.errors import warn_at_caller
from qstrat.graph.ir import Graph, Node, TensorRef, is_float_dtype
from qstrat.strategy import LayerQuantConfig

# Layers that only move or pick their input's values: what they write is on their input's grid, pattern or not.
KEEPS_GRID = ("Cropping", "GlobalMaxPooling", "MaxPooling", "RepeatVector", "Identity", "Reshape", "Flatten", "Permute")


def note_float_reads(graph: Graph, configs: dict[str, LayerQuantConfig], notes: dict[str, list[str]]) -> None:
    """Warn where a layer with quantized weights reads a float tensor that comes, through layers that keep their
    input's grid, from a layer no pattern matches (a Rescaling after an integer input, a Lambda): no quantizer
    puts it on a grid, so that layer computes on float values where an integer accelerator reads integers."""

    origin: dict[TensorRef, str | None] = {}  # float tensor -> the unmatched layer it comes from (None: on a grid)
    found: list[tuple[Node, str]] = []
    for node in graph.nodes:
        cfg = configs[node.name]
        read = [
            origin.get(r) if i not in _input_targets(node, cfg) else None
            for i, r in enumerate(node.inputs)
            if is_float_dtype(node.input_dtype(i))
        ]
        if cfg.quantized and any(t.target_type == "weight" for t in cfg.targets):
            found += [(node, o) for o in dict.fromkeys(read) if o is not None]
        if _output_target(graph, configs, node.name) is not None:
            here = None
        elif (cfg.quantized and not cfg.targets) or node.type_name.startswith(KEEPS_GRID):  # keeps its input's grid
            here = next((o for o in read if o is not None), None)
        elif not cfg.quantized and node.type_name != "InputLayer" and (cfg.skip_reason or "").startswith("no pattern"):
            here = node.layer_name
        else:
            continue
        for k in range(node.num_outputs):
            origin[TensorRef(node.name, k)] = here
    for reader, source in found:
        notes[reader.name].append(f"reads {source}'s output in float: no quantizer puts it on a grid")
    if found:
        pairs = ", ".join(f"{r.layer_name} reads {s}" for r, s in found[:6]) + (", ..." if len(found) > 6 else "")
        warn_at_caller(
            f"{pairs}: layers with quantized weights read float values that no quantizer puts on a grid (no pattern "
            "of the strategy matches the layer they come from), where an integer accelerator reads integers. To "
            "quantize what such a layer reads, name it in input_layers where it starts the part to quantize, or "
            "give the layer it reads a pattern with an output quantizer in layer_quantize_config."
        )


def input_indices(target_name: str, count: int) -> list[int]:
    """The inputs an input target names: all ``count`` for "input", i for "input_i" (which may be out of range)."""
    return list(range(count)) if target_name == "input" else [int(target_name.split("_")[1])]


def _input_targets(node: Node, cfg: LayerQuantConfig) -> set[int]:
    """The inputs ``node``'s own input targets quantize."""
    out: set[int] = set()
    for t in cfg.targets if cfg.quantized else ():
        if t.target_type == "input" and node.inputs:
            out |= set(input_indices(t.target_name, len(node.inputs)))
    return out


def _output_target(graph: Graph, configs: dict[str, LayerQuantConfig], name: str):
    """The target that quantizes what node ``name`` writes (a model input's own), or None."""
    cfg = configs[name]
    ends = ("output", "input") if not graph.node(name).inputs else ("output",)
    return next((t for t in cfg.targets if t.target_type in ends), None) if cfg.quantized else None


def drop_requantized_inputs(graph: Graph, configs: dict[str, LayerQuantConfig], notes: dict[str, list[str]]) -> None:
    """Take out input targets whose every input is already quantized by its producer's output quantizer (as
    `qstrat.passes.insert` skips them), with a note; warn where such a target asked for another quantizer."""

    differ = []
    for node in graph.nodes:
        cfg = configs[node.name]
        keep = []
        for t in cfg.targets if cfg.quantized else ():
            if t.target_type != "input" or not node.inputs:
                keep.append(t)
                continue
            idx = input_indices(t.target_name, len(node.inputs))
            there = {i: _output_target(graph, configs, node.inputs[i].node) for i in idx if node.inputs[i].index == 0}
            there = {i: q for i, q in there.items() if q is not None}
            for i, q in there.items():
                producer = graph.node(node.inputs[i].node).layer_name
                notes[node.name].append(f"{t.target_name}: {producer}'s output quantizer already quantizes input {i}")
                if (q.quantizer_type, dict(q.params)) != (t.quantizer_type, dict(t.params)):
                    differ.append(f"{node.layer_name}.{t.target_name} (input {i}, already quantized by {producer})")
            if len(there) < len(idx):
                keep.append(t)
        if len(keep) < len(cfg.targets if cfg.quantized else ()):
            configs[node.name] = replace(cfg, targets=tuple(keep))
    if differ:
        warn_at_caller(
            f"{', '.join(differ[:6])}{', ...' if len(differ) > 6 else ''}: these input targets read a tensor its "
            "producer's output quantizer already quantizes, so they are not inserted and their settings do "
            "nothing; that tensor keeps the producer's. Set them on the producer's output, or drop the target."
        )
