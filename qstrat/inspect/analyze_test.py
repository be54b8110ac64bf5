"""analyze: per-layer error against the float computation, each layer alone, and the quantizers' ranges."""

import math

import keras
import numpy as np
import pytest

import qstrat
from qstrat import CalibrationDataError
from qstrat.inspect import analyze
from qstrat.layers.fake_quant import set_quantizers_enabled

pytestmark = pytest.mark.portable
PLAIN = {"include_cle": False, "include_bias_corr": False}


def _wide_model(factor=1000.0):
    """A dense chain whose middle layer has one output channel 1000x wider than the rest.

    The head reads nothing from that channel (its kernel row is 0), so the float
    outputs do not depend on it; but a per-tensor grid wide enough for it leaves
    the other 15 channels of "wide" a few steps each.
    """
    rng = np.random.default_rng(0)
    i = keras.Input((16,), name="x")
    d1 = keras.layers.Dense(16, activation="relu", name="d1")
    wide = keras.layers.Dense(16, name="wide")
    head = keras.layers.Dense(4, name="head")
    y = head(wide(d1(i)))
    model = keras.Model(i, y)
    d1.set_weights([rng.normal(0, 0.3, (16, 16)).astype("float32"), np.zeros(16, "float32")])
    k = rng.normal(0, 0.3, (16, 16)).astype("float32")
    k[:, 0] *= factor
    wide.set_weights([k, np.zeros(16, "float32")])
    h = rng.normal(0, 0.3, (16, 4)).astype("float32")
    h[0] = 0.0
    head.set_weights([h, np.zeros(4, "float32")])
    return model, rng.normal(size=(96, 16)).astype("float32")


def test_the_layer_with_a_wide_activation_range_ranks_first():
    model, x = _wide_model()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, **PLAIN)
    result = analyze(model, qmodel, x, verbose=0)
    ranking = result.ranking()
    assert ranking[0] == "wide", result.table()
    wide = result.layer("wide")
    assert wide.alone_sqnr_db < result.layer(ranking[1]).alone_sqnr_db
    out = next(r for r in wide.ranges if r.target == "wide/output")
    assert out.grid_max >= out.observed_max * 0.5 and out.grid_max > 100  # the grid spans the wide channel
    assert set(result.passes) == {"statistics", "alone", "weight/activation split", "left out"}
    assert result.passes["alone"] == len(result.layers)


def _two_heads():
    """Two inputs, two outputs, no path between them: each head's error is its own."""
    ia, ib = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    model = keras.Model([ia, ib], [keras.layers.Dense(3, name="da")(ia), keras.layers.Dense(3, name="db")(ib)])
    rng = np.random.default_rng(1)
    # Multiples of 1/16 within +-6.25: exactly on the inputs' 8-bit grid (step 1/16), so the input quantizers add nothing.
    data = [rng.integers(-100, 101, (64, 8)).astype("float32") / 16 for _ in range(2)]
    return model, data


def test_alone_errors_add_up_when_the_errors_are_independent():
    model, data = _two_heads()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(data, verbose=0, **PLAIN)
    result = analyze(model, qmodel, data, batch_size=16, verbose=0)
    by_name = {la.name: la for la in result.layers}
    assert by_name["a"].alone_sse == 0.0 and by_name["b"].alone_sse == 0.0  # exact on the grid
    assert by_name["da"].alone_sse > 0 and by_name["db"].alone_sse > 0
    # The alone runs reproduce each head's error element for element; only float64 summation order differs.
    total = sum(la.alone_sse for la in result.layers)
    assert total == pytest.approx(result.output_sse, rel=1e-9)


def test_left_out_is_the_rest_of_the_model_quantized():
    model, data = _two_heads()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(data, verbose=0, **PLAIN)
    result = analyze(model, qmodel, data, batch_size=16, left_out=True, verbose=0)
    da, db = result.layer("da"), result.layer("db")
    # With "da" left out only "db" quantizes anything (the inputs are exact): the same error as "db" alone.
    assert da.left_out_sqnr_db == pytest.approx(db.alone_sqnr_db, rel=1e-12)
    assert db.left_out_sqnr_db == pytest.approx(da.alone_sqnr_db, rel=1e-12)
    assert result.gain_ranking()[0] == ("da" if da.alone_sse > db.alone_sse else "db")
    assert result.passes["left out"] == len(result.layers)


def test_cumulative_figures_match_a_direct_computation():
    model, x = _wide_model(factor=1.0)
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, **PLAIN)
    result = analyze(model, qmodel, x, batch_size=32, alone=False, verbose=0)
    on = np.asarray(qmodel.predict(x, batch_size=32, verbose=0), np.float64)
    set_quantizers_enabled(qmodel, False)
    off = np.asarray(qmodel.predict(x, batch_size=32, verbose=0), np.float64)
    set_quantizers_enabled(qmodel, True)
    head = result.layer("head")  # its tapped tensor is the model output, after its output quantizer
    e = on - off
    # analyze rounds each float32 product once (relative 2^-24) and sums in float64: every sum is good to
    # 2^-24 relative, so the SQNR to 10*log10(1 + 2^-23) dB, the MSE and cosine to a few 2^-24.
    assert head.sqnr_db == pytest.approx(10 * math.log10(np.sum(off * off) / np.sum(e * e)), abs=5e-7)
    assert head.mse == pytest.approx(np.mean(e * e), rel=4 * 2.0**-24)
    cos = np.sum(on * off) / math.sqrt(np.sum(on * on) * np.sum(off * off))
    assert head.cosine == pytest.approx(cos, rel=4 * 2.0**-24)
    assert result.layer("wide").alone_sqnr_db is None  # alone=False


def test_ranges_are_the_grid_against_what_the_quantizer_saw():
    model, x = _wide_model(factor=1.0)
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, **PLAIN)
    x = x.copy()
    x[0, 0] = 1e4  # after calibration: one value far beyond the grid
    result = analyze(model, qmodel, x, alone=False, verbose=0)
    r = result.layer("x").ranges[0]
    pos = qstrat.get_quantize_info(qmodel)["x"]["output"]["quantize_pos"]
    lo, hi = -128 * 2.0**-pos, 127 * 2.0**-pos
    assert (r.grid_min, r.grid_max) == (lo, hi)
    assert (r.observed_min, r.observed_max) == (float(x.min()), float(x.max()))
    assert r.clipped == np.mean((x < lo) | (x > hi)) and r.clipped > 0
    k = result.layer("d1").ranges[0]
    kernel = keras.ops.convert_to_numpy(model.get_layer("d1").kernel)
    assert (k.observed_min, k.observed_max) == (float(kernel.min()), float(kernel.max()))
    assert sum(k.hist_counts) == kernel.size


def test_the_quantized_model_is_left_as_it_came():
    model, x = _wide_model()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    before = [np.array(w) for w in qmodel.get_weights()]
    analyze(model, qmodel, x, verbose=0)
    for a, b in zip(before, qmodel.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = keras.Model(model.inputs, [model.output, model.output])
    with pytest.raises(CalibrationDataError, match="outputs"):
        analyze(other, qmodel, x, verbose=0)
    for a, b in zip(before, qmodel.get_weights(), strict=True):  # also after an error mid-way
        np.testing.assert_array_equal(a, b)


def test_json_has_no_infinities():
    import json

    model, data = _two_heads()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(data, verbose=0, **PLAIN)
    d = analyze(model, qmodel, data, verbose=0).to_dict()
    text = json.dumps(d, allow_nan=False)  # raises on inf/nan
    assert json.loads(text)["layers"][0]["alone_sqnr_db"] is None  # input "a": exact, no error


def test_a_quantized_model_given_as_the_float_one_and_a_flag_that_is_not_a_bool_are_refused():
    model, x = _wide_model()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    with pytest.raises(qstrat.UnsupportedError, match="the float model .* has qstrat quantizers"):
        analyze(qmodel, qmodel, x, verbose=0)  # it would score infinite SQNR against itself
    for flag in ("False", 0, None):
        with pytest.raises(qstrat.ConfigError, match="enabled=...\\): expected true or false"):
            set_quantizers_enabled(qmodel, flag)
    assert set_quantizers_enabled(qmodel, np.bool_(False)) == set_quantizers_enabled(qmodel, True) > 0
