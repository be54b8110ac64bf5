"""The README's worked strategy example is a real file that does what the README says."""

import json
import pathlib

import keras

from qstrat.strategy import load_strategy, resolve_views
from qstrat.strategy.views import views_of_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "first_last_16bit.json"


def test_readme_shows_the_example_file_verbatim():
    assert EXAMPLE.read_text().strip() in (ROOT / "README.md").read_text()


def test_first_and_last_conv_16_bit_head_float():
    i = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, name="conv_first")(i)
    x = keras.layers.Conv2D(8, 3, name="conv_mid")(x)
    x = keras.layers.Conv2D(8, 3, name="conv_last")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(3, name="head")(x)
    m = keras.Model(i, x)
    s = load_strategy("pof2s", str(EXAMPLE))
    r = resolve_views(s, views_of_model(m))
    for name in ("conv_first", "conv_last"):
        assert {t.params["bit_width"] for t in r[name].targets} == {16}
        assert r[name].target("kernel").params["method"] == "Min_MSE"  # the rest comes from pof2s
    assert {t.params["bit_width"] for t in r["conv_mid"].targets} == {8}
    assert not r["head"].quantized and "float32" in r["head"].skip_reason
    assert json.loads(EXAMPLE.read_text())["base"] == "pof2s"


def test_the_example_reaches_the_output_of_a_conv_whose_activation_is_split_off():
    """Conv2D(activation="relu"): the optimize stage splits the ReLU off and its output is quantized after it;
    the rule's 16-bit output moves there, as layer_config's would (with activation_unsigned kept)."""
    import numpy as np

    import qstrat

    i = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_first")(i)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_last")(x)
    m = keras.Model(i, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x)))
    data = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    for custom, kw in ((str(EXAMPLE), {}), (None, {"layer_config": {"conv_first": "int16"}})):
        qm = qstrat.Quantizer(m, "pof2s", custom).quantize_model(data, verbose=0, activation_unsigned=True, **kw)
        out = qm.get_layer("conv_first_relu_output_q").quantizer
        assert (out.params.bit_width, out.params.unsigned) == (16, True), custom
