"""The optimize stage: float-equivalent graph rewrites and cross-layer equalization."""

from qstrat.passes.optimize.pipeline import PASSES, optimize
from qstrat.passes.optimize.report import OptimizeReport

__all__ = ["PASSES", "OptimizeReport", "optimize"]
