"""Quantization-aware training on real data: what QAT recovers over PTQ, and what a training step costs.

On the MobileNet-style CNN trained on scikit-learn's digits (`qstrat.zoo.digits_mobilenet`,
1442 training and 355 test images), it prints:

- float test accuracy;
- pof2s PTQ accuracy with 8-bit and with 4-bit weights (512 calibration images);
- tqt QAT accuracy at both settings: ``get_qat_model(init_quant=True)`` on
  the same 512 images, initialized as pof2s PTQ is (``INIT``: MSE weight
  positions and bias correction; the tqt strategy's own defaults are the
  reference tool's max-based positions without correction), its accuracy
  before training, then ``EPOCHS`` epochs of ``fit`` on the training set
  (Adam, learning rate ``LR`` decayed to 0 on a cosine, batch 32, a fixed
  shuffle seed), then the deployed model (``get_deploy_model``: TQT
  thresholds as positions, the DPU constraints) evaluated; also with
  ``train_with_bn`` (fake folding);
- the QAT training step time divided by the float model's: warm epochs of
  ``fit`` at batch 32, the QAT model's and the float model's back to back,
  the median over ``ROUNDS`` rounds of each round's ratio (a round's two
  epochs see the same machine load), on this backend (the targets are for
  TensorFlow); for tqt, tqt with ``train_with_bn``, and pof2s, whose
  quantizers take each batch's position, the Min_MSE error sums in float64
  and in base-256 digits (as for grids over 8 bits: `batch_ranges.sums_in_float64`),
  each with its first epoch's time, which holds the training step's trace.

Targets (printed beside the figures): 8-bit tqt within 0.2 points of float;
4-bit-weight tqt recovering at least half of the PTQ loss; step time <= 1.15x.

Run: ``.venv/bin/python bench/qat.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import warnings
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

EPOCHS = 10
LR = 3e-4  # a tenth of the rate the float model trained at (qstrat.zoo: Adam 3e-3)
ROUNDS = 15
CALIB = 512
INIT = {"weight_method": "Min_MSE", "include_bias_corr": True}
STEP_ROWS = (  # (label, strategy, keys, Min_MSE sums in digits) for the step times
    ("tqt QAT", "tqt", {}, False),
    ("tqt QAT, train_with_bn", "tqt", {"train_with_bn": True}, False),
    ("pof2s QAT", "pof2s", {}, False),
    ("pof2s QAT, digit sums", "pof2s", {}, True),
)


def accuracy(model, x, y) -> float:
    import keras

    out = np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0, batch_size=64)))
    return float(np.mean(out.argmax(-1) == y))


def compile_for_training(model, lr: float, steps: int = 1):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def first_epoch(model, x, y, digits: bool = False) -> float:
    """Seconds of the model's first epoch, its trace included; with ``digits``, traced with Min_MSE's error sums
    in base-256 digits (the trace keeps them for every later step)."""
    from qstrat.quantizers import batch_ranges

    sums = mock.patch.object(batch_ranges, "sums_in_float64", lambda: False) if digits else contextlib.nullcontext()
    with sums:
        t = time.perf_counter()
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        return time.perf_counter() - t


def step_ratios(models: dict, x, y) -> dict:
    """Each model's warm epoch time over the float model's ("float"), paired by round: the median ratio.
    The models have trained an epoch on ``x`` (`first_epoch`), so no step is traced here."""
    times = {k: [] for k in models}
    for _ in range(ROUNDS):
        for k, m in models.items():
            t = time.perf_counter()
            m.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
            times[k].append(time.perf_counter() - t)
    steps = -(-len(x) // 32)
    return {
        k: (statistics.median(v) / steps, statistics.median(a / b for a, b in zip(v, times["float"], strict=True)))
        for k, v in times.items()
    }


def qat(model, x_train, y_train, x_test, y_test, **keys):
    import keras

    import qstrat

    q = qstrat.Quantizer(model, "tqt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = q.get_qat_model(init_quant=True, calib_dataset=x_train[:CALIB], verbose=0, **INIT, **keys)
    start = accuracy(m, x_test, y_test)
    compile_for_training(m, LR, EPOCHS * -(-len(x_train) // 32))
    keras.utils.set_random_seed(1)
    t = time.perf_counter()
    m.fit(x_train, y_train, batch_size=32, epochs=EPOCHS, shuffle=True, verbose=0)
    seconds = time.perf_counter() - t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = q.get_deploy_model(m, **{k: v for k, v in keys.items() if k != "train_with_bn"})
    return start, accuracy(m, x_test, y_test), accuracy(deployed, x_test, y_test), seconds, len(q.position_changes)


def main() -> None:
    import keras

    import qstrat
    from qstrat import zoo

    x_train, y_train, x_test, y_test = zoo.digits_split()
    model = zoo.digits_mobilenet()
    float_acc = accuracy(model, x_test, y_test)
    rows = []
    for label, keys in (("8-bit", {}), ("4-bit weights", {"weight_bit": 4})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ptq = qstrat.Quantizer(model, "pof2s").quantize_model(x_train[:CALIB], verbose=0, **keys)
        ptq_acc = accuracy(ptq, x_test, y_test)
        start, qat_acc, deploy_acc, seconds, moved = qat(model, x_train, y_train, x_test, y_test, **keys)
        bn = qat(model, x_train, y_train, x_test, y_test, train_with_bn=True, **keys)
        rows.append((label, ptq_acc, start, qat_acc, deploy_acc, moved, seconds, *bn[1:]))

    print(
        f"\nQAT on digits (MobileNet-style CNN), backend {keras.backend.backend()}: {len(x_train)} training, "
        f"{len(x_test)} test images; init {INIT}; {EPOCHS} epochs, Adam {LR} with cosine decay\n"
    )
    print(f"float accuracy: {100 * float_acc:.2f}%\n")
    head = f"{'setting':<14} {'pof2s PTQ':>10} {'tqt init':>9} {'tqt QAT':>9} {'deployed':>9} {'moved':>6} {'fit s':>6}"
    print(head + f"   {'with train_with_bn: QAT':>24} {'deployed':>9} {'moved':>6} {'fit s':>6}   target")
    for r in rows:
        label, ptq_acc, start, qat_acc, deploy_acc, moved, seconds, bn_qat, bn_deploy, bn_seconds, bn_moved = r
        if label == "8-bit":
            goal = f"deployed >= {100 * float_acc - 0.2:.2f}% (float - 0.2)"
            ok = deploy_acc >= float_acc - 0.002
        else:
            half = ptq_acc + (float_acc - ptq_acc) / 2
            goal = f"deployed >= {100 * half:.2f}% (half the PTQ loss back)"
            ok = deploy_acc >= half
        print(
            f"{label:<14} {100 * ptq_acc:>9.2f}% {100 * start:>8.2f}% {100 * qat_acc:>8.2f}% {100 * deploy_acc:>8.2f}% "
            f"{moved:>6} {seconds:>6.0f}   {100 * bn_qat:>23.2f}% {100 * bn_deploy:>8.2f}% {bn_moved:>6} "
            f"{bn_seconds:>6.0f}   {goal}: {'met' if ok else 'NOT met'}"
        )

    # Step time: the float model against the QAT models, same optimizer and batch.
    float_model = compile_for_training(keras.models.clone_model(model), LR)
    float_model.set_weights(model.get_weights())
    models = {"float": float_model}
    first = {"float": first_epoch(float_model, x_train, y_train)}
    for label, strategy, keys, digits in STEP_ROWS:
        q = qstrat.Quantizer(model, strategy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = q.get_qat_model(init_quant=True, calib_dataset=x_train[:CALIB], verbose=0, **INIT, **keys)
        models[label] = compile_for_training(m, LR)
        first[label] = first_epoch(models[label], x_train, y_train, digits)
    ratios = step_ratios(models, x_train, y_train)
    print(
        f"\ntraining step at batch 32 (warm fit epochs, median of {ROUNDS} paired rounds; first epoch, trace included):"
    )
    for label, (step, ratio) in ratios.items():
        goal = "" if label == "float" else f" = {ratio:.2f}x float"
        if label == "tqt QAT":
            goal += "   target <= 1.15x"
        print(f"  {label:<30} first epoch {first[label]:6.1f} s   step {1000 * step:6.1f} ms{goal}")


if __name__ == "__main__":
    main()
