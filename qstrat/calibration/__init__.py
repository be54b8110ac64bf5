"""Calibration: streaming observers that turn batches into statistics."""

from qstrat.calibration.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    Observer,
    PositionVoteObserver,
    make_observer,
)

__all__ = [
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PositionVoteObserver",
    "make_observer",
]
