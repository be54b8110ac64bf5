"""Bias correction: remove the per-channel mean shift that quantization adds to conv and dense outputs.

Quantized weights and activations move the mean of a layer's output: for
output channel c, ``E[y_q - y_f]_c`` over the calibration data is usually not
zero, and every layer after it inherits the shift. This pass measures the
shift on the quantized model against the float model and removes it:

- from the layer's bias, whose quantizer state is then recomputed;
- or, for a layer with no bias followed by a BatchNormalization (the fs
  strategy keeps BN unfolded), from that BN: ``moving_mean += shift``.

A channels_first layer's channels are on axis 1, where its means are taken
(a layer with a bias that Keras adds on the wrong axis,
`qstrat.passes.optimize.channels.misplaced_bias`, is left as it is; one
without a bias, before a BatchNormalization, is corrected in the BN's mean,
which Keras applies on the channels).

Each layer must be measured with every layer upstream of it already
corrected (simultaneous updates of all layers diverge: a shift corrected
upstream would be corrected again downstream). So the pass runs the
quantized model once, eagerly, layer by layer in graph order, on a fixed set
of `SAMPLES` calibration samples held in memory: at each corrected layer it
measures the shift on those samples, corrects the layer, computes its output
again and goes on from there. Whatever the depth, that is one forward pass
of the quantized model over those samples, with no function to trace (on
JAX, one compiled function per layer that holds variables, shared by convs alike:
`qstrat.passes.refine.layer_calls`). The
float model's means on the same samples come from the calibration probe,
which sees them on its pass (`float_sums`, where the data is arrays in
memory), else from a float pass over them. A tensor is dropped once the
layers that read it have run, so memory is bounded by the number of samples,
not by the calibration set: `SAMPLES`, or fewer (`MIN_SAMPLES` at least) where one
activation for that many would pass `TENSOR_BYTES` (large inputs). The shift
is the mean of a difference between the quantized and the float output of
the same samples, which varies far less from sample to sample than either
output, so 128 samples measure it well (`bench/ptq.py`).

On TensorFlow the walk runs the per-tensor HALF_UP power-of-2 quantizers
(the activations of pof2s) as one fused op each
(`qstrat.quantizers.fused.fused_measurement`): one pass over the tensor
where the exact kernel makes nine. It equals the exact kernel at every input
but one, x = (0.5 - 2^-25) * step, which it rounds to one step instead of 0;
such a value moves a channel's measured mean by one step over the number of
values averaged. The quantized model itself keeps the exact kernel. The walk
also runs `forward_only` (no custom gradients), where fs's per-channel
framework kernel is the same arithmetic as whole-tensor ops
(`qstrat.quantizers.framework_op`) and a bias is quantized by its
quantizer's NumPy twin where that is exact (`qstrat.passes.frozen.quantized_once`):
both give the values the model computes, bit for bit.

Where a layer shares its bias quantizer state with a layer that already ran
(a ``shared_quantizer``), its correction recalibrates that state, so the
model runs again from the start, each layer measured once.

In-memory arrays give a fixed random choice of samples (data sorted by class
still gives a mix); other sources give their first samples. The data
must be re-iterable (an array, a tf.data.Dataset or a PyDataset): with a
one-shot generator the API skips this pass with a warning that says how to
get it. The reference tool's version of this pass was disabled and added the
shift instead of subtracting it; here a test checks the sign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from qstrat.arrays import to_numpy
from qstrat.calibration.data import is_one_shot, take_samples  # noqa: F401 - is_one_shot: the API's too
from qstrat.errors import CalibrationDataError
from qstrat.graph import capture
from qstrat.graph.ir import Graph, Node, TensorRef
from qstrat.graph.rebuild import needed
from qstrat.layers import QuantizeWrapper
from qstrat.passes.frozen import quantized_once
from qstrat.passes.optimize.channels import misplaced_bias
from qstrat.passes.refine.layer_calls import LayerCalls
from qstrat.passes.runner import sample_bytes
from qstrat.progress import Progress
from qstrat.quantizers.fake_quant import forward_only
from qstrat.quantizers.fused import fused_measurement

SAMPLES = 128  # calibration samples every layer's shift is measured on, at most
MIN_SAMPLES = 32  # ... and at least (where the data holds that many)
TENSOR_BYTES = 128 * 2**20  # fewer samples where one activation of SAMPLES samples would be larger


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
        if getattr(layer.layer, "use_bias", False):
            if misplaced_bias(node):
                continue  # Keras adds its bias on another axis than its channels: a shift would not land on them
        else:
            users = float_graph.consumers(TensorRef(node.name, 0))
            if len(users) != 1 or users[0].type_name != "BatchNormalization":
                continue
            bn = _named(qmodel, users[0].layer_name)
            if bn is None:
                continue
            rank = len(users[0].in_tensors[0].shape)
            if int(np.ravel(bn.axis)[0]) % rank != _channel_axis(layer) % rank:
                continue  # normalizes another axis than the layer's channels
        out.append((layer, TensorRef(node.name, 0), bn))
    return out


def _named(qmodel, name: str):
    """The model's layer called ``name``, as it is or inside its `QuantizeWrapper` (a quantized BatchNormalization),
    or None."""
    for layer in qmodel.layers:
        inner = layer.layer if isinstance(layer, QuantizeWrapper) else layer
        if inner.name == name:
            return inner
    return None


def float_sums(qmodel, float_graph: Graph, data, steps=None, batch_size=32):
    """A `ChannelSums` of the float tensors bias correction measures, for the calibration probe to fill, where
    the data is arrays in memory, so the samples bias correction takes (`take_samples`: all of them, or the
    `sample_rows` of `sample_count`) are known before the probe runs; else None, and `correct_biases` runs
    the float model itself on the samples it took."""
    from qstrat.calibration.data import array_samples, sample_rows
    from qstrat.passes.calibrate import ChannelSums

    total = array_samples(data)
    if total is None:
        return None
    if steps is not None:
        total = min(total, steps * batch_size)
    targets = _targets(qmodel, float_graph)
    if any(_channel_axis(wrapper) == 1 for wrapper, _, _ in targets):
        return None  # the probe sums the last axis; a channels_first layer's means come from the float pass
    sizes = []
    for wrapper, _, _ in targets:
        shape = wrapper.output.shape  # the wrapped layer's: the float tensor's shape
        if any(d is None for d in shape[1:]):
            return None
        sizes.append(int(np.prod(shape[1:-1], dtype=np.int64)))
    if not targets:
        return None
    count = sample_count(float_graph)
    rows = None if total <= count else sample_rows(total, count)
    return ChannelSums([ref for _, ref, _ in targets], sizes, rows, count)


def correctable(qmodel, float_graph: Graph) -> bool:
    """Whether ``qmodel`` has a layer bias correction can correct."""
    return bool(_targets(qmodel, float_graph))


def sample_count(graph: Graph, samples: int = SAMPLES) -> int:
    """How many samples to hold: ``samples``, fewer (not under `MIN_SAMPLES`) where one of the graph's
    activations for that many would take more than `TENSOR_BYTES` (a large input resolution)."""
    per_sample = sample_bytes(graph)
    if not per_sample:
        return samples
    return max(min(samples, MIN_SAMPLES), min(samples, TENSOR_BYTES // per_sample))


class _Restart(Exception):
    """A correction changed a layer that already ran (a bias quantizer state shared with it): run again."""


def correct_biases(
    qmodel,
    float_graph: Graph,
    data,
    steps=None,
    batch_size=32,
    verbose=1,
    progress=None,
    samples: int = SAMPLES,
    sums=None,
) -> list[Correction]:
    """Correct the output mean of every quantized conv/dense layer, in graph order. Returns what changed.

    ``samples``: how many calibration samples every shift is measured on, at most (they are held in
    memory; `sample_count` takes fewer for large activations). ``sums``: the `float_sums` the calibration
    probe filled, used for the float means where they cover the same samples; else the float model runs.
    """
    from qstrat.passes.calibrate import input_specs
    from qstrat.passes.weight_calibration import weight_groups

    if is_one_shot(data):
        raise CalibrationDataError(ONE_SHOT_MESSAGE.replace("was skipped", "cannot run"))
    targets = _targets(qmodel, float_graph)
    if not targets:
        return []
    graph = capture(qmodel)
    count = sample_count(graph, samples)
    x = [keras.ops.convert_to_tensor(a) for a in take_samples(data, input_specs(qmodel), count, batch_size, steps)]
    n = int(x[0].shape[0])
    progress = progress or Progress(verbose)
    bar = progress.data_pass(len(targets), "layer", 1, f"{len(targets)} layers measured on {n} samples")
    refs = [ref for _, ref, _ in targets]
    axes = [_channel_axis(wrapper) for wrapper, _, _ in targets]
    if sums is not None and sums.count == count and sums.samples == n and sums.refs == refs:
        float_means = sums.means()
    else:
        float_means = _float_means(float_graph, refs, axes, x)
    index = {id(wrapper): j for j, (wrapper, _, _) in enumerate(targets)}
    groups = {(id(w), a): g for g in weight_groups(qmodel) for w, a in g}
    done: dict[int, Correction] = {}
    ran: set[int] = set()  # the layers that ran in this run of the model

    def visit(node: Node, outs: list):
        ran.add(id(node.op))
        j = index.get(id(node.op))
        if j is None or j in done:
            return None
        wrapper, _, bn = targets[j]
        group = groups.get((id(wrapper), "bias"), [])
        before = _bias_value(wrapper) if bn is None else None
        done[j] = _correct(targets[j], _channel_means(outs[0], axes[j]) - float_means[j], group)
        bar.update(len(done))
        if any(w is not wrapper and id(w) in ran for w, _ in group):
            raise _Restart  # a layer before this one shares the bias state that changed
        if bn is not None:
            return None  # the BN's new mean shows when it runs
        if _adds_bias_last(wrapper):  # the output moves by the change of the (quantized) bias (channels_last)
            return [keras.ops.add(outs[0], keras.ops.convert_to_tensor(_bias_value(wrapper) - before))]
        return True  # this layer's output again

    while True:
        ran.clear()
        try:
            with fused_measurement(), forward_only():
                _walk(graph, x, _outputs(graph, targets), visit)
            break
        except _Restart:
            continue
    return [done[j] for j in sorted(done)]


def _outputs(graph: Graph, targets) -> list[TensorRef]:
    """The quantized graph's tensors that the targets write (what the walk must compute)."""
    mine = {id(wrapper) for wrapper, _, _ in targets}
    return [TensorRef(node.name, 0) for node in graph.nodes if id(node.op) in mine]


def _float_means(float_graph: Graph, refs: list[TensorRef], axes: list[int], x: list) -> list[np.ndarray]:
    """Per target, the float output's per-channel mean (channels on ``axes[j]``) over the samples ``x``."""
    where = {ref.node: j for j, ref in enumerate(refs)}
    means: list = [None] * len(refs)

    def visit(node: Node, outs: list) -> None:
        if node.name in where:
            j = where[node.name]
            means[j] = _channel_means(outs[0], axes[j])

    _walk(float_graph, x, refs, visit)
    return means


def _walk(graph: Graph, inputs: list, outputs: list[TensorRef], visit: Callable[[Node, list], object]) -> None:
    """Run the nodes that ``outputs`` need on ``inputs``, eagerly, in graph order, each by its own layer.

    ``visit(node, outputs)`` follows each node: it returns None, True to run
    the node again (its layer changed), or the node's outputs to use instead.
    A tensor is dropped once every node that reads it has run.
    """
    need = needed(graph, outputs, graph.inputs)
    readers: dict[TensorRef, int] = {}
    for node in graph.nodes:
        if node.name in need:
            for r in node.inputs:
                readers[r] = readers.get(r, 0) + 1
    tensors = dict(zip(graph.inputs, inputs, strict=True))
    calls = LayerCalls()
    for node in graph.nodes:
        if node.name not in need:
            continue
        args = [tensors[r] for r in node.inputs]
        outs = calls(node, args)
        instead = visit(node, outs)
        if instead is True:
            outs = calls(node, args)
        elif instead is not None:
            outs = instead
        for r in node.inputs:
            readers[r] -= 1
            if not readers[r]:
                del tensors[r]
        for i, t in enumerate(outs):
            if readers.get(TensorRef(node.name, i)):
                tensors[TensorRef(node.name, i)] = t


# Layers whose output is their linear part plus the bias, last, when their activation is linear.
BIAS_LAST = frozenset(
    {"Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
     "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "Dense"}
)  # fmt: skip


def _adds_bias_last(wrapper: QuantizeWrapper) -> bool:
    """Whether the wrapped layer's output is its linear part plus its bias on the last axis, nothing after."""
    layer = wrapper.layer
    return (
        type(layer).__name__ in BIAS_LAST
        and getattr(layer, "activation", None) in (None, keras.activations.linear)
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and not hasattr(layer, "call_with_quantizers")
    )


def _bias_value(wrapper: QuantizeWrapper) -> np.ndarray:
    """The bias the wrapper computes with: quantized, or as it is where it has no quantizer."""
    if "bias" in wrapper.quantizers:
        return quantized_once(wrapper, "bias")
    return to_numpy(wrapper.layer.bias)


def _channel_axis(wrapper: QuantizeWrapper) -> int:
    """The axis of the wrapped layer's output that holds its channels: 1 (channels_first) or -1."""
    return 1 if getattr(wrapper.layer, "data_format", None) == "channels_first" else -1


def _channel_means(x, axis: int = -1) -> np.ndarray:
    """Per-channel mean of a batch, channels on ``axis``: summed per sample in float32, then over samples in
    float64."""
    from qstrat.layers.probe import per_sample_channel_sums

    if axis != -1 and axis != len(x.shape) - 1:
        x = keras.ops.moveaxis(x, axis, -1)
    per_sample = keras.ops.convert_to_numpy(per_sample_channel_sums(x))
    return np.sum(per_sample, axis=0, dtype=np.float64) / (x.shape[0] * int(np.prod(x.shape[1:-1])))


def _correct(target, shift: np.ndarray, group) -> Correction:
    """Move the target's bias (or its BatchNormalization mean) by ``shift``; recalibrate the bias quantizer's
    ``group`` (`weight_groups`: the targets that use its state), if the bias has a quantizer."""
    from qstrat.passes.weight_calibration import calibrate_weight_group

    wrapper, _, bn = target
    if bn is None:
        bias = wrapper.layer.bias
        new = to_numpy(bias).astype(np.float64) - shift
        bias.assign(new.astype(bias.dtype))
        wrapper.record_correction("bias", -shift)
        if group:
            calibrate_weight_group(group)
        where = "bias"
    else:
        mean = bn.moving_mean
        mean.assign((to_numpy(mean).astype(np.float64) + shift).astype(mean.dtype))
        where = f"{bn.name}.moving_mean"
        wrapper.record_correction(where, shift)
    return Correction(wrapper.layer.name, where, float(np.abs(shift).max()))
