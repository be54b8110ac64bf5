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
from qstrat.passes import distributed  # noqa: E402

warnings.filterwarnings("ignore")
BATCH = 8  # 100 samples: twelve full batches and a short one, so full groups spread and the last does not


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


def engine():
    """The distribution's scope: MirroredStrategy over two CPU devices, or DataParallel over four."""
    if BACKEND == "tensorflow":
        return "MirroredStrategy", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope()
    import jax

    return "DataParallel", keras.distribution.DataParallel(devices=jax.devices()).scope()


def main() -> int:
    build, x = task()
    model = build()
    spread_groups = {"n": 0}
    call = distributed.Spread.__call__

    def counted(self, group):
        before = self.groups_spread
        got = call(self, group)
        spread_groups["n"] += self.groups_spread - before
        return got

    distributed.Spread.__call__ = counted
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
