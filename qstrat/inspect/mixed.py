"""Mixed precision under a budget: raise the most sensitive layers to 16-bit (or float) until it is met.

The layers are ranked once, by `analyze`'s *left out* figure (the model
outputs' SQNR with every quantizer on but that layer's, bias corrections
in: what keeping that one layer in float gains in the model as it is) on
the first samples of the calibration data. (The *alone* figure ranks raw sensitivity, but
where bias correction removes most of a layer's error it overstates what
raising that layer buys.) Then the smallest number ``k`` of top-ranked layers whose
raise meets the budget is searched for: ``k`` at the cap first (if even that
misses, the result says so and keeps it), then bisection, each step a whole
quantization with ``layer_config`` naming the raised layers. That assumes
raising more layers never hurts, which holds for the measured figure up to
noise; the result lists every ``k`` tried and its score.

The result's ``layer_config`` is the strategy key that reproduces the
model: pass it back (``quantize_model(x, layer_config=...)``, or save it in
a strategy file) and the same layers are raised, bit for bit.

Budgets:
    target_sqnr: the model outputs' SQNR against the float model, in dB, on the samples analysed.
    accuracy_budget + eval_fn: ``eval_fn(model) -> score`` (higher is better); met when the float
        model's score minus the quantized model's is at most the budget.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qstrat.calibration.data import iterate_batches
from qstrat.calibration.inputs import KeyedSpecs, array_bundle
from qstrat.errors import ConfigError
from qstrat.inspect.analyze import analyze
from qstrat.inspect.measures import sqnr_db
from qstrat.progress import Progress

PRECISIONS = ("int16", "float32", "float16", "bfloat16")


@dataclass
class MixedPrecision:
    """What the search chose: ``layer_config`` reproduces the returned model."""

    layer_config: dict[str, str]
    raised: list[str]  # the layers raised, most sensitive first
    ranking: list[str]
    met: bool
    score: float  # SQNR in dB, or the quantized model's eval_fn score
    target: float  # the SQNR asked for, or the float score minus the budget
    tried: list[tuple[int, float]] = field(default_factory=list)  # (layers raised, score)


def check_budget(accuracy_budget, eval_fn, target_sqnr, max_raised, raise_to) -> None:
    """Refuse a half-given or contradictory budget before any work."""
    where = "quantize_model"
    if accuracy_budget is not None and target_sqnr is not None:
        raise ConfigError(where, "both accuracy_budget and target_sqnr are set", "Give one budget.")
    if accuracy_budget is not None and not callable(eval_fn):
        raise ConfigError(
            where,
            "accuracy_budget needs eval_fn, a function model -> score (higher is better)",
            "Pass eval_fn=lambda m: accuracy(m), or use target_sqnr=... instead.",
        )
    if eval_fn is not None and accuracy_budget is None:
        raise ConfigError(where, "eval_fn is given without accuracy_budget", "Add accuracy_budget=... (e.g. 0.01).")
    for name, value in (("target_sqnr", target_sqnr), ("accuracy_budget", accuracy_budget)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(where, f"{name} must be a number, got {value!r}", None)
        if value is not None and not math.isfinite(value):
            raise ConfigError(where, f"{name} must be a finite number, got {value!r}", "Give the target in dB.")
    if accuracy_budget is not None and accuracy_budget < 0:
        raise ConfigError(where, f"accuracy_budget must be 0 or more, got {accuracy_budget!r}", None)
    if isinstance(max_raised, bool) or not isinstance(max_raised, (int, float)) or not 0.0 < max_raised <= 1.0:
        raise ConfigError(where, f"max_raised must be a fraction in (0, 1], got {max_raised!r}", None)
    if raise_to not in PRECISIONS:
        raise ConfigError(where, f"raise_to {raise_to!r} is not one of {', '.join(PRECISIONS)}", None)


def first_samples(data, specs, n: int, batch_size: int):
    """The first ``n`` samples of the calibration data: an array (one input), a list of arrays, or a dict of
    them for a model that takes a dict of inputs."""
    arrays = array_bundle(data, specs)
    if arrays is None:
        parts, count = [], 0
        for batch in iterate_batches(data, specs, batch_size):
            parts.append(batch)
            count += len(batch[0])
            if count >= n:
                break
        arrays = [np.concatenate([p[i] for p in parts]) for i in range(len(specs))]
    arrays = [a[:n] for a in arrays]
    if isinstance(specs, KeyedSpecs):  # a model that takes a dict of inputs takes its data so
        return {s[0]: a for s, a in zip(specs, arrays, strict=True)}
    return arrays[0] if len(arrays) == 1 else arrays


def output_sqnr(float_model, qmodel, x, batch_size: int) -> float:
    """The model outputs' SQNR against the float model's, in dB, over every output (``x``: an array, a list
    with one per input in the model's order, or a dict keyed as the model takes it)."""
    import keras

    from qstrat.passes.runner import nested_inputs

    if not isinstance(x, dict):
        x = nested_inputs(float_model, x if isinstance(x, list) else [x])
    f = keras.tree.flatten(float_model.predict(x, batch_size=batch_size, verbose=0))
    q = keras.tree.flatten(qmodel.predict(x, batch_size=batch_size, verbose=0))
    signal = sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in f)
    noise = sum(float(np.sum(np.square(np.asarray(b, np.float64) - a))) for a, b in zip(f, q, strict=True))
    return sqnr_db(signal, noise)


def search(
    float_model,
    qmodel,
    quantize: Callable[[dict], object],
    sample,
    batch_size: int,
    user_layer_config: dict,
    accuracy_budget: float | None,
    eval_fn: Callable | None,
    target_sqnr: float | None,
    max_raised: float,
    raise_to: str,
    verbose: int,
):
    """(model, MixedPrecision): the model from the smallest raise that meets the budget.

    Args:
        quantize: ``layer_config -> quantized model`` (a whole quantize_model call).
        sample: the samples analysed and, for target_sqnr, scored.
    """
    progress = Progress(verbose)

    def evaluated(model) -> float:
        got = eval_fn(model)
        try:
            value = float(got)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(got, (bool, str)) or not math.isfinite(value):
            raise ConfigError(
                "quantize_model eval_fn",
                f"returned {got!r:.80} for '{model.name}'",
                "Return a finite number, higher for better (e.g. the accuracy on a held-out set).",
            )
        return value

    def score(model) -> float:
        return output_sqnr(float_model, model, sample, batch_size) if target_sqnr is not None else evaluated(model)

    target = target_sqnr if target_sqnr is not None else evaluated(float_model) - float(accuracy_budget)
    base = score(qmodel)
    tried = [(0, base)]
    progress.say(
        f"mixed precision: {_said(base, target_sqnr)} with no layer raised (target {_said(target, target_sqnr)})"
    )
    if base >= target:
        return qmodel, MixedPrecision(dict(user_layer_config), [], [], True, base, target, tried)
    with progress.stage("mixed precision: ranking"):
        result = analyze(float_model, qmodel, sample, batch_size, alone=False, left_out=True, verbose=0)
    ranking = [n for n in result.gain_ranking() if n not in user_layer_config]
    cap = max(1, int(max_raised * len(result.layers)))
    cap = min(cap, len(ranking))

    def attempt(k: int):
        config = {**user_layer_config, **{n: raise_to for n in ranking[:k]}}
        with progress.stage(f"mixed precision: {k} layer{'s' * (k != 1)} at {raise_to}"):
            model = quantize(config)
        s = score(model)
        tried.append((k, s))
        progress.say(f"mixed precision: {k} layer{'s' * (k != 1)} raised: {_said(s, target_sqnr)}")
        return model, s

    best = attempt(cap) if cap > 0 else (qmodel, base)
    if best[1] < target:
        k_best, returned = cap, "Returning that model"
        if best[1] < base:  # raising them made it worse: the model with none raised is the best there is
            k_best, best = 0, (qmodel, base)
            returned = f"That is below the {_said(base, target_sqnr)} with none raised, so none are"
        warnings.warn(
            f"mixed precision: the budget is not met with {cap} layer{'s' * (cap != 1)} at {raise_to} (the cap, max_raised="
            f"{max_raised}): {_said(tried[-1][1], target_sqnr)} against {_said(target, target_sqnr)}. {returned}; "
            "raise max_raised, or loosen the budget.",
            stacklevel=3,
        )
    else:
        lo, k_best = 0, cap
        while k_best - lo > 1:
            mid = (lo + k_best) // 2
            model, s = attempt(mid)
            if s >= target:
                k_best, best = mid, (model, s)
            else:
                lo = mid
    raised = ranking[:k_best]
    config = {**user_layer_config, **{n: raise_to for n in raised}}
    model = best[0]
    if tried[-1][0] != k_best:  # the last quantization sets the Quantizer's report and any file it writes
        with progress.stage(f"mixed precision: {k_best} layers at {raise_to}, again"):
            model = quantize(config)
    return model, MixedPrecision(config, raised, ranking, best[1] >= target, best[1], target, tried)


def _said(value: float, sqnr: float | None) -> str:
    return f"SQNR {value:.2f} dB" if sqnr is not None else f"score {value:.4g}"
