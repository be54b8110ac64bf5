"""Calibration on several devices: wall time against the device count, and what an observer holds.

1. The mini-Xception quantized with pof2s on 512 calibration images (batch 32;
   bias correction off, since its passes run on one device) on 1, 2 and 4 JAX
   virtual CPU devices (``DataParallel``) and on 1 and 2 TensorFlow logical
   CPU devices (``MirroredStrategy``), each in a fresh process: the wall time
   of ``quantize_model``, as a ratio to a warm one-device ``model.predict`` of
   the same images, median of 3. Virtual devices share this machine's cores,
   so this measures what spreading costs, not what more hardware gains.
2. The state each kind of observer holds (bytes per quantizer) after 32,
   1024 and 8192 samples of a 16x16x32 activation, streamed in batches of 32:
   it does not grow with the data, and it is what a worker would send to be
   merged. Then the time of one exact ``merge`` of two such states.

Run: ``.venv/bin/python bench/scale.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SAMPLES, BATCH = 512, 32


def one(backend: str, devices: int) -> dict:
    """In this process (its devices made before the backend starts): predict and quantize times."""
    if backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    import contextlib

    import keras
    import numpy as np

    import qstrat
    from qstrat import zoo

    warnings.filterwarnings("ignore")
    model, x = zoo.emotion_model(), zoo.face_images_n(SAMPLES, seed=1)
    model.predict(x, batch_size=BATCH, verbose=0)
    predict = []
    for _ in range(3):
        t = time.perf_counter()
        model.predict(x, batch_size=BATCH, verbose=0)
        predict.append(time.perf_counter() - t)
    if devices == 1:
        scope = contextlib.nullcontext()
    elif backend == "jax":
        import jax

        scope = keras.distribution.DataParallel(devices=jax.devices()).scope()
    else:
        scope = tf.distribute.MirroredStrategy([f"/cpu:{k}" for k in range(devices)]).scope()
    took = []
    with scope:
        for _ in range(3):
            t = time.perf_counter()
            qstrat.Quantizer(model, "pof2s").quantize_model(
                x, verbose=0, calib_batch_size=BATCH, include_bias_corr=False
            )
            took.append(time.perf_counter() - t)
    return {"predict": float(np.median(predict)), "quantize": float(np.median(took))}


def _spawn(backend: str, devices: int) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, os.path.abspath(__file__), "--one", backend, str(devices)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"bench/scale.py: {backend} on {devices} devices failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def observers() -> None:
    import numpy as np

    from qstrat.calibration import HistogramObserver, MinMaxObserver, MovingAverageObserver
    from qstrat.calibration.observers import PositionVoteObserver

    kinds = {
        "MinMax, per tensor": lambda: MinMaxObserver(),
        "MinMax, per channel": lambda: MinMaxObserver(axis=-1),
        "Histogram, per tensor (8192 bins a side)": lambda: HistogramObserver(),
        "MovingAverage, per tensor": lambda: MovingAverageObserver(),
        "position votes, per tensor": lambda: PositionVoteObserver(lambda b: np.array([0])),
    }
    counts = (32, 1024, 8192)
    rng = np.random.default_rng(0)
    print(f"\nobserver state per quantizer (bytes) after N samples of 16x16x32, batches of {BATCH}:")
    print(f"  {'observer':<42}" + "".join(f"{f'N={n}':>10}" for n in counts) + "   merge of two")
    for name, make in kinds.items():
        sizes, full = [], []
        for n in counts:
            obs = make()
            for start in range(0, n, BATCH):
                obs.update(rng.standard_t(4, size=(min(BATCH, n - start), 16, 16, 32)).astype(np.float32))
            sizes.append(obs.nbytes)
            full.append(obs)
        other = make()
        other.update(rng.standard_t(4, size=(BATCH, 16, 16, 32)).astype(np.float32) * 3)
        times = []
        for _ in range(20):
            a = make()
            a.merge(full[0])
            t = time.perf_counter()
            a.merge(other)
            times.append(time.perf_counter() - t)
        print(f"  {name:<42}" + "".join(f"{s:>10}" for s in sizes) + f"   {np.median(times) * 1e6:8.0f} us")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]))))
        return 0
    print(
        f"qstrat bench/scale.py: mini-Xception, pof2s, {SAMPLES} images in batches of {BATCH}, bias correction "
        f"off; {os.cpu_count()} cores, virtual devices"
    )
    for backend, counts in (("jax", (1, 2, 4)), ("tensorflow", (1, 2))):
        base = None
        for devices in counts:
            r = _spawn(backend, devices)
            base = base or r["predict"]
            engine = "one device" if devices == 1 else ("DataParallel" if backend == "jax" else "MirroredStrategy")
            print(
                f"  {backend:<10} {devices} devices ({engine:<16}): quantize_model {r['quantize']:6.2f} s = "
                f"{r['quantize'] / base:5.1f}x a warm one-device predict ({base:.2f} s)",
                flush=True,
            )
    observers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
