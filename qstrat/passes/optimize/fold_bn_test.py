"""BatchNormalization folding and conversion: float equivalence and what changed."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.layers import ScaleShift
from qstrat.layers.bias_axis import keras_adds_channels_first_bias_last
from qstrat.passes.optimize.conftest import rand, randomize_bn, types
from qstrat.passes.optimize.fold_bn import convert_bn_to_dwconv, fold_conv_bn

pytestmark = pytest.mark.portable
L = keras.layers


def _conv_bn(layer, shape, **bn):
    i = keras.Input(shape)
    y = L.BatchNormalization(name="bn", **bn)(layer(i))
    return randomize_bn(keras.Model(i, L.ReLU()(y)))


CASES = {
    "conv2d": (lambda: L.Conv2D(6, 3, name="c"), (8, 8, 3), {}),
    "conv2d_no_bias": (lambda: L.Conv2D(6, 3, use_bias=False, name="c"), (8, 8, 3), {}),
    "conv2d_no_scale": (lambda: L.Conv2D(6, 3, name="c"), (8, 8, 3), {"scale": False}),
    "conv2d_no_center": (lambda: L.Conv2D(6, 3, name="c"), (8, 8, 3), {"center": False}),
    "conv1d": (lambda: L.Conv1D(5, 3, name="c"), (10, 4), {}),
    "depthwise": (lambda: L.DepthwiseConv2D(3, name="c"), (8, 8, 4), {}),
    "depthwise_multiplier_2": (
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="c"),
        (8, 8, 3),
        {},
    ),
    "conv2d_transpose": (lambda: L.Conv2DTranspose(5, 3, strides=2, name="c"), (6, 6, 3), {}),
    "dense": (lambda: L.Dense(7, name="c"), (9,), {}),
    "dense_rank3": (lambda: L.Dense(7, use_bias=False, name="c"), (4, 9), {}),
    # channels_first: the channels on axis 1 of the output, the kernels laid out as channels_last ones.
    "conv2d_channels_first": (lambda: L.Conv2D(6, 3, data_format="channels_first", name="c"), (3, 8, 9), {"axis": 1}),
    "conv1d_channels_first": (lambda: L.Conv1D(5, 3, data_format="channels_first", name="c"), (4, 10), {"axis": 1}),
    "depthwise_channels_first_multiplier_2": (
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2, data_format="channels_first", name="c"),
        (3, 8, 9),
        {"axis": 1},
    ),
    "conv2d_transpose_channels_first": (
        lambda: L.Conv2DTranspose(5, 3, strides=2, data_format="channels_first", name="c"),
        (3, 6, 6),
        {"axis": 1},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_is_float_equivalent(case, run_pass):
    make, shape, bn = CASES[case]
    model = _conv_bn(make(), shape, **bn)
    new, report, rel = run_pass(fold_conv_bn, model, rand(4, *shape))
    assert rel <= 1e-5, rel
    assert "BatchNormalization" not in types(new)
    folded = new.get_layer("c")
    assert folded.use_bias and [e.detail for e in report.of("fold_conv_bn", "changed")] == ["folded into c"]


def _skip_reason(model, x, run_pass):
    new, report, rel = run_pass(fold_conv_bn, model, x)
    assert rel == 0.0 and "BatchNormalization" in types(new)
    (event,) = report.of("fold_conv_bn", "skipped")
    return event.detail


def test_shared_conv_is_not_folded(run_pass):
    i = keras.Input((6, 6, 2))
    conv = L.Conv2D(2, 3, padding="same", name="shared")
    y = L.BatchNormalization(name="bn")(conv(i))
    model = randomize_bn(keras.Model(i, L.Add()([y, conv(i)])))
    assert "shared by several calls" in _skip_reason(model, rand(2, 6, 6, 2), run_pass)


def test_bn_without_a_kernel_before_it_is_not_folded(run_pass):
    i = keras.Input((6, 6, 2))
    model = randomize_bn(keras.Model(i, L.BatchNormalization(name="bn")(L.ReLU(name="r")(i))))
    assert "ReLU 'r', which has no kernel" in _skip_reason(model, rand(2, 6, 6, 2), run_pass)


def test_conv_output_used_twice_is_not_folded(run_pass):
    i = keras.Input((6, 6, 2))
    c = L.Conv2D(2, 3, padding="same", name="c")(i)
    model = randomize_bn(keras.Model(i, L.Add()([L.BatchNormalization()(c), c])))
    assert "also used elsewhere" in _skip_reason(model, rand(2, 6, 6, 2), run_pass)


def test_conv_with_activation_is_not_folded(run_pass):
    model = _conv_bn(L.Conv2D(3, 3, activation="relu", name="c"), (6, 6, 2))
    assert "separate_conv_act" in _skip_reason(model, rand(2, 6, 6, 2), run_pass)


def test_unfoldable_4d_bn_becomes_a_1x1_depthwise_conv(run_pass):
    i = keras.Input((6, 6, 3))
    model = randomize_bn(keras.Model(i, L.BatchNormalization(name="bn")(L.ReLU()(i))))
    new, report, rel = run_pass(convert_bn_to_dwconv, model, rand(4, 6, 6, 3))
    assert rel <= 1e-5
    dw = new.get_layer("bn")
    assert isinstance(dw, L.DepthwiseConv2D) and tuple(dw.kernel.shape) == (1, 1, 3, 1)
    assert report.of("convert_bn_to_dwconv", "changed")[0].detail == "BatchNormalization -> DepthwiseConv2D"


def test_unfoldable_2d_bn_becomes_scale_shift_and_round_trips(run_pass, tmp_path):
    i = keras.Input((5,))
    model = randomize_bn(keras.Model(i, L.BatchNormalization(name="bn", scale=False)(L.ReLU()(i))))
    x = rand(8, 5)
    new, _, rel = run_pass(convert_bn_to_dwconv, model, x)
    assert rel <= 1e-5 and isinstance(new.get_layer("bn"), ScaleShift)
    new.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert np.array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(new(x)))


def test_bn_on_a_non_channel_axis_is_not_folded_and_becomes_a_channels_first_1x1_depthwise(run_pass):
    """BatchNormalization(axis=1) after a channels_last conv normalizes rows, not the conv's channels: no fold.
    On axis 1 of a 4-D tensor it is still a per-index affine map there, a channels_first 1x1 depthwise."""
    i = keras.Input((6, 5, 3))
    model = randomize_bn(keras.Model(i, L.BatchNormalization(axis=1, name="bn")(L.Conv2D(3, 1, name="conv")(i))))
    x = rand(2, 6, 5, 3)
    assert (
        _skip_reason(model, x, run_pass)
        == "not folded: BatchNormalization axis 1 is not the channel axis (3) of 'conv'"
    )
    new, report, rel = run_pass(convert_bn_to_dwconv, model, x)
    assert rel <= 1e-5 and "BatchNormalization" not in types(new)
    dw = new.get_layer("bn")
    assert dw.data_format == "channels_first" and tuple(dw.kernel.shape) == (1, 1, 6, 1)


def test_bn_on_the_spatial_axis_of_a_channels_first_conv_is_not_folded(run_pass):
    i = keras.Input((3, 6, 5))
    conv = L.Conv2D(4, 1, data_format="channels_first", name="conv")(i)
    model = randomize_bn(keras.Model(i, L.BatchNormalization(axis=-1, name="bn")(conv)))
    reason = _skip_reason(model, rand(2, 3, 6, 5), run_pass)
    assert reason == "not folded: BatchNormalization axis -1 is not the channel axis (1) of channels_first 'conv'"


def test_a_channels_first_conv_as_wide_as_its_channels_folds_only_where_keras_adds_its_bias_there(run_pass):
    """Keras's TensorFlow add puts a (1, C, 1, 1) bias on the last axis when that axis has C entries too: the
    conv's output (6, 6, 6) here. Where it does, the fold would move the BN's shift there, so it is skipped."""
    model = _conv_bn(L.Conv2D(6, 3, data_format="channels_first", name="c"), (3, 8, 8), axis=1)
    new, report, rel = run_pass(fold_conv_bn, model, rand(4, 3, 8, 8))
    assert rel <= 1e-5, rel
    if keras_adds_channels_first_bias_last():
        assert "BatchNormalization" in types(new)
        (event,) = report.of("fold_conv_bn", "skipped")
        assert event.detail.startswith("not folded: 'c': Keras on this backend adds the bias of this channels_first")
    else:
        assert "BatchNormalization" not in types(new)


def test_a_channels_first_conv_of_unknown_width_folds_only_where_keras_adds_its_bias_on_the_channels(run_pass):
    """Keras picks the axis from the tensor it gets: on 8x8 images the conv writes (6, 6, 6)."""
    model = _conv_bn(L.Conv2D(6, 3, data_format="channels_first", name="c"), (3, None, None), axis=1)
    new, report, rel = run_pass(fold_conv_bn, model, rand(4, 3, 8, 8))
    assert rel <= 1e-5, rel
    folded = not report.of("fold_conv_bn", "skipped")
    assert folded != keras_adds_channels_first_bias_last()
    assert ("BatchNormalization" in types(new)) != folded


def test_bn_on_the_middle_axis_of_a_3d_tensor_stays(run_pass):
    i = keras.Input((4, 6))
    model = randomize_bn(keras.Model(i, L.BatchNormalization(axis=1, name="bn")(L.ReLU()(i))))
    new, report, rel = run_pass(convert_bn_to_dwconv, model, rand(2, 4, 6))
    assert rel == 0.0 and "BatchNormalization" in types(new)
    (event,) = report.of("convert_bn_to_dwconv", "skipped")
    assert event.detail == "axis 1 is neither the last axis nor the channel axis (1) of a 4-D tensor"
