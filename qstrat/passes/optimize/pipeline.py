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

from collections.abc import Callable, Mapping

from qstrat.graph.ir import Graph
from qstrat.passes.optimize import cle, fold_bn, simplify
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


def optimize(graph: Graph, config: Mapping) -> tuple[Graph, OptimizeReport]:
    """Run every pass whose key is true in ``config`` (``optimize_pipeline_config``), in the config's order."""
    report = OptimizeReport()
    for key, on in config.items():
        if key in PASSES and on is True:
            graph = PASSES[key](graph, config, report)
            report.passes_run.append(key)
    return graph, report
