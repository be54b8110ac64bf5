"""Export a quantized Keras model: ONNX QDQ (any backend), TFLite int8 (TensorFlow), golden integer dumps.

`export_onnx` and `export_tflite` import their converters (onnx, TensorFlow) only when called.
"""


def export_onnx(qmodel, path, opset=None, **kwargs):
    """Write a quantized model as ONNX QDQ; see `qstrat.export.onnx_export.export_onnx`."""
    from qstrat.export.onnx_export import export_onnx as export

    return export(qmodel, path, opset, **kwargs)


def export_tflite(qmodel, path, **kwargs):
    """Write a quantized model as a fully int8 TFLite model (TensorFlow backend); see `qstrat.export.tflite`."""
    from qstrat.export.tflite import export_tflite as export

    return export(qmodel, path, **kwargs)


def dump_model(qmodel, dataset=None, output_dir="./dump_results", dump_float=False, **kwargs):
    """Write a power-of-2 model's integer weights and activations per layer; see `qstrat.export.dump`."""
    from qstrat.export.dump import dump_model as dump

    return dump(qmodel, dataset, output_dir, dump_float, **kwargs)
