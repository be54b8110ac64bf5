"""The pass sequences the API runs to build a quantized model and to calibrate and refine it.

`annotated` and `rebuild_quantized` make the quantized model from the
optimized graph: DPU layer versions, the strategy's quantizers by pattern, a
Keras model with its own layers. `calibrate_and_refine` then runs, in this
order: weight calibration, activation calibration, the DPU position
constraints, bias correction (then the constraints again, for the biases it
moved) and fast finetune. `qstrat.api.Quantizer` and `qstrat.qat` own the
progress stages' framing, the user's arguments and the results' attributes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from qstrat.graph import rebuild
from qstrat.graph.ir import Graph
from qstrat.graph.rebuild import copy_layer
from qstrat.layers import FakeQuant
from qstrat.passes.calibrate import calibrate_activations, quiet_probes
from qstrat.passes.dpu_versions import to_dpu_versions
from qstrat.passes.quantize import Annotation, QuantizeReport, annotate
from qstrat.passes.refine.bias_correction import (
    ONE_SHOT_MESSAGE,
    Correction,
    correct_biases,
    correctable,
    float_sums,
    is_one_shot,
)
from qstrat.passes.refine.fast_ft import FAST_FT_ONE_SHOT, FastFinetune, fast_finetune
from qstrat.passes.refine.positions import PositionChange, apply_constraints, idle_rules
from qstrat.passes.weight_calibration import calibrate_weights
from qstrat.progress import Progress
from qstrat.strategy import Strategy

# The warnings below name the user's call: it is this many frames up (the API method, then its helper).
_USER = 4


def annotated(graph: Graph, strategy: Strategy, custom_objects) -> tuple[Graph, Annotation]:
    """DPU layer versions, then the strategy's quantizers by pattern: (graph, annotation). Each DPU version made,
    or kept with its reason, is a note on its layer in the annotation's report."""
    graph, dpu = to_dpu_versions(graph, strategy.quantize)
    annotation = annotate(graph, strategy, custom_objects)
    for event in dpu.events:
        entry = annotation.report.layers.get(event.node)
        if entry is not None:
            entry.notes.append(f"DPU version: {event.detail}")
    return graph, annotation


def rebuild_quantized(qgraph: Graph, name: str):
    """The quantized graph as a Keras model whose layers are its own: copies of the float model's, the new ones
    (quantizers, DPU versions, wrappers) as they are."""
    copies: dict[int, object] = {}

    def op_for(node):
        if node.meta.get("own_op") or isinstance(node.op, FakeQuant) or type(node.op).__name__ == "InputLayer":
            return node.op
        if id(node.op) not in copies:
            copies[id(node.op)] = copy_layer(node.op)
        return copies[id(node.op)]

    return rebuild(qgraph, op_for=op_for, name=name)


@dataclass
class Refined:
    """What `calibrate_and_refine` did beyond calibration."""

    bias_corrections: list[Correction] = field(default_factory=list)
    position_changes: list[PositionChange] = field(default_factory=list)
    fast_finetune: FastFinetune | None = None


def calibrate_and_refine(
    qmodel,
    graph: Graph,
    taps,
    strategy: Strategy,
    data,
    steps,
    batch_size: int,
    verbose: int,
    progress: Progress,
    float_model,
    activations: bool = True,
    constraints: bool = True,
) -> Refined:
    """Calibrate ``qmodel``'s weights, then (with ``activations``) its activations on ``data``; the DPU position
    constraints (with ``constraints``), bias correction (``include_bias_corr``) and fast finetune
    (``include_fast_ft``, against ``float_model``)."""
    done = Refined()
    with progress.stage("weight calibration"):
        calibrate_weights(qmodel)
    if not activations:
        return done
    bias_corr = strategy.refine["include_bias_corr"]
    if bias_corr and is_one_shot(data):
        warnings.warn(ONE_SHOT_MESSAGE, stacklevel=_USER)
        bias_corr = False
    # Where bias correction measures every calibration sample, the calibration probe takes its float means.
    sums = float_sums(qmodel, graph, data, steps, batch_size) if bias_corr else None
    with quiet_probes():
        with progress.stage("activation calibration"):
            calibrate_activations(
                qmodel, graph, taps, data, steps, batch_size, strategy.quantize["calib_position_policy"], verbose,
                progress, sums,
            )  # fmt: skip
        if constraints:
            with progress.stage("position constraints"):
                done.position_changes = apply_constraints(qmodel, strategy.refine)
            for rule in idle_rules(qmodel, strategy.refine):
                warnings.warn(
                    f"refine_pipeline_config.{rule} = true does nothing: the model has no power-of-2 "
                    "quantizers, whose positions the DPU compiler constraints adjust.",
                    stacklevel=_USER,
                )
        if bias_corr and correctable(qmodel, graph):
            with progress.stage("bias correction"):
                done.bias_corrections = correct_biases(
                    qmodel, graph, data, steps, batch_size, verbose, progress, sums=sums
                )
            if constraints:  # a corrected bias gets a new position: the rules check it again
                done.position_changes += apply_constraints(qmodel, strategy.refine)
        # After bias correction: the layers it corrected are where fast finetune starts, and its check that
        # the outputs' error did not go up is then a check of the final model. Measured on the mini-Xception
        # (pof2s, act_eq): bias correction after fast finetune instead gave 0.9 dB less, and once more after
        # it 0.4 dB less.
        if strategy.refine["include_fast_ft"]:
            if is_one_shot(data):
                warnings.warn(FAST_FT_ONE_SHOT, stacklevel=_USER)
            else:
                with progress.stage("fast finetune"):
                    done.fast_finetune = fast_finetune(
                        qmodel, graph, data, strategy.refine, steps, batch_size, progress, float_model
                    )
    return done


def note_fast_finetune(report: QuantizeReport, result: FastFinetune | None) -> None:
    """Each finetuned block's error before and after, as a note on its layer in the quantize report; a warning
    (naming the caller's caller) where every block was put back."""
    if result is None:
        return
    for block in result.blocks:
        entry = report.layers.get(block.layer)
        if entry is not None:
            kept = "" if block.kept else ", not kept (no gain)"
            entry.notes.append(
                f"fast finetune: block MSE {block.mse_before:.3g} -> {block.mse_after:.3g} ({block.epochs} epochs{kept})"
            )
    if result.reverted:
        warnings.warn(
            f"fast finetune raised the model outputs' error against the float model ({result.output_mse_before:.4g} "
            f"-> {result.output_mse_after:.4g} on {result.samples} calibration samples): every layer was put back.",
            stacklevel=3,
        )
