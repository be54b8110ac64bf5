"""Bias correction: remove the per-channel mean shift that quantization adds to conv and dense outputs.

Quantized weights and activations move the mean of a layer's output: for
output channel c, ``E[y_q - y_f]_c`` over the calibration data is usually not
zero, and every layer after it inherits the shift. This pass measures the
shift on the quantized model against the float model and removes it, in
passes over the calibration data: pass k corrects every layer whose corrected
upstream layers were all handled by earlier passes, so each layer is measured
with everything before it already corrected (a chain of n layers takes n
passes; parallel branches share passes). The shift is removed:

- from the layer's bias, whose quantizer state is then recomputed;
- or, for a layer with no bias followed by a BatchNormalization (the fs
  strategy keeps BN unfolded), from that BN: ``moving_mean += shift``.

Each pass measures the float and the quantized outputs of the same batches
(so shuffled or augmented data is fine); there is a pass per level, so the
data must be re-iterable (an
array, a tf.data.Dataset or a PyDataset). With a one-shot generator the API
skips this pass with a warning that says how to get it.
The reference tool's version of this pass was disabled and added the shift
instead of subtracting it; here a test checks the sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qstrat.calibration.data import iterate_batches
from qstrat.errors import CalibrationDataError
from qstrat.graph.ir import Graph, TensorRef, taken_names, unique_name
from qstrat.layers import QuantizeWrapper


@dataclass(frozen=True)
class Correction:
    layer: str
    where: str  # "bias" | "<bn name>.moving_mean"
    max_abs_shift: float


def is_one_shot(data) -> bool:
    """True for data that can be read only once (a generator or another iterator)."""
    return data is not None and hasattr(data, "__next__") and iter(data) is data


ONE_SHOT_MESSAGE = (
    "bias correction (include_bias_corr) was skipped: it reads the calibration data once per corrected "
    "layer, and a generator can be read only once. Pass an array, a tf.data.Dataset or a keras.utils.PyDataset "
    "to get it, or set include_bias_corr=False to silence this warning."
)


def _sums_model(inputs, tensors, names):
    """A model that reduces each tensor to (per-channel sums, element count per channel) in the graph."""
    import keras

    from qstrat.layers.probe import ChannelSums

    outputs = []
    for t in tensors:
        outputs += ChannelSums(name=unique_name("qstrat_channel_sums", names))(t)
    return keras.Model(inputs, outputs, name=unique_name("qstrat_bias_correction_probe", names))


def _channel_means(model, data, specs, batch_size, steps) -> list[np.ndarray]:
    sums, counts = None, None
    for batch in iterate_batches(data, specs, batch_size, steps):
        outs = model.predict_on_batch(list(batch))
        pairs = [(np.asarray(outs[i], np.float64), float(outs[i + 1])) for i in range(0, len(outs), 2)]
        if sums is None:
            sums, counts = [np.zeros_like(s) for s, _ in pairs], [0.0] * len(pairs)
        for i, (s, n) in enumerate(pairs):
            sums[i] += s
            counts[i] += n
    return [s / n for s, n in zip(sums, counts, strict=True)]


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


def correct_biases(qmodel, float_graph: Graph, data, steps=None, batch_size=32, verbose=1) -> list[Correction]:
    """Correct the output mean of every quantized conv/dense layer, level by level. Returns what changed."""
    import keras

    from qstrat.graph import rebuild
    from qstrat.passes.calibrate import _assign, input_specs

    if is_one_shot(data):
        raise CalibrationDataError(ONE_SHOT_MESSAGE.replace("was skipped", "cannot run"))
    targets = _targets(qmodel, float_graph)
    if not targets:
        return []
    specs = input_specs(qmodel)
    # One probe, traced once, computes the float and the quantized layer outputs of the same batch,
    # so shuffled or augmented data cannot make the two means come from different samples.
    # The float model is one operation of the probe, so its layers keep their names; the
    # probe's own operations take names that nothing in either model has.
    names = taken_names(float_graph, qmodel)
    float_model = rebuild(
        float_graph, outputs=[ref for _, ref, _ in targets], name=unique_name("qstrat_float_reference", names)
    )
    inputs = list(qmodel.inputs)
    float_outs = float_model(inputs[0] if len(inputs) == 1 else inputs)
    float_outs = list(float_outs) if isinstance(float_outs, (list, tuple)) else [float_outs]
    probe = _sums_model(inputs, float_outs + [w.output for w, _, _ in targets], names)
    n = len(targets)
    # Each pass corrects the targets of one level: those whose upstream targets were all
    # corrected by earlier passes, so no correction is measured twice.
    levels = _levels(float_graph, [ref.node for _, ref, _ in targets])
    done = []
    bar = keras.utils.Progbar(max(levels) + 1, unit_name="pass", verbose=verbose) if verbose else None
    for level in range(max(levels) + 1):
        means = _channel_means(probe, data, specs, batch_size, steps)
        for k in (k for k, lv in enumerate(levels) if lv == level):
            done.append(_correct(targets[k], means[n + k] - means[k], _assign))
        if bar is not None:
            bar.update(level + 1)
    return done


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


def _correct(target, shift: np.ndarray, assign) -> Correction:

    wrapper, _, bn = target
    if bn is None:
        bias = wrapper.layer.bias
        new = bias.numpy().astype(np.float64) - shift
        bias.assign(new.astype(bias.dtype))
        if "bias" in wrapper.quantizers:
            state = wrapper.quantizers["bias"].state_from_tensor(bias.numpy())
            assign(wrapper.state["bias"], state)
        where = "bias"
    else:
        mean = bn.moving_mean
        mean.assign((mean.numpy().astype(np.float64) + shift).astype(mean.dtype))
        where = f"{bn.name}.moving_mean"
    return Correction(wrapper.layer.name, where, float(np.abs(shift).max()))
