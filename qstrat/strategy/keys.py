"""The pipeline keys a strategy may set, with their types and meaning in qstrat.

This table is the single source: validation reads it, and the documentation
table in the README is generated from it (`qstrat.strategy.keys_doc`:
`qstrat strategy keys`, and a test checks the README is up to date). The
keys of ``user_defined_quantize_config`` are in `qstrat.strategy.user_keys`. Every key the reference tool accepts for
the optimize, quantize, refine and finalize stages is here; the finalize keys
live in ``refine_pipeline_config``, since export is qstrat's last refine step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KeySpec:
    """One pipeline key: its JSON type, allowed values and what it does."""

    name: str
    kind: str  # "bool", "int", "float", "str", "enum"
    doc: str
    default: Any = False  # the value in a strategy built from scratch ("base": "")
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    # Non-empty while qstrat does not act on the key yet: what is missing. Setting
    # such a key to anything but its default warns (`pending_settings`).
    pending: str = ""
    # A boolean or enum pipeline key without which this one has no use
    # (fast_ft_epochs needs include_fast_ft): it warns only when that one is set.
    needs: str = ""


def _b(name, doc, pending="", needs=""):
    return KeySpec(name, "bool", doc, pending=pending, needs=needs)


_DPU_UNDOCUMENTED = (
    "the DPU's {unit} unit is not described precisely enough to simulate bit for bit (where its bfloat16 "
    "roundings happen, its reciprocal method), so qstrat does not guess: the layer is quantized as it is"
)


OPTIMIZE_KEYS = (
    _b(
        "remove_dropout",
        "Drop Dropout and the other layers that act only in training (GaussianNoise, SpatialDropout, ...).",
    ),
    _b("remove_unused_layers", "Drop layers and branches that feed no model output."),
    _b(
        "convert_tf_op_to_keras",
        "Turn keras.ops operations in a functional model (add, multiply, concatenate, relu, mean, reshape, ...) into equivalent Keras layers, so they can be quantized.",
    ),
    _b("separable_conv", "Split SeparableConv2D into DepthwiseConv2D + 1x1 Conv2D, keeping its activation."),
    _b(
        "separate_conv_act",
        "Split Conv/Dense(activation=f) into a linear layer and an Activation(f) layer, so a quantizer can sit between them when the strategy wants one.",
    ),
    _b("fold_conv_bn", "Fold BatchNormalization into the Conv2D, DepthwiseConv2D, Conv2DTranspose or Dense before it."),
    _b(
        "convert_bn_to_dwconv",
        "Turn a BatchNormalization that cannot be folded into an equivalent 1x1 DepthwiseConv2D (or a scale-and-shift layer for other ranks).",
    ),
    _b(
        "convert_relu6_to_relu",
        "Replace ReLU6 by ReLU (changes outputs above 6; lets CLE rescale through the activation).",
    ),
    _b("include_cle", "Run cross-layer equalization (Nagel et al. 2019) on conv/depthwise/dense pairs."),
    _b("cle_to_relu6", "Let CLE rescale through ReLU6 too (not exactly float-equivalent).", needs="include_cle"),
    KeySpec(
        "cle_steps",
        "int",
        "Number of CLE passes over all equalizable pairs.",
        10,
        minimum=1,
        maximum=1000,
        needs="include_cle",
    ),
    KeySpec(
        "cle_balance_method",
        "enum",
        "Per-channel range measure CLE balances: the maximum or the mean of |w|.",
        "max",
        choices=("max", "avg"),
        needs="include_cle",
    ),
    KeySpec(
        "cle_weight_threshold",
        "float",
        "Channels whose two weight ranges (the largest absolute weight of the channel in the head and in the "
        "tail, whichever the balance method) add up to less than this keep scale 1, with activation-aware "
        "equalization too.",
        0.1,
        minimum=0.0,
        needs="include_cle",
    ),
    _b(
        "cle_bias_absorption",
        "After CLE, absorb large post-ReLU activation offsets into the next layer's bias.",
        needs="include_cle",
    ),
    _b(
        "include_act_eq",
        "Activation-aware equalization: CLE's per-channel factor also weighs the per-channel ranges of the "
        "tensor between the two layers, measured on the calibration data (one more pass over it, in the "
        "optimize stage). Exact in float. Without data (optimize_model, inspect_model, a one-shot generator) "
        "it warns and CLE runs on weights alone.",
        needs="include_cle",
    ),
    KeySpec(
        "act_eq_beta",
        "float",
        "Activation-aware equalization's weight: channel scale = s_weight^(1 - beta) * s_activation^beta "
        "(0: weight-only CLE, 1: activation ranges alone).",
        0.5,
        minimum=0.0,
        maximum=1.0,
        needs="include_act_eq",
    ),
    _b(
        "train_with_bn",
        "QAT (get_qat_model): each conv that absorbed a BatchNormalization trains with batch statistics (fake "
        "folding: kernel quantized folded with the moving statistics, output rescaled to the batch's); "
        "get_deploy_model folds for real. quantize_model (PTQ) folds as usual and warns when it is set.",
    ),
)

QUANTIZE_KEYS = (
    KeySpec(
        "convert_datatype",
        "enum",
        'Cast the whole optimized model to this float type instead of quantizing ("" = quantize as usual).',
        "",
        choices=("", "float16", "bfloat16", "float32", "float64"),
    ),
    _b(
        "convert_sigmoid_to_hard_sigmoid",
        "DPU: sigmoid becomes the DPU's hard sigmoid relu6(x + 3) * 2731/16384, and swish/silu x times it (changes float outputs).",
    ),
    _b(
        "convert_hard_sigmoid_to_dpu_version",
        "DPU: hard_sigmoid, and the keras.ops pattern relu6(x + 3) / 6, become the DPU's hard sigmoid (2731/16384 for 1/6); hard_silu/hard_swish x times it.",
    ),
    _b(
        "convert_average_pooling2d_to_dpu_version",
        "DPU: AveragePooling2D (windows that read no padding) and GlobalAveragePooling2D sum and multiply by the DPU's k/2^n for 1/K (3x3: 7/64).",
    ),
    _b(
        "convert_leaky_relu_to_dpu_version",
        "DPU: LeakyReLU with slope 0.1 (or a ReLU with that negative_slope, no threshold and no max_value) gets the DPU's slope 26/256; other slopes are kept, with a note in the quantize report.",
    ),
    _b(
        "convert_softmax_to_dpu_version",
        "DPU: simulate the DPU softmax unit (bfloat16 exponentials, FLOOR-rounded output).",
        _DPU_UNDOCUMENTED.format(unit="softmax"),
    ),
    _b(
        "convert_layernorm_to_dpu_version",
        "DPU: simulate the DPU LayerNormalization unit (bfloat16 arithmetic).",
        _DPU_UNDOCUMENTED.format(unit="LayerNormalization"),
    ),
    KeySpec(
        "no_quant_in_conv_bn_act",
        "bool",
        "No quantizer between a conv, a BatchNormalization left after it (one the optimize stage did not fold) and the "
        "ReLU-like activation after that (ReLU, LeakyReLU, Activation relu/relu6/linear): only the activation output "
        "is quantized. A folded BatchNormalization is gone, and its conv falls under no_quant_in_conv_act.",
        True,
    ),
    KeySpec(
        "no_quant_in_conv_act",
        "bool",
        "No quantizer between a conv and the ReLU-like activation after it (ReLU, LeakyReLU, Activation "
        "relu/relu6/linear): only the activation output is quantized. Other activations keep the conv's quantizer.",
        True,
    ),
    KeySpec(
        "no_quant_in_add_act",
        "bool",
        "No quantizer between an Add/Multiply and the ReLU-like activation after it (as for no_quant_in_conv_act).",
        True,
    ),
    KeySpec(
        "export_rounding",
        "enum",
        "Round activations and model inputs as the runtime an export targets does, so that the exported file of a "
        'power-of-2 model computes what the quantized model does (ONNX: exactly; TFLite: README "Export" says when): '
        '"onnx" (QuantizeLinear: half to even), '
        '"tflite" (its default XNNPACK kernels: half to even after convolutions, dense layers and Multiply, half '
        "up after Add and Subtract, half away from zero after averaging). \"\" keeps the strategy's rounding (the DPU's HALF_UP); the ONNX export report "
        "then counts the elements that round differently.",
        "",
        choices=("", "onnx", "tflite"),
    ),
    KeySpec(
        "freeze_bn_delay",
        "int",
        "QAT with train_with_bn: training steps before the fake-folded BatchNormalization statistics freeze "
        "(moving statistics from then on; -1 = never).",
        -1,
        minimum=-1,
        needs="train_with_bn",
    ),
    _b(
        "quantize_with_xcompiler",
        "Ask the Vitis AI compiler which patterns a DPU target runs. That needs the external compiler, which qstrat does not call: only false is accepted.",
    ),
    KeySpec(
        "calib_position_policy",
        "enum",
        'How power-of-2 activation positions are calibrated: one search over all batches ("global") or the most common per-batch position ("batch_vote").',
        "global",
        choices=("global", "batch_vote"),
    ),
)

REFINE_KEYS = (
    _b(
        "adjust_dpu_sigmoid",
        "DPU compiler constraint: hard sigmoid input position in [0, 15], output position from 7 to 14 + input position.",
    ),
    _b(
        "adjust_dpu_shift_cut",
        "DPU compiler constraint: weight + input - output position in [0, 16] for conv-like layers (adjusts the weight position).",
    ),
    _b(
        "adjust_dpu_shift_bias",
        "DPU compiler constraint: weight + input - bias position in [min(0, shift_cut - 16), 16] for conv-like layers, so the bias fits the 24-bit accumulator (adjusts the bias position).",
    ),
    _b(
        "adjust_dpu_shift_bias_leakyrelu",
        "DPU compiler constraint: bias shift in [0, 16] for a conv feeding a LeakyReLU.",
    ),
    _b(
        "adjust_dpu_shift_read",
        "DPU compiler constraint: Add/Multiply input positions differ by at most 15.",
    ),
    _b(
        "adjust_dpu_shift_write",
        "DPU compiler constraint: Add/Multiply lowest input position minus output position in [-15, 15].",
    ),
    _b("adjust_dpu_shift_swish", "DPU compiler constraint: swish (x * hard_sigmoid(x)) shift in [0, 15]."),
    _b("align_concat", "Give Concatenate and all its inputs one position: the lowest of them."),
    _b("align_pool", "Give max/average pooling the same input and output position: the lower of the two."),
    _b(
        "include_fast_ft",
        "Fast finetune: after calibration, choose each conv/dense layer's weight rounding (up or down, AdaRound) and "
        "adjust its bias so that its output (with its BatchNormalization and activation) matches the float model's "
        "there, layer by layer in model order; quantizer positions and scales stay frozen. Needs re-iterable "
        "calibration data.",
    ),
    KeySpec(
        "fast_ft_epochs",
        "int",
        "Fast finetune: epochs per layer, at most: passes over the cached samples, of 50 steps at least (it stops "
        "when the held-out error has not gone down for 3 epochs after the first fifth).",
        5,
        minimum=1,
        maximum=10000,
        needs="include_fast_ft",
    ),
    KeySpec(
        "fast_ft_lr",
        "float",
        "Fast finetune: Adam learning rate of the rounding logits and of the bias (in steps of its grid).",
        0.1,
        minimum=0.0,
        maximum=1.0,
        needs="include_fast_ft",
    ),
    KeySpec(
        "fast_ft_batch_size",
        "int",
        "Fast finetune: samples per training step. Where the samples it trains on (fast_ft_samples less the held-out "
        "eighth) are no more, every step takes all of them: the result does not depend on their order.",
        256,
        minimum=1,
        maximum=65536,
        needs="include_fast_ft",
    ),
    KeySpec(
        "fast_ft_samples",
        "int",
        "Fast finetune: how many calibration samples it uses (the first ones). This, not the calibration set, bounds its "
        "memory: these samples, and one layer's input and float output for each, are held at a time.",
        256,
        minimum=2,
        maximum=100000,
        needs="include_fast_ft",
    ),
    KeySpec(
        "fast_ft_input",
        "enum",
        'Fast finetune: what each layer reads while it trains: the float model\'s activations ("float") or the quantized '
        'model\'s, with the layers before it finetuned ("quantized").',
        "quantized",
        choices=("float", "quantized"),
        needs="include_fast_ft",
    ),
    _b(
        "include_bias_corr",
        "Bias correction: subtract the per-channel mean shift that quantization adds to each conv/dense output.",
    ),
    _b(
        "convert_to_fs_quantize_strategy",
        "Replace power-of-2 and TQT quantizers by float-scale ones with the same grid (scale exactly 2^-pos), "
        "using the framework FakeQuant op where it is allowed (HALF_UP), for TFLite and framework export. The op "
        "can move a value within float32 rounding of a tie one level; `Quantizer.convert_report` lists each quantizer.",
    ),
    _b(
        "convert_to_pof2s_quantize_strategy",
        "Replace trained-threshold (TQT) quantizers by power-of-2 ones at the same position, for deployment (same outputs).",
    ),
    KeySpec(
        "output_format",
        "enum",
        'What quantize_model also writes into output_dir: nothing (""), quantized_model.keras, or '
        "quantized_model.onnx (ONNX QDQ, with its export report beside it).",
        "",
        choices=("", "keras", "onnx"),
    ),
    KeySpec(
        "onnx_opset_version",
        "int",
        "ONNX opset of the exported model (16-bit activation grids need 21).",
        13,
        minimum=13,
        maximum=23,
        needs="output_format",
    ),
    KeySpec(
        "output_dir",
        "str",
        'Folder for the written model (checked before quantizing starts, created when the model is written; "" is the current folder).',
        "./quantize_results",
        needs="output_format",
    ),
)

SECTIONS = {
    "optimize_pipeline_config": {k.name: k for k in OPTIMIZE_KEYS},
    "quantize_pipeline_config": {k.name: k for k in QUANTIZE_KEYS},
    "refine_pipeline_config": {k.name: k for k in REFINE_KEYS},
}


def pending_settings(sections: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per key that is set to something other than its default but does not act yet.

    ``sections``: ``{section name: {key: value}}``, as a strategy holds its
    three pipeline sections. Each line names the key, its value and what is missing.
    """
    lines = []
    every = {k: v for values in sections.values() for k, v in values.items()}
    for section, keys in SECTIONS.items():
        values = sections.get(section, {})
        for name, spec in keys.items():
            if spec.needs and not every.get(spec.needs):
                continue  # of no use without the key it needs, which is off
            if spec.pending and name in values and values[name] != spec.default:
                lines.append(f"{section}.{name} = {json.dumps(values[name])}: {spec.pending}")
    return lines


def idle_settings(sections: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per acting key set away from its default while the key it needs is off (cle_steps without CLE)."""
    every = {k: v for values in sections.values() for k, v in values.items()}
    lines = []
    for section, keys in SECTIONS.items():
        values = sections.get(section, {})
        for name, spec in keys.items():
            if spec.pending or not spec.needs or every.get(spec.needs) or name not in values:
                continue
            if values[name] != spec.default:
                lines.append(f"{section}.{name} = {json.dumps(values[name])} does nothing while {spec.needs} is off")
    return lines


# Legacy key names the reference tool still accepts as keyword overrides.
LEGACY_KEYS = {
    "fold_bn": "convert_bn_to_dwconv",
    "replace_relu6": "convert_relu6_to_relu",
    "convert_tf_op": "convert_tf_op_to_keras",
    "forced_cle": "cle_to_relu6",
    "balance_method": "cle_balance_method",
    "weight_threshold": "cle_weight_threshold",
    "replace_sigmoid": "convert_sigmoid_to_hard_sigmoid",
    "replace_hard_sigmoid": "convert_hard_sigmoid_to_dpu_version",
    "replace_average_pooling2d": "convert_average_pooling2d_to_dpu_version",
    "replace_leaky_relu": "convert_leaky_relu_to_dpu_version",
}
