"""Refining PTQ for accuracy: activation-aware equalization (and, as they land, the other refine options).

On the digits MobileNet-style CNN (512 calibration digits; accuracy on 355
test digits, logit SQNR against the float model) and the mini-Xception (the
demo's split of its real images: 128 calibration, the rest evaluated; top-1
agreement with the float model on all of them and on the real faces among
them, and output SQNR): pof2s at 8-bit, pof2s with
4-bit weights, and fs, each plain (the strategy's defaults) and with
``include_act_eq`` at several ``act_eq_beta``; and the wall time of each
``quantize_model`` as a ratio to a warm ``model.predict`` of the calibration
data (one run each: small models, so it moves a lot between runs).

Run: ``.venv/bin/python bench/refine.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CALIB = 512
VARIANTS = (
    ("plain", {}),
    ("act_eq beta 0.25", {"include_act_eq": True, "act_eq_beta": 0.25}),
    ("act_eq beta 0.5", {"include_act_eq": True, "act_eq_beta": 0.5}),
    ("act_eq beta 0.75", {"include_act_eq": True, "act_eq_beta": 0.75}),
)
SETTINGS = (("pof2s", {}), ("pof2s w4", {"weight_bit": 4}), ("fs", {}))


def _tasks():
    import numpy as np

    from qstrat import zoo

    x_train, _, x_test, y_test = zoo.digits_split()
    yield "digits MobileNet-style", zoo.digits_mobilenet(), x_train[:CALIB], x_test, y_test, None
    images, is_face = zoo.face_images()  # the demo's split: 128 calibration images, the rest evaluated
    order = np.random.default_rng(0).permutation(len(images))
    calib, rest = order[:128], order[128:]
    yield "mini-Xception", zoo.emotion_model(), images[calib], images[rest], None, is_face[rest]


def _scores(model, qmodel, x, labels, faces) -> str:
    import numpy as np

    from qstrat.inspect.mixed import output_sqnr

    f = np.asarray(model.predict(x, batch_size=64, verbose=0))
    q = np.asarray(qmodel.predict(x, batch_size=64, verbose=0))
    sqnr = output_sqnr(model, qmodel, x, 64)
    if labels is not None:
        return f"acc {100 * np.mean(q.argmax(1) == labels):6.2f}% (float {100 * np.mean(f.argmax(1) == labels):.2f}%)  {sqnr:5.2f} dB"
    agree = f.argmax(1) == q.argmax(1)
    extra = "" if faces is None else f" / faces {100 * agree[faces].mean():6.2f}%"
    return f"agree {100 * agree.mean():6.2f}%{extra}  {sqnr:5.2f} dB"


def main() -> int:
    warnings.filterwarnings("ignore")
    import keras

    import qstrat

    print(f"qstrat bench/refine.py: Keras {keras.__version__}, {keras.backend.backend()}, {os.cpu_count()} cores")
    for title, model, calib, x, labels, faces in _tasks():
        model.predict(calib, batch_size=32, verbose=0)
        t = time.perf_counter()
        model.predict(calib, batch_size=32, verbose=0)
        predict = time.perf_counter() - t
        print(f"\n{title}: {len(calib)} calibration, {len(x)} evaluation samples; warm predict {predict:.3f} s")
        for setting, base in SETTINGS:
            for variant, extra in VARIANTS:
                q = qstrat.Quantizer(model, setting.split()[0])
                t = time.perf_counter()
                qmodel = q.quantize_model(calib, verbose=0, **base, **extra)
                took = time.perf_counter() - t
                print(
                    f"  {setting:<9} {variant:<17} {_scores(model, qmodel, x, labels, faces)}  {took / predict:5.1f}x predict"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
