"""Keras layers that carry quantizers: `FakeQuant` (a tensor) and `QuantizeWrapper` (a layer's weights).

Quantizer state lives in the layers' non-trainable weights (TQT's threshold
is trainable), so a quantized model is an ordinary Keras model: it trains,
saves to ``.keras`` and loads back once qstrat is imported.

Each layer also has a non-trainable ``enabled`` flag per quantizer. With it at
0 the quantizer passes its input through unchanged (a conditional in
inference, a select in training: either returns the input itself, so
bypassing is exact), which is how tests check that a
quantized model with every quantizer bypassed is the float model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
from keras import ops

from qstrat.layers.masking import KeepsMask
from qstrat.quantizers import Quantizer, get_quantizer_class


def make_quantizer(config: Mapping[str, Any], where: str = "quantizer") -> Quantizer:
    """A quantizer from ``{"type": ..., "params": {...}}``."""
    cls = get_quantizer_class(config["type"], f"{where}.type")
    return cls.from_params(dict(config.get("params", {})), f"{where}.params")


def quantizer_config(q: Quantizer) -> dict[str, Any]:
    return {"type": q.type_name, "params": q.get_config()}


def _gate(enabled, quantize, x, training: bool):
    """``quantize()`` where enabled, ``x`` exactly where not.

    In inference a conditional, so a bypassed quantizer costs nothing (analysis runs the model with all
    but one layer's quantizers off); in training a select, through which gradients reach both sides. On
    JAX a select always: XLA compiles a conditional's branch on its own and contracted the float-scale
    arithmetic there differently, one ulp off the NumPy twin.
    """
    on = ops.convert_to_tensor(enabled) > 0.5
    if training or keras.backend.backend() == "jax":
        return ops.where(on, quantize(), x)
    return ops.cond(on, quantize, lambda: x)


@keras.saving.register_keras_serializable(package="qstrat")
class FakeQuant(KeepsMask, keras.layers.Layer):
    """Fake-quantize a tensor with one quantizer (a layer output or a model input).

    Args:
        quantizer: ``{"type": "Pof2SQuantizer", "params": {...}}``.
        target: what it quantizes, for reports (e.g. ``"conv1/output"``).
        more_targets: the other targets that share it (``shared_quantizer``), one per further call.
    """

    def __init__(self, quantizer: Mapping[str, Any], target: str = "", more_targets=(), **kwargs):
        super().__init__(**kwargs)
        self.quantizer_spec = dict(quantizer)
        self.target = target
        self.more_targets = list(more_targets)
        self.quantizer = make_quantizer(self.quantizer_spec, self.name)

    def build(self, input_shape):
        self.state = self.quantizer.build(self, input_shape, "q")
        self.enabled = self.add_weight(
            name="enabled", shape=(), initializer=keras.initializers.Constant(1.0), trainable=False
        )
        self.built = True

    def call(self, inputs, training=None):
        if training:
            gated = self.quantizer.gated_training_call(inputs, self.state, self.enabled)
            if gated is not None:
                return gated
        training = bool(training)
        return _gate(self.enabled, lambda: self.quantizer(inputs, self.state, training=training), inputs, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "quantizer": self.quantizer_spec,
            "target": self.target,
            "more_targets": self.more_targets,
        }


QUANTIZER_KINDS = ("all", "activations", "weights")


def require_quantizers(model, then: str = "", deployed: bool = False) -> None:
    """Refuse a model with no qstrat quantizer layer (a float model given where a quantized one is needed);
    ``deployed``: also a QAT model that still folds a BatchNormalization in training (an exporter's input)."""
    from qstrat.errors import UnsupportedError
    from qstrat.layers.wrapper import QuantizeWrapper

    if not any(isinstance(layer, (FakeQuant, QuantizeWrapper)) for layer in model.layers):
        raise UnsupportedError(f"'{model.name}' has no qstrat quantizers: quantize it first (qstrat.Quantizer){then}.")
    if deployed:
        training = [
            layer.name
            for layer in model.layers
            if "FoldedConvBN" in (type(layer).__name__, type(getattr(layer, "layer", None)).__name__)
        ]
        if training:
            raise UnsupportedError(
                f"{', '.join(training[:4])}{', ...' if len(training) > 4 else ''}: a QAT model's convolutions with "
                "their BatchNormalization folded for training (train_with_bn). Export the model "
                "Quantizer.get_deploy_model(qat_model) returns, which folds them for inference."
            )


def set_quantizers_enabled(model, enabled: bool, which: str = "all") -> int:
    """Turn the quantizers of a quantized model on or off (off: exactly the float computation).

    ``which``: ``"all"``; ``"activations"``, the tensors' (`FakeQuant` layers:
    the model's inputs and the tensors between layers); or ``"weights"``, the
    layers' own (`QuantizeWrapper`: weights and biases). Returns how many
    quantizers were set. Useful to find which part of a model loses accuracy:
    bypass the weights' to score the activations' alone, or bypass all, then
    enable layer by layer.
    """
    from qstrat.errors import ConfigError
    from qstrat.layers.wrapper import QuantizeWrapper

    if which not in QUANTIZER_KINDS:
        raise ConfigError(
            "set_quantizers_enabled(which=...)", f"unknown kind {which!r}", f"Use one of {', '.join(QUANTIZER_KINDS)}."
        )
    import numpy as np

    if not isinstance(enabled, (bool, np.bool_)):
        raise ConfigError.expected("set_quantizers_enabled(enabled=...)", "true or false", enabled)
    value, n = 1.0 if enabled else 0.0, 0
    for layer in model.layers:
        if isinstance(layer, FakeQuant) and which != "weights":
            layer.enabled.assign(value)
            n += 1
        elif isinstance(layer, QuantizeWrapper) and which != "activations":
            for flag in layer.enabled.values():
                flag.assign(value)
                n += 1
    return n
