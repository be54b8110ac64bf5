"""Calibration's fast path (one traced probe, statistics reduced in the graph) against a straightforward one.

The straightforward path takes every tapped float activation whole, from a
plain sub-model of the float model, batch by batch, and feeds it to a NumPy
observer; the quantizer state it gives must be the fast path's, bit for bit.
"""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.calibration import HistogramObserver, make_observer
from qstrat.graph import rebuild
from qstrat.passes.calibrate import HISTOGRAM_SAMPLES, histogram_rows
from qstrat.passes.insert import insert
from qstrat.passes.quantize import annotate
from qstrat.passes.refine.constraints import RULES
from qstrat.quantizers.stats import DEFAULT_BINS_PER_SIDE

pytestmark = pytest.mark.portable
L = keras.layers


def _model():
    i = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(i)
    y = L.Conv2D(8, 3, padding="same", name="c2")(x)
    x = L.ReLU(name="r2")(L.Add(name="add")([x, y]))
    x = L.MaxPooling2D(name="pool")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(i, L.Dense(5, name="logits")(x))


def _reference_states(q, overrides):
    strategy = q._strategy(overrides)
    graph = q._optimized_graph(strategy)
    _, taps = insert(graph, annotate(graph, strategy))
    policy = strategy.quantize["calib_position_policy"]
    refs = list(dict.fromkeys(r for rs in taps.values() for r in rs))
    probe = rebuild(graph, outputs=refs)  # plain float sub-model: every tapped tensor, whole
    return taps, refs, probe, policy


def _counted(obs, spec, rows):
    """What the fast path counts of each batch: per-tensor aligned histograms of power-of-2 positions
    (``spec.share``) count ``rows`` samples; every other observer sees the whole batch."""
    plain = type(obs) is HistogramObserver and obs.axis is None and obs.bins_per_side == DEFAULT_BINS_PER_SIDE
    return rows if plain and spec.share else None


def _states(qmodel, taps, observers) -> dict:
    out = {}
    for name in taps:
        fq = qmodel.get_layer(name)
        for key, value in fq.quantizer.state_from_stats(observers[name].result()).items():
            out[(name, key)] = np.asarray(value, ops.convert_to_numpy(fq.state[key]).dtype)
    return out


@pytest.mark.parametrize(
    "strategy, overrides",
    [
        ("pof2s", {}),
        ("fs", {}),
        ("pof2s", {"activation_method": "Min_KL"}),
        ("fs", {"input_method": "Percentile"}),  # fs quantizes inputs of conv and dense layers, no outputs
    ],
)
@pytest.mark.parametrize("samples", [100, 600])
def test_fast_calibration_gives_the_straightforward_state_bit_for_bit(strategy, overrides, samples, monkeypatch):
    model = _model()
    counted: dict[str, int] = {}  # per FakeQuant, the values its in-graph histograms counted
    plain = HistogramObserver.update_histogram

    def spy(self, counts, exponent, lo, hi, count):
        counted[self.name] = counted.get(self.name, 0) + int(count)
        plain(self, counts, exponent, lo, hi, count)

    monkeypatch.setattr(HistogramObserver, "update_histogram", spy)
    data = np.random.default_rng(0).normal(1.0, 2.0, size=(samples, 10, 10, 3)).astype("float32")  # last batch short
    # Over HISTOGRAM_SAMPLES (256) samples, the histograms count each batch's first ceil(32 * 256 / 600) = 14.
    rows = histogram_rows(data, 32)
    assert rows == (None if samples <= HISTOGRAM_SAMPLES else 14)
    q = qstrat.Quantizer(model, strategy)
    # The DPU compiler constraints (refine) move positions after calibration, and the DPU average pooling
    # changes the graph the reference below observes: both off, to compare calibration alone.
    off = {**dict.fromkeys(RULES, False), "convert_average_pooling2d_to_dpu_version": False}
    qmodel = q.quantize_model(data, calib_batch_size=32, verbose=0, include_bias_corr=False, **off, **overrides)

    taps, refs, probe, policy = _reference_states(q, {"include_bias_corr": False, **off, **overrides})
    observers, whole, specs = {}, {}, {}
    for name in taps:
        fq = qmodel.get_layer(name)
        specs[name] = spec = fq.quantizer.observer_spec(policy)
        observers[name], whole[name] = make_observer(spec, name=name), make_observer(spec, name=name)
        counted[name] = counted.pop(fq.target or fq.name, 0)  # the fast path names observers by target
    for start in range(0, len(data), 32):
        outs = probe(data[start : start + 32])
        outs = dict(
            zip(refs, [ops.convert_to_numpy(o) for o in (outs if isinstance(outs, list) else [outs])], strict=True)
        )
        for name, rs in taps.items():
            for r in rs:
                first = _counted(observers[name], specs[name], rows)
                if first is None:
                    observers[name].update(outs[r])
                else:
                    observers[name].update(outs[r], counted=first)
                whole[name].update(outs[r])
    assert len(taps) >= 4
    want, got = _states(qmodel, taps, observers), {}
    for name, key in want:
        got[(name, key)] = ops.convert_to_numpy(qmodel.get_layer(name).state[key])
    for k, value in want.items():
        assert np.array_equal(got[k], value), (k, got[k], value)
    # What the fast path's histograms counted: power-of-2 positions 14 samples of each of the 19 batches
    # (266 of 600), float scales every sample.
    shares = [name for name in taps if specs[name].share]
    assert bool(shares) == (strategy == "pof2s")
    for name in taps:
        if type(whole[name]) is HistogramObserver:
            share = rows is not None and name in shares
            assert counted[name] == whole[name].count * (266 if share else 600) // 600, name


@pytest.mark.parametrize("strategy", ["pof2s", "fs"])
def test_activations_that_are_not_finite_name_the_tensor(strategy):
    """Finite data that the float model turns into Inf (1e10 * 1e30) and then NaN (Inf - Inf): a
    CalibrationDataError names the first such tensor, on every backend, although TensorFlow's and torch's
    histogram kernels themselves fail on NaN."""
    from qstrat.errors import CalibrationDataError

    i = keras.Input((4,))
    big = L.Dense(4, kernel_initializer=keras.initializers.Constant(1e30), name="big")(i)
    neg = L.Dense(4, kernel_initializer=keras.initializers.Constant(-1e30), name="neg")(i)
    model = keras.Model(i, L.Dense(2, name="out")(L.ReLU(name="relu")(L.Add(name="add")([big, neg]))))
    x = np.full((64, 4), 1e10, "float32")
    assert np.isnan(ops.convert_to_numpy(model(x))).all()
    with pytest.raises(CalibrationDataError, match=r"(big|add|relu|out)/\w+: the tensor holds NaN or Inf values"):
        qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0)


def test_a_probe_failure_with_finite_activations_is_raised_as_it_is(monkeypatch):
    """Only non-finite activations become a CalibrationDataError; any other failure of a probe batch (here an
    error raised by the runner) reaches the caller unchanged."""
    from qstrat.passes import runner

    def broken(self, batch):
        raise RuntimeError("the probe broke")

    monkeypatch.setattr(runner.BatchRunner, "__call__", broken)
    with pytest.raises(RuntimeError, match="the probe broke"):
        qstrat.Quantizer(_model(), "pof2s").quantize_model(np.ones((8, 10, 10, 3), "float32"), verbose=0)


@pytest.mark.parametrize("joined", ["keras.ops", "Lambda"])
def test_a_model_that_computes_across_the_batch_is_calibrated_batch_by_batch(joined):
    """Centering by the batch's mean makes a batch of one exactly 0, so the last layer writes its zero bias:
    calibrated one sample at a time, every value it sees is 0. Run joined (64 samples in a call), it would see
    the spread of 64 samples about their mean instead."""
    from qstrat.passes.runner import rows_apart

    keras.utils.set_random_seed(0)
    i = keras.Input((4,), name="x")
    d1 = L.Dense(4, name="d1")(i)
    if joined == "Lambda":
        centered = L.Lambda(lambda t: t - ops.mean(t, axis=0, keepdims=True), name="center")(d1)
    else:
        centered = d1 - ops.mean(d1, axis=0, keepdims=True)
    model = keras.Model(i, L.Dense(2, name="d2")(centered))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32") * 3
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(x, calib_batch_size=1, verbose=0, include_bias_corr=False)
    fq = next(layer for layer in qmodel.layers if getattr(layer, "target", "") == "d2/output")
    want = fq.quantizer.state_from_tensor(np.zeros((1, 2), np.float32))["pos"]
    assert ops.convert_to_numpy(fq.state["pos"]) == want
    assert not rows_apart(q._optimized_graph(q._strategy({})))
    plain = qstrat.Quantizer(_model(), "pof2s")
    assert rows_apart(plain._optimized_graph(plain._strategy({})))  # Keras' own layers run joined
