"""Calibration with and without a distribution, compared bit for bit; run in a fresh process.

``python tests/distributed_check.py BACKEND MODEL`` with BACKEND ``jax``
(``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set, as
`distributed_test` does) or ``tensorflow`` (two logical CPU devices, made
here before TensorFlow starts), MODEL ``digits`` or ``xception``. For pof2s and
fs, the model is quantized on one device, then under the distribution (JAX:
``keras.distribution.DataParallel`` over the 4 devices; TensorFlow:
``MirroredStrategy`` over the 2). Prints one JSON line:
per run, the groups of batches that ran spread over the devices, and the
quantizer states and bias corrections that differ (none, when all is well).

MODEL ``qat``: the digits CNN trained with QAT (tqt, then pof2s) for 16
steps on one device and under the distribution: accuracies, and the largest
differences of quantizer states and weights. Then an MAFS quantizer on the
input of a dense model, trained the same way: its moving range.

MODEL ``layout`` (JAX): the digits MobileNet-style model built and quantized
under a ModelParallel layout; each kernel's sharding, float and quantized.
"""

import json
import os
import sys
import warnings

BACKEND, MODEL = sys.argv[1], sys.argv[2]
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if BACKEND == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import qstrat  # noqa: E402
from qstrat import zoo  # noqa: E402
from qstrat.layers import FakeQuant, QuantizeWrapper  # noqa: E402
from qstrat.passes import distributed, runner  # noqa: E402

warnings.filterwarnings("ignore")
BATCH = 8  # 100 samples: twelve full batches and a short one, so full groups spread and the last does not
# On one device and under a distribution alike, a small model's consecutive batches run joined, as one call
# (`qstrat.passes.runner.merged`); a distribution spreads those units. Two batches a unit here: six units of
# two and the short batch, so that several groups of units spread (JAX compiles per shape: one batch a unit).
runner.MERGE_SAMPLES = 2 * BATCH


def task():
    if MODEL == "digits":
        x_train, _, _, _ = zoo.digits_split()
        return zoo.digits_mobilenet, x_train[:100]
    images, _ = zoo.face_images()
    return zoo.emotion_model, images[:100]


def state(qmodel) -> dict:
    """Every quantizer state variable and bias correction of the quantized model, by name."""
    out = {}
    for layer in qmodel.layers:
        if isinstance(layer, FakeQuant):
            for k, v in layer.state.items():
                out[f"{layer.name}.{k}"] = np.asarray(keras.ops.convert_to_numpy(v))
        elif isinstance(layer, QuantizeWrapper):
            for attr, variables in layer.state.items():
                for k, v in variables.items():
                    out[f"{layer.name}.{attr}.{k}"] = np.asarray(keras.ops.convert_to_numpy(v))
            for attr, value in (getattr(layer, "corrections", None) or {}).items():
                out[f"{layer.name}.{attr}.correction"] = np.asarray(value)
    return out


def quantize(model, x, strategy) -> dict:
    return state(qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0, calib_batch_size=BATCH))


_MIRRORED = []


def engine():
    """The distribution's scope: MirroredStrategy over two CPU devices, or DataParallel over four.

    TensorFlow: one MirroredStrategy for the whole process. A second one over the same devices numbers its
    collectives from the start again, and its gradient all-reduce then fails against the first's ("Shape
    mismatch in the collective instance"), with plain Keras models too.
    """
    if BACKEND == "tensorflow":
        if not _MIRRORED:
            _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        return "MirroredStrategy", _MIRRORED[0].scope()
    import jax

    return "DataParallel", keras.distribution.DataParallel(devices=jax.devices()).scope()


LR, EPOCHS = 1e-3, 1  # QAT: Adam, 1 epoch of 512 digits in batches of 32 (16 steps)


def qat() -> dict:
    """The digits CNN trained with QAT (tqt, then pof2s) on one device and under the distribution: each
    quantizer state's largest difference, the weights' largest, and the accuracies; then MAFS's moving range."""
    import contextlib

    x_train, y_train, x_test, y_test = zoo.digits_split()
    x, y, xt, yt = x_train[:512], y_train[:512], x_test[:352], y_test[:352]  # 352: whole batches on 4 devices
    report = {"backend": BACKEND, "model": "qat", "steps": EPOCHS * len(x) // 32, "lr": LR, "runs": []}
    for strategy in ("tqt", "pof2s"):
        got = {}
        for name, scope in (("one device", contextlib.nullcontext()), engine()):
            with scope:
                q = qstrat.Quantizer(zoo.digits_cnn(), strategy)
                m = q.get_qat_model(calib_dataset=x[:256], verbose=0, init_quant=True)
                m.compile(keras.optimizers.Adam(LR), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                m.fit(x, y, batch_size=32, epochs=EPOCHS, shuffle=False, verbose=0)
                acc = float(np.mean(np.asarray(m.predict(xt, batch_size=32, verbose=0)).argmax(1) == yt))
                weights = {v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in m.trainable_weights}
                got[name] = (state(m), weights, acc)
        (s1, w1, a1), (s2, w2, a2) = got.values()
        report["runs"].append(
            {
                "strategy": strategy,
                "accuracy": [a1, a2],
                "states": len(s1),
                "state_differ": sorted(k for k in s1 if not np.array_equal(s1[k], s2[k])),
                "state_max_diff": max(float(np.max(np.abs(s1[k] - s2[k]))) for k in s1),
                "weight_max_diff": max(float(np.max(np.abs(w1[k] - w2[k]))) for k in w1),
            }
        )
    # Each image scaled and shifted by its own draw: every batch, and each half of one, has its own range.
    rng = np.random.default_rng(0)
    scale, shift = rng.uniform(0.5, 4.0, (len(x), 1)), rng.uniform(0.0, 2.0, (len(x), 1))
    report["mafs"] = mafs((x.reshape(len(x), -1) * scale - shift).astype("float32"), y)
    return report


def mafs(x, y) -> dict:
    """Input -> FakeQuant(MAFS, per tensor) -> Dense(10), fit for 16 steps on one device and under the
    distribution: the quantizer sees the input batches, so its moving range is the data's alone and must be
    equal bit for bit (the batch's minimum and maximum, combined over the devices, are exact)."""
    import contextlib

    spec = {"type": "MAFSQuantizer", "params": {"bit_width": 8, "ema_decay": 0.9, "symmetry": False}}
    got = []
    for scope in (contextlib.nullcontext(), engine()[1]):
        with scope:
            inp = keras.Input((x.shape[1],))
            fq = FakeQuant(spec, target="x/input", name="fq")
            m = keras.Model(inp, keras.layers.Dense(10)(fq(inp)))
            m.compile(keras.optimizers.Adam(LR), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            m.fit(x, y, batch_size=32, epochs=EPOCHS, shuffle=False, verbose=0)
            got.append({k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in fq.state.items()})
    one, many = got
    return {
        "state": {k: one[k].tolist() for k in sorted(one)},
        "differ": sorted(k for k in one if not np.array_equal(one[k], many[k])),
    }


def layout() -> dict:
    """JAX: the digits MobileNet-style model built and quantized (pof2s) under a ModelParallel layout on a 2x2
    mesh (the 1x1 convolutions' and the head's kernels split over their output axis): each kernel's sharding in
    the float and in the quantized model, the groups spread over the batch axis, and the quantizer states that
    differ from one device's."""
    import jax

    x_train, _, _, _ = zoo.digits_split()
    x = x_train[:100]
    one = quantize(zoo.digits_mobilenet(), x, "pof2s")
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], jax.devices())
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[".*pw\\d/kernel"] = (None, None, None, "model")
    layouts[".*logits/kernel"] = (None, "model")
    groups = counting()
    with keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch").scope():
        model = zoo.digits_mobilenet()
        qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, calib_batch_size=BATCH)
        many = state(qmodel)
        outputs = np.asarray(qmodel.predict(x[:32], verbose=0)).shape

    def specs(m):
        return {v.path: str(v.value.sharding.spec) for v in m.weights if v.path.endswith("kernel")}

    return {
        "backend": BACKEND,
        "model": "layout",
        "float": specs(model),
        "quantized": specs(qmodel),
        "groups": groups["n"],
        "outputs": list(outputs),
        "differ": sorted(k for k in one if not np.array_equal(one[k], many[k])),
        "max_diff": max(float(np.max(np.abs(one[k] - many[k]))) for k in one),
    }


def counting() -> dict:
    """Count the groups of batches `Spread` runs spread over the devices, from now on."""
    spread_groups = {"n": 0}
    call = distributed.Spread.__call__

    def counted(self, group):
        before = self.groups_spread
        got = call(self, group)
        spread_groups["n"] += self.groups_spread - before
        return got

    distributed.Spread.__call__ = counted
    return spread_groups


def main() -> int:
    if MODEL == "qat":
        print(json.dumps(qat()))
        return 0
    if MODEL == "layout":
        print(json.dumps(layout()))
        return 0
    build, x = task()
    model = build()
    spread_groups = counting()
    report = {"backend": BACKEND, "model": MODEL, "runs": []}
    for strategy in ("pof2s", "fs"):
        one = quantize(model, x, strategy)
        name, scope = engine()
        spread_groups["n"] = 0
        with scope:
            many = quantize(model, x, strategy)
        report["runs"].append(
            {
                "strategy": strategy,
                "engine": name,
                "groups": spread_groups["n"],
                "states": len(one),
                "corrections": sum(k.endswith(".correction") for k in one),
                "differ": sorted(k for k in one if k not in many or not np.array_equal(one[k], many[k])),
            }
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
