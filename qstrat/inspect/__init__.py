"""Seeing inside a quantized model: what each layer gets (`inspect_rows`) and why accuracy dropped (`analyze`)."""

from qstrat.inspect.analyze import Analysis, LayerAnalysis, RangeStats, analyze
from qstrat.inspect.layers import inspect_rows, rows_table, supported, supported_table

__all__ = [
    "Analysis",
    "LayerAnalysis",
    "RangeStats",
    "analyze",
    "inspect_rows",
    "rows_table",
    "supported",
    "supported_table",
]
