"""`QuantizeWrapper`: a layer whose weights are fake-quantized before every call.

The wrapped layer runs through ``stateless_call`` with its targeted variables
replaced by their fake-quantized values, so any Keras layer works unchanged
(Conv2D, DepthwiseConv2D, Dense, BatchNormalization, PReLU, custom layers),
and gradients reach the float weights through the straight-through estimator.

A layer that computes its own quantized output instead (`qstrat.layers.FoldedConvBN`,
whose quantizers see weights derived from its variables) defines
``call_with_quantizers(inputs, quantize, training)``, which the wrapper calls with
``quantize(attr, tensor)``: the gated quantizer of ``attr`` applied to ``tensor``.
Its ``target_value(attr)`` is the tensor that quantizer sees in inference, which
`quantized_weight` quantizes and calibration calibrates on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from qstrat.errors import ConfigError
from qstrat.layers import strided
from qstrat.layers.fake_quant import _gate, make_quantizer
from qstrat.layers.shared_state import shared_state_from_config
from qstrat.quantizers import batch_ranges


@keras.saving.register_keras_serializable(package="qstrat")
class QuantizeWrapper(keras.layers.Layer):
    """Fake-quantize some of a layer's weights, then call it.

    Args:
        layer: the layer to wrap (the wrapper owns it; pass a copy).
        weight_quantizers: ``{attribute: {"type": ..., "params": ...}}``, e.g.
            ``{"kernel": ..., "bias": ...}``; the attribute names a variable of the layer.
        shared_states: ``{attribute: QuantState}`` for the targets whose quantizer
            state is shared with other targets (`qstrat.layers.shared_state`).
        corrections: what bias correction added, per channel: ``{"bias": [...]}`` or
            ``{"<bn name>.moving_mean": [...]}`` (`record_correction`); analysis subtracts it to
            get the float model's values back.
    """

    def __init__(
        self,
        layer,
        weight_quantizers: Mapping[str, Mapping[str, Any]],
        shared_states: Mapping[str, Any] | None = None,
        corrections: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        if isinstance(layer, Mapping):
            layer = keras.saving.deserialize_keras_object(layer)
        kwargs.setdefault("name", f"quant_{layer.name}")
        super().__init__(**kwargs)
        self.layer = layer
        self.weight_quantizers = {k: dict(v) for k, v in weight_quantizers.items()}
        self.quantizers = {k: make_quantizer(v, f"{self.name}.{k}") for k, v in self.weight_quantizers.items()}
        self.shared_states = {
            attr: shared_state_from_config(s, f"{self.name}.{attr}") if isinstance(s, Mapping) else s
            for attr, s in (shared_states or {}).items()
        }
        # Float64 arrays, lists in the config: Keras tracks a list held by a layer element by element (27
        # thousand tracking calls in one bias correction of a ResNet50), an array as one value.
        self.corrections = {k: np.asarray(vs, np.float64).ravel() for k, vs in (corrections or {}).items()}
        self.supports_masking = layer.supports_masking  # a mask goes through as the wrapped layer passes it
        # Keras applies it in __call__ to the outputs, which are the wrapped layer's; not saved in the wrapper's
        # config, but with the layer's.
        self.activity_regularizer = layer.activity_regularizer

    def compute_mask(self, inputs, previous_mask):
        return self.layer.compute_mask(inputs, previous_mask)

    def record_correction(self, where: str, added) -> None:
        """Note that bias correction added ``added`` (per channel) to ``where`` (see ``corrections``)."""
        before = self.corrections.get(where, 0.0)
        self.corrections[where] = before + np.asarray(added, np.float64).ravel()

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.state, self.enabled, self._targets = {}, {}, {}
        for attr, q in self.quantizers.items():
            var = getattr(self.layer, attr, None)
            if not isinstance(var, keras.Variable):
                have = ", ".join(v.path.split("/")[-1] for v in self.layer.weights) or "none"
                raise ConfigError(
                    f"{self.layer.name}.{attr}",
                    f'{type(self.layer).__name__} has no weight named "{attr}"',
                    f"Its weights: {have}.",
                )
            if hasattr(self.layer, "target_value"):
                self.layer.target_value(attr)  # a ConfigError for a weight the layer does not quantize
            self._targets[id(var)] = attr
            shared = self.shared_states.get(attr)
            if shared is None:
                self.state[attr] = q.build(self, var.shape, attr)
            else:
                if shared.built:
                    shared.check_shape(var.shape, f"{self.layer.name}.{attr}")
                else:
                    shared.build(var.shape)
                self.state[attr] = shared.state
            self.enabled[attr] = self.add_weight(
                name=f"{attr}_enabled", shape=(), initializer=keras.initializers.Constant(1.0), trainable=False
            )
        self.built = True

    def _quantize(self, attr: str, w, training: bool):
        """``w`` fake-quantized by the quantizer of ``attr``, or ``w`` itself where that quantizer is bypassed."""

        def quantize():
            with batch_ranges.same_on_every_replica():  # a weight: the same on every tf.distribute replica
                return self.quantizers[attr](w, self.state[attr], training=training)

        return _gate(self.enabled[attr], quantize, w, training)

    def quantized_weight(self, attr: str, training=False):
        target = getattr(self.layer, "target_value", None)
        if target is not None:
            return self._quantize(attr, keras.ops.convert_to_tensor(target(attr)), training)
        # A plain tensor, not the variable: inside tf.function a variable's value is a
        # tf.Variable, which Keras' framework fake-quant op does not accept.
        w = keras.ops.multiply(getattr(self.layer, attr).value, 1.0)
        return self._quantize(attr, w, training)

    def call(self, inputs, *args, training=None, mask=None, **kwargs):
        # Not ``quantized_call``: every Keras layer has one, for Keras' own int8/float8 quantization.
        if hasattr(self.layer, "call_with_quantizers"):

            def quantize(attr, tensor):
                return tensor if attr not in self.quantizers else self._quantize(attr, tensor, bool(training))

            return self.layer.call_with_quantizers(inputs, quantize, training=bool(training))

        def value(v):
            attr = self._targets.get(id(v))
            return v.value if attr is None else self.quantized_weight(attr, bool(training))

        strides = strided.pointwise_strides(self.layer) if training else None
        if strides is not None:  # TensorFlow's oneDNN gradient of this conv can crash: see qstrat.layers.strided
            bias = value(self.layer.bias) if self.layer.use_bias else None
            return strided.call_conv(self.layer, inputs, value(self.layer.kernel), bias, strides)
        trainable = [value(v) for v in self.layer.trainable_variables]
        non_trainable = [value(v) for v in self.layer.non_trainable_variables]
        if training is not None and "training" in self.layer._call_signature.parameters:
            kwargs["training"] = training
        if mask is not None and self.layer._call_has_mask_arg:
            kwargs["mask"] = mask
        # The layer's call with its weights as given (`Layer.stateless_call`, whose losses would include the
        # weights' regularization again, already the wrapper's through its sublayer).
        variables = [*self.layer.trainable_variables, *self.layer.non_trainable_variables]
        with keras.StatelessScope(
            state_mapping=list(zip(variables, trainable + non_trainable, strict=True)), collect_losses=True
        ) as scope:
            # A layer Keras itself quantized (int8 weights) computes with them as stateless_call would.
            call = self.layer.quantized_call if self.layer.dtype_policy.quantization_mode else self.layer.call
            outputs = call(inputs, *args, **kwargs)
        added = {id(loss) for loss in scope.losses}
        for sub in self.layer._flatten_layers():  # the wrapper owns them now: counted once, within an outer
            sub._loss_ids -= added  # stateless scope (JAX's training step) as outside one
        for loss in scope.losses:  # what the layer's call adds (add_loss)
            self.add_loss(loss)
        if training:  # the statistics it updates in training (a BatchNormalization's moving mean and variance)
            for v in self.layer.non_trainable_variables:
                if id(v) not in self._targets:
                    new = scope.get_current_value(v)
                    if new is not None:
                        v.assign(new)
        return outputs

    def compute_output_spec(self, inputs, *args, **kwargs):
        # The wrapped layer's own answer: its compute_output_shape, or Keras tracing its call for a
        # custom layer that defines none.
        kwargs.pop("training", None)
        if not self.layer._call_has_mask_arg:
            kwargs.pop("mask", None)
        return self.layer.compute_output_spec(inputs, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("activity_regularizer", None)
        return {
            **config,
            "layer": keras.saving.serialize_keras_object(self.layer),
            "weight_quantizers": self.weight_quantizers,
            "shared_states": {a: keras.saving.serialize_keras_object(s) for a, s in self.shared_states.items()},
            **(
                {"corrections": {k: [float(v) for v in vs] for k, vs in self.corrections.items()}}
                if self.corrections
                else {}
            ),
        }
