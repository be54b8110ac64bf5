"""The TFLite file itself: converting the float twin, checking it is all int8, its report and metadata table.

TensorFlow ships the flatbuffer schema (``tensorflow.lite.python.schema_py_generated``)
and the ``flatbuffers`` package: a converted model is read into ``ModelT``,
checked, given metadata entries (one buffer each) and serialized again with
the file identifier ``TFL3``.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from qstrat.errors import ConfigError, UnsupportedError


def convert(twin, int8_io: bool):
    """The converted model as a flatbuffer object (``ModelT``)."""
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as fb

    conv = tf.lite.TFLiteConverter.from_keras_model(twin)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if int8_io:
        conv.inference_input_type = conv.inference_output_type = tf.int8
    try:
        # Keras prints where it traced the model, and the converter warns that the inputs have no
        # statistics (their FakeQuant gives them); neither tells a qstrat user anything.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            data = conv.convert()
    except Exception as exc:  # noqa: BLE001 - any converter failure is one error, with its first line
        first = next((s for s in str(exc).splitlines() if "error" in s.lower()), str(exc))
        raise UnsupportedError(f"the TFLite converter failed on the quantized model: {first[-400:]}") from None
    return fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(bytearray(data), 0))


def _names(model):
    """(operator name per opcode index, dtype name per TensorType value)."""
    from tensorflow.lite.python import schema_py_generated as fb

    ops = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    dtypes = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    return [ops.get(max(c.builtinCode, c.deprecatedBuiltinCode), "CUSTOM") for c in model.operatorCodes], dtypes


def float_ops(model) -> list[str]:
    """Operators that compute in float: all but QUANTIZE from a model input and DEQUANTIZE to an output."""
    (names, dtypes), bad = _names(model), []
    for sub in model.subgraphs:
        for op in sub.operators:
            name = names[op.opcodeIndex]
            floats = {t for t in [*op.inputs, *op.outputs] if t >= 0 and dtypes[sub.tensors[t].type] == "float32"}
            edge = set(sub.inputs) if name == "QUANTIZE" else set(sub.outputs) if name == "DEQUANTIZE" else set()
            if floats - edge:
                bad.append(f"{name} -> {sub.tensors[op.outputs[0]].name.decode()}")
    return bad


def keras_order(model, twin, side: str) -> list[tuple[str, int]]:
    """(signature key, tensor index) of the file's ``side`` ("inputs" or "outputs") in the Keras model's
    order. The converter orders a subgraph's inputs and outputs its own way (by name); its signature keys
    them by Input name, by output key where the model gives a dict, and as output_0, output_1, ... otherwise."""
    graph = twin.graph
    if side == "inputs":
        keys = [graph.node(r.node).op.name for r in graph.inputs]
    else:
        keys = [f"output_{i}" for i in range(len(graph.outputs))]
        skeleton = graph.structure[1] if graph.structure is not None else None
        if isinstance(skeleton, dict) and all(isinstance(i, int) for i in skeleton.values()):
            keys = [str(k) for k, _ in sorted(skeleton.items(), key=lambda item: item[1])]
    (signature,) = model.signatureDefs
    tensors = {m.name.decode(): m.tensorIndex for m in getattr(signature, side)}
    if sorted(tensors) != sorted(keys):
        raise UnsupportedError(
            f"the TFLite file's {side} are keyed {sorted(tensors)}, not as the model's ({keys}), so they cannot "
            "be matched to the model's; the file was not written."
        )
    return [(k, tensors[k]) for k in keys]


def report(model, path: str, size: int, int8_io: bool, twin, metadata) -> dict:
    (names, dtypes), sub, inner = _names(model), model.subgraphs[0], {}
    for op in sub.operators:  # float I/O: report the int8 side of QUANTIZE / DEQUANTIZE
        if names[op.opcodeIndex] == "QUANTIZE" and op.inputs[0] in sub.inputs:
            inner[op.inputs[0]] = op.outputs[0]
        elif names[op.opcodeIndex] == "DEQUANTIZE" and op.outputs[0] in sub.outputs:
            inner[op.outputs[0]] = op.inputs[0]

    def io(i):
        t, q = sub.tensors[i], sub.tensors[inner.get(i, i)].quantization
        shape = [int(d) for d in (t.shapeSignature if t.shapeSignature is not None else t.shape)]
        scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) == 1 else None
        zp = int(q.zeroPoint[0]) if scale is not None else None
        return {"name": t.name.decode(), "shape": shape, "dtype": dtypes[t.type], "scale": scale, "zero_point": zp}

    def count(items):
        return {k: items.count(k) for k in dict.fromkeys(items)}

    return {
        "path": path,
        "bytes": size,
        "int8_io": int8_io,
        "tensors": count([dtypes[t.type] for t in sub.tensors]),
        "ops": count([names[op.opcodeIndex] for op in sub.operators]),
        "inputs": [{"key": k, **io(i)} for k, i in keras_order(model, twin, "inputs")],
        "outputs": [{"key": k, **io(i)} for k, i in keras_order(model, twin, "outputs")],
        "folded_batch_norms": [bn.op.name for bn in twin.folded.values()],
        "calibrated": twin.calibrated,
        "metadata": sorted(metadata),
    }


def with_metadata(model, metadata: dict[str, str]) -> bytes:
    """The model serialized, with ``metadata`` appended to its metadata table (one buffer per entry)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as fb

    model.metadata, model.buffers = list(model.metadata or []), list(model.buffers)
    clash = sorted({m.name.decode() for m in model.metadata} & set(metadata))
    if clash:
        raise ConfigError("export_tflite.metadata", f"the keys {clash} are the converter's own", "Use other names.")
    for key, value in metadata.items():
        buf, entry = fb.BufferT(), fb.MetadataT()
        buf.data = np.frombuffer(value.encode("utf-8"), np.uint8)
        model.buffers.append(buf)
        entry.name, entry.buffer = key.encode("utf-8"), len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_tflite_metadata(path) -> dict[str, str]:
    """The text entries of a TFLite file's metadata table (``export_tflite(metadata=...)``, the converter's).

    Example:
        >>> read_tflite_metadata("digits.tflite")["strategy"]
        'pof2s'
    """
    from tensorflow.lite.python import schema_py_generated as fb

    with open(path, "rb") as f:
        model = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(bytearray(f.read()), 0))
    out = {}
    for m in model.metadata or []:
        data = model.buffers[m.buffer].data
        with contextlib.suppress(UnicodeDecodeError):  # binary entries (CONVERSION_METADATA) are left out
            out[m.name.decode()] = bytes(np.asarray([] if data is None else data, np.uint8)).decode().rstrip("\0")
    return out
