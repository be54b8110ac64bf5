"""Quantization-aware training: the model to train, and the model to deploy once it is trained.

``Quantizer.get_qat_model`` builds the quantized model as ``quantize_model``
does (optimize, DPU layer versions, quantizers by pattern), but returns it
for the user's own ``compile``/``fit``:

- weight and bias quantizers start calibrated from the weights; with
  ``init_quant=True`` activation quantizers are calibrated from data too, and
  with ``include_bias_corr`` the biases are corrected (the PTQ pass of
  ``quantize_model``, less the DPU constraints, which wait for the deploy
  model): TQT needs sensible thresholds to start from, and low bit widths a
  start near PTQ's accuracy;
- in training each quantizer follows its policy: TQT trains its log2
  threshold, MAFS moves its average, Pof2S takes each batch's position and
  FS widens its range to each batch's extremes (the last values stay for
  inference);
- with ``train_with_bn`` every conv that absorbed a BatchNormalization trains
  with batch statistics (`qstrat.layers.FoldedConvBN`) until
  ``freeze_bn_delay`` steps, then with the moving ones. The fold is made from
  the calibrated model, so it starts from the corrected biases and the
  calibrated quantizers.

``Quantizer.get_deploy_model`` turns the trained model into the deployable
one: BatchNormalizations folded for real, TQT thresholds as power-of-2
positions (b - 1 - ceil(log_th), any bit width), the DPU compiler's position
constraints, then the refine stage's framework conversion and the file
``output_format`` asks for. Its outputs equal the QAT model's inference
outputs except where a constraint moved a position
(``Quantizer.position_changes`` lists each).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from qstrat.calibration.data import check_count
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.export.outputs import output_target
from qstrat.guards import refuse_non_finite, warn_pending
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.passes.optimize.fake_fold import fake_fold
from qstrat.passes.refine.convert import to_pof2s
from qstrat.passes.refine.positions import apply_constraints
from qstrat.passes.refine.real_fold import real_fold
from qstrat.passes.weight_calibration import calibrate_weights
from qstrat.progress import Progress

# Refine keys of PTQ that a QAT model does not use: training replaces them, or get_deploy_model applies them.
_PTQ_ONLY = {
    "include_fast_ft": "training adjusts the weights",
    "convert_to_pof2s_quantize_strategy": "get_deploy_model converts TQT to positions (its argument)",
    "convert_to_fs_quantize_strategy": "get_deploy_model converts to float scales (its argument)",
    "output_format": "get_deploy_model writes the deployable model",
}


def qat_model(
    q,
    init_quant: bool,
    calib_dataset,
    calib_steps,
    calib_batch_size,
    train_with_bn,
    freeze_bn_delay,
    verbose: int,
    overrides: Mapping[str, Any],
):
    """`Quantizer.get_qat_model`: a quantized Keras model to train with ``fit`` (see the module doc).

    Args:
        q: the `qstrat.Quantizer` (its float model and strategy).
        init_quant: calibrate the activation quantizers on ``calib_dataset`` first.
        calib_dataset, calib_steps, calib_batch_size: as for ``quantize_model``.
        train_with_bn, freeze_bn_delay: override the strategy's keys (None: the strategy's).
        verbose: 1 names each stage; 0 is silent.
        overrides: other strategy keys.
    """
    overrides = dict(overrides)
    _flag(init_quant, "get_qat_model init_quant")
    if train_with_bn is not None:
        _flag(train_with_bn, "get_qat_model train_with_bn")
        overrides["train_with_bn"] = train_with_bn
    if freeze_bn_delay is not None:
        overrides["freeze_bn_delay"] = freeze_bn_delay
    calib_batch_size = check_count(calib_batch_size, "calib_batch_size")
    calib_steps = check_count(calib_steps, "calib_steps", allow_none=True)
    strategy = q._strategy(overrides)
    if strategy.quantize["convert_datatype"]:
        raise ConfigError(
            "quantize_pipeline_config.convert_datatype",
            f'"{strategy.quantize["convert_datatype"]}" casts the model and leaves no quantizer to train',
            'Set convert_datatype to "" for QAT, or use quantize_model for a cast model.',
        )
    if init_quant and calib_dataset is None:
        raise ConfigError(
            "calib_dataset",
            "init_quant=True calibrates the activation quantizers from data, and no calib_dataset was given",
            "Pass calib_dataset (a few hundred training samples), or init_quant=False.",
        )
    if calib_dataset is not None and not init_quant:
        warnings.warn(
            "get_qat_model: calib_dataset does nothing without init_quant=True, and the activation quantizers "
            "start uncalibrated. Pass init_quant=True to calibrate them on it first.",
            stacklevel=3,
        )
    warn_pending(strategy)
    for key, why in _PTQ_ONLY.items():
        if strategy.refine[key] not in (False, ""):
            warnings.warn(
                f"refine_pipeline_config.{key} = {strategy.refine[key]!r} does nothing in get_qat_model: {why}.",
                stacklevel=3,
            )
    if strategy.refine["include_bias_corr"] and not init_quant:
        warnings.warn(
            "refine_pipeline_config.include_bias_corr = true does nothing in get_qat_model without init_quant: "
            "bias correction measures the calibration data.",
            stacklevel=3,
        )
    with_bn = strategy.optimize["train_with_bn"]
    if with_bn and not strategy.optimize["fold_conv_bn"]:
        warnings.warn(
            "optimize_pipeline_config.train_with_bn = true does nothing while fold_conv_bn is off: "
            "the BatchNormalization layers stay layers of their own and train as such.",
            stacklevel=3,
        )
    progress = Progress(verbose)
    data = calib_dataset if init_quant else None
    graph, annotation, model, taps = q._build(
        strategy, progress, suffix="qat", data=data, steps=calib_steps, batch_size=calib_batch_size
    )
    _warn_moved_regularizers(q.model, q.optimize_report, with_bn)
    removed = [e.node for e in q.optimize_report.of("remove_dropout", "changed")]
    if removed and "remove_dropout" not in overrides:
        warnings.warn(
            f"get_qat_model: remove_dropout took out {len(removed)} training-only layer(s) ({', '.join(removed[:4])}"
            f"{', ...' if len(removed) > 4 else ''}), so the QAT model trains without them. Pass "
            "remove_dropout=False to train with them (they do nothing in inference, and the deploy model keeps "
            "them as they are).",
            stacklevel=3,
        )
    # Constraints are for the deploy model: training moves the positions they would fix.
    q._calibrate(
        model,
        graph,
        taps,
        strategy,
        calib_dataset,
        calib_steps,
        calib_batch_size,
        verbose,
        progress,
        activations=bool(init_quant),
        constraints=False,
    )
    if with_bn:
        with progress.stage("fake folding"):
            model = fake_fold(model, graph, int(strategy.quantize["freeze_bn_delay"]), q.optimize_report)
            calibrate_weights(model)  # the fold's kernel is the conv's to float32 rounding: its own positions
    _start_zero_biases(model)
    q.report, q.position_changes = annotation.report, []
    q.convert_report = q.export_report = q.output_path = None
    progress.done("QAT model ready")
    q.timings = {**progress.times, "data_passes": progress.data_passes}
    return model


def _start_zero_biases(model) -> None:
    """A TQT bias that is all zero (a layer not trained yet) has no range to calibrate from: its threshold would
    start at the smallest step's, about 2^-16, and clip every value training gives it for thousands of steps.
    It starts at its kernel's threshold instead, which it then trains from."""
    from qstrat.quantizers import TQTQuantizer

    for layer in model.layers:
        if not isinstance(layer, QuantizeWrapper) or not {"kernel", "bias"} <= set(layer.quantizers):
            continue
        if "bias" in layer.shared_states or not all(
            isinstance(layer.quantizers[a], TQTQuantizer) and np.ndim(layer.state[a]["log_th"]) == 0
            for a in ("kernel", "bias")
        ):
            continue
        target = getattr(layer.layer, "target_value", None)
        bias = keras.ops.convert_to_numpy(target("bias") if target is not None else layer.layer.bias)
        if not np.any(bias):
            layer.state["bias"]["log_th"].assign(keras.ops.convert_to_numpy(layer.state["kernel"]["log_th"]))


_KERNEL_REGULARIZERS = ("kernel_regularizer", "depthwise_regularizer", "pointwise_regularizer")


def _warn_moved_regularizers(model, report, with_bn: bool) -> None:
    """Warn where the optimize stage changed the weights a regularizer of the user's model acts on: QAT's loss
    then differs from the float model's (a folded BatchNormalization's are gone, and its conv's act on W·γ/σ;
    CLE's pairs' act on scaled kernels)."""
    layers = {layer.name: layer for layer in model._flatten_layers(include_self=False)}

    def has(name, attrs):
        return any(getattr(layers.get(name), a, None) is not None for a in attrs)

    moved = []
    if not with_bn:  # train_with_bn keeps the conv and its BatchNormalization as they are (FoldedConvBN)
        for e in report.of("fold_conv_bn", "changed"):
            if has(e.node, ("gamma_regularizer", "beta_regularizer")):
                moved.append(f"{e.node}'s (its BatchNormalization is folded into {e.partner}: gone)")
            if has(e.partner, _KERNEL_REGULARIZERS):
                moved.append(f"{e.partner}'s (on its kernel folded with {e.node}, W·γ/σ)")
    for e in report.of("include_cle", "changed"):
        moved += [f"{n}'s (on its kernel scaled by CLE)" for n in (e.node, e.partner) if has(n, _KERNEL_REGULARIZERS)]
    if moved:
        warnings.warn(
            f"get_qat_model: weight regularizers act on other weights than in the float model, so the loss QAT "
            f"trains on differs: {'; '.join(dict.fromkeys(moved))}. train_with_bn=True keeps the folded "
            "BatchNormalization's and its conv's; include_cle=False keeps the kernels CLE scales.",
            stacklevel=4,
        )


# The keys that act in get_deploy_model: the refine stage's constraints and where the model is written.
_DEPLOY_KEYS = frozenset(
    {
        "adjust_dpu_sigmoid", "adjust_dpu_shift_cut", "adjust_dpu_shift_bias", "adjust_dpu_shift_bias_leakyrelu",
        "adjust_dpu_shift_read", "adjust_dpu_shift_write", "adjust_dpu_shift_swish", "align_concat", "align_pool",
        "output_format", "output_dir", "onnx_opset_version",
    }
)  # fmt: skip


def _flag(value, where: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError.expected(where, "True or False", value)


def _check_quantized(model) -> None:
    if not isinstance(model, keras.Model):
        raise ConfigError("qat_model", f"expected the trained QAT keras.Model, got {type(model).__name__}")
    if not any(isinstance(layer, (FakeQuant, QuantizeWrapper)) for layer in model.layers):
        raise UnsupportedError(
            f"'{model.name}' holds no qstrat quantizers: get_deploy_model takes the model get_qat_model "
            "returned (after training), not the float model."
        )


def deploy_model(
    q,
    model,
    convert_to_pof2s_quantize_strategy: bool,
    convert_to_fs_quantize_strategy: bool,
    verbose: int,
    overrides: Mapping[str, Any],
):
    """`Quantizer.get_deploy_model`: the deployable copy of a trained QAT model (see the module doc)."""
    _check_quantized(model)
    _flag(convert_to_pof2s_quantize_strategy, "get_deploy_model convert_to_pof2s_quantize_strategy")
    _flag(convert_to_fs_quantize_strategy, "get_deploy_model convert_to_fs_quantize_strategy")
    refuse_non_finite(
        model.weights,
        model.name,
        "Training diverged, and no deployable model can be made of it: train again (a lower learning rate), or "
        "deploy a checkpoint from before it diverged.",
    )
    for key in overrides:
        if key not in _DEPLOY_KEYS:
            warnings.warn(
                f"get_deploy_model: {key} does nothing here: the QAT model's layers and quantizers were set by "
                "get_qat_model (give it there); get_deploy_model takes the refine stage's position constraints, "
                "output_format, output_dir and onnx_opset_version.",
                stacklevel=3,
            )
    strategy = q._strategy(
        {
            **overrides,
            "convert_to_pof2s_quantize_strategy": False,
            "convert_to_fs_quantize_strategy": bool(convert_to_fs_quantize_strategy),
        }
    )
    target = output_target(strategy)  # checked before any work
    progress = Progress(verbose)
    with progress.stage("real folding"):
        deployed = real_fold(model)
    pof2s_report = None
    if convert_to_pof2s_quantize_strategy:
        with progress.stage("TQT to power-of-2 positions"):
            converted, report = to_pof2s(deployed)
        if report.converted():
            deployed, pof2s_report = converted, report
        left = [f"{t.layer}.{t.target} ({t.note})" for t in report.not_converted() if t.from_type == "TQTQuantizer"]
        if left:
            warnings.warn(
                f"get_deploy_model: {len(left)} TQT quantizer(s) could not become power-of-2 positions and stay "
                f"TQT in the deploy model: {'; '.join(left[:4])}{'; ...' if len(left) > 4 else ''}.",
                stacklevel=3,
            )
    with progress.stage("position constraints"):
        q.position_changes = apply_constraints(deployed, strategy.refine)
    q.bias_corrections = []
    deployed = q._refine_and_write(deployed, strategy, target, None, progress)
    if q.convert_report is None:
        q.convert_report = pof2s_report
    progress.done("deploy model ready")
    return deployed
