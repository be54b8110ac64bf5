"""inspect_model: every layer of the float model, with its rule, quantizers, and what the passes did."""

import pytest

import qstrat
from qstrat import zoo
from qstrat.inspect import rows_table, supported_table

pytestmark = pytest.mark.portable


def test_every_layer_is_listed_with_what_happened_to_it():
    model = zoo.digits_mobilenet()
    rows = qstrat.Quantizer(model, "pof2s").inspect_model()
    by_name = {r["name"]: r for r in rows}
    assert [layer.name for layer in model.layers] == [r["name"] for r in rows[: len(model.layers)]]
    assert by_name["stem_bn"]["status"] == "folded" and "folded into stem" in by_name["stem_bn"]["reason"]
    stem = by_name["stem"]
    assert stem["status"] == "quantized" and stem["rules"] == ["layer_quantize_config[0] (conv_dense)"]
    assert [(q["target"], q["bit_width"]) for q in stem["quantizers"]] == [("kernel", 8), ("bias", 8)]
    assert "stem_relu" in stem["fused"]
    assert any(e.startswith("include_cle") for e in stem["optimize"])
    assert by_name["digit"]["rules"] == ["input_quantize_config"]
    table = rows_table(rows)
    assert len(table.splitlines()) == len(rows) + 1


def test_overrides_and_skips_show():
    model = zoo.digits_mobilenet()
    rows = qstrat.Quantizer(model, "pof2s").inspect_model(weight_bit=4, ignore_layers=["logits"])
    by_name = {r["name"]: r for r in rows}
    assert {q["bit_width"] for q in by_name["stem"]["quantizers"] if q["target"] == "kernel"} == {4}
    assert by_name["logits"]["status"] == "skipped" and "ignore_layers" in by_name["logits"]["reason"]


def test_supported_table_comes_from_the_strategies():
    table = supported_table(["pof2s", "fs"])
    lines = table.splitlines()
    assert lines[0] == "| layer type | pof2s | fs |"
    conv = next(line for line in lines if line.startswith("| Conv2D |"))
    assert conv == "| Conv2D | kernel (weight), bias (bias), output (output) | kernel (weight), input (input) |"
    relu = next(line for line in lines if line.startswith("| ReLU |"))
    assert relu.endswith("| - |")  # fs leaves activations to the layers that read them
