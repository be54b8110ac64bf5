"""Calibration: set every quantizer's state from the weights and from streamed data.

Weights are quantized from their own values. Activations are observed with
one pass over the calibration data through the quantized model with its
activation quantizers bypassed and its weight quantizers on, so each
activation is seen as the quantized weights produce it. Observers stream
(`qstrat.calibration`), so memory does not depend on the dataset's size.
"""

from __future__ import annotations

import numpy as np

from qstrat.calibration import make_observer
from qstrat.calibration.data import iterate_batches
from qstrat.layers import FakeQuant, QuantizeWrapper


def input_specs(model) -> list[tuple]:
    return [(t.name, tuple(t.shape), t.dtype) for t in model.inputs]


def _assign(state: dict, values: dict) -> None:
    for key, value in values.items():
        state[key].assign(np.asarray(value, dtype=state[key].dtype))


def calibrate_weights(qmodel) -> None:
    """Set the state of every weight quantizer from the weight it quantizes."""
    from keras import ops

    for layer in qmodel.layers:
        if isinstance(layer, QuantizeWrapper):
            for attr, q in layer.quantizers.items():
                _assign(layer.state[attr], q.state_from_tensor(ops.convert_to_numpy(getattr(layer.layer, attr))))


def fake_quant_layers(qmodel) -> list[FakeQuant]:
    return [layer for layer in qmodel.layers if isinstance(layer, FakeQuant)]


def calibrate_activations(qmodel, float_graph, taps, data, steps=None, batch_size=32, policy=None, verbose=1) -> int:
    """Observe, over the data, the float tensors every FakeQuant quantizes, and set its state.

    Args:
        qmodel: the quantized model (its FakeQuant layers get their state).
        float_graph: the float model's graph.
        taps: ``{FakeQuant name: float tensors it quantizes}`` (from `insert`).

    Activations are observed on the float model (one probe model with every
    tapped tensor as an output), so calibration costs about one inference
    pass; measured in bench/calib_policy.py and by the PTQ study this makes no
    accuracy difference against observing the partly quantized model.
    Returns the number of batches seen.
    """
    from qstrat.graph import rebuild

    fqs = [fq for fq in fake_quant_layers(qmodel) if fq.quantizer.observer_spec(policy) is not None]
    refs, owners = [], []
    for fq in fqs:
        for ref in taps.get(fq.name, ()):
            refs.append(ref)
            owners.append(fq)
    observers = {id(fq): make_observer(fq.quantizer.observer_spec(policy), name=fq.target or fq.name) for fq in fqs}
    unique = list(dict.fromkeys(refs))
    probe = rebuild(float_graph, outputs=unique, name="calibration_probe") if unique else None
    position = {r: i for i, r in enumerate(unique)}
    batches = 0
    bar = None
    if verbose:
        import keras

        bar = keras.utils.Progbar(steps, unit_name="batch", verbose=verbose)
    for batch in iterate_batches(data, input_specs(qmodel), batch_size, steps):
        if probe is not None:
            outs = probe.predict_on_batch(batch if len(batch) > 1 else batch[0])
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for fq, ref in zip(owners, refs, strict=True):
                observers[id(fq)].update(np.asarray(outs[position[ref]]))
        batches += 1
        if bar is not None:
            bar.update(batches)
    for fq in fqs:
        if fq.name in taps:
            _assign(fq.state, fq.quantizer.state_from_stats(observers[id(fq)].result()))
    return batches
