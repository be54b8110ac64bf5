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
