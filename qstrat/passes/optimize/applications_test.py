"""A real architecture from keras.applications through the optimize and quantize stages (TensorFlow only: slow elsewhere)."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.passes.optimize.conftest import randomize_bn, types


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keras_mobilenet_v2_optimizes_float_equivalently_and_quantizes():
    # keras.applications architecture, random weights (nothing is downloaded), BN statistics made non-trivial.
    model = randomize_bn(keras.applications.MobileNetV2((64, 64, 3), alpha=0.35, weights=None))
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    opt = q.optimize_model()
    y0, y1 = ops.convert_to_numpy(model(x)), ops.convert_to_numpy(opt(x))
    assert np.abs(y0 - y1).max() <= 1e-5 * np.abs(y0).max()
    assert "BatchNormalization" not in types(opt) and not q.optimize_report.of("fold_conv_bn", "skipped")
    qmodel = q.quantize_model(x, verbose=0)
    assert len(q.report.quantized()) > 90 and np.isfinite(ops.convert_to_numpy(qmodel(x))).all()
