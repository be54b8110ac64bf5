"""`QuantState`: one quantizer's state, shared by several weight or bias targets (``shared_quantizer``).

Output and input targets that share a quantizer share one `FakeQuant` layer,
called on each tensor. Weights are not tensors of the graph, so wrappers that
share a weight quantizer hold one `QuantState` each, the same object: its
variables are the state of every target that shares it, in calibration and
in training (a trained threshold gets the gradients of all of them).

Saving and loading keep the sharing: the state is saved once, and while
``keras.models.load_model`` (or `qstrat.load_model`) rebuilds the model, the
wrappers that name the same ``key`` get one `QuantState` again. Built from a
config outside a load (``from_config`` by hand, ``clone_model``), each
wrapper gets its own, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import keras

from qstrat.layers.fake_quant import make_quantizer


@keras.saving.register_keras_serializable(package="qstrat")
class QuantState(keras.layers.Layer):
    """The state variables of one shared quantizer.

    Args:
        quantizer: ``{"type": ..., "params": ...}``, as the targets that share it give it.
        key: names the sharing within the model (the pattern match and quantizer name).
    """

    def __init__(self, quantizer: Mapping[str, Any], key: str, **kwargs):
        super().__init__(**kwargs)
        self.quantizer_spec = dict(quantizer)
        self.key = key
        self.quantizer = make_quantizer(self.quantizer_spec, self.name)

    def build(self, shape):
        self.state = self.quantizer.build(self, shape, "q")
        self.built = True

    def check_shape(self, shape, where: str) -> None:
        """A target of ``shape`` can use this state only if its state has the same shapes."""
        from qstrat.errors import ConfigError

        mine = {k: s.shape for k, s in self.quantizer.state_spec(self._build_shape).items()}
        theirs = {k: s.shape for k, s in self.quantizer.state_spec(shape).items()}
        if mine != theirs:
            raise ConfigError(
                where,
                f'shares the quantizer "{self.key}" with a target whose state has shapes {mine}, '
                f"but its own needs {theirs}",
                "Shared per-channel quantizers need targets with the same number of channels; "
                "share a per-tensor quantizer instead, or stop sharing.",
            )

    @property
    def _build_shape(self):
        return tuple(self.get_build_config()["input_shape"])

    def get_config(self):
        return {**super().get_config(), "quantizer": self.quantizer_spec, "key": self.key}


def _loading_objects() -> dict | None:
    """The dictionary Keras keeps of the objects it has rebuilt during a load, or None outside a load."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - a Keras without it: sharing is rebuilt per wrapper, with a warning
        return None
    return global_state.get_global_attribute("shared_objects/id_to_obj_map")


def shared_state_from_config(config: Mapping[str, Any], where: str) -> QuantState:
    """The `QuantState` for a serialized one: the same object for every wrapper naming its key during a load."""
    key = ("qstrat.QuantState", config["config"]["key"])
    objects = _loading_objects()
    if objects is not None and key in objects:
        return objects[key]
    state = keras.saving.deserialize_keras_object(dict(config))
    if objects is None:
        warnings.warn(
            f'{where}: the quantizer state "{key[1]}" is shared in the saved model, but it is being rebuilt '
            "outside keras.models.load_model, so this copy gets its own state. Load the saved model with "
            "qstrat.load_model or keras.models.load_model to keep the sharing.",
            stacklevel=3,
        )
    else:
        objects[key] = state
    return state
