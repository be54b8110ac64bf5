"""The calibration methods `bench/observers.py` measures, their NumPy baselines, and its synthetic activations."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POOL_SIZE = 8
PERCENTILE = 99.99
HIST_BINS = 2048


# ---- methods and baselines ------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    make: Callable  # () -> quantizer
    policy: str | None
    baseline: str  # key into BASELINES


def _qstrat():
    """Import qstrat lazily (from the checkout when it is not installed)."""
    os.environ["KERAS_BACKEND"] = "numpy"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import qstrat
    from qstrat.calibration import make_observer

    return qstrat, make_observer


def methods() -> list[Method]:
    q, _ = _qstrat()
    pof2, fs = q.Pof2SQuantizer, q.FSQuantizer
    return [
        Method("pof2_noof", "Pof2S No_OF", lambda: pof2(method="No_OF"), None, "minmax"),
        Method("pof2_mse", "Pof2S Min_MSE global", lambda: pof2(method="Min_MSE"), "global", "histogram"),
        Method("pof2_vote", "Pof2S Min_MSE batch_vote", lambda: pof2(method="Min_MSE"), "batch_vote", "histogram"),
        Method("pof2_kl", "Pof2S Min_KL", lambda: pof2(method="Min_KL"), None, "histogram"),
        Method(
            "pof2_pct",
            "Pof2S Percentile",
            lambda: pof2(method="Percentile", method_percentile=PERCENTILE),
            None,
            "percentile",
        ),
        Method("fs_noof", "FS No_OF", lambda: fs(per_channel=False, method="No_OF"), None, "minmax"),
        Method("fs_mse", "FS Min_MSE", lambda: fs(per_channel=False, method="Min_MSE"), None, "histogram"),
        Method("fs_kl", "FS Min_KL", lambda: fs(per_channel=False, method="Min_KL"), None, "histogram"),
        Method(
            "fs_pct",
            "FS Percentile",
            lambda: fs(per_channel=False, method="Percentile", method_percentile=PERCENTILE),
            None,
            "percentile",
        ),
        Method("mafs_noof", "MAFS No_OF", lambda: q.MAFSQuantizer(method="No_OF"), None, "minmax"),
    ]


def _minmax(batch):
    batch.min()
    batch.max()


BASELINES: dict[str, tuple[str, Callable]] = {
    "histogram": (f"np.histogram({HIST_BINS})", lambda b: np.histogram(b, bins=HIST_BINS)),
    "percentile": (f"np.percentile({PERCENTILE})", lambda b: np.percentile(b, PERCENTILE)),
    "minmax": ("min()+max()", _minmax),
}


def build(method: Method):
    """(quantizer, observer) for a method."""
    _, make_observer = _qstrat()
    quantizer = method.make()
    return quantizer, make_observer(quantizer.observer_spec(method.policy), name=method.label)


def final_state(quantizer, observer):
    return quantizer.state_from_stats(observer.result())


# ---- data -------------------------------------------------------------------------------------


def activation_shape(elements: int) -> tuple[int, ...]:
    """(tokens, channels) with 64 channels when possible, else flat."""
    return (elements // 64, 64) if elements % 64 == 0 else (elements,)


def make_pool(elements: int, seed: int = 0) -> np.ndarray:
    """POOL_SIZE activations: even ones ReLU outputs (half zeros), odd ones heavy-tailed Student-t."""
    rng = np.random.default_rng(seed)
    shape = activation_shape(elements)
    pool = np.empty((POOL_SIZE,) + shape, dtype=np.float32)
    for k in range(POOL_SIZE):
        scale = rng.lognormal(0.0, 0.5, size=shape[-1]).astype(np.float32)  # per-channel spread
        if k % 2 == 0:
            x = rng.standard_normal(shape, dtype=np.float32) * scale
            np.maximum(x, 0.0, out=x)
        else:
            x = rng.standard_t(3 + k % 3, size=shape).astype(np.float32) * scale + np.float32(0.05 * k)
        pool[k] = x
    return pool


def batch_at(pool: np.ndarray, i: int, n: int) -> np.ndarray:
    """Batch i of n: a pool entry times a factor growing from 1 to 2 (a fresh array)."""
    return pool[i % POOL_SIZE] * np.float32(1.0 + i / n)
