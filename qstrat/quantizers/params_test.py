"""Quantizer parameters: seed spellings accepted, everything else rejected with a clear message."""

import pytest

from qstrat.errors import ConfigError
from qstrat.quantizers import FSQuantizer, MAFSQuantizer, Pof2SQuantizer, TQTQuantizer
from qstrat.quantizers.grid import DataFormat, Method, RoundMode, int_grid

pytestmark = pytest.mark.portable

ALL = [Pof2SQuantizer, FSQuantizer, MAFSQuantizer, TQTQuantizer]


@pytest.mark.parametrize("bits", range(1, 33))
def test_int_grid_for_every_bit_width(bits):
    g = int_grid(bits)
    assert (g.qmin, g.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    u = int_grid(bits, unsigned=True)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    if bits > 1:
        n = int_grid(bits, narrow_range=True)
        assert n.qmin == -n.qmax


@pytest.mark.parametrize("cls", ALL)
def test_config_round_trip(cls):
    kw = dict(bit_width=6, method="Percentile", method_percentile=99.5, round_mode="HALF_AWAY_FROM_ZERO")
    q = cls(**kw)
    again = cls.from_config(q.get_config())
    assert again == q and again.get_config() == q.get_config()
    assert set(q.get_config()) == set(cls.accepted)
    assert q.get_config()["round_mode"] == "HALF_AWAY_FROM_ZERO"


def test_seed_parameter_sets():
    seed_pof2s = {
        "bit_width",
        "data_format",
        "method",
        "round_mode",
        "symmetry",
        "per_channel",
        "channel_axis",
        "unsigned",
        "narrow_range",
        "epsilon",
        "min_quantize_pos",
        "max_quantize_pos",
    }
    assert seed_pof2s <= set(Pof2SQuantizer.accepted)
    assert {"use_framework_quantizer", "data_format"} <= set(FSQuantizer.accepted)
    assert "ema_decay" in MAFSQuantizer.accepted
    assert "min_quantize_pos" not in TQTQuantizer.accepted


def test_values_are_parsed_into_enums():
    q = Pof2SQuantizer(method="Min_MSE", round_mode="HALF_UP", data_format="UINT")
    assert q.params.method is Method.MIN_MSE and q.params.round_mode is RoundMode.HALF_UP
    assert q.params.data_format is DataFormat.UINT and q.params.is_unsigned
    assert q.grid == int_grid(8, unsigned=True)


@pytest.mark.parametrize(
    "cls,kw,match",
    [
        (Pof2SQuantizer, {"bit_width": 0}, r"Pof2SQuantizer\.bit_width: expected an integer in \[1, 32\], got 0\."),
        (Pof2SQuantizer, {"bit_width": 33}, r"bit_width: expected an integer in \[1, 32\], got 33"),
        (
            Pof2SQuantizer,
            {"bit_width": "8"},
            r'bit_width: expected an integer in \[1, 32\], got "8" \(a string\)\. Write 8 without quotes\.',
        ),
        (Pof2SQuantizer, {"bit_width": 8.0}, r"Write 8 without a decimal point"),
        (Pof2SQuantizer, {"bit_width": True}, r"expected an integer in \[1, 32\], got true"),
        (FSQuantizer, {"data_format": "FP16", "bit_width": 32}, r'data_format "FP16" stores 16 bits per value'),
        (
            Pof2SQuantizer,
            {"round_mode": "HALF_EVEN"},
            r'round_mode: expected one of .*"HALF_TO_EVEN".*got "HALF_EVEN".*Did you mean "HALF_TO_EVEN"\?',
        ),
        (Pof2SQuantizer, {"round_mode": 1}, r'1 is the Vitis AI integer code; write "HALF_UP"'),
        (Pof2SQuantizer, {"method": "min_mse"}, r'Did you mean "Min_MSE"\? Names are case-sensitive'),
        (Pof2SQuantizer, {"method": 2}, r'write "Min_KL"'),
        (Pof2SQuantizer, {"symetry": True}, r'Pof2SQuantizer: unknown key "symetry"\. Did you mean "symmetry"\?'),
        (Pof2SQuantizer, {"ema_decay": 0.9}, r'Pof2SQuantizer has no parameter "ema_decay"'),
        (Pof2SQuantizer, {"data_format": "FP16"}, r'data_format: expected one of "INT", "UINT", got "FP16"'),
        (
            Pof2SQuantizer,
            {"symmetry": "true"},
            r"symmetry: expected true or false, got \"true\" \(a string\)\. Write true or false without quotes",
        ),
        (Pof2SQuantizer, {"unsigned": True, "narrow_range": True}, r"narrow_range: .*unsigned grid has none"),
        (Pof2SQuantizer, {"bit_width": 1, "narrow_range": True}, r"1-bit narrow grid has a single level"),
        (
            Pof2SQuantizer,
            {"min_quantize_pos": 10, "max_quantize_pos": 2},
            r"min_quantize_pos 10 is above max_quantize_pos 2",
        ),
        (Pof2SQuantizer, {"epsilon": 0}, r"epsilon: expected a positive number, got 0"),
        (Pof2SQuantizer, {"method_percentile": 101}, r"method_percentile: expected a number in \(50, 100\], got 101"),
        (MAFSQuantizer, {"ema_decay": 1.0}, r"ema_decay: expected a number in \(0, 1\), got 1\.0"),
        (
            TQTQuantizer,
            {"per_channel": True},
            r"TQTQuantizer\.per_channel: TQTQuantizer learns one threshold per tensor",
        ),
        (TQTQuantizer, {"symmetry": False}, r"TQTQuantizer\.symmetry: TQTQuantizer is symmetric"),
        (
            FSQuantizer,
            {"data_format": "FP16"},
            r'data_format "FP16" stores 16 bits per value, got bit_width 8\. Set bit_width to 16',
        ),
        (
            FSQuantizer,
            {"data_format": "BF16", "bit_width": 16, "round_mode": "HALF_UP"},
            r"rounds like an IEEE conversion",
        ),
        (
            FSQuantizer,
            {"use_framework_quantizer": True, "round_mode": "HALF_TO_EVEN"},
            r"the framework quantizer rounds HALF_UP only",
        ),
        (
            FSQuantizer,
            {"use_framework_quantizer": True, "round_mode": "HALF_UP", "bit_width": 1},
            r"framework quantizer needs bit_width 2 to 16",
        ),
        (
            FSQuantizer,
            {"use_framework_quantizer": True, "round_mode": "HALF_UP", "bit_width": 17},
            r"framework quantizer needs bit_width 2 to 16, got 17\. Set use_framework_quantizer to false for wider",
        ),
    ],
)
def test_invalid_parameters_are_named(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


def test_errors_can_be_located_under_a_json_path():
    path = "$.quantize_registry_config.layer_quantize_config[3].quant_config[0].quantizer_config.params"
    with pytest.raises(ConfigError) as info:
        Pof2SQuantizer.from_params({"bit_width": "8"}, path)
    assert str(info.value).startswith(path + '.bit_width: expected an integer in [1, 32], got "8"')
    moved = ConfigError("bit_width", "bad").with_prefix("$.a")
    assert moved.path == "$.a.bit_width" and str(moved) == "$.a.bit_width: bad."


def test_params_object_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected an object of quantizer parameters"):
        Pof2SQuantizer.from_params(["bit_width", 8], "$.params")


def test_float_formats_are_accepted_with_their_width():
    for fmt in ("FP16", "BF16", "BFP16"):
        q = FSQuantizer(data_format=fmt, bit_width=16)
        assert q.observer_spec() is None and q.state_spec((4, 8)) == {}
