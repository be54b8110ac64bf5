"""Real folding: a trained QAT model's fake-folded convs become plain convs with the BatchNormalization folded in.

Why: `qstrat.layers.FoldedConvBN` trains with batch statistics; a deployed
model has none. Each one becomes its conv with kernel and bias folded with the
moving statistics (`FoldedConvBN.folded_weights`, the same float32 products
the fold layer computes in inference), in a `QuantizeWrapper` with the same
quantizers and state, so the deployed model computes what the QAT model
computes in inference. Every other layer is copied: the QAT model is not
changed and shares nothing with the new one.
"""

from __future__ import annotations

from qstrat.graph.rebuild import copy_layer
from qstrat.graph.rewrite import built_layer
from qstrat.layers import FoldedConvBN
from qstrat.passes.refine.convert import _convert, keep


def _unfold(layer, node):
    if not isinstance(layer, FoldedConvBN):
        return copy_layer(layer)
    kernel, bias = layer.folded_weights()
    config = {**layer.conv.get_config(), "use_bias": True, "name": layer.name}
    return built_layer(type(layer.conv), config, node.in_tensors[0].shape, [kernel, bias])


def has_fake_folds(qmodel) -> bool:
    """Whether ``qmodel`` holds any `FoldedConvBN` (inside its wrappers)."""
    return any(isinstance(getattr(layer, "layer", None), FoldedConvBN) for layer in qmodel.layers)


def real_fold(qmodel):
    """A copy of ``qmodel`` with every `FoldedConvBN` folded for real (see the module doc)."""
    model, _ = _convert(qmodel, keep, _unfold)
    return model
