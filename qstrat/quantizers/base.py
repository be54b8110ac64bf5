"""The quantizer base class and the quantizer protocol.

A quantizer is a small, immutable description of one fake-quantization
rule: validated parameters plus the math. A quantizer class, built in or a
user's, defines (see `Quantizer` and README "Custom quantizers"):

- ``state_spec(shape)``: the state a tensor of that shape needs (required);
- ``__call__(x, state, training)``: fake-quantize in keras.ops (required);
- ``state_from_tensor(tensor)``: state of a weight or bias target from its
  values (required);
- ``state_from_stats(stats)``: state of an activation or input target from the
  statistics ``observer_spec`` asked for (required);
- ``observer_spec``, ``reference`` (the NumPy twin), ``describe``, ``_check``:
  optional, with defaults.

`qstrat.quantizers.registry.register_quantizer` checks a class against
this protocol when it is registered, so a missing method is a `ConfigError`
at import time, not a failure in the middle of ``quantize_model``.

Quantizer state is plain data (NumPy arrays, or Keras variables inside a
layer); the quantizer object itself holds none, so one quantizer can serve
many tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.errors import ConfigError, UnsupportedError, did_you_mean
from qstrat.quantizers import percentile_kl
from qstrat.quantizers.grid import DataFormat, IntGrid, Method
from qstrat.quantizers.params import QuantizerParams, parse_params
from qstrat.quantizers.stats import Histogram, ObserverSpec, histogram_of_rows, move_axis_last

# What every quantizer class must define, and what qstrat uses each for.
REQUIRED_METHODS: dict[str, str] = {
    "state_spec": (
        "state_spec(self, shape) -> {key: StateSpec}: the state a tensor of this shape needs "
        "(the layer holding the quantizer creates it as Keras weights); {} for none"
    ),
    "__call__": (
        "__call__(self, x, state, training=False): x fake-quantized with keras.ops, same shape and dtype; "
        "state maps each key of state_spec to a Keras variable or a NumPy array"
    ),
    "state_from_tensor": (
        "state_from_tensor(self, tensor) -> {key: np.ndarray}: calibrates weight and bias targets "
        "from the weight's own values"
    ),
    "state_from_stats": (
        "state_from_stats(self, stats) -> {key: np.ndarray}: calibrates activation and model-input targets "
        "from the statistics observer_spec asked for (RangeStats by default)"
    ),
}
# Methods qstrat calls, with how it calls them: a class's own version must accept these arguments.
_CALLS: dict[str, tuple[tuple, dict]] = {
    "state_spec": (("shape",), {}),
    "__call__": (("x", "state"), {"training": False}),
    "state_from_tensor": (("tensor",), {}),
    "state_from_stats": (("stats",), {}),
    "observer_spec": (("policy",), {}),
    "reference": (("x", "state"), {}),
    "describe": (("state",), {}),
    "_check": (("path",), {}),
}


@dataclass(frozen=True)
class StateSpec:
    """One piece of quantizer state: shape, dtype, trainability and initial value."""

    shape: tuple[int, ...]
    initial: float
    trainable: bool = False
    dtype: str = "float32"


POSITION_POLICIES = ("global", "batch_vote")
# Chosen by bench/calib_policy.py on real activations: see README "Calibration".
DEFAULT_POSITION_POLICY = "global"


class Quantizer:
    """Base class of all quantizers: parameters, state, fake quantization and calibration.

    Why: every quantizer, built in or a user's, is driven the same way by
    the strategy, the quantize pass, calibration and saving, so a registered
    class works anywhere a strategy names it.

    A subclass sets the class attributes:

    - ``accepted``: the parameter names it takes, from `QuantizerParams`
      (``bit_width``, ``per_channel``, ``channel_axis``, ``round_mode``, ...);
    - ``defaults``: its own defaults for some of them;
    - ``data_formats``: the ``data_format`` values it supports.

    It must define (`register_quantizer` refuses a class without them):

    - ``state_spec(shape) -> {key: StateSpec}``: its state for a tensor of
      ``shape``. The layer holding the quantizer (`FakeQuant`,
      `QuantizeWrapper`) creates each entry as a Keras weight, trainable or
      not, so it is saved with the model;
    - ``__call__(x, state, training=False)``: x fake-quantized, in keras.ops,
      with the same shape and dtype. ``state`` maps each key to a Keras
      variable (in a layer) or a NumPy array (frozen copies), so pass each
      value through ``ops.convert_to_tensor`` first;
    - ``state_from_tensor(tensor) -> {key: ndarray}``: the state for a weight or
      bias target, from the weight as a NumPy array (also re-run on biases
      after bias correction);
    - ``state_from_stats(stats) -> {key: ndarray}``: the state for an activation
      or model-input target, from what its observer saw: `RangeStats` for the
      "minmax" and "ema" observers, `Histogram` for "histogram", an int array
      for "votes".

    State dicts hold a value for every key of ``state_spec``, shaped as its
    StateSpec. All four are required, wherever a strategy puts the quantizer:
    a registered class can be named for any target, and checking at
    registration keeps the error out of ``quantize_model``.

    Optional, with defaults:

    - ``observer_spec(policy)``: which statistics to collect for activations.
      The default asks for min/max (`RangeStats`) when ``method`` is No_OF (the
      default, and always when the class does not accept ``method``), a
      `Histogram` for the other methods, per channel along ``channel_axis``
      when ``per_channel``, and nothing for float data formats. Return None to
      skip calibration: the state keeps its StateSpec initial values;
    - ``reference(x, state)``: the NumPy twin, for tests; none by default;
    - ``describe(state)``: what `get_quantize_info` reports; the default lists
      the common parameters and the state;
    - ``_check(path)``: rules across parameters; raise `ConfigError` under ``path``.

    Do not define ``__init__``: strategies and saved models rebuild a
    quantizer from its parameters with `from_params`, which does not call it.

    Example:
        >>> @register_quantizer
        ... class SignQuantizer(Quantizer):
        ...     def state_spec(self, shape):
        ...         return {}
        ...     def __call__(self, x, state, training=False):
        ...         return ops.sign(x)
        ...     def state_from_tensor(self, tensor):
        ...         return {}
        ...     def state_from_stats(self, stats):
        ...         return {}
    """

    type_name: ClassVar[str] = "Quantizer"
    accepted: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    data_formats: ClassVar[tuple[DataFormat, ...]] = (DataFormat.INT, DataFormat.UINT)

    def __init__(self, **params):
        self.params: QuantizerParams = parse_params(
            self.type_name, params, self.accepted, self.defaults, self.data_formats
        )
        self._check(self.type_name)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], path: str) -> Quantizer:
        """Build from JSON parameters, reporting errors under ``path``."""
        obj = cls.__new__(cls)
        obj.params = parse_params(cls.type_name, params, cls.accepted, cls.defaults, cls.data_formats, path)
        obj._check(path)
        return obj

    def _check(self, path: str) -> None:
        """Optional: rules across this quantizer's parameters; raise ConfigError under ``path``."""

    # ---- config ---------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """The full parameter set, in the seed's spelling; ``from_config`` inverts it."""
        return self.params.to_dict(self.accepted)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Quantizer:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.params == self.params

    def __hash__(self) -> int:
        return hash((type(self), self.params))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{self.type_name}({shown})"

    # ---- shape helpers ----------------------------------------------------------

    @property
    def grid(self) -> IntGrid:
        return self.params.grid

    @property
    def axis(self) -> int | None:
        """The channel axis when per channel, else None."""
        return self.params.channel_axis if self.params.per_channel else None

    def channels(self, shape) -> tuple[int, ...]:
        """Shape of per-channel state for a tensor of ``shape``: (C,) or ()."""
        if self.axis is None:
            return ()
        ndim = len(shape)
        if not -ndim <= self.axis < ndim:
            raise ConfigError(
                f"{self.type_name}.channel_axis",
                f"channel_axis {self.axis} does not exist in a tensor of shape {tuple(shape)}",
                f"Use an axis in [{-ndim}, {ndim - 1}].",
            )
        c = shape[self.axis]
        if c is None:
            raise UnsupportedError(f"{self.type_name}: the channel axis of shape {tuple(shape)} is unknown.")
        return (int(c),)

    # ---- state ----------------------------------------------------------------------

    def state_spec(self, shape) -> dict[str, StateSpec]:
        """Required: the state for a tensor of ``shape``, as ``{key: StateSpec}`` ({} for none)."""
        raise self._missing("state_spec")

    def initial_state(self, shape) -> dict[str, np.ndarray]:
        return {k: np.full(s.shape, s.initial, dtype=s.dtype) for k, s in self.state_spec(shape).items()}

    def build(self, layer, shape, name: str) -> dict[str, Any]:
        """Create the state as weights of a Keras ``layer``; returns {key: variable}."""
        import keras

        out = {}
        for key, spec in self.state_spec(shape).items():
            out[key] = layer.add_weight(
                name=f"{name}_{key}",
                shape=spec.shape,
                initializer=keras.initializers.Constant(spec.initial),
                trainable=spec.trainable,
                dtype=spec.dtype,
            )
        return out

    def __call__(self, x, state: Mapping[str, Any], training: bool = False):
        """Required: ``x`` fake-quantized with ``state``, in keras.ops (same shape and dtype)."""
        raise self._missing("__call__")

    def gated_training_call(self, x, state: Mapping[str, Any], enabled):
        """Optional: ``__call__`` in training with a layer's on/off flag applied inside (x where off), for
        a faster training step; None (the default) lets the layer apply the flag itself."""
        return None

    def reference(self, x, state: Mapping[str, Any]) -> np.ndarray:
        """Optional: the NumPy twin of ``__call__``, bit for bit; tests compare the two."""
        raise UnsupportedError(f"{self.type_name} has no NumPy twin: define reference(self, x, state).")

    @property
    def exact_twin(self) -> bool:
        """Whether `reference` is inference's ``__call__`` bit for bit with these parameters (tests compare
        the two); passes that quantize a small constant tensor (a bias) then do it in NumPy, where each of
        the kernel's ops on a few hundred values costs more to launch than to compute."""
        return False

    # ---- calibration ------------------------------------------------------------------

    def observer_spec(self, policy: str | None = None) -> ObserverSpec | None:
        """Optional: what to observe of an activation during calibration; None when no data is needed.

        ``policy`` is the strategy's ``calib_position_policy`` ("global" or
        "batch_vote"); a quantizer without positions can ignore it. The
        default: min/max (`RangeStats`) for method No_OF, a `Histogram`
        otherwise, per channel along ``channel_axis`` when ``per_channel``;
        None for float data formats, whose state needs no data.
        """
        _check_policy(policy)
        p = self.params
        if p.data_format.is_float:
            return None
        if p.method == Method.NO_OF:
            return ObserverSpec("minmax", self.axis)
        return ObserverSpec("histogram", self.axis)

    def state_from_stats(self, stats) -> dict[str, np.ndarray]:
        """Required: activation or input state from the statistics `observer_spec` asked for."""
        raise self._missing("state_from_stats")

    def state_from_tensor(self, tensor) -> dict[str, np.ndarray]:
        """Required: weight or bias state from the weight's values (a NumPy array)."""
        raise self._missing("state_from_tensor")

    def _missing(self, method: str) -> UnsupportedError:
        # Reached only by a subclass that was never registered: registration refuses it.
        return UnsupportedError(
            f"{type(self).__name__} does not define {method}; every quantizer must: {REQUIRED_METHODS[method]}. "
            "Register the class with qstrat.register_quantizer, which checks this."
        )

    def describe(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Optional: human-readable parameters and state, for reports and `get_quantize_info`."""
        p = self.params
        info: dict[str, Any] = {
            "quantizer": self.type_name,
            "bit_width": p.bit_width,
            "data_format": p.data_format.value,
            "round_mode": p.round_mode.value,
            "method": p.method.value,
            "symmetry": p.symmetry,
            "unsigned": p.is_unsigned,
            "narrow_range": p.narrow_range,
            "per_channel": p.per_channel,
        }
        for k, v in state.items():
            arr = np.asarray(v if isinstance(v, np.ndarray) else _to_numpy(v))
            info[k] = arr.tolist()
        return info

    # ---- shared range logic ---------------------------------------------------------------

    def _ranges_from_tensor(self, tensor):
        """(rows, lo, hi) of a tensor per channel, with lo/hi from the method (not MSE)."""
        rows = move_axis_last(np.asarray(tensor), self.axis)
        lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
        if self.params.method in (Method.MIN_KL, Method.PERCENTILE):
            lo, hi = self._ranges_from_histogram(histogram_of_rows(rows))
        return rows, lo, hi

    def _ranges_from_histogram(self, hist: Histogram):
        """Per-channel (lo, hi) for No_OF, Percentile or Min_KL from a histogram."""
        p = self.params
        los, his = [], []
        for h in hist.channels():
            if p.method == Method.PERCENTILE:
                lo, hi = percentile_kl.percentile_range(h, p.method_percentile, p.symmetry)
            elif p.method == Method.MIN_KL:
                lo, hi = percentile_kl.kl_range(h, self.grid, p.symmetry)
            else:
                lo, hi = float(h.min), float(h.max)
            los.append(lo)
            his.append(hi)
        return np.array(los), np.array(his)

    def _shape_like_stats(self, values, stats_min):
        """Per-tensor results become 0-d arrays; per-channel stay (C,)."""
        values = np.asarray(values)
        return values.reshape(np.shape(stats_min)) if np.ndim(stats_min) == 0 else values


def _check_policy(policy):
    if policy is not None and policy not in POSITION_POLICIES:
        raise ConfigError.expected(
            "position_policy",
            "one of " + ", ".join(f'"{p}"' for p in POSITION_POLICIES),
            policy,
            did_you_mean(str(policy), POSITION_POLICIES),
        )


def _to_numpy(v):
    return to_numpy(v)
