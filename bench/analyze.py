"""Analysis and mixed precision on real models: which layers are sensitive, what raising them buys, what it costs.

For the mini-Xception (pretrained, real face images) and the digits
MobileNet-style CNN (trained on scikit-learn's digits), pof2s with its
defaults, in one run each:

- the 5 most sensitive layers (model output SQNR with only that layer
  quantized) and their cumulative SQNR;
- the wall time of `qstrat.analyze` as a ratio to a warm ``model.predict``
  of the same analysis data (batch 32, median of 3), split into the
  statistics (3 passes: the float model, the quantized model bypassed and
  on) and each layer alone (one run per layer, two more per layer with both
  weight and activation quantizers), each against its number of runs;
- the outputs' SQNR before and after mixed precision with at most 10% of
  the quantized layers at int16 (`quantize_model(target_sqnr=..., max_raised=0.1)`
  with a target out of reach, so the cap is used), and with a reachable
  target (3 dB above the 8-bit model), the layers raised for each.

Run: ``.venv/bin/python bench/analyze.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ANALYSIS_SAMPLES = 256
CALIB_SAMPLES = 512


def _data(name: str):
    import numpy as np

    from qstrat import zoo

    if name == "fer":
        x = zoo.face_images_n(CALIB_SAMPLES + ANALYSIS_SAMPLES).astype(np.float32)
        return "mini-Xception", zoo.emotion_model(), x[:CALIB_SAMPLES], x[CALIB_SAMPLES:]
    x_train, _, x_test, _ = zoo.digits_split()
    return "digits MobileNet-style", zoo.digits_mobilenet(), x_train[:CALIB_SAMPLES], x_test[:ANALYSIS_SAMPLES]


def _warm_predict(model, x) -> float:
    import numpy as np

    model.predict(x, batch_size=32, verbose=0)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model.predict(x, batch_size=32, verbose=0)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run(name: str) -> None:
    import qstrat
    from qstrat.inspect.mixed import output_sqnr

    title, model, calib, x = _data(name)
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(calib, verbose=0)
    predict = _warm_predict(model, x)
    t = time.perf_counter()
    result = qstrat.analyze(model, qmodel, x, left_out=True, verbose=0)
    took = time.perf_counter() - t
    print(f"\n{title}: {len(result.layers)} quantized layers, {result.samples} analysis samples, pof2s")
    print(
        f"  outputs against float: SQNR {result.output_sqnr_db:.2f} dB"
        + ("" if result.agreement is None else f", top-1 agreement {100 * result.agreement:.2f}%")
        + f"; float reference against the float model: {result.bypass_sqnr_db:.1f} dB"
    )
    print(f"  warm predict of the analysis data: {predict:.3f} s")
    print(f"  analyze: {took:.2f} s = {took / predict:.1f}x a warm predict")
    stats = result.seconds["statistics"]
    print(f"    statistics: {stats:.2f} s in 3 passes = {stats / predict:.1f}x a predict")
    for stage, key in (
        ("each layer alone", "alone"),
        ("weights or activations alone", "weight/activation split"),
        ("each layer left out", "left out"),
    ):
        seconds, runs = result.seconds.get(stage, 0.0), result.passes[key]
        print(
            f"    {stage}: {seconds:.2f} s in {runs} runs = {seconds / max(runs, 1) / predict:.2f}x a predict per run"
        )
    print("  most sensitive layers (alone = output SQNR with only that layer quantized):")
    for name_ in result.ranking()[:5]:
        la = result.layer(name_)
        print(
            f"    {la.name:<28} {la.layer_type:<22} alone {la.alone_sqnr_db:6.2f} dB, cumulative {la.sqnr_db:6.2f} dB"
        )
    print("  largest gains from one layer in float (left out = output SQNR with every other layer quantized):")
    for name_ in result.gain_ranking()[:5]:
        la = result.layer(name_)
        print(f"    {la.name:<28} {la.layer_type:<22} left out {la.left_out_sqnr_db:6.2f} dB")
    base = output_sqnr(model, qmodel, x, 32)
    for label, target in (("at most 10% of layers at int16 (cap)", 1e3), ("target 8-bit + 3 dB", base + 3.0)):
        q = qstrat.Quantizer(model, "pof2s")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixed_model = q.quantize_model(calib, verbose=0, target_sqnr=target, max_raised=0.1)
        m = q.mixed_precision
        after = output_sqnr(model, mixed_model, x, 32)
        print(
            f"  mixed precision, {label}: {len(m.raised)} raised {m.raised}; output SQNR on the analysis data "
            f"{base:.2f} -> {after:.2f} dB ({'met' if m.met else 'not met'}; tried {[k for k, _ in m.tried]})"
        )


def main() -> int:
    warnings.filterwarnings("ignore")
    import keras

    print(f"qstrat bench/analyze.py: Keras {keras.__version__}, {keras.backend.backend()}, {os.cpu_count()} cores")
    for name in ("fer", "digits_mobilenet"):
        run(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
