"""Layer class names in patterns: checking them at load time, resolving them at match time.

A ``layer_type`` token is a Keras layer class name (``"Conv2D"``), the name of
a custom class the user passed in ``custom_types``/``custom_objects``, a
registered Keras serializable name, or a dotted path (``"mypkg.layers.MyConv"``):
checked at load time where its module imports, else matched by its last name. A layer matches a type if it is an instance of that
class or of a subclass, so user subclasses of Conv2D match ``"Conv2D"``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from qstrat.errors import ConfigError, did_you_mean

# Config keys every layer has, whatever its constructor says.
COMMON_CONFIG_KEYS = ("name", "trainable", "dtype")


@functools.lru_cache(maxsize=1)
def keras_layer_classes() -> dict[str, type]:
    import keras

    out = {}
    for name in dir(keras.layers):
        obj = getattr(keras.layers, name)
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer):
            out[name] = obj
    return out


def _registered() -> dict[str, type]:
    import keras

    out = {}
    for key, obj in keras.saving.get_custom_objects().items():
        if isinstance(obj, type):
            out[key] = obj
            out.setdefault(obj.__name__, obj)
    return out


def resolve_layer_class(token: str, custom_types: Mapping[str, type] | None = None) -> type | None:
    """The class a layer_type token names, or None when it cannot be found."""
    if custom_types and token in custom_types:
        return custom_types[token]
    known = keras_layer_classes()
    if token in known:
        return known[token]
    reg = _registered()
    if token in reg:
        return reg[token]
    if "." in token:
        module, _, attr = token.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            return None
    return None


def check_layer_type(token: str, path: str, custom_types: Mapping[str, type] | None = None) -> None:
    """Reject a layer_type token that names no layer class. A dotted path whose module cannot be imported here
    is let through: it then matches layers whose class has its last name."""
    if not token:
        raise ConfigError(path, 'an empty alternative in layer_type (a stray "|")', 'Remove the extra "|".')
    if "." in token and not (custom_types and token in custom_types):
        _check_dotted(token, path)
        return
    if resolve_layer_class(token, custom_types) is not None:
        return
    choices = list(keras_layer_classes()) + list(custom_types or ())
    hint = did_you_mean(token, choices) or (
        'Use a Keras layer class name, a dotted path such as "mypkg.MyLayer", or pass the class in custom_objects.'
    )
    raise ConfigError(path, f'unknown layer type "{token}"', hint)


def _check_dotted(token: str, path: str) -> None:
    import keras

    module_name, _, attr = token.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError):
        return  # not importable here: matched by its class name
    cls = getattr(module, attr, None)
    if cls is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = did_you_mean(attr, names) or f"Check the class name in {module_name}."
        raise ConfigError(path, f'"{token}": {module_name} has no {attr}', hint)
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise ConfigError(path, f'"{token}" is not a Keras layer class', "Name a keras.layers.Layer subclass.")


def _init_params(cls: type) -> set[str] | None:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            sig = inspect.signature(klass.__init__)
        except (TypeError, ValueError):
            return None
        for p in sig.parameters.values():
            if p.kind == p.VAR_KEYWORD and klass.__module__.startswith("keras") and klass.__name__ == "Layer":
                continue
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
        if klass.__name__ == "Layer":
            break
    return names


def check_layer_params(types: tuple[str, ...], params: Mapping[str, Any], path: str, custom_types=None) -> None:
    """A layer_params key must be a config key of at least one of the named classes."""
    if not params or not types:
        return
    allowed: set[str] = set(COMMON_CONFIG_KEYS)
    for t in types:
        cls = resolve_layer_class(t, custom_types)
        names = _init_params(cls) if cls is not None else None
        if names is None:
            return  # an unresolvable or opaque class: cannot check here
        allowed |= names
    for key in params:
        if key not in allowed:
            hint = did_you_mean(key, sorted(allowed)) or f"{'|'.join(types)} config keys: {', '.join(sorted(allowed))}."
            raise ConfigError(f"{path}.{key}", f'"{key}" is not a config key of {"|".join(types)}', hint)
