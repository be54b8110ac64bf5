"""Export a quantized model to a fully-int8 TFLite file that keeps qstrat's ranges and integer weights.

Why: TFLite's post-training quantization would calibrate every tensor again;
this export keeps the scales and zero points qstrat chose and the integers it
rounded the weights to, so the file computes what the quantized Keras model
computes, up to the rounding of TFLite's integer kernels.

Route (TensorFlow backend only): a float twin of the quantized graph in which
each `FakeQuant` is TensorFlow's ``fake_quant_with_min_max_vars`` with
min = (qmin - zp) * scale, max = (qmax - zp) * scale, and each wrapped layer
reads its fake-quantized weights through a per-tensor or per-channel FakeQuant
of the same grid (its bias as a constant: TFLite stores it as int32 at input
scale * weight scale). ``tf.lite.TFLiteConverter`` takes every range from the
FakeQuant ops (its quantization-aware mode). The result is checked (an
operator left in float is an error, never a silently mixed file), gets the
``metadata`` table and is written atomically. Rewrites for TFLite's layouts:

- a BatchNormalization right after a quantized Conv/Dense ("fs" keeps BN) is
  folded in: the integers stay qstrat's, the per-channel scale becomes the
  weight scale * |gamma| / sqrt(var + eps);
- a Dense with per-channel weights runs as a 1x1 CONV_2D (the converter
  cannot transpose per-channel weights into FULLY_CONNECTED's layout);
- a layer that reads a float tensor a FakeQuant also reads (a residual Add in
  "fs", which quantizes layer inputs) reads it quantized: an int8 tensor has one range.

Limits: 8-bit integer grids; activations per tensor; symmetric weights; no
float formats (FP16, BF16, BFP16); each is an `UnsupportedError` naming the
target. Tensors qstrat leaves in float ("fs": layer outputs) need
``calib_data``, which gives those tensors, and only those, a min/max range.
TFLite's kernels round ties their own way: fed the same int8 inputs, a tensor
can differ by one step where its exact value is a tie, and such steps grow
through the layers after it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import keras

from qstrat.errors import ConfigError, UnsupportedError
from qstrat.export.tflite_file import convert, float_ops, read_tflite_metadata, report, with_metadata  # noqa: F401 - read_tflite_metadata is public here
from qstrat.export.tflite_twin import Twin, layer_name, tflite_grid
from qstrat.files import check_writable, write_atomically
from qstrat.graph.ir import TensorRef
from qstrat.graph.rebuild import float32_policy
from qstrat.layers.fake_quant import FakeQuant, require_quantizers


def _check_args(path, metadata, int8_io) -> tuple[str, dict[str, str]]:
    check_writable(path, "export_tflite path")
    path = os.fspath(path)
    if not isinstance(int8_io, bool):
        raise ConfigError.expected("export_tflite.int8_io", "True or False", int8_io)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ConfigError("export_tflite.metadata", f"expected a mapping of str to str, got {type(metadata).__name__}")
    items = dict(metadata or {})
    for k, v in items.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(
                f"export_tflite.metadata[{k!r}]",
                f"expected str keys and str values, got {type(k).__name__}: {type(v).__name__}",
                "Convert values with str() or json.dumps().",
            )
    return path, items


DPU_LAYERS = ("DPUHardSigmoid", "DPUAveragePooling2D", "DPUGlobalAveragePooling2D")


# What the converter's float operators come from, in Keras' words.
_FLOAT_CAUSES = {
    "SpaceToBatchND": "a convolution with dilation_rate > 1 (the converter splits it around the batch axis)",
    "BatchToSpaceND": "a convolution with dilation_rate > 1 (the converter splits it around the batch axis)",
    "Tensordot": "a Dense on an input of rank 3 or more (reshape it to 2-D around the Dense)",
}


def _float_hints(floats: list[str]) -> str:
    causes = dict.fromkeys(why for op, why in _FLOAT_CAUSES.items() if any(op in f for f in floats))
    return (" They come from " + "; ".join(causes) + ".") if causes else ""


def export_tflite(qmodel, path, *, int8_io: bool = False, metadata=None, calib_data=None) -> dict:
    """Write a quantized model as a fully-int8 TFLite file with qstrat's ranges and integer weights.

    TensorFlow backend only. Every tensor qstrat quantized keeps its scale and
    zero point, every weight its integers. The write is atomic: on any error
    nothing new is left in the folder, and a file already at ``path`` stays.

    Args:
        qmodel: a model from ``qstrat.Quantizer(...).quantize_model(...)`` or ``qstrat.load_model``.
        path: the .tflite file to write; its folder must exist and be writable.
        int8_io: int8 model inputs and outputs (scales in the report); False keeps
            float32 I/O, with QUANTIZE and DEQUANTIZE at the edges.
        metadata: ``{str: str}`` for the file's metadata table (`read_tflite_metadata` reads it).
        calib_data: samples (an array, or a list with one per model input) that give
            a min/max range to the tensors qstrat left in float ("fs" quantizes layer
            inputs only, so the logits are float). Used only when there are such
            tensors; without it they are an error that names their layers.

    Returns:
        ``{"path", "bytes", "int8_io", "tensors": {dtype: count}, "ops": {op: count},
        "inputs"/"outputs": [{"key", "name", "shape", "dtype", "scale", "zero_point"}] in the Keras model's
        order (the converter orders the file's own lists otherwise); "key" is the tensor's key in the
        file's serving_default signature (`get_signature_runner()`),
        "folded_batch_norms", "calibrated" (layers whose outputs calib_data ranged), "metadata"}``.

    Example:
        >>> qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x[:256])
        >>> export_tflite(qmodel, "digits.tflite", int8_io=True, metadata={"strategy": "pof2s"})["outputs"][0]["scale"]
        0.25
    """
    with float32_policy():
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise UnsupportedError(
                f"export_tflite needs the TensorFlow backend; Keras runs on {backend}. Load the model under "
                "KERAS_BACKEND=tensorflow (e.g. KERAS_BACKEND=tensorflow python, then qstrat.load_model(path)) "
                "and export it there."
            )
        path, metadata = _check_args(path, metadata, int8_io)
        require_quantizers(qmodel, deployed=True)
        dpu = [layer.name for layer in qmodel.layers if type(layer).__name__ in DPU_LAYERS]
        if dpu:
            raise UnsupportedError(
                f"{', '.join(dpu[:4])}{', ...' if len(dpu) > 4 else ''}: TFLite has no int8 kernels for the DPU layer "
                "versions (hard sigmoid with the DPU's 2731/16384, sums times k/2^n), so the file would compute them in "
                "float. Export to ONNX, or quantize for TFLite with the convert_*_to_dpu_version and "
                "convert_sigmoid_to_hard_sigmoid keys off."
            )
        _check_float_inputs(qmodel)
        twin = Twin(qmodel)
        _check_resizes(twin)
        unranged = twin.unranged()
        if unranged and calib_data is None:
            names = ", ".join(layer_name(twin.graph.node(r.node)) for r in unranged)
            raise UnsupportedError(
                f"qstrat left the outputs of {names} in float, and every TFLite int8 tensor needs a range. "
                "Pass calib_data (a few hundred samples) to give them min/max ranges."
            )
        if unranged:
            twin.add_ranges(unranged, _checked_calib(qmodel, calib_data))
        model = convert(twin.build(), int8_io)
        floats = float_ops(model)
        if floats:
            raise UnsupportedError(
                f"TFLite left these operators in float: {'; '.join(floats[:8])}.{_float_hints(floats)} "
                "The ONNX export (export_onnx) runs them in integers."
            )
        data = with_metadata(model, metadata)
        result = report(model, path, len(data), int8_io, twin, metadata)  # it checks the file's I/O first
        write_atomically(path, data)
        return result


def _check_float_inputs(qmodel) -> None:
    """Refuse integer model inputs before anything else is asked for: the converter keeps their cast (and what
    reads it, up to the first quantizer) in float, which no calib_data can change."""
    ints = [f"{t.name} ({t.dtype})" for t in qmodel.inputs if not keras.backend.is_float_dtype(t.dtype)]
    if ints:
        raise UnsupportedError(
            f"input {', '.join(ints)}: TFLite keeps the cast of an integer model input, and what reads it before a "
            "quantizer, in float. Give the model a float input (do the conversion, e.g. a Rescaling, before calling "
            "it), or export to ONNX (export_onnx)."
        )


def _check_resizes(twin: Twin) -> None:
    """Refuse a bilinear resize whose output grid is not its input's: TFLite's int8 kernel writes the input's
    scale (qstrat's own output grid would be lost, by many steps), so the file would not compute the model.
    An fs resize reads a float tensor, which the file would range from calib_data: refused too."""
    for node in twin.graph.nodes:
        op = node.op
        if type(op).__name__ != "UpSampling2D" or getattr(op, "interpolation", "nearest") == "nearest":
            continue
        before = twin.graph.node(node.inputs[0].node) if node.inputs else None
        after = twin.graph.consumers(TensorRef(node.name, 0))
        fqs = [n.op for n in [before, *after] if n is not None and isinstance(n.op, FakeQuant)]
        grids = [tuple(float(v) for v in tflite_grid(q.quantizer, q.state, q.enabled, q.name, False)[:2]) for q in fqs]
        if grids and (before is None or not isinstance(before.op, FakeQuant)):  # fs: it reads a float tensor
            s_out, z_out = grids[0]
            raise UnsupportedError(
                f"{op.name}: UpSampling2D (bilinear) reads a tensor qstrat leaves in float, which the file would "
                f"range from calib_data on another grid than the one it writes (scale {s_out:g}, zero point "
                f"{z_out:g}), and TFLite's int8 resize keeps its input's: the file would not compute the model. "
                'Export to ONNX, or use interpolation="nearest".'
            )
        if len(grids) == 2 and grids[0] != grids[1]:
            (s_in, z_in), (s_out, z_out) = grids
            raise UnsupportedError(
                f"{op.name}: UpSampling2D (bilinear) writes another grid (scale {s_out:g}, zero point {z_out:g}) "
                f"than it reads (scale {s_in:g}, zero point {z_in:g}), and TFLite's int8 resize keeps its input's: "
                'the file would not compute the model. Export to ONNX, or use interpolation="nearest".'
            )


def _checked_calib(qmodel, calib_data):
    """``calib_data`` checked as calibration data is (`checked_arrays`)."""
    from qstrat.calibration.inputs import checked_arrays

    arrays = checked_arrays(calib_data, qmodel, "export_tflite calib_data")
    return arrays[0] if len(arrays) == 1 else arrays
