"""`export_onnx`: a quantized Keras model as an ONNX model in QDQ form.

The model is read through qstrat's own graph (`qstrat.graph.capture`), not
through a converter, so it does not depend on the Keras backend that made
it: a model quantized under torch or JAX exports the same file. Each layer
becomes the nodes of `onnx_layers`; each quantizer becomes:

- on a tensor (`FakeQuant`): QuantizeLinear, an integer Clip when the grid is
  narrower than its type, DequantizeLinear;
- on a weight (`QuantizeWrapper`): the grid integers as the initializer,
  read through DequantizeLinear (per channel on the right ONNX axis).

Biases. An 8-bit bias is stored as int8 at its own scale, as the DPU has it.
ONNX Runtime then runs a convolution, or a Dense on a 2-D input, in float on
the dequantized values (its integer kernels need an int32 bias at the
accumulator scale), which computes exactly what the Keras model does. A Dense
on a wider input is a MatMul, which ONNX Runtime runs on integers whatever
its bias. A wider bias goes to int32: where the
layer's input and weight are quantized, ONNX Runtime fuses the three into an
integer kernel that reads the bias at the accumulator scale (input scale x
weight scale), whatever scale the file gives it, so the bias is stored at
that scale; the report gives the rounding this costs (none when the bias's
grid is a multiple of the accumulator's, as power-of-2 grids usually are).

Integer kernels on x86 without VNNI sum u8 x s8 products in int16 pairs,
which saturate. For every layer ONNX Runtime can run that way, the report
bounds the pair sums from the stored weights and the input's grid and warns
when they can pass 32767, naming the session option that avoids it.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from qstrat.errors import ConfigError, UnsupportedError
from qstrat.export.onnx_activations import settings_refusal
from qstrat.export.onnx_layers import EMITTERS, op_operands
from qstrat.export.onnx_report import OPSET21_NOTE, QDQ_INT8_OPTION, ExportReport, SaturationWarning
from qstrat.export.onnx_writer import DEFAULT_OPSET, Writer, version
from qstrat.export.qdq import Grid
from qstrat.files import check_writable, write_atomically
from qstrat.graph import capture
from qstrat.graph.rebuild import float32_policy
from qstrat.layers import FakeQuant, QuantizeWrapper, require_quantizers
from qstrat.quantizers.grid import RoundMode


def export_onnx(
    qmodel,
    path,
    opset: int | None = None,
    *,
    data=None,
    batch_size: int = 32,
    metadata: dict[str, str] | None = None,
    strategy=None,
) -> ExportReport:
    """Write ``qmodel`` (a qstrat quantized model) to ``path`` as ONNX QDQ.

    Args:
        qmodel: a model from `Quantizer.quantize_model` (or `qstrat.load_model`).
        path: the .onnx file to write (written atomically: a failure leaves no file).
        opset: ONNX opset; None picks the lowest that holds every grid (13, or
            21 for 16-bit activations).
        data: optional input data (an array, or a list of arrays for several
            inputs): the report then counts, per tensor, the elements whose
            rounding ONNX cannot reproduce (see README "Export").
        metadata: extra ``{key: value}`` strings for the model's metadata.
        strategy: the `Strategy` it was quantized with, stored in the metadata.

    Returns:
        An `ExportReport`.
    """
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, (int, np.integer))):
        raise ConfigError.expected("opset", "an ONNX opset from 13 to 23 (an int), or None", opset)
    opset = None if opset is None else int(opset)
    with float32_policy():
        check_writable(path, "export_onnx path")
        path = os.fspath(path)
        require_quantizers(qmodel, ", then export the quantized model", deployed=True)
        if data is not None:
            data = _checked_data(qmodel, data)
        graph = capture(qmodel)
        _check_supported(graph)
        b, report = Writer(graph, opset).run()
        report.path = path
        from qstrat.export.rounding import calibration_fingerprint, count_rounding_mismatch

        meta = {"qstrat.version": version(), "qstrat.quantizers": json.dumps(report.quantizers)}
        meta.update(getattr(qmodel, "qstrat_metadata", {}) or {})  # set by quantize_model: its strategy
        if strategy is not None:
            meta["qstrat.strategy"] = json.dumps(strategy.to_dict(2) if hasattr(strategy, "to_dict") else strategy)
        if data is not None:
            meta.setdefault("qstrat.data_fingerprint", calibration_fingerprint(data))
            report.rounding_mismatch = count_rounding_mismatch(qmodel, data, batch_size)
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        model = b.model(meta)
        blob = model.SerializeToString()
        write_atomically(path, blob)
        report.bytes, report.nodes, report.metadata = len(blob), len(model.graph.node), meta
        if report.opset >= 21 and any(n.op_type == "Transpose" for n in model.graph.node):
            report.notes.append(OPSET21_NOTE)
            warnings.warn(f"{path}: {OPSET21_NOTE}", stacklevel=2)
        if report.saturation_risk:
            names = ", ".join(r["layer"] for r in report.saturation_risk[:5])
            warnings.warn(
                f"{len(report.saturation_risk)} layers of {path} ({names}) can saturate in ONNX Runtime's default "
                f"session on x86 CPUs without VNNI (u8 x s8 pair sums above 32767). Run it with the session option "
                f'"{QDQ_INT8_OPTION}" = "1", or quantize with weight_bit=7 so that no pair can saturate.',
                SaturationWarning,
                stacklevel=2,
            )
        return report


def check_exportable(qmodel, opset: int | None = None) -> None:
    """Fail now, before calibration, if ``qmodel`` cannot become an ONNX file at ``opset``.

    Checks the layers and that the opset holds each activation grid's type
    (the zero points are not known yet: they stay inside their grids).
    """
    graph = capture(qmodel)
    _check_supported(graph)
    need = DEFAULT_OPSET
    for n in graph.nodes:
        if isinstance(n.op, FakeQuant) and not n.op.quantizer.params.data_format.is_float:
            g = n.op.quantizer.grid
            grid = Grid(np.float32(1), np.int64(0), g.qmin, g.qmax, None, RoundMode.HALF_TO_EVEN, 0)
            op = grid.quantize_opset()
            if op is None:
                raise UnsupportedError(f"{n.name}: a {g.qmax - g.qmin + 1}-level activation grid has no ONNX type.")
            need = max(need, op)
    if opset is not None and opset < need:
        raise ConfigError(
            "refine_pipeline_config.onnx_opset_version",
            f"opset {opset} cannot hold this model's activation grids (16-bit QuantizeLinear needs opset {need})",
            f"Set onnx_opset_version to {need} or later.",
        )


def _check_supported(graph) -> None:
    import keras

    bad = []
    for n in graph.nodes:
        op = n.op.layer if isinstance(n.op, QuantizeWrapper) else n.op
        kind = type(op).__name__
        layer = isinstance(op, keras.layers.Layer)  # a keras.ops operation may share a layer's class name (Add)
        if layer and kind in EMITTERS:
            why = settings_refusal(op)
            if why:
                bad.append(f"{n.name} ({kind} {why})")
            continue
        if layer and kind in ("InputLayer", "FakeQuant"):
            continue
        if not layer and op_operands(n) is not None:
            continue
        what = "a layer" if layer else "a keras.ops operation"
        bad.append(f"{n.name} ({kind}, {what})")
    if bad:
        raise UnsupportedError(
            f"{len(bad)} nodes have no ONNX export yet: "
            + "; ".join(bad[:8])
            + ("; ..." if len(bad) > 8 else "")
            + '. Replace them with supported layers (README "Export" lists them; of keras.ops, add, subtract, '
            "multiply, divide, maximum and minimum of a float32 tensor and a float32 constant export), or file an issue."
        )


def _checked_data(qmodel, data):
    """``data`` checked as calibration data is (`checked_arrays`); a dict stays matched by input name."""
    from qstrat.calibration.inputs import checked_arrays

    arrays = checked_arrays(data, qmodel, "export_onnx data")
    if isinstance(data, dict):
        return {t.name: a for t, a in zip(qmodel.inputs, arrays, strict=True)}
    return arrays[0] if len(arrays) == 1 else arrays
