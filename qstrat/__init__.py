"""qstrat: strategy-driven quantization for Keras 3."""

import qstrat.layers  # noqa: F401 - registers the quantized layers for keras.saving
from qstrat.errors import CalibrationDataError, ConfigError, QstratError, UnsupportedError
from qstrat.quantizers import (
    FSQuantizer,
    MAFSQuantizer,
    Pof2SQuantizer,
    Quantizer,
    TQTQuantizer,
    register_quantizer,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "FSQuantizer",
    "MAFSQuantizer",
    "Pof2SQuantizer",
    "QstratError",
    "Quantizer",
    "TQTQuantizer",
    "UnsupportedError",
    "register_quantizer",
]
