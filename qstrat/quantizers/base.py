"""The quantizer base class and the quantizer registry.

A quantizer is a small, immutable description of one fake-quantization
rule: validated parameters plus the math to

- shape its state (``state_spec``) and create it on a Keras layer (``build``);
- fake-quantize a tensor with that state in keras.ops (``__call__``), and the
  same in NumPy (``reference``);
- say what it needs to see during calibration (``observer_spec``) and turn
  what was seen into state (``state_from_stats``, ``state_from_tensor``).

Quantizer state is plain data (NumPy arrays, or Keras variables inside a
layer); the quantizer object itself holds none, so one quantizer can serve
many tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from qstrat.errors import ConfigError, UnsupportedError, did_you_mean
from qstrat.quantizers import ranges
from qstrat.quantizers.grid import DataFormat, IntGrid, Method
from qstrat.quantizers.params import QuantizerParams, parse_params
from qstrat.quantizers.stats import Histogram, ObserverSpec, histogram_of_rows, move_axis_last

_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(cls=None, *, name: str | None = None, replace: bool = False):
    """Class decorator: make a quantizer class available by name in strategies.

    Example:
        @register_quantizer
        class MyQuantizer(Quantizer):
            ...
    """

    def add(klass):
        key = name or klass.__name__
        if key in _REGISTRY and _REGISTRY[key] is not klass and not replace:
            raise ConfigError(
                "register_quantizer",
                f'a quantizer named "{key}" is already registered ({_REGISTRY[key].__module__})',
                "Pick another name, or pass replace=True to override it on purpose.",
            )
        if not (isinstance(klass, type) and issubclass(klass, Quantizer)):
            raise ConfigError("register_quantizer", f"{klass!r} is not a Quantizer subclass")
        klass.type_name = key
        _REGISTRY[key] = klass
        return klass

    return add(cls) if cls is not None else add


def get_quantizer_class(name: str, path: str = "type") -> type[Quantizer]:
    """Look a quantizer class up by its registered name."""
    if not isinstance(name, str) or name not in _REGISTRY:
        hint = did_you_mean(str(name), _REGISTRY) or f"Registered quantizers: {', '.join(sorted(_REGISTRY))}."
        if isinstance(name, str):
            hint += " Custom quantizers must be registered with qstrat.register_quantizer first."
        raise ConfigError.expected(path, "a registered quantizer type", name, hint)
    return _REGISTRY[name]


def registered_quantizers() -> dict[str, type[Quantizer]]:
    return dict(_REGISTRY)


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
    """Base class of all quantizers. Subclasses set the class attributes and the math."""

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
        """Quantizer-specific parameter rules; raise ConfigError."""

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

    def state_spec(self, shape) -> dict[str, StateSpec]:  # pragma: no cover - interface
        raise NotImplementedError

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

    def __call__(self, x, state: Mapping[str, Any], training: bool = False):  # pragma: no cover
        raise NotImplementedError

    def reference(self, x, state: Mapping[str, Any]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    # ---- calibration ------------------------------------------------------------------

    def observer_spec(self, policy: str | None = None) -> ObserverSpec | None:
        """What to observe during calibration; None when the quantizer needs no data."""
        _check_policy(policy)
        p = self.params
        if p.data_format.is_float:
            return None
        if p.method == Method.NO_OF:
            return ObserverSpec("minmax", self.axis)
        return ObserverSpec("histogram", self.axis)

    def state_from_stats(self, stats) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def state_from_tensor(self, tensor) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Human-readable parameters and state, for reports and quantize info."""
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
                lo, hi = ranges.percentile_range(h, p.method_percentile, p.symmetry)
            elif p.method == Method.MIN_KL:
                lo, hi = ranges.kl_range(h, self.grid, p.symmetry)
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
    from keras import ops

    if hasattr(v, "numpy") and hasattr(v, "assign"):
        return v.numpy()  # a Keras Variable: numpy() avoids NumPy 2's copy-keyword warning
    return ops.convert_to_numpy(v)
