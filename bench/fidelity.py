"""DPU fidelity: the fake-quant Keras model against the integer reference, and what the DPU layer versions cost.

For the digits CNN, the fer mini-Xception and a MobileNetV3Small (random
weights with real images' BatchNormalization statistics: it has every DPU
layer version: hard swish, the hard-sigmoid pattern in its squeeze-excite
blocks, a 3x3 global average), each quantized with ``pof2s``, it prints:

- mismatches between the fake-quant Keras model and
  `qstrat.simulate_integer`: output elements, and elements of every
  quantized tensor (each FakeQuant's integers), on real images, on random
  inputs, and on inputs placed exactly on the input quantizer's rounding
  ties; all must be 0;
- the cost of the DPU layer versions, against the float model: the float
  model with the DPU versions (quantized without bias correction, its
  quantizers bypassed), and pof2s with and without the DPU versions, as
  accuracy (digits), top-1 agreement with the float model and output SQNR;
- how many positions the DPU compiler constraints moved, per rule.

Run: ``.venv/bin/python bench/fidelity.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import collections
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def sqnr(ref: np.ndarray, y: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - y) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def position(info: dict):
    """A power-of-2 quantizer's position from its description (TQT derives it from its threshold)."""
    return info["quantize_pos"] if "quantize_pos" in info else info["pos"]


def fake_quant_tensors(qmodel, x):
    """{FakeQuant call name: grid integers} from the Keras model, for every call of every FakeQuant."""
    import keras

    from qstrat.layers import FakeQuant

    names, outs, positions = [], [], []
    for layer in qmodel.layers:
        if not isinstance(layer, FakeQuant):
            continue
        for k, node in enumerate(layer._inbound_nodes):
            names.append(layer.name if k == 0 else f"{layer.name}@{k}")
            outs.append(node.output_tensors[0])
            positions.append(position(layer.quantizer.describe(layer.state)))
    values = keras.Model(qmodel.inputs, outs).predict(x, verbose=0, batch_size=64)
    values = values if isinstance(values, list) else [values]
    return {
        n: np.asarray(keras.ops.convert_to_numpy(v), np.float64) * np.exp2(np.asarray(p, np.float64))
        for n, v, p in zip(names, values, positions, strict=True)
    }


def tie_inputs(qmodel, shape, n: int, seed: int) -> np.ndarray:
    """Inputs exactly halfway between two levels of the input quantizer's grid (inside its range)."""
    info = next(iter(qmodel_input_info(qmodel)))
    pos = position(info)
    k = np.random.default_rng(seed).integers(-120, 120, (n, *shape))
    return ((k + 0.5) * 2.0**-pos).astype("float32")


def qmodel_input_info(qmodel):
    from qstrat.layers import FakeQuant

    inputs = {layer.name for layer in qmodel.layers if type(layer).__name__ == "InputLayer"}
    for layer in qmodel.layers:
        if isinstance(layer, FakeQuant) and layer.target.partition("/")[0] in inputs:
            yield layer.quantizer.describe(layer.state)


def mismatches(qmodel, x) -> tuple[int, int, int, int, list[str]]:
    """(output elements, output mismatches, tensor elements, tensor mismatches, float layers)."""
    import keras

    from qstrat.integer import run_integer

    run = run_integer(qmodel, x)
    yk = np.asarray(keras.ops.convert_to_numpy(qmodel.predict(x, verbose=0, batch_size=64)))
    yi = np.asarray(run.outputs[0] if isinstance(run.outputs, list) else run.outputs)
    keras_ints = fake_quant_tensors(qmodel, x)
    total = bad = 0
    for name, ints in keras_ints.items():
        mine = run.tensors[name][0]
        total += ints.size
        bad += int(np.sum(ints != mine))
    return yk.size, int(np.sum(yk != yi)), total, bad, list(run.float_layers)


def models():
    import keras

    from qstrat import zoo

    x_train, y_train, x_test, y_test = zoo.digits_split()
    yield "digits CNN", zoo.digits_cnn(), x_train[:512], x_test, y_test
    faces, is_face = zoo.face_images()
    yield "fer mini-Xception", zoo.emotion_model(), faces[:100], faces[100:], None
    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), weights=None, include_preprocessing=False)
    images = (zoo.color_images(320, 96) / 127.5 - 1).astype("float32")
    zoo.real_statistics(net, images[:64])
    yield "MobileNetV3Small (random weights)", net, images[:128], images[128:], None


DPU_VERSION_KEYS = (
    "convert_sigmoid_to_hard_sigmoid",
    "convert_hard_sigmoid_to_dpu_version",
    "convert_leaky_relu_to_dpu_version",
    "convert_average_pooling2d_to_dpu_version",
)


def quantize(model, calib, **keys):
    import qstrat

    q = qstrat.Quantizer(model, "pof2s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return q, q.quantize_model(calib, verbose=0, **keys)


def predict(model, x) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0, batch_size=64)))


def main() -> None:
    from qstrat.layers import set_quantizers_enabled

    rows_fid, rows_cost, rows_rules = [], [], []
    for name, model, calib, x_eval, labels in models():
        t = time.perf_counter()
        q, qmodel = quantize(model, calib)
        seconds = time.perf_counter() - t
        shape = tuple(x_eval.shape[1:])
        rng = np.random.default_rng(1)
        inputs = {
            "real": x_eval[:200],
            "random": rng.uniform(x_eval.min(), x_eval.max(), (64, *shape)).astype("float32"),
            "ties": tie_inputs(qmodel, shape, 64, 2),
        }
        for kind, x in inputs.items():
            n_out, bad_out, n_t, bad_t, floats = mismatches(qmodel, x)
            rows_fid.append((name, kind, len(x), n_out, bad_out, n_t, bad_t, ", ".join(floats) or "-"))
        # The float model with the DPU versions: quantized without bias correction, quantizers bypassed.
        _, plain = quantize(model, calib, include_bias_corr=False)
        set_quantizers_enabled(plain, False)
        _, no_dpu = quantize(model, calib, **dict.fromkeys(DPU_VERSION_KEYS, False))
        y_float = predict(model, x_eval)
        top = y_float.argmax(-1)
        variants = (
            ("float", y_float),
            ("float, DPU versions", predict(plain, x_eval)),
            ("pof2s, no DPU versions", predict(no_dpu, x_eval)),
            ("pof2s", predict(qmodel, x_eval)),
        )
        for label, y in variants:
            acc = float(np.mean(y.argmax(-1) == labels)) if labels is not None else None
            rows_cost.append((name, label, acc, float(np.mean(y.argmax(-1) == top)), sqnr(y_float, y)))
        made = collections.Counter(
            type(layer).__name__ for layer in qmodel.layers if type(layer).__name__.startswith("DPU")
        )
        per_rule = collections.Counter(c.rule for c in q.position_changes)
        rows_rules.append((name, dict(made), dict(per_rule), seconds))

    print("\nFake-quant Keras model vs qstrat.simulate_integer (mismatching elements; must be 0)\n")
    print(
        f"{'model':<34} {'inputs':<7} {'n':>4} {'outputs':>9} {'bad':>4} {'tensor elements':>16} {'bad':>4}  float layers"
    )
    for r in rows_fid:
        print(f"{r[0]:<34} {r[1]:<7} {r[2]:>4} {r[3]:>9} {r[4]:>4} {r[5]:>16} {r[6]:>4}  {r[7]}")
    print("\nCost of the DPU layer versions (against the float model)\n")
    print(f"{'model':<34} {'variant':<23} {'accuracy':>9} {'top-1 agree':>12} {'SQNR dB':>8}")
    for r in rows_cost:
        acc = "-" if r[2] is None else f"{100 * r[2]:.1f}%"
        print(f"{r[0]:<34} {r[1]:<23} {acc:>9} {100 * r[3]:>11.1f}% {r[4]:>8.1f}")
    print("\nDPU layers made, and positions the DPU compiler constraints moved (pof2s)\n")
    for name, made, per_rule, seconds in rows_rules:
        print(f"{name} (quantized in {seconds:.0f} s)")
        print(f"  DPU layers: {made or 'none'}")
        print(f"  positions moved: {per_rule or 'none'}")


if __name__ == "__main__":
    main()
