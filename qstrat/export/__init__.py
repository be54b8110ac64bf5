"""Export a quantized Keras model: ONNX QDQ (any backend) and TFLite int8 (TensorFlow).

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
