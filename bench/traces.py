"""Where a quantize_model call's fixed cost goes: the first call (trace) of each probe, and per-batch costs.

For one model, calibration size and strategy (defaults, bias correction on),
in one run: every probe qstrat runs (`qstrat.passes.runner.BatchRunner`) is
timed call by call, so its first call (tracing, plus one batch) shows apart
from the rest; bias correction's eager runs (`bias_correction._walk`: the
float model's, then the quantized model's) are timed whole; and a warm batch
of 32 through the float model and through the quantized model shows what the
FakeQuant layers cost per batch.

Run: ``.venv/bin/python bench/traces.py --model mobilenet_v2 --samples 1024``
(models as in bench/speed.py; about a minute).
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from speed import load

    import qstrat
    from qstrat.passes import runner
    from qstrat.passes.refine import bias_correction

    calls: list[tuple[int, float]] = []  # (the probe that ran, seconds)
    walks: list[float] = []  # bias correction's eager runs: the float model's, then the quantized model's
    plain_call, plain_walk = runner.BatchRunner.__call__, bias_correction._walk

    def timed(self, batch):
        t = time.perf_counter()
        out = plain_call(self, batch)
        calls.append((id(self), time.perf_counter() - t))
        return out

    def timed_walk(*args):
        t = time.perf_counter()
        plain_walk(*args)
        walks.append(time.perf_counter() - t)

    net, x = load(args.model, args.samples)
    runner.BatchRunner.__call__, bias_correction._walk = timed, timed_walk
    q = qstrat.Quantizer(net, args.strategy)
    t = time.perf_counter()
    qmodel = q.quantize_model(x, calib_batch_size=32, verbose=0)
    total = time.perf_counter() - t
    runner.BatchRunner.__call__, bias_correction._walk = plain_call, plain_walk
    print(f"{args.model}, {args.samples} samples, {args.strategy}: quantize_model {total:.2f} s", end="")
    print(f", bias correction {q.timings['bias correction']:.2f} s" if "bias correction" in q.timings else "")
    for probe in dict.fromkeys(c[0] for c in calls):
        mine = [c[1] for c in calls if c[0] == probe]
        print(
            f"  calibration probe: {len(mine)} calls; first (trace + 1 batch) {mine[0]:.2f} s, the other {sum(mine[1:]):.2f} s"
        )
    if walks:
        runs = ", ".join(f"{w:.2f} s" for w in walks[1:])
        print(
            f"  bias correction on {bias_correction.SAMPLES} samples, eagerly: float model {walks[0]:.2f} s, quantized model {runs} (corrections included)"
        )
    batch = [x[:32]]
    float_s = _warm_batch_s(runner.BatchRunner(net), batch)
    quant_s = _warm_batch_s(runner.BatchRunner(qmodel), batch)
    print(f"  warm batch of 32: float {1e3 * float_s:.1f} ms, quantized {1e3 * quant_s:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
