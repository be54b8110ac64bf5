"""The optimize stage: the strategy's switched-on passes, in the order its config lists them.

Every pass maps a float `Graph` to a float `Graph` (`simplify`, `fold_bn`,
`cle`), so ``optimize`` never touches a Keras model: the caller rebuilds one.
Parameter keys (``cle_steps``, ...) are read by the passes; keys that name no
pass here (``train_with_bn``, for QAT) are not run by this stage.

The order is the config's key order. A strategy merged over a built-in keeps
the built-in's order (overriding a value does not move its key); a strategy
with ``"base": ""`` runs its passes in the order it lists them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

from qstrat.calibration.data import is_one_shot
from qstrat.errors import warn_at_caller
from qstrat.graph.ir import Graph
from qstrat.graph.rewrite import Editor
from qstrat.passes.optimize import act_eq, cle, fold_bn, simplify
from qstrat.passes.optimize.report import OptimizeReport

PASSES: dict[str, Callable[[Graph, Mapping, OptimizeReport], Graph]] = {
    "remove_dropout": simplify.remove_dropout,
    "remove_unused_layers": simplify.remove_unused_layers,
    "convert_tf_op_to_keras": simplify.convert_tf_op_to_keras,
    "separable_conv": simplify.separable_conv,
    "separate_conv_act": simplify.separate_conv_act,
    "fold_conv_bn": fold_bn.fold_conv_bn,
    "convert_bn_to_dwconv": fold_bn.convert_bn_to_dwconv,
    "convert_relu6_to_relu": simplify.convert_relu6_to_relu,
    "include_cle": cle.cross_layer_equalization,
}


def optimize(graph: Graph, config: Mapping, data=None, calib=None, progress=None) -> tuple[Graph, OptimizeReport]:
    """Run every pass whose key is true in ``config`` (``optimize_pipeline_config``), in the config's order.

    ``data`` (calibration data) and ``calib`` (input specs, batch size, steps) serve ``include_act_eq``,
    which measures activation ranges before CLE; without data it warns and CLE runs on weights alone.
    """
    report = OptimizeReport()
    graph = simplify.compute_in_float32(graph, report)
    if report.of("compute_in_float32"):
        report.passes_run.append("compute_in_float32")
        names = [e.node for e in report.of("compute_in_float32")]
        warn_at_caller(
            f"{len(names)} layer(s) of '{graph.name}' compute in another float type than float32 ("
            + ", ".join(names[:5])
            + (", ..." if len(names) > 5 else "")
            + "): the quantized model computes them in float32, the type qstrat simulates integer hardware in. "
            "The optimize report lists each (compute_in_float32)."
        )
    for key, on in config.items():
        if key in PASSES and on is True:
            extra = {}
            if key == "include_cle" and config.get("include_act_eq") is True:
                extra = _act_ranges(graph, config, data, calib, progress, report)
            graph = PASSES[key](graph, config, report, **extra)
            report.passes_run.append(key)
    if config.get("include_act_eq") is True and config.get("include_cle") is not True:
        warnings.warn(
            "optimize_pipeline_config.include_act_eq = true does nothing with include_cle = false: it weighs "
            "activation ranges into cross-layer equalization. Switch include_cle on.",
            stacklevel=3,
        )
    return graph, report


def _act_ranges(graph: Graph, config: Mapping, data, calib, progress, report: OptimizeReport) -> dict:
    pairs = cle.find_pairs(Editor(graph), bool(config.get("cle_to_relu6", False)))
    if not pairs:
        return {}
    if data is None or is_one_shot(data):
        why = (
            "needs calibration data it can read before calibration (quantize_model and get_qat_model pass "
            "theirs; a one-shot generator can be read only once): CLE ran on weights alone"
        )
        report.skipped("include_act_eq", graph.name, why)
        warnings.warn(f"optimize_pipeline_config.include_act_eq {why}.", stacklevel=4)
        return {}
    specs, batch_size, steps = calib
    return {"act_ranges": act_eq.measure(graph, pairs, data, specs, batch_size, steps, progress)}
