"""qstrat: strategy-driven quantization for Keras 3."""

import qstrat.layers  # noqa: F401 - registers the quantized layers for keras.saving
from qstrat.api import Quantizer, get_quantize_info
from qstrat.errors import CalibrationDataError, ConfigError, PendingKeyWarning, QstratError, UnsupportedError
from qstrat.export import dump_model, export_onnx, export_tflite
from qstrat.inspect import analyze
from qstrat.integer import run_integer, simulate_integer
from qstrat.quantizers import (
    FSQuantizer,
    MAFSQuantizer,
    Pof2SQuantizer,
    TQTQuantizer,
    register_quantizer,
)
from qstrat.quantizers import Quantizer as BaseQuantizer
from qstrat.saving import load_model

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "FSQuantizer",
    "MAFSQuantizer",
    "PendingKeyWarning",
    "Pof2SQuantizer",
    "QstratError",
    "BaseQuantizer",
    "Quantizer",
    "dump_model",
    "export_onnx",
    "export_tflite",
    "get_quantize_info",
    "load_model",
    "TQTQuantizer",
    "analyze",
    "UnsupportedError",
    "register_quantizer",
    "run_integer",
    "simulate_integer",
]
