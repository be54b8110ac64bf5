"""Cross-layer equalization: pof2s 8-bit PTQ on a MobileNet-style CNN, with and without CLE.

Prints, in one run:

1. the float equivalence of the "rescaled" digits MobileNet
   (`zoo.rescale_channels_through_relu`: in every BN -> ReLU -> conv chain the
   BN's output channels are scaled by factors spread 100x and the conv's input
   channels divided by them), as the max relative difference of the logits;
2. test accuracy (355 digits) and logit SQNR against float of the original
   and the rescaled model: float, then the built-in pof2s strategy (8-bit
   per-tensor PTQ, bias correction on) without CLE (``include_cle=False``),
   with CLE, and with CLE plus bias absorption (``cle_bias_absorption=True``),
   calibrated on the first 200 training digits;
3. the targets, PASS/FAIL from the measured numbers: rescaled without CLE
   collapses (at least 10 points below float), rescaled with CLE within 1 point
   of float, original with CLE no more than 0.2 points below without CLE;
4. the same numbers as a markdown table.

Run: ``.venv/bin/python bench/cle.py`` (about a minute on 2 cores once the model
is cached; training it the first time takes about 40 s more).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")

import numpy as np  # noqa: E402

COLLAPSE_POINTS = 10.0  # "collapsed": at least this many points below float
CLE_RECOVERY_POINTS = 1.0  # rescaled with CLE: within this many points of float
CLE_HARM_POINTS = 0.2  # original: CLE may cost at most this many points


def max_rel_diff(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


VARIANTS = (
    ("no_cle", {"include_cle": False}),
    ("cle", {"include_cle": True}),
    ("cle_absorb", {"include_cle": True, "cle_bias_absorption": True}),
)


def sqnr_db(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((out - ref) ** 2), 1e-30)))


def measure(model, calib, x_test, y_test) -> dict:
    """Float accuracy, then accuracy and logit SQNR of each pof2s variant (the built-in strategy otherwise)."""
    import qstrat

    y_float = model.predict(x_test, verbose=0, batch_size=128)
    row = {"float": float(np.mean(np.argmax(y_float, axis=-1) == y_test))}
    for key, overrides in VARIANTS:
        q = qstrat.Quantizer(model, "pof2s")
        qmodel = q.quantize_model(calib, calib_batch_size=32, verbose=0, **overrides)
        y_q = qmodel.predict(x_test, verbose=0, batch_size=128)
        row[key] = float(np.mean(np.argmax(y_q, axis=-1) == y_test))
        row[key + "_sqnr"] = sqnr_db(y_float, y_q)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spread", type=float, default=100.0, help="max/min of the per-channel factors (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="numpy seed of the factors (default 0)")
    args = ap.parse_args()

    import keras

    from qstrat import zoo

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # each new model's first predict retraces: expected here

    print(f"qstrat bench/cle.py: Keras {keras.__version__}, {keras.backend.backend()}, {os.cpu_count()} cores\n")
    t0 = time.perf_counter()
    model = zoo.digits_mobilenet()
    t_load = time.perf_counter() - t0
    x_train, _, x_test, y_test = zoo.digits_split()
    calib = x_train[:200]

    rescaled = zoo.rescale_channels_through_relu(model, spread=args.spread, seed=args.seed)
    rel = max_rel_diff(model.predict(x_test, verbose=0), rescaled.predict(x_test, verbose=0))
    print(f"1. Rescaled model (spread {args.spread:g}, seed {args.seed}): max relative logit difference {rel:.2e}")
    assert rel <= 1e-4, f"the rescaling is not function-preserving: {rel:.2e} > 1e-4"

    rows = {}
    for name, m in (("original", model), ("rescaled", rescaled)):
        t = time.perf_counter()
        rows[name] = measure(m, calib, x_test, y_test)
        rows[name]["seconds"] = time.perf_counter() - t
    print(f"\n2. Test accuracy and logit SQNR, {len(y_test)} digits (pof2s 8-bit, {len(calib)} calibration digits)")
    print(f"{'model':<10} {'float':>7} {'no CLE':>14} {'CLE':>14} {'CLE + absorb':>14} {'seconds':>8}")
    for name, r in rows.items():
        cells = " ".join(f"{100 * r[k]:>6.2f} {r[k + '_sqnr']:>5.1f}dB" for k, _ in VARIANTS)
        print(f"{name:<10} {100 * r['float']:>7.2f} {cells} {r['seconds']:>8.1f}")

    o, s = rows["original"], rows["rescaled"]
    checks = [
        (
            f"rescaled without CLE collapses (>= {COLLAPSE_POINTS:g} points below float)",
            100 * (s["float"] - s["no_cle"]),
            100 * (s["float"] - s["no_cle"]) >= COLLAPSE_POINTS,
        ),
        (
            f"rescaled with CLE within {CLE_RECOVERY_POINTS:g} point of float",
            100 * (s["float"] - s["cle"]),
            100 * (s["float"] - s["cle"]) <= CLE_RECOVERY_POINTS,
        ),
        (
            f"original: CLE costs at most {CLE_HARM_POINTS:g} points",
            100 * (o["no_cle"] - o["cle"]),
            100 * (o["no_cle"] - o["cle"]) <= CLE_HARM_POINTS + 1e-9,
        ),
    ]
    print("\n3. Targets (measured drop in points)")
    for text, drop, ok in checks:
        print(f"{text:<62} {drop:>7.2f} {'PASS' if ok else 'FAIL'}")

    print("\n4. Markdown\n")
    print("| model | float | pof2s no CLE | pof2s with CLE | pof2s, CLE + bias absorption |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        cells = " | ".join(f"{100 * r[k]:.2f} ({r[k + '_sqnr']:.1f} dB)" for k, _ in VARIANTS)
        print(f"| {name} | {100 * r['float']:.2f} | {cells} |")
    print(f"\nmodel load {t_load:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
