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


def calibrate_activations(qmodel, data, steps=None, batch_size=32, policy=None, verbose=1) -> int:
    """Observe every FakeQuant's input over the data and set its state; returns batches seen."""
    import keras

    fqs = [fq for fq in fake_quant_layers(qmodel) if fq.quantizer.observer_spec(policy) is not None]
    taps, owners = [], []
    for fq in fqs:
        for node in fq._inbound_nodes:
            t = node.input_tensors[0]
            taps.append(t)
            owners.append(fq)
    observers = {id(fq): make_observer(fq.quantizer.observer_spec(policy), name=fq.target or fq.name) for fq in fqs}
    enabled = {id(fq): float(keras.ops.convert_to_numpy(fq.enabled)) for fq in fake_quant_layers(qmodel)}
    for fq in fake_quant_layers(qmodel):
        fq.enabled.assign(0.0)
    batches = 0
    try:
        if taps:
            probe = keras.Model(qmodel.inputs, taps)
            bar = keras.utils.Progbar(steps, unit_name="batch", verbose=verbose) if verbose else None
            for batch in iterate_batches(data, input_specs(qmodel), batch_size, steps):
                outs = probe.predict_on_batch(batch if len(batch) > 1 else batch[0])
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                for fq, out in zip(owners, outs, strict=True):
                    observers[id(fq)].update(np.asarray(out))
                batches += 1
                if bar is not None:
                    bar.update(batches)
        else:
            for _ in iterate_batches(data, input_specs(qmodel), batch_size, steps):
                batches += 1
    finally:
        for fq in fake_quant_layers(qmodel):
            fq.enabled.assign(enabled[id(fq)])
    for fq in fqs:
        _assign(fq.state, fq.quantizer.state_from_stats(observers[id(fq)].result()))
    return batches
