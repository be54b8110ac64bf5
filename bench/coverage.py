"""Coverage: every keras.applications architecture through quantize and save/load, for pof2s and fs.

Each architecture that builds offline (``weights=None``) is built at a small
input size (32x32, or the smallest of 75/96 it accepts), given the
BatchNormalization and Normalization statistics of real images
(`qstrat.zoo.real_statistics` over crops of the bundled sample photographs,
fed through the architecture's own ``preprocess_input``), then quantized with
the built-in ``pof2s`` and ``fs`` strategies (bias correction on, as built in).
For each it reports:

- quantized / skipped layer counts (from the quantize report), and the layer
  types skipped for lack of a pattern;
- output SQNR (logits) and top-1 agreement against the float model, on
  evaluation crops the calibration never saw;
- whether the saved and reloaded quantized model gives bit-identical outputs;
- the wall time of ``quantize_model``.

Random-weight networks are far more sensitive to quantization than trained
ones, so read SQNR for relative comparisons between architectures and
strategies; crash-freedom and reload identity are the hard facts.

Every architecture runs in its own process (a crash, a time-out or memory
growth stays with it). The table is printed, the rows go to
``bench/results/coverage.json``, and the support table is written to
``docs/coverage.md`` (generated: do not edit it by hand).

Run: ``.venv/bin/python bench/coverage.py`` (all 40 architectures, two at a
time: about two hours on 2 cores); ``--only MobileNetV2 ResNet50`` for some.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

STRATEGIES = ("pof2s", "fs")
SIZES = (32, 75, 96)  # tried in order: the first the architecture accepts
N_CALIB, N_EVAL = 32, 32


def architectures() -> list[str]:
    """Every architecture builder in keras.applications, the largest last."""
    import keras

    names = sorted(n for n, f in vars(keras.applications).items() if n[:1].isupper() and callable(f))
    heavy = ("Large", "XLarge", "Base", "B5", "B6", "B7", "V2M", "V2L", "152", "201", "ResNetV2")
    return sorted(names, key=lambda n: sum(h in n for h in heavy))


def _build(name: str):
    """(model, input size, preprocess_input) at the smallest size the architecture accepts."""
    import keras

    fn = getattr(keras.applications, name)
    preprocess = sys.modules[fn.__module__].preprocess_input
    last = None
    for size in SIZES:
        try:
            model = fn(input_shape=(size, size, 3), weights=None, classifier_activation=None)
        except ValueError as exc:  # too small for this architecture
            last = exc
            continue
        return model, size, preprocess
    raise RuntimeError(f"{name} builds at none of the sizes {SIZES}: {last}")


def run_one(name: str) -> dict:
    """Build, give real statistics, quantize with each strategy, save and reload: one architecture's row."""
    import keras
    import numpy as np

    import qstrat
    from qstrat import zoo
    from qstrat.demo import sqnr_db

    t0 = time.perf_counter()
    model, size, preprocess = _build(name)
    calib = np.asarray(preprocess(zoo.color_images(N_CALIB, size, seed=0)), np.float32)
    evaluation = np.asarray(preprocess(zoo.color_images(N_EVAL, size, seed=1)), np.float32)
    zoo.real_statistics(model, calib)
    row = {"arch": name, "size": size, "params": int(model.count_params()), "layers": len(model.layers)}
    row["build_s"] = time.perf_counter() - t0
    # Direct calls, not predict: each new model's predict would trace a function first.
    ref = np.asarray(keras.ops.convert_to_numpy(model(evaluation)), np.float64)
    for strategy in STRATEGIES:
        r: dict = {}
        try:
            q = qstrat.Quantizer(model, strategy)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = time.perf_counter()
                qmodel = q.quantize_model(calib, verbose=0)
                r["quantize_s"] = time.perf_counter() - t
            out = keras.ops.convert_to_numpy(qmodel(evaluation))
            r["sqnr_db"] = sqnr_db(ref, out)
            r["agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)))
            r["finite"] = bool(np.isfinite(out).all())
            skipped = q.report.skipped()
            r["quantized"] = len(q.report.quantized())
            r["skipped"] = len(skipped)
            r["unmatched_types"] = sorted(
                {q.report.layers[n].layer_type for n, why in skipped.items() if why and "no pattern" in why}
            )
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qstrat-coverage-{os.getpid()}-{strategy}.keras")
            try:
                qmodel.save(path)
                again = qstrat.load_model(path)
                reloaded = keras.ops.convert_to_numpy(again(evaluation))
                r["reload_identical"] = bool(np.array_equal(out, reloaded))
            finally:
                if os.path.exists(path):
                    os.unlink(path)
        except Exception as exc:  # noqa: BLE001 - the bench reports every failure and goes on
            r["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            r["traceback"] = traceback.format_exc()[-2000:]
        row[strategy] = r
    return row


def _cell(r: dict, key: str, fmt: str) -> str:
    return "-" if "error" in r or key not in r else format(r[key], fmt)


def table(rows: list[dict]) -> list[str]:
    head = f"{'architecture':<18} {'size':>4} {'params':>7} " + " ".join(
        f"{s + ' q/skip':>11} {'SQNR':>6} {'agree':>6} {'reload':>6} {'time s':>7}" for s in STRATEGIES
    )
    lines = [head]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['arch']:<18} FAILED: {row['error']}")
            continue
        cells = []
        for s in STRATEGIES:
            r = row[s]
            if "error" in r:
                cells.append(f"{'ERROR':>11} {r['error'][:40]}")
                continue
            cells.append(
                f"{str(r['quantized']) + '/' + str(r['skipped']):>11} {r['sqnr_db']:>6.1f} {100 * r['agreement']:>5.0f}% "
                f"{'same' if r['reload_identical'] else 'DIFF':>6} {r['quantize_s']:>7.1f}"
            )
        lines.append(f"{row['arch']:<18} {row['size']:>4} {row['params'] / 1e6:>6.1f}M " + " ".join(cells))
    return lines


def markdown(rows: list[dict]) -> str:
    import keras

    out = [
        "# keras.applications support",
        "",
        "Generated by `bench/coverage.py`; do not edit by hand. Each architecture is built with "
        "`weights=None` at the input size shown, given the BatchNormalization and Normalization statistics of "
        f"real images, quantized with the built-in strategy on {N_CALIB} calibration images and compared with "
        f"the float model on {N_EVAL} others (logits). Keras {keras.__version__}, backend "
        f"{keras.backend.backend()}.",
        "",
        "Random-weight networks are far more sensitive to quantization than trained ones: read SQNR for "
        "relative comparisons. *q/skip* counts the layers quantized and those skipped (each skip has its "
        "reason in `Quantizer.report`); *reload* says whether the saved and reloaded quantized model gives "
        "bit-identical outputs; *time* is the wall time of `quantize_model`, bias correction included.",
        "",
        "| architecture | input | params | "
        + " | ".join(f"{s} q/skip | {s} SQNR dB | {s} agree | {s} reload | {s} time s" for s in STRATEGIES)
        + " |",
        "|---|---:|---:|" + "---:|---:|---:|:---:|---:|" * len(STRATEGIES),
    ]
    unmatched: dict[str, set[str]] = {s: set() for s in STRATEGIES}
    for row in rows:
        if "error" in row:
            cells = [row["error"][:60].replace("|", "/")] + ["–"] * (5 * len(STRATEGIES) - 1)
            out.append(f"| {row['arch']} | – | – | " + " | ".join(cells) + " |")
            continue
        cells = []
        for s in STRATEGIES:
            r = row[s]
            if "error" in r:
                cells += ["error: " + r["error"][:60].replace("|", "/")] + ["–"] * 4
                continue
            unmatched[s].update(r["unmatched_types"])
            cells += [
                f"{r['quantized']}/{r['skipped']}",
                f"{r['sqnr_db']:.1f}",
                f"{100 * r['agreement']:.0f}%",
                "identical" if r["reload_identical"] else "**differs**",
                f"{r['quantize_s']:.0f}",
            ]
        out.append(f"| {row['arch']} | {row['size']} | {row['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    out += ["", "Layer types no pattern of the strategy matches (skipped, with that reason in the report):", ""]
    for s in STRATEGIES:
        out.append(f"- {s}: {', '.join(sorted(unmatched[s])) or 'none'}")
    return "\n".join(out) + "\n"


def _worker(name: str, result_path: str) -> int:
    warnings.filterwarnings("ignore")
    try:
        row = run_one(name)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row = {"arch": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        row["traceback"] = traceback.format_exc()[-2000:]
    with open(result_path, "w") as f:
        json.dump(row, f)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per architecture")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/coverage.md")
    p.add_argument("--reuse", action="store_true", help="keep the results already in bench/results/ and run the rest")
    p.add_argument("--jobs", type=int, default=2, help="architectures run at once (default 2)")
    p.add_argument("--report", action="store_true", help="only rebuild the table and docs from bench/results/")
    args = p.parse_args()
    if args.worker:
        return _worker(args.worker, args.result)
    names = args.only or architectures()
    results_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(results_dir, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str) -> dict:
        result = os.path.join(results_dir, f"coverage-{name}.json")
        if (args.reuse or args.report) and os.path.exists(result):
            with open(result) as f:
                return json.load(f)
        if args.report:
            return {"arch": name, "error": "not run yet"}
        t = time.perf_counter()
        try:
            subprocess.run(
                [sys.executable, __file__, "--worker", name, "--result", result],
                timeout=args.timeout,
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            with open(result) as f:
                row = json.load(f)
        except subprocess.TimeoutExpired:
            row = {"arch": name, "error": f"timed out after {args.timeout} s"}
        except (OSError, json.JSONDecodeError) as exc:
            row = {"arch": name, "error": f"the worker died without a result ({exc})"}
        print(f"{name}: {time.perf_counter() - t:.0f} s\n{table([row])[-1]}", file=sys.stderr, flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:  # each architecture in its own process
        rows = sorted(pool.map(run, names), key=lambda r: r["arch"])  # run heavy-last, reported by name
    print("\n".join(table(rows)))
    with open(os.path.join(results_dir, "coverage.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if not args.no_docs and not args.only:
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        with open(os.path.join(ROOT, "docs", "coverage.md"), "w") as f:
            f.write(markdown(rows))
        print("\nwrote docs/coverage.md")
    failures = [r["arch"] for r in rows if "error" in r or any("error" in r.get(s, {}) for s in STRATEGIES)]
    differs = [r["arch"] for r in rows if any(r.get(s, {}).get("reload_identical") is False for s in STRATEGIES)]
    print(
        f"\n{len(rows)} architectures: {len(failures)} with a failure {failures or ''}, "
        f"{len(differs)} whose reload differs {differs or ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
