"""Benchmark of qstrat's streaming calibration observers: throughput and peak memory.

What it measures, for a float32 activation of ``--elements`` values (1M by default) calibrated
over each batch count in ``--batches`` (256 and 4096 by default):

1. Throughput (MB/s of activations) per calibration method, end to end: ``observer.update(batch)``
   for every batch plus the final statistic, ``quantizer.state_from_stats(observer.result())``.
   Each row is compared with plain NumPy over the same batches (ratio = ours / baseline):
   ``numpy.histogram(batch, bins=2048)`` for histogram-type methods (Min_MSE, Min_KL),
   ``numpy.percentile(batch, 99.99)`` for Percentile and ``batch.min(); batch.max()`` for No_OF.
   Timed in this process with ``time.perf_counter`` around the observer calls only.
2. Peak memory per method and batch count, each in a fresh subprocess (``--worker``): peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the RSS right before the calibration loop,
   and tracemalloc's peak over the loop and the final statistic (it tracks NumPy's allocations).
   The ratio between the largest and the smallest batch count must stay within 10% (observers
   keep no raw data).

Data: a pool of 8 distinct activations (ReLU-like ones, half zeros, and heavy-tailed Student-t
ones, with per-channel scales) is generated once; batch i is ``pool[i % 8] * (1 + i / n)``, so the
range keeps growing and histograms re-bin. Building each batch is not timed.

A method whose projected pass over n batches would exceed ``--max-seconds`` (60 by default;
estimated from a few warm-up updates) runs on fewer batches, a power of two, for both
throughput and memory; the tables mark such rows with ``*`` and show the count used (on
2 cores, no row needs it at the default sizes). The full run takes about 7 minutes on 2 cores,
``--quick`` about 2.

Run from the repository root (qstrat need not be installed):

    .venv/bin/python bench/observers.py                  # full run: 256 and 4096 batches
    .venv/bin/python bench/observers.py --quick          # 16 and 256 batches
    .venv/bin/python bench/observers.py --batches 256 4096 --elements 1000000

The observers are pure NumPy, so Keras is imported with its "numpy" backend (set here) to keep
start-up time and memory of the worker processes low.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from observers_setup import (
    BASELINES,
    POOL_SIZE,
    Method,
    batch_at,
    build,
    final_state,
    make_pool,
    methods,
)

MEMORY_BOUND = 1.10  # largest/smallest batch count: peak memory may grow by at most 10%
MEMORY_SLACK = 1 << 20  # ... or by less than 1 MiB (page-level noise on tiny batches)
MB = 1e6


# ---- timing -----------------------------------------------------------------------------------


@dataclass
class Timing:
    batches: int
    update_s: float
    final_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.update_s + self.final_s


def seconds_per_batch(method: Method, pool: np.ndarray, tries: int = 3) -> float:
    """Best of a few update() times after one warm-up call (for the --max-seconds cap)."""
    _, observer = build(method)
    observer.update(pool[0])
    best = float("inf")
    for i in range(tries):
        batch = pool[(i + 1) % POOL_SIZE]
        t0 = time.perf_counter()
        observer.update(batch)
        best = min(best, time.perf_counter() - t0)
    return best


def batches_within(n: int, per_batch_s: float, max_seconds: float, floor: int) -> int:
    """n, or the largest power of two (at least ``floor``) that fits in max_seconds."""
    if max_seconds <= 0 or per_batch_s * n <= max_seconds:
        return n
    fit = max(1, int(max_seconds / per_batch_s))
    return min(n, max(floor, 1 << (fit.bit_length() - 1)))


def time_method(method: Method, pool: np.ndarray, n: int) -> Timing:
    quantizer, warm = build(method)  # warm-up on a throwaway observer
    warm.update(pool[0])
    final_state(quantizer, warm)
    quantizer, observer = build(method)
    t = Timing(n, 0.0)
    for i in range(n):
        batch = batch_at(pool, i, n)
        t0 = time.perf_counter()
        observer.update(batch)
        t.update_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    final_state(quantizer, observer)
    t.final_s = time.perf_counter() - t0
    return t


def time_baseline(fn: Callable, pool: np.ndarray, n: int) -> Timing:
    fn(pool[0])
    t = Timing(n, 0.0)
    for i in range(n):
        batch = batch_at(pool, i, n)
        t0 = time.perf_counter()
        fn(batch)
        t.update_s += time.perf_counter() - t0
    return t


# ---- memory (worker side) ---------------------------------------------------------------------


def current_rss() -> int | None:
    """Resident set size now, in bytes (Linux only)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def max_rss() -> int:
    """Peak RSS of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker(key: str, n: int, pool_path: str) -> None:
    """Calibrate one method over n batches and print its memory use as one JSON line."""
    method = {m.key: m for m in methods()}[key]
    pool = np.load(pool_path)
    quantizer, observer = build(method)
    gc.collect()
    peak_before = max_rss()
    rss_before = current_rss()
    if rss_before is None:  # no /proc: the peak so far is the best "before" we have
        rss_before = peak_before
    tracemalloc.start()
    for i in range(n):
        batch = batch_at(pool, i, n)
        observer.update(batch)
        del batch
    final_state(quantizer, observer)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_after = max(max_rss(), current_rss() or 0)  # ru_maxrss may lag the RSS by a few pages
    print(
        json.dumps(
            {
                "rss_delta": peak_after - rss_before,
                "traced_peak": traced_peak,
                "slack_before": peak_before - rss_before,  # pre-loop peak above pre-loop RSS
                "peak_in_loop": peak_after > peak_before,
                "state_bytes": observer.nbytes,
            }
        )
    )


def launch(mode: str, key: str, n: int, pool_path: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, key, str(n), pool_path]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def launcher(key: str, n: int, pool_path: str) -> int:
    """Start the worker from this small process and relay its output.

    Linux carries a process's peak RSS across exec: a child exec'd straight from the (large)
    benchmark process would report the parent's peak as its own ru_maxrss. A grandchild starts
    from this launcher's small peak instead, far below the worker's RSS before its loop.
    """
    proc = launch("--worker", key, n, pool_path)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def measure_memory(method: Method, n: int, pool_path: str) -> dict:
    proc = launch("--launch", method.key, n, pool_path)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method.key} n={n} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report -----------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else float("inf")
    return a / b


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 4096], help="calibration batch counts")
    ap.add_argument("--elements", type=int, default=1_000_000, help="values per activation batch")
    ap.add_argument("--quick", action="store_true", help="use 16 and 256 batches")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="cap a method's batch count when one pass would take longer than this (0: never cap)",
    )
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "BATCHES", "POOL"), help=argparse.SUPPRESS)
    ap.add_argument("--launch", nargs=3, metavar=("METHOD", "BATCHES", "POOL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        key, n, pool_path = args.worker
        worker(key, int(n), pool_path)
        return
    if args.launch:
        key, n, pool_path = args.launch
        sys.exit(launcher(key, int(n), pool_path))

    start = time.perf_counter()
    counts = [16, 256] if args.quick else sorted(args.batches)
    ms = methods()
    log(f"generating a pool of {POOL_SIZE} activations of {args.elements:,} values ...")
    pool = make_pool(args.elements)
    mb_per_batch = pool[0].nbytes / MB
    per_batch = {m.key: seconds_per_batch(m, pool) for m in ms}
    used = {(m.key, n): batches_within(n, per_batch[m.key], args.max_seconds, counts[0]) for m in ms for n in counts}

    timings: dict[tuple[str, int], Timing] = {}
    base_t: dict[tuple[str, int], Timing] = {}
    memory: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="qstrat_bench_") as tmp:
        pool_path = os.path.join(tmp, "pool.npy")
        np.save(pool_path, pool)
        for n in counts:
            for bkey, (name, fn) in BASELINES.items():
                log(f"[{time.perf_counter() - start:6.0f}s] baseline {name}, {n} batches")
                base_t[bkey, n] = time_baseline(fn, pool, n)
            for m in ms:
                k = used[m.key, n]
                log(f"[{time.perf_counter() - start:6.0f}s] {m.label}: throughput over {k} batches")
                timings[m.key, n] = time_method(m, pool, k)
                log(f"[{time.perf_counter() - start:6.0f}s] {m.label}: memory over {k} batches (subprocess)")
                memory[m.key, n] = measure_memory(m, k, pool_path)
    runtime = time.perf_counter() - start

    lo_n, hi_n = counts[0], counts[-1]
    lines = []
    out = lines.append
    out(
        f"qstrat observer benchmark: {args.elements:,}-value float32 activations ({mb_per_batch:.1f} MB per batch), "
        f"{POOL_SIZE}-batch pool x factor 1..2"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out(
        f"machine: {cores} cores ({os.cpu_count()} online), {cpu_model()}, {platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}, NumPy {np.__version__}; total runtime {runtime:.0f} s"
    )
    out("")
    out(
        "Throughput (MB/s of activations; ours = update() on every batch + state_from_stats(result()); "
        "ratio = ours / baseline)"
    )
    hdr = (
        f"{'method':<26} {'observer':<22} {'baseline':<21} {'batches':>8} {'ours MB/s':>10} "
        f"{'base MB/s':>10} {'ratio':>6} {'upd ms/b':>9} {'final ms':>9}"
    )
    out(hdr)
    out("-" * len(hdr))
    any_capped = False
    for m in ms:
        obs_name = type(build(m)[1]).__name__
        for n in counts:
            t, b = timings[m.key, n], base_t[m.baseline, n]
            ours = t.batches * mb_per_batch / t.total_s
            base = b.batches * mb_per_batch / b.total_s
            capped = t.batches != n
            any_capped |= capped
            shown = f"{t.batches}*" if capped else str(t.batches)
            out(
                f"{m.label:<26} {obs_name:<22} {BASELINES[m.baseline][0]:<21} {shown:>8} {ours:>10.0f} "
                f"{base:>10.0f} {ratio(ours, base):>6.2f} {1e3 * t.update_s / t.batches:>9.2f} "
                f"{1e3 * t.final_s:>9.1f}"
            )
    if any_capped:
        out(
            f"* fewer batches: the full count was projected to take over --max-seconds={args.max_seconds:g} s; "
            "the baseline MB/s is over the full count."
        )
    out("")
    out(
        f"Peak memory during calibration (MB; fresh process per run; RSS = peak ru_maxrss - RSS before the loop; "
        f"TM = tracemalloc peak; bound: {hi_n}/{lo_n} ratio <= {MEMORY_BOUND:.2f} or growth < 1 MiB)"
    )
    hdr = (
        f"{'method':<26} {'state B':>9} {'batches':>13} {'RSS lo':>8} {'RSS hi':>8} {'ratio':>6} "
        f"{'TM lo':>8} {'TM hi':>8} {'ratio':>6} {'check':>6}"
    )
    out(hdr)
    out("-" * len(hdr))
    all_pass = True
    for m in ms:
        a, b = memory[m.key, lo_n], memory[m.key, hi_n]
        r_rss, r_tm = ratio(b["rss_delta"], a["rss_delta"]), ratio(b["traced_peak"], a["traced_peak"])
        ok = all(ratio(b[k], a[k]) <= MEMORY_BOUND or b[k] - a[k] < MEMORY_SLACK for k in ("rss_delta", "traced_peak"))
        all_pass &= ok
        nlo, nhi = used[m.key, lo_n], used[m.key, hi_n]
        shown = f"{nlo}/{nhi}" + ("*" if (nlo, nhi) != (lo_n, hi_n) else "")
        out(
            f"{m.label:<26} {b['state_bytes']:>9d} {shown:>13} {a['rss_delta'] / MB:>8.1f} "
            f"{b['rss_delta'] / MB:>8.1f} {r_rss:>6.2f} {a['traced_peak'] / MB:>8.1f} {b['traced_peak'] / MB:>8.1f} "
            f"{r_tm:>6.2f} {'PASS' if ok else 'FAIL':>6}"
        )
    notes = [f"{m.label} n={n}" for (k, n), r in memory.items() for m in ms if m.key == k and not r["peak_in_loop"]]
    if any(used[m.key, n] != n for m in ms for n in (lo_n, hi_n)):
        out(f"* memory measured over the batch counts shown, not {lo_n}/{hi_n} (--max-seconds cap).")
    if notes:
        out("note: peak RSS was reached before the loop (RSS column is an upper bound) for: " + ", ".join(notes))
    out(f"memory flat within {100 * (MEMORY_BOUND - 1):.0f}%: {'PASS' if all_pass else 'FAIL'}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
