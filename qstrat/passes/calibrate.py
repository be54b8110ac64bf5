"""Calibration of the activations: set every tensor quantizer's state from streamed data.

Weights are calibrated from their own values (`weight_calibration`). Activations are observed in one
pass over the calibration data through a probe of the float model, which
reduces each tapped tensor to its statistics inside the graph. Observers
stream (`qstrat.calibration`), so memory does not depend on the dataset's size.
"""

from __future__ import annotations

import contextlib

import numpy as np

from qstrat.calibration import HistogramObserver, MinMaxObserver, make_observer
from qstrat.calibration.data import array_samples, count_batches, iterate_batches
from qstrat.calibration.inputs import InputValues, input_specs
from qstrat.calibration.observers import finite_range
from qstrat.errors import one_line
from qstrat.graph.ir import taken_names, unique_name
from qstrat.layers import FakeQuant
from qstrat.layers.probe import HISTOGRAMS, ChannelSumTaps, PackedStats, StatsTaps, unpack_stats
from qstrat.passes.distributed import Spread, placement
from qstrat.passes.runner import BatchRunner, graph_probe, groups, join, merged, rows_apart, sample_bytes, split_outputs
from qstrat.passes.weight_calibration import assign_state
from qstrat.progress import Progress
from qstrat.quantizers.stats import DEFAULT_BINS_PER_SIDE


@contextlib.contextmanager
def quiet_probes():
    """Silence TensorFlow's "retracing" warning while qstrat traces its own probe models.

    Every probe model is new, so its first ``predict_on_batch`` traces once; after
    a few of them TensorFlow warns about retracing, which says nothing useful here.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


# The in-graph histograms of power-of-2 positions (`_mode` "share") of a larger calibration set count
# about this many samples, a share of every batch (`histogram_rows`): counting is the costly part of a
# calibration batch (a loop over every value), and a search among a few power-of-2 positions
# picks the same one from hundreds of samples' activations as from more (bench/ptq.py, table 5). Float
# scales are continuous and move with every sample: their histograms count all of it. Ranges see every
# sample.
HISTOGRAM_SAMPLES = 256


def fake_quant_layers(qmodel) -> list[FakeQuant]:
    return [layer for layer in qmodel.layers if isinstance(layer, FakeQuant)]


class ChannelSums:
    """Per-channel sums of float tensors over the samples bias correction measures, taken by the calibration
    probe.

    Bias correction needs the float model's per-channel output means over the
    samples it measures (`qstrat.calibration.data.take_samples`): all the
    calibration samples, or the ``rows`` of them that `sample_rows` picks. The
    probe that runs the float model for calibration meets those samples on
    its way: it outputs each sample's sums, the rows measured are kept, and
    bias correction's own float pass is not needed. As there, each sample's
    channels are summed in float32 (the last axis is the channel), then the
    samples in float64.
    """

    def __init__(self, refs, sizes: list[int], rows: np.ndarray | None = None, count: int | None = None):
        self.refs, self.sizes = list(refs), list(sizes)  # sizes: values per channel in one sample
        self.rows = rows  # the indices of the samples measured, increasing; None: every sample
        self.count = count  # the samples bias correction asked for, for it to check
        self.sums: list = [None] * len(self.refs)
        self.samples = 0  # the samples added

    def add(self, per_sample: list, start: int) -> None:
        """Add one batch's per-sample sums (one (samples, channels) array per tensor) where bias correction
        measures its samples; ``start``: the index of the batch's first sample in the calibration data."""
        keep = None
        if self.rows is not None:
            lo, hi = np.searchsorted(self.rows, [start, start + len(per_sample[0])])
            if lo == hi:
                return
            keep = self.rows[lo:hi] - start
        for j, rows in enumerate(per_sample):
            rows = np.asarray(rows) if keep is None else np.asarray(rows)[keep]
            total = np.sum(rows, axis=0, dtype=np.float64)
            self.sums[j] = total if self.sums[j] is None else self.sums[j] + total
        self.samples += len(per_sample[0]) if keep is None else len(keep)

    def means(self) -> list[np.ndarray]:
        return [total / (self.samples * size) for total, size in zip(self.sums, self.sizes, strict=True)]


def calibrate_activations(
    qmodel, float_graph, taps, data, steps=None, batch_size=32, policy=None, verbose=1, progress=None, sums=None
) -> int:
    """Observe, over the data, the float tensors every FakeQuant quantizes, and set its state.

    Args:
        qmodel: the quantized model (its FakeQuant layers get their state).
        float_graph: the float model's graph.
        taps: ``{FakeQuant name: float tensors it quantizes}`` (from `insert`).
        sums: a `ChannelSums` to fill with its tensors' per-channel sums, or None.

    Activations are observed on the float model: one probe model outputs, for
    every tapped tensor, its min/max or its aligned histogram computed in the
    graph (`StatsTaps`), or the tensor itself for per-channel and per-batch
    observers. The batches' statistics are added up exactly (`PackedStats`)
    and each observer takes the sum once; the raw tensors go to their
    observers batch by batch. Observing float activations (not partly
    quantized ones) lets one inference pass calibrate every quantizer at once.
    Returns the number of samples seen.
    """

    specs = {id(fq): fq.quantizer.observer_spec(policy) for fq in fake_quant_layers(qmodel)}
    fqs = [fq for fq in fake_quant_layers(qmodel) if specs[id(fq)] is not None]
    refs, owners = [], []
    for fq in fqs:
        for ref in taps.get(fq.name, ()):
            refs.append(ref)
            owners.append(fq)
    observers = {id(fq): make_observer(specs[id(fq)], name=fq.target or fq.name) for fq in fqs}
    # What each tapped tensor is reduced to inside the probe: its range, its histogram (of a share
    # of each batch for power-of-2 positions), or (per-channel and per-batch observers) the tensor itself.
    pair_modes = [_mode(observers[id(fq)], specs[id(fq)]) for fq in owners]
    keys = list(dict.fromkeys(zip(refs, pair_modes, strict=True)))
    keys.sort(key=lambda key: key[1] != "raw")  # the probe's order: raw tensors, then the taps' statistics
    rows = histogram_rows(data, batch_size, steps)
    summed = sums.refs if sums is not None else []
    probe = _stats_probe(float_graph, keys, rows, batch_size, summed) if keys or summed else None
    batches = samples = 0
    progress = progress or Progress(verbose)
    raw = [key for key in keys if key[1] == "raw"]
    tapped = [key for key in keys if key[1] != "raw"]
    kinds = [mode for _, mode in tapped]
    n_stats = (5 if set(kinds) & HISTOGRAMS else 3) if tapped else 0
    # What each probe output is: a row per sample, or a statistic of the batch.
    kinds_out = ["rows"] * len(raw) + ["reduced"] * n_stats + ["rows"] * len(summed)
    spread = _spread(probe, kinds_out)
    what = "activation statistics" + (f" ({spread.where.describe()})" if spread is not None else "")
    bar = progress.data_pass(count_batches(data, batch_size, steps), "batch", what=what)
    packed = PackedStats(kinds)  # the taps' statistics of every batch, which the observers take at the end

    def observe(keys, values):
        _observe(dict(zip(keys, values, strict=True)), owners, refs, pair_modes, observers)

    # Consecutive batches of a small model run joined, as one call (`merged`: the statistics are exact sums,
    # and each batch's rows come back apart); a distribution spreads those units over its devices.
    joinable = sample_bytes(float_graph) if rows_apart(float_graph) else 0  # 0: each batch on its own
    specs = input_specs(qmodel)
    seen = InputValues(specs)
    units = merged(seen.watch(iterate_batches(data, specs, batch_size, steps)), joinable)
    for group in groups(units, spread.width) if spread is not None else ([unit] for unit in units):
        batch_group = [batch for unit in group for batch in unit]
        everything = _checked(
            lambda g=group: _run_units(probe, spread, g, kinds_out), batch_group, float_graph, owners, refs, batches
        )
        for batch, outs in zip(batch_group, everything, strict=True):
            if outs is not None:
                observe(raw, ([out] for out in outs[: len(raw)]))
                stats = outs[len(raw) : len(raw) + n_stats]
                if tapped and stats[0] is not None and not packed.add(stats):
                    observe(tapped, unpack_stats(stats, kinds))  # not finite: the observer raises, naming the tensor
                if summed:
                    sums.add(outs[len(outs) - len(summed) :], samples)
            batches += 1
            samples += len(batch[0])
            bar.update(batches)
    seen.warn_if_constant()
    if tapped and packed.lo is not None:
        observe(tapped, packed.per_tensor())
    done = [fq for fq in fqs if fq.name in taps]
    for fq, state in zip(done, _states_from_stats(done, observers), strict=True):
        assign_state(fq.state, state, fq.quantizer, "state_from_stats", fq.target or fq.name)
    return samples


def histogram_rows(data, batch_size: int, steps: int | None = None) -> int | None:
    """How many samples of each batch the in-graph "share" histograms count: None (all) unless the data is
    arrays in memory holding more than `HISTOGRAM_SAMPLES` samples (to be read); then each batch's
    share of `HISTOGRAM_SAMPLES`, rounded up, so about that many samples, spread over all the batches,
    are counted. Ranges always see every sample."""
    samples = array_samples(data)
    if samples is None or not isinstance(batch_size, int) or batch_size <= 0:
        return None
    if steps is not None:
        samples = min(samples, steps * batch_size)
    if samples <= HISTOGRAM_SAMPLES:
        return None
    return min(batch_size, -(-batch_size * HISTOGRAM_SAMPLES // samples))


def _spread(probe, outputs: list[str]) -> Spread | None:
    """The probe spread over the devices of an active distribution (`qstrat.passes.distributed`), or None."""
    where = placement() if probe is not None else None
    return Spread(probe, where, outputs) if where is not None else None


def _run_units(probe, spread, units, kinds) -> list:
    """Per batch of ``units`` (lists of batches, each run as one: `qstrat.passes.runner.join`), the probe's
    outputs (`split_outputs`; None without a probe): on one device, or the units spread over a distribution's."""
    if probe is None:
        return [None] * sum(len(unit) for unit in units)
    joined = [join(unit) for unit in units]
    outs = spread(joined) if spread is not None else [probe(batch) for batch in joined]
    sizes = [[len(batch[0]) for batch in unit] for unit in units]
    return [mine for out, size in zip(outs, sizes, strict=True) for mine in split_outputs(out, kinds, size)]


def _checked(run, group, float_graph, owners, refs, first: int = 0) -> list:
    """``run()``; where it fails, the batches of ``group`` (calibration batches ``first`` on) run through the
    float model eagerly, to say why: a `CalibrationDataError` naming the first tapped tensor that is not finite
    (TensorFlow's and torch's histogram kernels refuse NaN), or the batch the float model itself fails on
    (token ids past an Embedding's vocabulary); else the failure itself."""
    try:
        return run()
    except Exception as failure:
        from keras import ops

        from qstrat.errors import CalibrationDataError
        from qstrat.graph.rebuild import run_graph

        names = {}
        for fq, ref in zip(owners, refs, strict=True):
            names.setdefault(ref, fq.target or fq.name)
        try:
            for k, batch in enumerate(group):
                try:
                    tensors = run_graph(float_graph, [ops.convert_to_tensor(a) for a in batch], list(names), False)
                except MemoryError:
                    raise
                except Exception as own:
                    said = one_line(own)
                    raise CalibrationDataError(
                        f"calibration batch {first + k}: the float model itself fails on it "
                        f"({type(own).__name__}: {said}). Check the data against what the model reads "
                        "(shapes, value ranges, token ids within an Embedding's vocabulary)."
                    ) from own
                for name, t in zip(names.values(), tensors, strict=True):
                    t = np.asarray(ops.convert_to_numpy(t), np.float64)
                    finite_range(name, t.min() if t.size else 0.0, t.max() if t.size else 0.0)
        except CalibrationDataError as found:
            raise found from None
        except Exception:  # noqa: BLE001 - the check itself failed (memory, ...): the probe's failure is the one to see
            raise failure from None
        raise


def _observe(results: dict, owners, refs, pair_modes, observers) -> None:
    """Update each FakeQuant's observer from ``results``: ``{(tensor, mode): statistics}``, a raw batch or
    the statistics of its tap (`unpack_stats`), for the keys given."""
    for fq, ref, mode in zip(owners, refs, pair_modes, strict=True):
        if (ref, mode) not in results:
            continue
        obs, got = observers[id(fq)], results[(ref, mode)]
        if mode == "raw":
            obs.update(np.asarray(got[0]))
        elif mode == "range":
            obs.update_range(got[0], got[1], int(got[2]))
        else:
            obs.update_histogram(got[0], int(got[1]), got[2], got[3], int(np.sum(got[0])))


def _states_from_stats(fqs, observers) -> list[dict]:
    """Each FakeQuant's state from its observer, the searches (Min_MSE, ...) spread over the CPU cores.

    The searches are NumPy on arrays large enough that NumPy releases the GIL,
    so threads run them in parallel; each result is the same as alone.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    def one(fq):
        return fq.quantizer.state_from_stats(observers[id(fq)].result())

    workers = min(len(fqs), os.cpu_count() or 1)
    if workers <= 1:
        return [one(fq) for fq in fqs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, fqs))


def _mode(obs, spec) -> str:
    """What the probe reduces a tapped tensor to: "range", "histogram", "share" (a histogram of a share of
    each batch, see `histogram_rows`), or "raw" (the tensor itself)."""
    if obs.axis is None and type(obs) is MinMaxObserver:
        return "range"
    if obs.axis is None and type(obs) is HistogramObserver and obs.bins_per_side == DEFAULT_BINS_PER_SIDE:
        return "share" if spec.share else "histogram"
    return "raw"


def _stats_probe(float_graph, keys, hist_rows: int | None = None, batch: int | None = None, summed=()) -> BatchRunner:
    """A probe from the float inputs to, per (tensor, mode), the tensor or its in-graph statistics.

    ``keys`` lists the "raw" tensors first; the statistics of all the others
    come from one `StatsTaps` layer. Then, per tensor of ``summed``, each
    sample's per-channel sums (`ChannelSums`).
    """
    from qstrat.graph.rebuild import run_graph

    refs = list(dict.fromkeys([ref for ref, _ in keys] + list(summed)))
    names = taken_names(float_graph)
    tapped = [(ref, mode) for ref, mode in keys if mode != "raw"]
    name = unique_name("qstrat_stats_taps", names)
    taps = StatsTaps([mode for _, mode in tapped], hist_rows=hist_rows, batch=batch, name=name) if tapped else None
    channel_sums = ChannelSumTaps(name=unique_name("qstrat_channel_sums", names | {name})) if summed else None

    def body(inputs, symbolic):
        by_ref = dict(zip(refs, run_graph(float_graph, inputs, refs, symbolic), strict=True))
        outputs = [by_ref[ref] for ref, mode in keys if mode == "raw"]
        if taps is not None:
            outputs += taps([by_ref[ref] for ref, _ in tapped])
        if channel_sums is not None:
            outputs += channel_sums([by_ref[ref] for ref in summed])
        return outputs

    # Statistics and sums are read once, as they come: views of the outputs, not copies. Raw tensors go to
    # observers, which may keep them: copies.
    views = all(mode != "raw" for _, mode in keys)
    return graph_probe(float_graph, body, unique_name("qstrat_calibration_stats", names), views)
