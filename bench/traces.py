"""Where a quantize_model call's fixed cost goes: the first call (trace) of each probe, and per-batch costs.

For one model, calibration size and strategy (defaults, bias correction on),
in one run: every probe qstrat runs (`qstrat.passes.runner.BatchRunner`) is
timed call by call, so its first call (tracing, plus one batch) shows apart
from the rest, with the number of ops its traced function holds (on
TensorFlow: making them is most of a trace); the time spent adding up the
batches' statistics (`qstrat.layers.probe.PackedStats`); bias correction's
eager runs (`bias_correction._walk`: the float model's, where the
calibration probe did not take its means, and the quantized model's) are
timed whole; and a warm batch of 32 through the float model and through the
quantized model shows what the FakeQuant layers cost per batch.

Run: ``.venv/bin/python bench/traces.py --model mobilenet_v2 --samples 1024``
(models as in bench/speed.py; about a minute). ``--no-join`` runs the
calibration probe one batch a call, ``--full-optimizer`` gives its function
TensorFlow's whole graph optimizer: each undoes one of qstrat's choices, to
measure what it saves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _warm_batch_s(runner, batch, repeats=10) -> float:
    import numpy as np

    runner(batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner(batch)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--strategy", default="pof2s")
    p.add_argument("--no-join", action="store_true", help="run the probe one batch a call (no `runner.merged` units)")
    p.add_argument(
        "--full-optimizer", action="store_true", help="probes get TensorFlow's whole graph optimizer (as tf.function)"
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from speed import load

    import qstrat
    from qstrat.layers import probe as stats_layers
    from qstrat.passes import runner
    from qstrat.passes.refine import bias_correction

    calls: list[tuple[int, float]] = []  # (the probe that ran, seconds)
    probes: dict[int, object] = {}
    walks: list[tuple[str, float]] = []  # bias correction's eager runs: ("float" or "quantized", seconds)
    adding = [0.0]  # seconds in `PackedStats`: adding each batch's statistics, then aligning them
    plain_call, plain_walk, plain_means = (
        runner.BatchRunner.__call__,
        bias_correction._walk,
        bias_correction._float_means,
    )
    plain_add, plain_per_tensor = stats_layers.PackedStats.add, stats_layers.PackedStats.per_tensor
    in_float = [False]

    def timed(self, batch):
        t = time.perf_counter()
        out = plain_call(self, batch)
        calls.append((id(self), time.perf_counter() - t))
        probes[id(self)] = self
        return out

    def timed_walk(*args):
        t = time.perf_counter()
        plain_walk(*args)
        walks.append(("float" if in_float[0] else "quantized", time.perf_counter() - t))

    def timed_means(*args):
        in_float[0] = True
        try:
            return plain_means(*args)
        finally:
            in_float[0] = False

    def timed_stats(plain):
        def run(*args):
            t = time.perf_counter()
            try:
                return plain(*args)
            finally:
                adding[0] += time.perf_counter() - t

        return run

    net, x = load(args.model, args.samples)
    if args.no_join:
        runner.MERGE_SAMPLES = 0
    if args.full_optimizer:
        runner.lightly_optimized = contextlib.nullcontext
    patches = [
        (runner.BatchRunner, "__call__", timed),
        (bias_correction, "_walk", timed_walk),
        (bias_correction, "_float_means", timed_means),
        (stats_layers.PackedStats, "add", timed_stats(plain_add)),
        (stats_layers.PackedStats, "per_tensor", timed_stats(plain_per_tensor)),
    ]
    for owner, name, fn in patches:
        setattr(owner, name, fn)
    q = qstrat.Quantizer(net, args.strategy)
    t = time.perf_counter()
    qmodel = q.quantize_model(x, calib_batch_size=32, verbose=0)
    total = time.perf_counter() - t
    runner.BatchRunner.__call__, bias_correction._walk = plain_call, plain_walk
    bias_correction._float_means = plain_means
    stats_layers.PackedStats.add, stats_layers.PackedStats.per_tensor = plain_add, plain_per_tensor
    print(f"{args.model}, {args.samples} samples, {args.strategy}: quantize_model {total:.2f} s", end="")
    print(f", bias correction {q.timings['bias correction']:.2f} s" if "bias correction" in q.timings else "")
    for probe in dict.fromkeys(c[0] for c in calls):
        mine = [c[1] for c in calls if c[0] == probe]
        fn = getattr(probes[probe], "_fn", None)
        ops = f", {len(fn.get_concrete_function().graph.get_operations())} ops traced" if fn is not None else ""
        print(
            f"  calibration probe: {len(mine)} calls{ops}; first (trace + 1 batch) {mine[0]:.2f} s, "
            f"the other {sum(mine[1:]):.2f} s"
        )
    print(f"  adding up the batches' statistics (PackedStats): {adding[0]:.3f} s")
    for kind in ("float", "quantized"):
        runs = [w for k, w in walks if k == kind]
        if runs:
            what = "corrections included" if kind == "quantized" else "the probe did not take its means"
            print(
                f"  bias correction's {kind} model on {bias_correction.SAMPLES} samples at most, eagerly: "
                f"{', '.join(f'{w:.2f} s' for w in runs)} ({what})"
            )
    batch = [x[:32]]
    float_s = _warm_batch_s(runner.BatchRunner(net), batch)
    quant_s = _warm_batch_s(runner.BatchRunner(qmodel), batch)
    print(f"  warm batch of 32: float {1e3 * float_s:.1f} ms, quantized {1e3 * quant_s:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
