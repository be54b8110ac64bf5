"""Mixed precision under a budget: the most sensitive layers are raised first, the budget is met with as few as
possible, and the layer_config it reports reproduces the model bit for bit."""

import numpy as np
import pytest

import qstrat
from qstrat import ConfigError
from qstrat.inspect.analyze_test import PLAIN, _wide_model
from qstrat.inspect.mixed import output_sqnr

pytestmark = pytest.mark.portable


def _same_weights(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True))


def test_target_sqnr_raises_the_sensitive_layer_and_the_layer_config_reproduces_the_model():
    model, x = _wide_model()
    q = qstrat.Quantizer(model, "pof2s")
    base = output_sqnr(model, q.quantize_model(x, verbose=0, **PLAIN), x, 32)
    qmodel = q.quantize_model(x, verbose=0, target_sqnr=base + 20.0, max_raised=1.0, **PLAIN)
    mixed = q.mixed_precision
    assert mixed.met and mixed.raised[0] == "wide" and mixed.ranking[0] == "wide"
    assert mixed.layer_config == {n: "int16" for n in mixed.raised}
    assert output_sqnr(model, qmodel, x, 32) == pytest.approx(mixed.score, abs=1e-9) and mixed.score >= base + 20
    # As few layers as the search found: one fewer was tried (the bisection's lower end) and missed the target.
    assert dict(mixed.tried)[len(mixed.raised) - 1] < mixed.target
    again = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, layer_config=mixed.layer_config, **PLAIN)
    assert _same_weights(qmodel, again)
    info = qstrat.get_quantize_info(qmodel)
    assert info["wide"]["kernel"]["bit_width"] == 16 and info["wide"]["output"]["bit_width"] == 16


def test_an_accuracy_budget_uses_the_users_score():
    model, x = _wide_model()
    reference = np.asarray(model.predict(x, verbose=0))
    calls = []

    def eval_fn(m):
        calls.append(m.name)
        return -float(np.mean((np.asarray(m.predict(x, verbose=0)) - reference) ** 2))

    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(x, verbose=0, accuracy_budget=1e-3, eval_fn=eval_fn, max_raised=1.0, **PLAIN)
    assert q.mixed_precision.met and eval_fn(qmodel) >= -1e-3
    assert calls[0] == model.name  # the float model's score first


def test_a_budget_out_of_reach_warns_and_says_so():
    model, x = _wide_model()
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match="not met"):
        q.quantize_model(x, verbose=0, target_sqnr=500.0, max_raised=0.34, **PLAIN)
    assert not q.mixed_precision.met and len(q.mixed_precision.raised) == 1  # 34% of 4 layers: one


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"accuracy_budget": 0.01}, "needs eval_fn"),
        ({"eval_fn": len}, "without accuracy_budget"),
        ({"accuracy_budget": 0.01, "eval_fn": len, "target_sqnr": 30.0}, "Give one budget"),
        ({"target_sqnr": 30.0, "max_raised": 0}, "fraction"),
        ({"target_sqnr": 30.0, "raise_to": "int4"}, "int16"),
    ],
)
def test_a_bad_budget_is_refused_before_any_work(kwargs, message):
    model, x = _wide_model()
    with pytest.raises(ConfigError, match=message):
        qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, **kwargs)


def test_raising_layers_that_score_worse_returns_the_model_with_none_raised():
    """A score that falls as layers are raised (the user's eval_fn may say so): the search never returns a
    model that scores below the one with none raised."""
    from qstrat.layers import QuantizeWrapper

    model, x = _wide_model()

    def eval_fn(m):
        if not any(isinstance(layer, QuantizeWrapper) for layer in m.layers):
            return 1.0  # the float model
        info = qstrat.get_quantize_info(m)
        return 0.2 if any(t.get("bit_width") == 16 for v in info.values() for t in v.values()) else 0.5

    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match=r"below the score 0.5 with none raised, so none are"):
        qmodel = q.quantize_model(x, verbose=0, accuracy_budget=0.1, eval_fn=eval_fn, max_raised=0.5, **PLAIN)
    mixed = q.mixed_precision
    assert not mixed.met and mixed.raised == [] and mixed.layer_config == {} and mixed.score == 0.5
    assert [k for k, _ in mixed.tried] == [0, 2] and eval_fn(qmodel) == 0.5
