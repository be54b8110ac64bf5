"""The quantizer registry: quantizer classes by the names strategies and saved models use.

`register_quantizer` adds a class after checking it against the quantizer
protocol (`qstrat.quantizers.base`, README "Custom quantizers"), so a missing
or misshapen method is a `ConfigError` when the class is defined.
"""

from __future__ import annotations

import inspect

from qstrat.errors import ConfigError, did_you_mean
from qstrat.quantizers.base import _CALLS, REQUIRED_METHODS, Quantizer
from qstrat.quantizers.grid import DataFormat
from qstrat.quantizers.params import PARAM_NAMES, parse_params

_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(cls=None, *, name: str | None = None, replace: bool = False):
    """Class decorator: make a quantizer class available by name in strategies and saved models.

    Why: a strategy names its quantizers by string, and a saved model stores
    that string in its layers' configs; the registry maps it back to the
    class. The class is checked against the quantizer protocol here, so a
    missing method is reported when the class is defined, not in the middle
    of ``quantize_model``.

    Args:
        cls: a subclass of `Quantizer` defining the required methods
            (`REQUIRED_METHODS`).
        name: the name strategies use; the class name by default.
        replace: allow replacing another class registered under ``name``.

    Raises:
        ConfigError: the class is not a `Quantizer` subclass, lacks a required
            method, has a method qstrat cannot call the way it does, names a
            parameter `QuantizerParams` does not have, or ``name`` is taken.

    Example:
        @register_quantizer
        class MyQuantizer(Quantizer):
            accepted = ("bit_width",)

            def state_spec(self, shape): ...
            def __call__(self, x, state, training=False): ...
            def state_from_tensor(self, tensor): ...
            def state_from_stats(self, stats): ...
    """

    def add(klass):
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError.expected("register_quantizer name", "a non-empty string", name)
        key = name or getattr(klass, "__name__", repr(klass))
        if not (isinstance(klass, type) and issubclass(klass, Quantizer)):
            raise ConfigError(
                "register_quantizer",
                f"{klass!r} is not a Quantizer subclass",
                "Subclass qstrat.BaseQuantizer (qstrat.quantizers.Quantizer).",
            )
        check_quantizer_class(klass, key)
        if key in _REGISTRY and _REGISTRY[key] is not klass and not replace:
            raise ConfigError(
                "register_quantizer",
                f'a quantizer named "{key}" is already registered ({_REGISTRY[key].__module__})',
                "Pick another name, or pass replace=True to override it on purpose.",
            )
        klass.type_name = key
        _REGISTRY[key] = klass
        return klass

    return add(cls) if cls is not None else add


def check_quantizer_class(klass: type, key: str | None = None) -> None:
    """Raise ConfigError unless ``klass`` follows the quantizer protocol (`register_quantizer` calls it).

    Checks that every required method is defined, that each method qstrat
    calls accepts the arguments qstrat passes, that ``__init__`` is the base
    class's (quantizers are rebuilt from their parameters without calling it),
    and that ``accepted``/``defaults``/``data_formats`` describe valid parameters.
    """
    where = f"register_quantizer({key or klass.__name__})"
    missing = [m for m in REQUIRED_METHODS if getattr(klass, m, None) is getattr(Quantizer, m)]
    if missing:
        listed = " and ".join(missing) if len(missing) <= 2 else ", ".join(missing[:-1]) + " and " + missing[-1]
        needs = " ".join(f"Define {REQUIRED_METHODS[m]}." for m in missing)
        raise ConfigError(
            where,
            f"{klass.__name__} does not define {listed}, which every quantizer must",
            f'{needs} See README "Custom quantizers".',
        )
    if klass.__init__ is not Quantizer.__init__:
        raise ConfigError(
            where,
            f"{klass.__name__} defines __init__, which qstrat does not call: strategies and saved models "
            "rebuild a quantizer from its parameters with from_params",
            "Remove __init__: declare parameters with accepted/defaults, check them in _check(self, path), "
            "and derive values in properties or methods.",
        )
    sample = klass.__new__(klass)
    for method, (args, kwargs) in _CALLS.items():
        if getattr(klass, method, None) is getattr(Quantizer, method):
            continue  # the base class's own: known to fit
        bound = getattr(sample, method, None)
        if not callable(bound):
            raise ConfigError(where, f"{klass.__name__}.{method} is not a method")
        try:
            signature = inspect.signature(bound)
        except (TypeError, ValueError):
            continue  # a builtin or C callable: nothing to check
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            shown = ", ".join([*args, *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise ConfigError(
                where,
                f"{klass.__name__}.{method}{signature} cannot be called as {method}({shown}), the way qstrat calls it",
                f"Give it the signature {method}(self, {shown}).",
            ) from None
    accepted = klass.accepted
    unknown = [p for p in accepted if p not in PARAM_NAMES] if isinstance(accepted, tuple) else []
    if unknown or not isinstance(accepted, tuple):
        what = f"{', '.join(unknown)}, which QuantizerParams does not have" if unknown else repr(accepted)
        close = did_you_mean(unknown[0], PARAM_NAMES) if unknown else None
        raise ConfigError(
            f"{where}.accepted",
            f"expected a tuple of parameter names from QuantizerParams, got {what}",
            close or f"Quantizers take parameters from: {', '.join(PARAM_NAMES)}.",
        )
    stray = [p for p in klass.defaults if p not in klass.accepted]
    if stray:
        raise ConfigError(
            f"{where}.defaults",
            f"defaults set {', '.join(stray)}, which the class does not accept",
            "Add them to accepted, or drop them from defaults.",
        )
    if not klass.data_formats or not all(isinstance(f, DataFormat) for f in klass.data_formats):
        raise ConfigError(
            f"{where}.data_formats",
            f"expected a non-empty tuple of DataFormat values, got {klass.data_formats!r}",
        )
    parse_params(key or klass.__name__, {}, klass.accepted, klass.defaults, klass.data_formats, f"{where}.defaults")


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


def checked_state(quantizer: Quantizer, values, state: dict, method: str, where: str) -> dict | None:
    """What ``quantizer.<method>`` returned, checked against the state it sets (``{key: variable}``): None (the
    state stays as it is), or a value for every key, in its shape, finite; else a `ConfigError` naming the
    class, the method, the tensor and the key."""
    import numpy as np

    if values is None:
        return None
    path = f"{type(quantizer).__name__}.{method} ({where})"
    fix = "Return {key: array} for every key of state_spec, in its shape (README: Custom quantizers)."
    if not isinstance(values, dict):
        raise ConfigError(path, f"returned a {type(values).__name__}, not a dict of state values", fix)
    extra, missing = sorted(set(values) - set(state), key=str), sorted(set(state) - set(values), key=str)
    if extra or missing:
        said = "; ".join(
            part
            for part in (
                f"keys not in state_spec: {', '.join(map(str, extra))}" if extra else "",
                f"no value for {', '.join(map(str, missing))}" if missing else "",
            )
            if part
        )
        raise ConfigError(path, said, fix)
    out = {}
    for key, value in values.items():
        want = tuple(state[key].shape)
        try:
            arr = np.asarray(value, dtype=np.dtype(str(state[key].dtype)))
        except (TypeError, ValueError):
            raise ConfigError(path, f"state '{key}' is not numbers: {value!r:.60}", fix) from None
        if arr.shape != want:
            raise ConfigError(path, f"state '{key}' has shape {arr.shape}; its state_spec says {want}", fix)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ConfigError(path, f"state '{key}' holds NaN or Inf", "Return finite values: check the statistics.")
        out[key] = arr
    return out
