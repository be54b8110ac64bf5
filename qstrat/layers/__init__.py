"""Keras layers that carry quantizers; importing qstrat registers them for loading."""

from qstrat.layers.fake_quant import FakeQuant, make_quantizer, quantizer_config, set_quantizers_enabled
from qstrat.layers.scale_shift import ScaleShift
from qstrat.layers.shared_state import QuantState
from qstrat.layers.wrapper import QuantizeWrapper

__all__ = [
    "FakeQuant",
    "QuantState",
    "QuantizeWrapper",
    "ScaleShift",
    "make_quantizer",
    "quantizer_config",
    "set_quantizers_enabled",
]
