"""Bias correction: remove the per-channel mean shift that quantization adds to conv and dense outputs.

Quantized weights and activations move the mean of a layer's output: for
output channel c, ``E[y_q - y_f]_c`` over the calibration data is usually not
zero, and every layer after it inherits the shift. This pass measures the
shift on the quantized model against the float model and removes it:

- from the layer's bias, whose quantizer state is then recomputed;
- or, for a layer with no bias followed by a BatchNormalization (the fs
  strategy keeps BN unfolded), from that BN: ``moving_mean += shift``.

Each layer must be measured with every layer upstream of it already
corrected, so the layers are grouped in levels (a layer's level is one more
than the highest level upstream of it; parallel branches share a level),
and the calibration samples are cut into one segment per level
(`qstrat.passes.refine.schedule`): a fixed number of passes over the data,
whatever the depth. Simultaneous updates of all levels, the obvious
alternative, diverge: a shift corrected upstream would be corrected again
downstream.

For in-memory arrays the float side comes from the calibration pass, so the
passes here run only the quantized model: its frozen copy, on TensorFlow cut
into stages so that a level's batches run only the layers up to that level
(`qstrat.passes.staged`). Other sources are measured on the float and the
quantized model in one probe (so shuffled or augmented data is fine).
Either way the data must be re-iterable (an array, a tf.data.Dataset or a
PyDataset). With a one-shot generator the API skips this pass with a
warning that says how to get it.
The reference tool's version of this pass was disabled and added the shift
instead of subtracting it; here a test checks the sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qstrat.calibration.data import is_one_shot, iterate_batches  # noqa: F401 - is_one_shot: the API's too
from qstrat.errors import CalibrationDataError
from qstrat.graph.ir import Graph, TensorRef, taken_names, unique_name
from qstrat.layers import QuantizeWrapper
from qstrat.passes.frozen import Frozen
from qstrat.passes.refine.schedule import FloatSide, Schedule, _sample_stream, _segments
from qstrat.passes.runner import BatchRunner, graph_probe
from qstrat.progress import Progress


@dataclass(frozen=True)
class Correction:
    layer: str
    where: str  # "bias" | "<bn name>.moving_mean"
    max_abs_shift: float


ONE_SHOT_MESSAGE = (
    "bias correction (include_bias_corr) was skipped: it reads the calibration data again after "
    "calibration, and a generator can be read only once. Pass an array, a tf.data.Dataset or a keras.utils.PyDataset "
    "to get it, or set include_bias_corr=False to silence this warning."
)


def _channel_means(model, pieces, channels: list[int]) -> list[np.ndarray]:
    """Per tensor of the probe (``channels`` each), its per-channel mean over the pieces."""
    from qstrat.layers.probe import split_channels

    sums, counts = None, None
    for piece in pieces:
        packed, n = model(piece)
        batch = np.sum(packed, axis=0, dtype=np.float64)
        sums = batch if sums is None else sums + batch
        counts = len(packed) * np.asarray(n, np.float64) + (0.0 if counts is None else counts)
    return [total / n for total, n in zip(split_channels(sums, channels), counts, strict=True)]


def _targets(qmodel, float_graph: Graph):
    """(wrapper, float tensor, BN layer or None) for every correctable conv/dense called once."""
    by_layer = {}
    for node in float_graph.nodes:
        by_layer.setdefault(node.layer_name, []).append(node)
    out = []
    for layer in qmodel.layers:
        if not isinstance(layer, QuantizeWrapper) or len(layer._inbound_nodes) != 1:
            continue
        nodes = by_layer.get(layer.layer.name, [])
        if len(nodes) != 1:
            continue
        node = nodes[0]
        bn = None
        if not getattr(layer.layer, "use_bias", False):
            users = float_graph.consumers(TensorRef(node.name, 0))
            if len(users) != 1 or users[0].type_name != "BatchNormalization":
                continue
            try:
                bn = qmodel.get_layer(users[0].layer_name)
            except ValueError:
                continue
        out.append((layer, TensorRef(node.name, 0), bn))
    return out


@dataclass
class Plan:
    """What bias correction will measure: targets grouped by level, and for arrays the float side to gather."""

    targets: list  # (wrapper, float TensorRef, BN layer or None), sorted by level
    levels: list[int]
    float_side: FloatSide | None = None  # in-memory arrays: float sums gathered by calibration (with the schedule)

    @property
    def channels(self) -> list[int]:
        """Output channels of each target."""
        return [wrapper.output.shape[-1] for wrapper, _, _ in self.targets]


def make_plan(qmodel, float_graph: Graph, data, steps=None, batch_size=32) -> Plan | None:
    """The plan for ``qmodel``, or None when no layer can be corrected.

    For in-memory arrays the sample count is known up front, so the plan
    carries a `FloatSide` for the calibration pass to fill.
    """
    from qstrat.calibration.data import array_bundle
    from qstrat.passes.calibrate import input_specs

    targets = _targets(qmodel, float_graph)
    if not targets:
        return None
    levels = _levels(float_graph, [ref.node for _, ref, _ in targets])
    order = sorted(range(len(targets)), key=lambda k: levels[k])  # probe outputs grouped by level
    targets, levels = [targets[k] for k in order], [levels[k] for k in order]
    arrays = None if is_one_shot(data) else array_bundle(data, input_specs(qmodel))
    if arrays is None:
        return Plan(targets, levels)
    samples = len(arrays[0]) if steps is None else min(len(arrays[0]), steps * batch_size)
    schedule = Schedule.plan(samples, max(levels) + 1, batch_size)
    plan = Plan(targets, levels)
    plan.float_side = FloatSide([ref for _, ref, _ in targets], plan.channels, levels, schedule)
    return plan


def correct_biases(
    qmodel,
    float_graph: Graph,
    data,
    steps=None,
    batch_size=32,
    verbose=1,
    samples: int | None = None,
    progress=None,
    plan: Plan | None = None,
) -> list[Correction]:
    """Correct the output mean of every quantized conv/dense layer, level by level. Returns what changed.

    ``samples``: how many samples the calibration data holds (as calibration
    counted them); counted here with one read of the data when not given.
    ``plan``: from `make_plan`, its `FloatSide` filled by the calibration pass
    (made here, without one, when not given).
    """
    from qstrat.passes.calibrate import input_specs, weight_groups

    if is_one_shot(data):
        raise CalibrationDataError(ONE_SHOT_MESSAGE.replace("was skipped", "cannot run"))
    plan = plan or make_plan(qmodel, float_graph, None)
    if plan is None:
        return []
    specs = input_specs(qmodel)
    if samples is None:
        samples = sum(len(b[0]) for b in iterate_batches(data, specs, batch_size, steps))
    targets, levels = plan.targets, plan.levels
    float_side = plan.float_side
    schedule = float_side.schedule if float_side is not None else Schedule.plan(samples, max(levels) + 1, batch_size)
    channels = plan.channels
    frozen = Frozen(qmodel)
    groups = {(id(w), a): g for g in weight_groups(qmodel) for w, a in g}
    staged = _staged(frozen, targets, levels) if float_side is not None else None
    probe = _probe(frozen, float_graph, targets, paired=float_side is None) if staged is None else None
    stream = _sample_stream(data, specs, batch_size, steps, samples)
    done = []
    progress = progress or Progress(verbose)
    what = f"{len(targets)} layers in {schedule.levels} levels, {schedule.segment} samples each"
    bar = progress.data_pass(schedule.levels, "level", schedule.passes, what)
    for level, pieces in _segments(stream, schedule):
        first = levels.index(level)
        count = levels.count(level)
        if float_side is None:
            means = _channel_means(probe, pieces, [c for c in channels for _ in range(2)])
            shifts = [means[2 * j + 1] - means[2 * j] for j in range(first, first + count)]
        elif staged is None:
            quantized = _channel_means(probe, pieces, channels)[first : first + count]
            shifts = [q - f for q, f in zip(quantized, float_side.means(first, count), strict=True)]
        else:  # the stage of this level's targets, and the stages before it
            stage = staged.stage_of_level[level]
            mine = staged.targets[stage]
            quantized = _channel_means(
                lambda piece, stage=stage: staged(piece, stage), pieces, [channels[i] for i in mine]
            )
            quantized = quantized[first - mine[0] : first - mine[0] + count]
            shifts = [q - f for q, f in zip(quantized, float_side.means(first, count), strict=True)]
        for j in range(count):
            wrapper, _, bn = targets[first + j]
            group = groups.get((id(wrapper), "bias"), [])
            done.append(_correct(targets[first + j], shifts[j], group))
            if bn is None:
                for w, attr in group or [(wrapper, "bias")]:  # a shared bias state changes every sharer's value
                    frozen.sync(w, [attr])  # only biases changed: the kernels' copies stand
            else:
                frozen.sync(bn)
        bar.update(level + 1)
    return done


def _staged(frozen: Frozen, targets, levels):
    """On TensorFlow, the frozen copy cut into stages along the levels (`StagedSums`); else None."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    from qstrat.passes.staged import StagedSums, stage_count

    refs = [frozen.ref(w) for w, _, _ in targets]
    return StagedSums(frozen.graph, frozen.op_for(False), refs, levels, stage_count(max(levels) + 1))


def _probe(frozen: Frozen, float_graph: Graph, targets, paired: bool) -> BatchRunner:
    """Channel sums of every target's quantized output; with ``paired``, its float output's first.

    The quantized outputs come from the frozen copy of the quantized model
    (weights fake-quantized once: a smaller graph, the same values). Paired,
    one probe computes the float and the quantized outputs of the same batch,
    so shuffled or augmented data cannot make the two means come from
    different samples. In a Keras model (backends other than TensorFlow) the
    float model is one operation of the probe, so its layers keep their
    names; the probe's own operations take names that nothing in either
    model has.
    """
    from qstrat.graph import rebuild
    from qstrat.graph.rebuild import run_graph
    from qstrat.layers.probe import SampleChannelSums

    names = taken_names(float_graph, frozen.qmodel)
    sums = SampleChannelSums(name=unique_name("qstrat_channel_sums", names))
    refs = [frozen.ref(w) for w, _, _ in targets]
    float_refs = [ref for _, ref, _ in targets]

    def body(inputs, symbolic):
        quantized = frozen.outputs(inputs, refs, symbolic)
        if not paired:
            return sums(quantized)
        if symbolic:
            float_model = rebuild(float_graph, outputs=float_refs, name=unique_name("qstrat_float_reference", names))
            floats = float_model(inputs[0] if len(inputs) == 1 else inputs)
            floats = list(floats) if isinstance(floats, (list, tuple)) else [floats]
        else:
            floats = run_graph(float_graph, inputs, float_refs, symbolic)
        return sums([t for pair in zip(floats, quantized, strict=True) for t in pair])

    return graph_probe(frozen.graph, body, unique_name("qstrat_bias_correction_probe", names))


def _levels(graph: Graph, target_nodes: list[str]) -> list[int]:
    """Per target: 1 + the highest level among the targets upstream of it (0 if none)."""
    index = {name: k for k, name in enumerate(target_nodes)}
    upstream: dict[str, set[str]] = {}
    for node in graph.nodes:
        ups: set[str] = set()
        for r in node.inputs:
            ups |= upstream[r.node]
            if r.node in index:
                ups.add(r.node)
        upstream[node.name] = ups
    level: dict[str, int] = {}
    for node in graph.nodes:  # topological order
        if node.name in index:
            level[node.name] = 1 + max((level[u] for u in upstream[node.name]), default=-1)
    return [level[name] for name in target_nodes]


def _correct(target, shift: np.ndarray, group) -> Correction:
    """Move the target's bias (or its BatchNormalization mean) by ``shift``; recalibrate the bias quantizer's
    ``group`` (`weight_groups`: the targets that use its state), if the bias has a quantizer."""
    from qstrat.passes.calibrate import calibrate_weight_group

    wrapper, _, bn = target
    if bn is None:
        bias = wrapper.layer.bias
        new = bias.numpy().astype(np.float64) - shift
        bias.assign(new.astype(bias.dtype))
        wrapper.record_correction("bias", -shift)
        if group:
            calibrate_weight_group(group)
        where = "bias"
    else:
        mean = bn.moving_mean
        mean.assign((mean.numpy().astype(np.float64) + shift).astype(mean.dtype))
        where = f"{bn.name}.moving_mean"
        wrapper.record_correction(where, shift)
    return Correction(wrapper.layer.name, where, float(np.abs(shift).max()))
