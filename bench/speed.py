"""End-to-end speed of ``quantize_model``, as a user waits for it.

For each model, calibration set size and built-in strategy (defaults, bias
correction on), in a fresh process:

- ratio: the wall time of the whole ``quantize_model`` call divided by a
  *warm* ``model.predict`` of the same data (batch 32), each the median of 3;
- the time of each stage (``Quantizer.timings``): capture + optimize,
  annotate + insert + rebuild, weight calibration, activation calibration,
  bias correction;
- bias x: the bias correction stage over the predict (bounded at 2 on ResNet50);
- the number of passes over the calibration data;
- the time Python's cyclic garbage collector ran inside the three calls
  (all of them: a full collection comes every call or two), and how many
  of its collections were full ones;
- the process's peak RSS.

Models: the digits CNN and the digits MobileNet-style CNN (trained on
scikit-learn's digits), the pretrained mini-Xception (real images), and
keras.applications MobileNetV2 (alpha 0.35, 96x96) and ResNet50 (64x64) with
random weights and the BatchNormalization statistics of real images.
Targets are printed beside each ratio.

Run: ``.venv/bin/python bench/speed.py`` (about 15 minutes on 2 cores);
``--models digits_cnn fer --sizes 128`` for a part; ``--no-freeze`` to compare without
quantize_model's freeze of the caller's objects (the gc column).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODELS = ("digits_cnn", "digits_mobilenet", "fer", "mobilenet_v2", "resnet50")
SIZES = (128, 1024)
STRATEGIES = ("pof2s", "fs")
STAGES = (
    "capture + optimize",
    "annotate + insert + rebuild",
    "weight calibration",
    "activation calibration",
    "bias correction",
)
REPEATS = 3


def target(model: str, n: int) -> float | None:
    if n >= 1024:
        return 4.0 if model in ("mobilenet_v2", "resnet50") else 3.0
    if n <= 128 and model in ("digits_cnn", "digits_mobilenet", "fer"):
        return 10.0
    return None


BIAS_TARGET = {"resnet50": 2.0}  # bias correction's seconds over a predict's, where the issue sets a bound


def load(model: str, n: int):
    """(float model, n calibration samples)."""
    import keras
    import numpy as np

    from qstrat import zoo

    if model in ("digits_cnn", "digits_mobilenet"):
        x_train, _, _, _ = zoo.digits_split()
        x = np.concatenate([x_train] * (-(-n // len(x_train))))[:n]
        return getattr(zoo, model)(), x
    if model == "fer":
        return zoo.emotion_model(), zoo.face_images_n(n)
    if model == "mobilenet_v2":
        net = keras.applications.MobileNetV2(
            input_shape=(96, 96, 3), alpha=0.35, weights=None, classifier_activation=None
        )
        x = keras.applications.mobilenet_v2.preprocess_input(zoo.color_images(n, 96))
    else:
        net = keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classifier_activation=None)
        x = keras.applications.resnet.preprocess_input(zoo.color_images(n, 64))
    x = np.asarray(x, np.float32)
    zoo.real_statistics(net, x[:256])
    return net, x


class CollectorClock:
    """Seconds Python's cyclic garbage collector runs, and its full (oldest-generation) collections, while on."""

    def __init__(self):
        self.seconds, self.full, self.on, self._start = 0.0, 0, False, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._start
        self.full += info["generation"] == 2


def measure(model: str, n: int, strategy: str, freeze: bool = True) -> dict:
    """One row, in this process; ``freeze=False``: without quantize_model's garbage-collector freeze, to compare."""
    import contextlib
    import gc

    import numpy as np

    import qstrat
    from qstrat.passes.calibrate import quiet_probes

    warnings.filterwarnings("ignore")
    if not freeze:
        from qstrat import guards

        guards.caller_objects_frozen = contextlib.nullcontext
    net, x = load(model, n)
    net.predict(x, batch_size=32, verbose=0)  # traces: what follows is warm
    predicts = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        net.predict(x, batch_size=32, verbose=0)
        predicts.append(time.perf_counter() - t)
    runs = []
    clock = CollectorClock()
    gc.callbacks.append(clock)
    with quiet_probes():
        for _ in range(REPEATS):
            q = qstrat.Quantizer(net, strategy)
            clock.on = True
            t = time.perf_counter()
            q.quantize_model(x, calib_batch_size=32, verbose=0)
            runs.append((time.perf_counter() - t, dict(q.timings)))
            clock.on = False
    gc.callbacks.remove(clock)
    runs.sort(key=lambda r: r[0])
    total, timings = runs[len(runs) // 2]
    predict = float(np.median(predicts))
    return {
        "model": model,
        "samples": n,
        "strategy": strategy,
        "predict_s": predict,
        "quantize_s": total,
        "ratio": total / predict,
        "stages": {s: timings.get(s, 0.0) for s in STAGES},
        "data_passes": timings.get("data_passes"),
        "gc_s": clock.seconds,
        "gc_full": clock.full,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(rows: list[dict]) -> list[str]:
    short = ("optimize", "insert", "weights", "activations", "bias corr")
    lines = [
        f"{'model':<17} {'n':>5} {'strategy':<8} {'predict s':>9} {'quantize s':>10} {'ratio':>6} {'target':>7} "
        + " ".join(f"{s:>11}" for s in short)
        + f" {'bias x':>12} {'passes':>6} {'gc s (full)':>11} {'RSS MB':>7}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<17} {r['samples']:>5} {r['strategy']:<8} ERROR {r['error']}")
            continue
        t = target(r["model"], r["samples"])
        verdict = "-" if t is None else f"<={t:g} {'PASS' if r['ratio'] <= t else 'FAIL'}"
        bias = r["stages"]["bias correction"] / r["predict_s"]
        b = BIAS_TARGET.get(r["model"])
        bias_col = f"{bias:.1f}" + ("" if b is None else f" <={b:g} {'PASS' if bias <= b else 'FAIL'}")
        lines.append(
            f"{r['model']:<17} {r['samples']:>5} {r['strategy']:<8} {r['predict_s']:>9.2f} {r['quantize_s']:>10.2f} "
            f"{r['ratio']:>6.1f} {verdict:>7} "
            + " ".join(f"{r['stages'][s]:>10.2f}s" for s in STAGES)
            + f" {bias_col:>12} {r['data_passes']:>6} {r['gc_s']:>6.2f} ({r['gc_full']}) {r['peak_rss_mb']:>7.0f}"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument(
        "--no-freeze",
        action="store_true",
        help="quantize_model without its freeze of the caller's objects (gc.freeze), to compare the gc column",
    )
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        model, n, strategy = args.worker
        print(json.dumps(measure(model, int(n), strategy, freeze=not args.no_freeze)))
        return 0
    import keras

    print(f"qstrat bench/speed.py: Keras {keras.__version__}, {keras.backend.backend()}, {os.cpu_count()} cores")
    print(f"quantize_model / warm model.predict of the same data (batch 32), medians of {REPEATS}\n")
    rows = []
    for model in args.models:
        for n in args.sizes:
            for strategy in args.strategies:
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", model, str(n), strategy]
                    + (["--no-freeze"] if args.no_freeze else []),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                try:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    row = {"model": model, "samples": n, "strategy": strategy, "error": proc.stderr[-300:]}
                rows.append(row)
                print(table([row])[-1], file=sys.stderr, flush=True)
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
