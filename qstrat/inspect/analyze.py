"""Why accuracy dropped: each quantized layer's error, its sensitivity alone, and the ranges its quantizers chose.

`analyze` compares a quantized model with its own float computation, layer
by layer. Every quantizer has an ``enabled`` flag, so the same traced model
runs with all quantizers bypassed (the float model after the optimize
stage: BatchNormalization folded, CLE's channel scales in place, so its
layers line up with the quantized ones) and with them on, on the same
batches. That gives, per layer:

- **cumulative error** at the tensor the next layers read: SQNR, MSE and
  cosine similarity of the quantized against the float value, with every
  quantizer before it on;
- **alone**: the model outputs' SQNR with only this layer's quantizers on
  (the rest in float), which ranks layers by sensitivity; for a layer with
  both weight and activation quantizers, the same with only its weights,
  and with only its activations;
- **left out** (``left_out=True``): the outputs' SQNR with every quantizer
  on but this layer's, bias corrections in: what keeping this one layer in
  float would gain in the model as it is. Alone and left out differ where
  bias correction removes much of a layer's error, or errors interact;
- **ranges**: for each quantizer, the grid's ends against the minimum and
  maximum it saw, the fraction of values beyond the ends (clipped), and a
  histogram (of a sample, for activations).

Passes over the data: 3 for the statistics (the float model, the quantized
model bypassed, and on), then one per layer for *alone* (two more for a
layer with both kinds of quantizer), and one per layer for *left out*. No pass retraces anything: the runs
differ only in the flags' values. The data is read into memory once, so
give a few hundred samples. The quantized model's flags are restored when
analysis ends, whatever happens.

Example:
    result = qstrat.analyze(float_model, qmodel, x_val[:256])
    result.ranking()[:5]          # the most sensitive layers first
    result.write_html("report.html")
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from qstrat.calibration.data import iterate_batches
from qstrat.errors import CalibrationDataError, UnsupportedError
from qstrat.graph.rebuild import float32_policy
from qstrat.inspect.measures import Moments, RangeStats, Seen, sqnr_db, sse, weight_stats
from qstrat.inspect.units import Flags, find_units
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.passes.calibrate import input_specs
from qstrat.passes.runner import BatchRunner
from qstrat.progress import Progress

# The bypassed quantized model differs from its float model only by the optimize stage's float rewrites and
# the DPU layer versions (an average's 1/9 as 7/64 is a 1.6% change, about 36 dB): far above this.
BYPASS_SQNR_FLOOR = 20.0


@dataclass
class LayerAnalysis:
    """One quantized layer: cumulative error at its output, sensitivity alone, its quantizers' ranges."""

    name: str
    layer_type: str
    targets: list[str]
    sqnr_db: float
    mse: float
    cosine: float
    alone_sqnr_db: float | None = None  # model outputs, only this layer quantized
    alone_sse: float | None = None
    weight_only_sqnr_db: float | None = None
    activation_only_sqnr_db: float | None = None
    left_out_sqnr_db: float | None = None  # model outputs, every layer quantized but this one (bias corrections in)
    ranges: list[RangeStats] = field(default_factory=list)


@dataclass
class Analysis:
    """What `analyze` measured; ``to_dict`` for scripts, ``write_html`` for people."""

    model: str
    samples: int
    layers: list[LayerAnalysis]
    output_sqnr_db: float  # quantized outputs against the float model's
    output_sse: float  # against the bypassed quantized model, as each layer's alone_sse
    agreement: float | None  # top-1 agreement with the float model (classification outputs)
    bypass_sqnr_db: float  # the quantized model with every quantizer bypassed, against the float model
    passes: dict[str, int]
    seconds: dict[str, float]

    def ranking(self) -> list[str]:
        """Layer names, the most sensitive (lowest SQNR with only that layer quantized) first."""
        scored = [la for la in self.layers if la.alone_sqnr_db is not None]
        return [la.name for la in sorted(scored, key=lambda la: la.alone_sqnr_db)]

    def gain_ranking(self) -> list[str]:
        """Layer names, the one whose bypass helps the outputs most (highest ``left_out_sqnr_db``) first."""
        scored = [la for la in self.layers if la.left_out_sqnr_db is not None]
        return [la.name for la in sorted(scored, key=lambda la: -la.left_out_sqnr_db)]

    def layer(self, name: str) -> LayerAnalysis:
        for la in self.layers:
            if la.name == name:
                return la
        raise KeyError(name)

    def to_dict(self) -> dict:
        """Plain JSON-ready data (infinite SQNR, meaning no error, becomes ``None``)."""
        return _finite(asdict(self))

    def table(self, top: int | None = None) -> str:
        """A text table of the layers, most sensitive first."""
        order = self.ranking() + [la.name for la in self.layers if la.alone_sqnr_db is None]
        rows = [f"{'layer':<28} {'type':<20} {'alone dB':>9} {'cumul dB':>9} {'cosine':>8} {'clipped':>8}"]
        for name in order[:top]:
            la = self.layer(name)
            clipped = max((r.clipped for r in la.ranges), default=0.0)
            rows.append(
                f"{la.name:<28} {la.layer_type:<20} {_fmt(la.alone_sqnr_db):>9} {_fmt(la.sqnr_db):>9} "
                f"{la.cosine:>8.5f} {100 * clipped:>7.3f}%"
            )
        return "\n".join(rows)

    def write_html(self, path: str) -> str:
        """One self-contained HTML report (plots inline, no external assets), written atomically."""
        from qstrat.inspect.html import write_report

        return write_report(self, path)

    def write_json(self, path: str) -> str:
        import json

        from qstrat.files import check_writable, write_atomically

        check_writable(path, "write_json path")
        write_atomically(path, json.dumps(self.to_dict(), indent=1).encode())
        return path


def _fmt(db: float | None) -> str:
    if db is None:
        return "-"
    return "exact" if math.isinf(db) and db > 0 else f"{db:.1f}"


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _as_list(outs) -> list[np.ndarray]:
    return [np.asarray(o) for o in outs]


def _check_same_inputs(float_model, qmodel) -> None:
    """The float model reads what the quantized one reads: as many inputs, of shapes that agree (None: any)."""
    f, q = input_specs(float_model), input_specs(qmodel)

    def agree(a, b):
        return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))

    if len(f) != len(q) or not all(agree(a[1], b[1]) for a, b in zip(f, q, strict=True)):
        raise CalibrationDataError(
            f"analyze: the float model takes inputs of shapes {[a[1] for a in f]} and the quantized model "
            f"{[b[1] for b in q]}; pass the float model the quantized one was made from."
        )


def analyze(
    float_model,
    qmodel,
    data,
    batch_size: int = 32,
    steps: int | None = None,
    alone: bool = True,
    left_out: bool = False,
    verbose: int = 1,
) -> Analysis:
    """Per-layer error and sensitivity of ``qmodel`` (from `quantize_model` or `get_qat_model`) on ``data``.

    Args:
        float_model: the float model ``qmodel`` was quantized from (for the output figures and a check
            that the bypassed quantized model computes the same).
        qmodel: the quantized model; its quantizers' flags are as they were when this returns.
        data: arrays (or a dict by input name), a tf.data.Dataset, a PyDataset or a generator of batches;
            read into memory once.
        batch_size, steps: as for calibration.
        alone: also measure each layer quantized alone (one pass over the data per layer, two more per layer
            with both weight and activation quantizers).
        left_out: also measure the model with every quantizer on but this layer's (one pass per layer):
            what keeping the layer in float would gain; mixed precision ranks layers by it.
        verbose: 1 shows the passes; 0 is silent.
    """
    with float32_policy():
        import keras

        progress = Progress(verbose, data="analysis data")
        _check_same_inputs(float_model, qmodel)
        if any(isinstance(layer, (FakeQuant, QuantizeWrapper)) for layer in float_model.layers):
            raise UnsupportedError(
                f"analyze: the float model '{float_model.name}' has qstrat quantizers; pass the float model the "
                "quantized one was made from."
            )
        units = find_units(qmodel)
        with progress.stage("read data"):
            batches = list(iterate_batches(data, input_specs(qmodel), batch_size, steps, caller="analyze"))
        samples = sum(len(b[0]) for b in batches)
        n_out = len(qmodel.outputs)
        tensors: list = list(qmodel.outputs)
        index: dict[int, int] = {}

        def slot(t) -> int:
            if id(t) not in index:
                index[id(t)] = len(tensors)
                tensors.append(t)
            return index[id(t)]

        tap_slot = {u.name: slot(u.tap) for u in units}
        acts = [q for u in units for q in u.quants if q.kind in ("output", "input")]
        act_slot = {(id(q.layer), q.call): slot(q.input) for q in acts}
        tap_runner = BatchRunner(keras.Model(qmodel.inputs, tensors, name=f"{qmodel.name}_taps"), views=True)
        out_runner = BatchRunner(qmodel, views=True)
        float_runner = BatchRunner(float_model, views=True)
        flags = Flags(qmodel)
        moments = {u.name: Moments() for u in units}
        rng = np.random.default_rng(0)
        seen = {(id(q.layer), q.call): Seen(q, rng) for q in acts}
        out_quant, out_sse, bypass = Moments(), Moments(), Moments()
        agree = [0, 0]
        references: list[list[np.ndarray]] = []
        try:
            with progress.stage("statistics"):
                bar = progress.data_pass(len(batches), passes=3, what="float model, quantized model bypassed and on")
                for k, batch in enumerate(batches):
                    f_out = _as_list(float_runner(batch))
                    if len(f_out) != n_out:
                        raise CalibrationDataError(
                            f"analyze: the float model has {len(f_out)} outputs and the quantized model {n_out}; "
                            "pass the float model the quantized one was made from."
                        )
                    flags.only([])
                    off = _as_list(tap_runner(batch))
                    flags.restore()
                    on = _as_list(tap_runner(batch))
                    shapes = [(np.shape(f), np.shape(b)) for f, b in zip(f_out, off[:n_out], strict=True)]
                    if any(a != b for a, b in shapes):
                        raise CalibrationDataError(
                            f"analyze: the float model's outputs have shapes {[a for a, _ in shapes]} and the quantized "
                            f"model's {[b for _, b in shapes]}; pass the float model the quantized one was made from."
                        )
                    references.append(off[:n_out])
                    for f, b, q in zip(f_out, off[:n_out], on[:n_out], strict=True):
                        out_quant.add(f, q)
                        out_sse.add(b, q)
                        bypass.add(f, b)
                        if f.ndim == 2 and f.shape[1] > 1:
                            agree[0] += int(np.count_nonzero(f.argmax(1) == q.argmax(1)))
                            agree[1] += len(f)
                    for u in units:
                        moments[u.name].add(off[tap_slot[u.name]], on[tap_slot[u.name]])
                    for key, s in seen.items():
                        s.add(on[act_slot[key]])
                    bar.update(k + 1)
            layers = []
            for u in units:
                m = moments[u.name]
                ranges = [
                    weight_stats(q) if q.kind in ("weight", "bias") else seen[(id(q.layer), q.call)].stats()
                    for q in u.quants
                ]
                layers.append(
                    LayerAnalysis(
                        u.name, u.layer_type, [q.target for q in u.quants], m.sqnr(), m.mse(), m.cosine(), ranges=ranges
                    )
                )
            passes = {"statistics": 3, "alone": 0, "weight/activation split": 0, "left out": 0}

            def output_sse() -> float:
                err = 0.0
                for batch, ref in zip(batches, references, strict=True):
                    for q, f in zip(_as_list(out_runner(batch)), ref, strict=True):
                        err += sse(q, f)
                return err

            pairs = list(zip(units, layers, strict=True))
            stages = []
            if alone:
                stages.append(("each layer alone", "alone", [(u, la, None) for u, la in pairs]))
                split = [(u, la, k) for u, la in pairs if len(u.kinds) > 1 for k in ("weight", "activation")]
                stages.append(("weights or activations alone", "weight/activation split", split))
            if left_out:
                stages.append(("each layer left out", "left out", [(u, la, "left out") for u, la in pairs]))
            for stage, key, runs in stages:
                if not runs:
                    continue
                with progress.stage(stage):
                    bar = progress.data_pass(len(runs), unit="run", passes=len(runs), what=stage)
                    for r, (u, la, kind) in enumerate(runs):
                        if kind == "left out":  # the model as it is, this layer's quantizers bypassed
                            mine = {id(f) for f in u.flags()}
                            flags.only([f for f in flags.flags if id(f) not in mine], corrections=True)
                        else:
                            flags.only(u.flags(kind))
                        err = output_sse()
                        db = sqnr_db(out_sse.ff, err)
                        if kind is None:
                            la.alone_sqnr_db, la.alone_sse = db, err
                        elif kind == "weight":
                            la.weight_only_sqnr_db = db
                        elif kind == "activation":
                            la.activation_only_sqnr_db = db
                        else:
                            la.left_out_sqnr_db = db
                        bar.update(r + 1)
                passes[key] = len(runs)
        finally:
            flags.restore()
        if bypass.sqnr() is not None and bypass.sqnr() < BYPASS_SQNR_FLOOR:
            warnings.warn(
                f"analyze: with every quantizer bypassed, '{qmodel.name}' computes the float model's outputs only to "
                f"{bypass.sqnr():.1f} dB, below {BYPASS_SQNR_FLOOR} dB: the float model given is likely not the one it "
                "was quantized from, and every figure against it is off.",
                stacklevel=2,
            )
        return Analysis(
            qmodel.name,
            samples,
            layers,
            out_quant.sqnr(),
            out_sse.ee,
            agree[0] / agree[1] if agree[1] else None,
            bypass.sqnr(),
            passes,
            dict(progress.times),
        )
