"""Post-training quantization end to end: accuracy, calibration overhead and memory.

Prints, in one run:

1. float vs quantized accuracy on the digits CNN (355 test digits) and top-1
   agreement (all images, and faces only) plus output SQNR on the pretrained
   mini-Xception (348 real images), for the pof2s and fs strategies as built
   in, and without bias correction or CLE (what each contributes), with the
   reference tool's No_OF model inputs (pof2s) and with SeparableConv2D split
   (fs): the two places the built-ins depart from it on measurement;
2. the same agreement and SQNR for the built-in strategies over five random
   splits of the images into calibration and evaluation sets (the noise);
3. calibration overhead: the wall time of calibrating (weights, then one
   streaming pass over the data with every observer) divided by the wall time
   of a first ``model.predict`` on the same data (both include their one-time
   graph tracing), for No_OF, Min_MSE and Min_KL activations (pof2s,
   mini-Xception, 1024 images, batch 32) (``bench/speed.py`` times the whole
   ``quantize_model`` call, bias correction included);
4. peak memory of ``quantize_model`` with 256 and with 4096 calibration
   samples (a generator, so the dataset itself is never in memory), each in a
   fresh process: peak RSS minus the RSS before calibrating;
5. with 1024 calibration samples (arrays), the built-ins with histograms of
   every sample against the default (the histograms of power-of-2 positions
   count a share of each batch, about ``qstrat.passes.calibrate.HISTOGRAM_SAMPLES``
   samples in all; those of float scales every sample): accuracy or
   agreement, SQNR, the activation calibration's seconds, and how many
   FakeQuant state arrays differ.

Run: ``.venv/bin/python bench/ptq.py`` (about 8 minutes on 2 cores).
Timings are medians of 3 runs; this machine varies by about 20% between runs.
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
warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")

import numpy as np  # noqa: E402

VARIANTS = (
    ("pof2s", {}),
    ("pof2s", {"include_bias_corr": False}),
    ("pof2s", {"include_cle": False}),
    ("pof2s", {"input_method": "No_OF"}),
    ("fs", {}),
    ("fs", {"include_bias_corr": False}),
    ("fs", {"separable_conv": True}),
)


def accuracy_table() -> list[str]:
    import qstrat
    from qstrat.demo import digits_task, evaluate, faces_task

    digits, d_calib, d_test, d_labels = digits_task()
    fer, f_calib, f_eval, f_faces = faces_task()
    lines = [
        f"{'model':<14} {'strategy':<8} {'overrides':<28} {'float acc':>9} {'quant acc':>9} {'agree all':>9} "
        f"{'agree faces':>11} {'SQNR dB':>8}"
    ]
    for strategy, over in VARIANTS:
        label = ", ".join(f"{k}={v}" for k, v in over.items()) or "(built-in)"
        q = qstrat.Quantizer(digits, strategy).quantize_model(d_calib, verbose=0, **over)
        r = evaluate(digits, q, d_test, labels=d_labels)
        lines.append(
            f"{'digits CNN':<14} {strategy:<8} {label:<28} {100 * r['float_acc']:>9.2f} {100 * r['quant_acc']:>9.2f} "
            f"{100 * r['agreement']:>9.2f} {'-':>11} {r['sqnr_db']:>8.1f}"
        )
        q = qstrat.Quantizer(fer, strategy).quantize_model(f_calib, verbose=0, **over)
        r = evaluate(fer, q, f_eval, faces=f_faces)
        lines.append(
            f"{'mini-Xception':<14} {strategy:<8} {label:<28} {'-':>9} {'-':>9} {100 * r['agreement']:>9.2f} "
            f"{100 * r['agreement_faces']:>11.2f} {r['sqnr_db']:>8.1f}"
        )
    return lines


def split_table(seeds=(0, 1, 2, 3, 4)) -> list[str]:
    """Top-1 agreement and SQNR of the built-in strategies on the mini-Xception over several random splits.

    One 348-image evaluation set gives agreement to within a few images; other
    splits of the same images into 128 calibration and 348 evaluation images
    show how much of a difference between settings is noise.
    """
    import qstrat
    from qstrat import zoo
    from qstrat.demo import evaluate

    model = zoo.emotion_model()
    images, is_face = zoo.face_images()
    lines = [f"{'strategy':<8} " + " ".join(f"{'split ' + str(s):>13}" for s in seeds) + f" {'mean':>13}"]
    for strategy in ("pof2s", "fs"):
        agree, sqnr = [], []
        for seed in seeds:
            order = np.random.default_rng(seed).permutation(len(images))
            calib, ev, faces = images[order[:128]], images[order[128:]], is_face[order[128:]]
            q = qstrat.Quantizer(model, strategy).quantize_model(calib, verbose=0)
            r = evaluate(model, q, ev, faces=faces)
            agree.append(100 * r["agreement"])
            sqnr.append(r["sqnr_db"])
        cells = " ".join(f"{a:>6.2f}/{q:>4.1f}dB" for a, q in zip(agree, sqnr, strict=True))
        lines.append(f"{strategy:<8} {cells} {np.mean(agree):>6.2f}/{np.mean(sqnr):>4.1f}dB")
    return lines


def _images(n: int, seed: int = 0) -> np.ndarray:
    from qstrat import zoo

    return zoo.face_images_n(n, seed)


def overhead_table(n: int = 1024, batch: int = 32, repeats: int = 3) -> list[str]:
    import qstrat
    from qstrat import zoo
    from qstrat.passes.calibrate import calibrate_activations
    from qstrat.passes.insert import insert
    from qstrat.passes.ptq import rebuild_quantized
    from qstrat.passes.quantize import annotate
    from qstrat.passes.weight_calibration import calibrate_weights

    data = _images(n)
    # Baseline: a user's first model.predict over the data on a freshly loaded model, which
    # includes its one-time tracing, as calibration includes tracing its probe model.
    # Each figure is the median of `repeats` runs: this machine varies by about 20%.
    firsts, warms = [], []
    for _ in range(repeats):
        model = zoo.emotion_model()
        t0 = time.perf_counter()
        model.predict(data, verbose=0, batch_size=batch)
        firsts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.predict(data, verbose=0, batch_size=batch)
        warms.append(time.perf_counter() - t0)
    t_pred = float(np.median(firsts))
    lines = [
        f"model.predict on {n} images, batch {batch}: {t_pred:.2f} s first call, {np.median(warms):.2f} s traced "
        f"(medians of {repeats})",
        f"{'activation method':<18} {'calibration s':>13} {'ratio':>6} {'target':>7}",
    ]
    for method, target in (("No_OF", 1.5), ("Min_MSE", 3.0), ("Min_KL", 3.0)):
        times = []
        for _ in range(repeats):
            q = qstrat.Quantizer(model, "pof2s")
            strategy = q._strategy({"activation_method": method, "input_method": method})
            graph = q._optimized_graph(strategy)  # what quantize_model calibrates: the optimized graph
            qgraph, taps = insert(graph, annotate(graph, strategy))
            qmodel = rebuild_quantized(qgraph, "q")
            t0 = time.perf_counter()
            calibrate_weights(qmodel)
            calibrate_activations(
                qmodel, graph, taps, data, None, batch, strategy.quantize["calib_position_policy"], verbose=0
            )
            times.append(time.perf_counter() - t0)
        t_cal = float(np.median(times))
        ratio = t_cal / t_pred
        lines.append(
            f"{method:<18} {t_cal:>13.2f} {ratio:>6.2f} {'<= ' + format(target, 'g'):>7} {'PASS' if ratio <= target else 'FAIL'}"
        )
    return lines


def _worker(samples: int) -> None:
    """Run in a fresh process: peak RSS growth while calibrating on ``samples`` streamed images."""
    import qstrat
    from qstrat import zoo

    model = zoo.emotion_model()
    pool = _images(256)
    model.predict(pool[:32], verbose=0)

    def batches():
        rng = np.random.default_rng(1)
        for k in range(0, samples, 32):
            idx = rng.integers(0, len(pool), size=min(32, samples - k))
            yield pool[idx]

    q = qstrat.Quantizer(model, "pof2s")
    warm = q.quantize_model(pool[:32], verbose=0, include_bias_corr=False)  # warm up Keras/TF once
    del warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now = _rss_mb()
    # A generator is read once: bias correction, which needs several passes, is off.
    q.quantize_model(batches(), verbose=0, include_bias_corr=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "samples": samples,
                "growth_mb": max(peak - before, 0) / 1024,
                "rss_before_mb": rss_now,
                "peak_mb": peak / 1024,
            }
        )
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_table(counts=(256, 4096)) -> list[str]:
    results = []
    for n in counts:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", str(n)], capture_output=True, text=True, check=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [f"{'samples':>8} {'peak RSS MB':>11} {'RSS before MB':>13} {'peak minus before-peak MB':>25}"]
    for r in results:
        lines.append(f"{r['samples']:>8} {r['peak_mb']:>11.1f} {r['rss_before_mb']:>13.1f} {r['growth_mb']:>25.1f}")
    ratio = results[-1]["peak_mb"] / results[0]["peak_mb"]
    lines.append(
        f"peak RSS ratio {counts[-1]}/{counts[0]}: {ratio:.3f} ({'PASS' if ratio <= 1.10 else 'FAIL'}: flat within 10%)"
    )
    return lines


def _states(qmodel) -> dict:
    from qstrat.layers import FakeQuant

    return {
        (layer.name, v.path): np.asarray(v.numpy())
        for layer in qmodel.layers
        if isinstance(layer, FakeQuant)
        for v in layer.non_trainable_weights
    }


def histogram_share_table(n: int = 1024) -> list[str]:
    """Quality with the histograms of a share of a large calibration set (`HISTOGRAM_SAMPLES`) against all.

    The digits CNN calibrated on 1024 training digits, the mini-Xception on 1024 flips and shifts of its
    128 calibration images (no evaluation image); the same models and evaluation sets as table 1.
    """
    import qstrat
    from qstrat import zoo
    from qstrat.demo import digits_task, evaluate, faces_task
    from qstrat.passes import calibrate

    digits, _, d_test, d_labels = digits_task()
    x_train, _, _, _ = zoo.digits_split()
    d_calib = x_train[np.random.default_rng(0).permutation(len(x_train))[:n]]
    fer, f_calib, f_eval, f_faces = faces_task()
    f_calib = zoo.shifted_flips(f_calib, n)
    budget = calibrate.HISTOGRAM_SAMPLES
    lines = [
        f"{'model':<14} {'strategy':<8} {'histograms of':>13} {'acc / agree':>11} {'SQNR dB':>8} "
        f"{'act. calib s':>12} {'states that differ':>18}"
    ]
    for name, model, calib, ev, extra in (
        ("digits CNN", digits, d_calib, d_test, {"labels": d_labels}),
        ("mini-Xception", fer, f_calib, f_eval, {"faces": f_faces}),
    ):
        for strategy in ("pof2s", "fs"):
            states = {}
            for share, samples in (("all", 10**9), ("share", budget)):
                calibrate.HISTOGRAM_SAMPLES = samples
                try:
                    q = qstrat.Quantizer(model, strategy)
                    qmodel = q.quantize_model(calib, verbose=0)
                finally:
                    calibrate.HISTOGRAM_SAMPLES = budget
                r = evaluate(model, qmodel, ev, **extra)
                states[share] = _states(qmodel)
                score = r["quant_acc"] if "labels" in extra else r["agreement"]
                differ = "-"
                if share == "share":
                    differ = sum(not np.array_equal(v, states["all"][k]) for k, v in states[share].items())
                    differ = f"{differ} of {len(states[share])}"
                label = "every sample" if share == "all" else "default"
                lines.append(
                    f"{name:<14} {strategy:<8} {label:>13} {100 * score:>11.2f} {r['sqnr_db']:>8.2f} "
                    f"{q.timings['activation calibration']:>12.2f} {differ:>18}"
                )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument(
        "--parts", type=int, nargs="*", default=[1, 2, 3, 4, 5], help="which sections to run (default: all)"
    )
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # each new model's first predict retraces: expected here
    print(f"qstrat bench/ptq.py: Keras {keras.__version__}, {keras.backend.backend()}, {os.cpu_count()} cores\n")
    if 1 in args.parts:
        print("1. Accuracy (digits: 256 calibration digits; mini-Xception: 128 calibration images)")
        print("\n".join(accuracy_table()))
    if 2 in args.parts:
        print(
            "\n2. mini-Xception top-1 agreement / SQNR over five calibration/evaluation splits (split 0 is the one above)"
        )
        print("\n".join(split_table()))
    if 3 in args.parts:
        print("\n3. Calibration overhead (pof2s, mini-Xception)")
        print("\n".join(overhead_table()))
    if 4 in args.parts:
        print("\n4. Peak memory of quantize_model (pof2s, mini-Xception, streamed calibration)")
        print("\n".join(memory_table()))
    if 5 in args.parts:
        print(
            "\n5. 1024 calibration samples: in-graph histograms of every sample, and by default (power-of-2 "
            "positions: a share of each batch, about HISTOGRAM_SAMPLES in all; float scales: every sample)"
        )
        print("\n".join(histogram_share_table()))


if __name__ == "__main__":
    main()
