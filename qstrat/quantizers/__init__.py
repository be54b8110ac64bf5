"""Quantizers: the numerical core of qstrat.

Four built-in quantizers, each constructed from the seed's parameter names:
`Pof2SQuantizer`, `FSQuantizer`, `MAFSQuantizer` and `TQTQuantizer`.
"""

from qstrat.quantizers.base import (
    DEFAULT_POSITION_POLICY,
    POSITION_POLICIES,
    Quantizer,
    StateSpec,
)
from qstrat.quantizers.float_scale import FSQuantizer, MAFSQuantizer
from qstrat.quantizers.grid import DataFormat, IntGrid, Method, RoundMode, int_grid
from qstrat.quantizers.params import QuantizerParams
from qstrat.quantizers.pof2 import Pof2SQuantizer, TQTQuantizer
from qstrat.quantizers.registry import get_quantizer_class, register_quantizer, registered_quantizers
from qstrat.quantizers.stats import Histogram, ObserverSpec, RangeStats

__all__ = [
    "DEFAULT_POSITION_POLICY",
    "POSITION_POLICIES",
    "DataFormat",
    "FSQuantizer",
    "Histogram",
    "IntGrid",
    "MAFSQuantizer",
    "Method",
    "ObserverSpec",
    "Pof2SQuantizer",
    "Quantizer",
    "QuantizerParams",
    "RangeStats",
    "RoundMode",
    "StateSpec",
    "TQTQuantizer",
    "get_quantizer_class",
    "int_grid",
    "register_quantizer",
    "registered_quantizers",
]
