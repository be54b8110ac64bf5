"""Checks, warnings and context around the public calls: refused inputs, keys that do nothing, models too deep to
load, the garbage collector kept off the caller's objects.

Each raises a `ConfigError`/`UnsupportedError` that names what to change, or
warns once per call; `qstrat.api` and `qstrat.qat` call them before long work.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from qstrat.arrays import to_numpy
from qstrat.errors import ConfigError, PendingKeyWarning, did_you_mean
from qstrat.graph.ir import Graph
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.passes.optimize import OptimizeReport
from qstrat.strategy import Strategy
from qstrat.strategy.keys import idle_settings, pending_settings
from qstrat.strategy.match import Matcher, config_of, norm, param_value
from qstrat.strategy.schema import LayerPattern, thaw


def check_rounding_overrides(rounding: str, overrides: Mapping[str, Any]) -> None:
    """An explicit activation or input round mode contradicts ``export_rounding``, which sets them."""
    for key in ("activation_round_mode", "input_round_mode"):
        if overrides.get(key) is not None:
            raise ConfigError(
                key,
                f'{key}="{overrides[key]}" contradicts export_rounding="{rounding}", which sets the activation '
                "and input round modes",
                f'Drop {key}, or set export_rounding to "".',
            )


def refuse_quantized(graph: Graph) -> None:
    """A quantized model holds qstrat's quantizers already; quantizing it again would stack a second set."""
    from qstrat.errors import UnsupportedError

    found = [n.layer_name for n in graph.nodes if isinstance(n.op, (FakeQuant, QuantizeWrapper))]
    if found:
        raise UnsupportedError(
            f"'{graph.name}' is already quantized: it holds {len(found)} qstrat quantizer layers "
            f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}). Quantize the float model instead; "
            "to change a quantized model's settings, quantize the float model again with the new strategy."
        )


def refuse_non_finite_weights(graph: Graph) -> None:
    """A weight that holds NaN or Inf (a diverged training run, a damaged file) makes every quantizer after it
    meaningless; name it before any work, rather than the activation it spoils."""
    variables = [v for node in graph.nodes for v in getattr(node.op, "weights", ())]
    refuse_non_finite(
        variables, graph.name, "The float model cannot be quantized with them: retrain it, or load its weights again."
    )


def refuse_non_finite(variables, owner: str, fix: str) -> None:
    """Raise `UnsupportedError` naming the first float variable of ``variables`` that holds NaN or Inf."""
    import keras
    import numpy as np

    from qstrat.errors import UnsupportedError

    seen = set()
    for v in variables:
        if id(v) in seen or not keras.backend.is_float_dtype(v.dtype):
            continue
        seen.add(id(v))
        values = to_numpy(v)
        if not np.isfinite(values).all():
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            raise UnsupportedError(
                f"'{owner}': weight {v.path} holds {bad} NaN or Inf values (of {values.size}). {fix}"
            )


# Frames keras.models.load_model uses besides one per layer of the longest path.
_LOAD_FRAMES = 100


def warn_deep(qgraph: Graph) -> None:
    """Say so when keras.models.load_model would pass Python's recursion limit on this model."""
    depth, limit = qgraph.depth(), sys.getrecursionlimit()
    if depth + _LOAD_FRAMES > limit:
        warnings.warn(
            f"the quantized model is {depth} layers deep (a FakeQuant follows most layers). keras.models.load_model "
            f"maps a graph recursively and passes Python's recursion limit ({limit}) on it: load the saved model with "
            f"qstrat.load_model(path), which makes room, or call sys.setrecursionlimit({2 * depth + 1000}) first.",
            stacklevel=3,
        )


def warn_pending(strategy: Strategy) -> None:
    """One warning per call listing the strategy's keys that are set but do not act yet, and one for keys
    set while the key they need is off."""
    sections = {
        "optimize_pipeline_config": strategy.optimize,
        "quantize_pipeline_config": strategy.quantize,
        "refine_pipeline_config": strategy.refine,
    }
    idle = idle_settings(sections)
    if idle:
        warnings.warn("; ".join(idle) + ".", stacklevel=3)
    lines = pending_settings(sections)
    if lines:
        warnings.warn(
            f"{len(lines)} strategy key(s) are set but have no effect yet; the model is quantized without them:\n  "
            + "\n  ".join(lines),
            PendingKeyWarning,
            stacklevel=3,
        )


def warn_unknown_layer_names(strategy: Strategy, graph: Graph, report: OptimizeReport | None) -> None:
    """Warn about names in the partition keys that no layer of the optimized model answers to."""
    known = {n.layer_name for n in graph.nodes} | {n.meta["origin"] for n in graph.nodes if n.meta.get("origin")}
    for key in ("input_layers", "output_layers", "ignore_layers", "layer_config"):
        for name in strategy.user[key]:
            if name in known:
                continue
            why = [e.detail for e in (report.events if report else []) if e.node == name and e.kind == "changed"]
            hint = f" The optimize stage changed it: {why[0]}." if why else f" {did_you_mean(name, known) or ''}"
            warnings.warn(
                f'user_defined_quantize_config.{key} names "{name}", but no layer of the optimized model '
                f"has that name, so the setting does nothing.{hint}".rstrip(),
                stacklevel=3,
            )
    for i, pattern in enumerate(strategy.patterns):
        if not pattern.layer_name or any(re.fullmatch(pattern.layer_name, name) for name in known):
            continue
        hint = did_you_mean(pattern.layer_name, known) or ""
        warnings.warn(
            f'quantize_registry_config.layer_quantize_config[{i}] ({pattern.pattern_name}): layer_name "'
            f'{pattern.layer_name}" matches no layer of the optimized model, so the rule does nothing. {hint}'.rstrip(),
            stacklevel=3,
        )


def _kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "a dict" if isinstance(value, Mapping) else type(value).__name__


def _patterns(entries, path: str):
    """(pattern, its path in the strategy) for ``entries`` and the patterns in their layer_inputs."""
    for i, pattern in enumerate(entries):
        if isinstance(pattern, LayerPattern):
            yield pattern, f"{path}[{i}]"
            yield from _patterns(pattern.layer_inputs, f"{path}[{i}].layer_inputs")


def warn_unmatchable_params(strategy: Strategy, graph: Graph, custom_types=None) -> None:
    """Warn about a layer_params value of another kind than the layers of its type hold (``"3"`` or ``3``
    for a kernel_size that Conv2D holds as ``[3, 3]``): matching is by equality, so it matches no layer."""
    matcher = Matcher(strategy, custom_types)
    for pattern, path in _patterns(strategy.patterns, "quantize_registry_config.layer_quantize_config"):
        if not pattern.layer_params:
            continue
        layers = [n.op for n in graph.nodes if matcher.type_matches(pattern, n.op)]
        for key, want in pattern.layer_params.items():
            held = [(layer, param_value(config_of(layer), key)) for layer in layers]
            held = [(layer, value) for layer, value in held if value is not None]
            if not held or _kind(thaw(want)) in {_kind(value) for _, value in held}:
                continue
            layer, value = held[0]
            example = json.dumps(norm(value))
            warnings.warn(
                f"{path}.layer_params.{key}: {json.dumps(thaw(want))} is {_kind(thaw(want))}, but "
                f"{type(layer).__name__} layers hold {key} as {_kind(value)} ({example} on '{layer.name}'), so "
                f"the rule ({pattern.pattern_name}) matches no layer and does nothing. Write it as they hold it, "
                f"e.g. {example}.",
                stacklevel=3,
            )


@contextlib.contextmanager
def caller_objects_frozen():
    """While it is open, the objects that existed when it opened are out of the cyclic garbage collector's way.

    A full collection scans every object the process tracks, the caller's
    included, and allocating graphs and layers sets one off every call or
    two (`bench/speed.py --no-freeze`: 0.24 s of collection in three
    mini-Xception calls, against 0.02 s with the freeze). ``gc.freeze()`` on entry leaves
    those objects out of every collection until ``gc.unfreeze()`` on exit;
    what the call makes is collected as usual, and what was garbage before
    it is collected after it. Nothing is done when the collector is off or
    the caller froze objects itself (an outer call, or ``gc.freeze`` before
    forking workers): their freeze is theirs to lift. A context, not a
    decorator: the public call's warnings keep pointing at the user's line.
    """
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
