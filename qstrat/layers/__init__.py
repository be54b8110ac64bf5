"""Keras layers that carry quantizers; importing qstrat registers them for loading."""

from qstrat.layers.conv_bn import FoldedConvBN
from qstrat.layers.dpu import DPUAveragePooling2D, DPUGlobalAveragePooling2D, DPUHardSigmoid
from qstrat.layers.fake_quant import (
    FakeQuant,
    make_quantizer,
    quantizer_config,
    require_quantizers,
    set_quantizers_enabled,
)
from qstrat.layers.scale_shift import ScaleShift
from qstrat.layers.shared_state import QuantState
from qstrat.layers.wrapper import QuantizeWrapper

__all__ = [
    "DPUAveragePooling2D",
    "DPUGlobalAveragePooling2D",
    "DPUHardSigmoid",
    "FakeQuant",
    "FoldedConvBN",
    "QuantState",
    "QuantizeWrapper",
    "ScaleShift",
    "make_quantizer",
    "quantizer_config",
    "require_quantizers",
    "set_quantizers_enabled",
]
