"""Real architectures from keras.applications through the optimize and quantize stages (TensorFlow only: slow elsewhere)."""

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


def _float64_twin(build, model):
    """The same architecture in float64 with the same weights and statistics: the exact-arithmetic reference."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        twin = build()
    finally:
        keras.config.set_dtype_policy(policy)
    for a, b in zip(model.layers, twin.layers, strict=True):
        for va, vb in zip(a.weights, b.weights, strict=True):
            vb.assign(va.numpy().astype("float64"))
        if isinstance(b, keras.layers.Normalization):
            b.finalize_state()
    return twin


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_efficientnet_with_adapted_normalization_stays_float_equivalent_and_reloads_bit_identically(tmp_path):
    from qstrat import zoo

    def build():
        return keras.applications.EfficientNetB0(input_shape=(64, 64, 3), weights=None, classifier_activation=None)

    x = zoo.color_images(16, 64)
    model = zoo.real_statistics(build(), x)
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    assert np.abs(np.asarray(norm.mean) - 0).max() > 0.1  # adapted to the images, not the identity
    exact = ops.convert_to_numpy(_float64_twin(build, model)(x.astype("float64")))
    scale = np.abs(exact).max()
    float32_error = np.abs(ops.convert_to_numpy(model(x)) - exact).max() / scale
    q = qstrat.Quantizer(model, "pof2s")
    optimized_error = np.abs(ops.convert_to_numpy(q.optimize_model()(x)) - exact).max() / scale
    # Exactly equivalent in real arithmetic: its float32 rounding error is of the original's order.
    assert optimized_error <= 2 * float32_error, (optimized_error, float32_error)
    qmodel = q.quantize_model(x, verbose=0, include_bias_corr=False)
    out = ops.convert_to_numpy(qmodel(x))
    assert np.isfinite(out).all()
    qmodel.save(tmp_path / "q.keras")
    assert np.array_equal(ops.convert_to_numpy(keras.models.load_model(tmp_path / "q.keras")(x)), out)
