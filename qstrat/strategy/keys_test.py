"""The key table: complete against the reference tool, and the README copy is current."""

import pathlib

import pytest

from qstrat.strategy.keys import SECTIONS
from qstrat.strategy.keys_doc import README_BEGIN, README_END, keys_table_markdown

pytestmark = pytest.mark.portable

# Every pipeline key the reference tool accepts (optimize, quantize, refine, finalize).
REFERENCE_KEYS = {
    "remove_dropout",
    "separate_conv_act",
    "fold_conv_bn",
    "convert_bn_to_dwconv",
    "convert_relu6_to_relu",
    "convert_tf_op_to_keras",
    "include_cle",
    "cle_to_relu6",
    "cle_steps",
    "cle_balance_method",
    "cle_weight_threshold",
    "train_with_bn",
    "separable_conv",
    "convert_datatype",
    "convert_sigmoid_to_hard_sigmoid",
    "convert_hard_sigmoid_to_dpu_version",
    "convert_average_pooling2d_to_dpu_version",
    "convert_leaky_relu_to_dpu_version",
    "convert_softmax_to_dpu_version",
    "convert_layernorm_to_dpu_version",
    "freeze_bn_delay",
    "quantize_with_xcompiler",
    "no_quant_in_conv_bn_act",
    "no_quant_in_conv_act",
    "no_quant_in_add_act",
    "adjust_dpu_sigmoid",
    "adjust_dpu_shift_cut",
    "adjust_dpu_shift_bias",
    "adjust_dpu_shift_bias_leakyrelu",
    "adjust_dpu_shift_read",
    "adjust_dpu_shift_write",
    "adjust_dpu_shift_swish",
    "align_concat",
    "align_pool",
    "include_fast_ft",
    "fast_ft_epochs",
    "include_bias_corr",
    "convert_to_fs_quantize_strategy",
    "convert_to_pof2s_quantize_strategy",
    "output_format",
    "onnx_opset_version",
    "output_dir",
}


def test_every_reference_key_has_a_meaning():
    ours = {k for keys in SECTIONS.values() for k in keys}
    assert REFERENCE_KEYS - ours == set()
    for keys in SECTIONS.values():
        for spec in keys.values():
            assert len(spec.doc) > 20, spec.name


def test_readme_table_is_generated_from_the_schema():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index(README_BEGIN) + len(README_BEGIN) : readme.index(README_END)]
    assert block.strip() == keys_table_markdown().strip(), "run: python -m qstrat.strategy.keys_doc README.md"


def _sections(strategy):
    return {
        "optimize_pipeline_config": strategy.optimize,
        "quantize_pipeline_config": strategy.quantize,
        "refine_pipeline_config": strategy.refine,
    }


def test_pending_settings_name_exactly_the_pending_keys_set_away_from_their_default():
    from qstrat.strategy import load_strategy
    from qstrat.strategy.keys import pending_settings

    scratch = load_strategy("", None)
    assert pending_settings(_sections(scratch)) == []  # from scratch every key has its default
    lines = pending_settings(
        _sections(load_strategy("", None, convert_layernorm_to_dpu_version=True, include_fast_ft=True))
    )
    assert [line.split(":")[0] for line in lines] == [
        "quantize_pipeline_config.convert_layernorm_to_dpu_version = true"
    ]
    pof2s = load_strategy("pof2s")
    named = {line.split(" = ")[0].split(".")[1] for line in pending_settings(_sections(pof2s))}
    want = {
        k
        for section, keys in SECTIONS.items()
        for k, spec in keys.items()
        if spec.pending and pof2s.to_dict()[section][k] != spec.default and not spec.needs
    }
    assert named == want == set()  # every key pof2s sets acts
    softmax = load_strategy("pof2s", convert_softmax_to_dpu_version=True)
    assert [line.split(" = ")[0] for line in pending_settings(_sections(softmax))] == [
        "quantize_pipeline_config.convert_softmax_to_dpu_version"
    ]


def test_the_built_in_strategies_set_no_key_that_warns():
    """A user who loads a built-in and changes nothing gets no warning about a key it sets."""
    from qstrat.strategy import load_strategy
    from qstrat.strategy.keys import idle_settings, pending_settings

    for name in ("pof2s", "fs", "tqt"):
        sections = _sections(load_strategy(name))
        assert idle_settings(sections) == [] and pending_settings(sections) == [], name


def test_a_key_that_needs_another_is_named_while_that_one_is_off():
    from qstrat.strategy import load_strategy
    from qstrat.strategy.keys import idle_settings, pending_settings

    assert not [k for keys in SECTIONS.values() for k in keys.values() if k.pending and k.needs]
    alone = load_strategy("", None, fast_ft_epochs=3, fast_ft_input="float")
    assert pending_settings(_sections(alone)) == []  # every fast finetune key acts
    assert idle_settings(_sections(alone)) == [
        "refine_pipeline_config.fast_ft_epochs = 3 does nothing while include_fast_ft is off",
        'refine_pipeline_config.fast_ft_input = "float" does nothing while include_fast_ft is off',
    ]
    assert idle_settings(_sections(load_strategy("", None, fast_ft_epochs=3, include_fast_ft=True))) == []


def test_an_acting_key_set_while_the_key_it_needs_is_off_is_named():
    from qstrat.strategy import load_strategy
    from qstrat.strategy.keys import idle_settings

    assert idle_settings(_sections(load_strategy("", None, cle_steps=3, include_cle=True))) == []
    assert idle_settings(_sections(load_strategy("", None, cle_steps=10))) == []  # the default: nothing set
    assert idle_settings(_sections(load_strategy("", None, cle_steps=3, cle_balance_method="avg"))) == [
        "optimize_pipeline_config.cle_steps = 3 does nothing while include_cle is off",
        'optimize_pipeline_config.cle_balance_method = "avg" does nothing while include_cle is off',
    ]
