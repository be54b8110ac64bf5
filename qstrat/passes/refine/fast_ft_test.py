"""Fast finetune: each block's error goes down, the outputs' error never goes up, off is plain PTQ bit for bit."""

import warnings

import keras
import numpy as np
import pytest

import qstrat
from qstrat.passes.refine.fast_ft import Block, _unstrided
from qstrat.passes.refine.soft_round import Chain

pytestmark = pytest.mark.portable
L = keras.layers
FT = {"include_fast_ft": True, "fast_ft_epochs": 5, "fast_ft_batch_size": 16, "fast_ft_lr": 0.01}


def _model():
    """conv + BN + ReLU, depthwise, conv, a 1x1 stride-2 conv, dense: every kind of block."""
    rng = np.random.default_rng(1)
    keras.utils.set_random_seed(1)
    i = keras.Input((10, 10, 3))
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="c1")(i)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.ReLU(name="r2")(x)
    x = L.Conv2D(16, 3, padding="same", name="c2")(x)
    x = L.ReLU(name="r3")(x)
    x = L.Conv2D(12, 1, strides=2, name="down")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(i, L.Dense(5, name="fc")(x))
    bn = model.get_layer("bn1")
    bn.set_weights([w + rng.uniform(0.2, 1.0, w.shape).astype("float32") for w in bn.get_weights()])
    return model


@pytest.fixture
def few_steps(monkeypatch):
    """Epochs of 8 steps at least, not `fast_ft.MIN_STEPS`: for the tests of what holds whatever the training."""
    from qstrat.passes.refine import fast_ft

    monkeypatch.setattr(fast_ft, "MIN_STEPS", 8)


def _data(n=128, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 10, 10, 3)).astype("float32")


def _out(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model.predict(x, batch_size=32, verbose=0)), np.float64)


def _mse(a, b):
    return float(np.mean(np.square(a - b)))


def test_fast_finetune_lowers_each_block_error_and_the_output_error():
    model, x = _model(), _data()
    plain_ptq = {"weight_bit": 4, "include_bias_corr": False}
    plain = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, **plain_ptq)
    q = qstrat.Quantizer(model, "pof2s")
    tuned = q.quantize_model(x, verbose=0, **plain_ptq, **FT)
    result = q.fast_finetune
    assert [b.layer for b in result.blocks] == ["c1", "dw", "c2", "down", "fc"]
    assert result.samples == len(x) and result.inputs == "quantized" and not result.reverted
    for block in result.blocks:
        assert block.kept and block.mse_after < block.mse_before, block
        assert 2 <= block.epochs <= FT["fast_ft_epochs"]  # the warm-up, then at least one epoch
    # The outputs' error, measured here from the two models: lower than plain PTQ's.
    f = _out(model, x)
    assert _mse(_out(tuned, x), f) < _mse(_out(plain, x), f)
    assert _mse(_out(tuned, x), f) == pytest.approx(result.output_mse_after, rel=1e-3)
    # The first block reads the model input in both models: its own error, measured here, went down.
    probe = lambda m, name: _out(keras.Model(m.inputs, m.get_layer(name).output), x)  # noqa: E731
    folded = qstrat.Quantizer(model, "pof2s").optimize_model()
    want = probe(folded, "r1")
    assert _mse(probe(tuned, "r1"), want) < _mse(probe(plain, "r1"), want)
    assert _mse(probe(tuned, "r1"), want) == pytest.approx(result.blocks[0].mse_after, rel=1e-3)
    notes = q.report.layers["c1"].notes
    assert any(n.startswith("fast finetune: block MSE") for n in notes), notes


def test_weights_end_on_the_frozen_grid(few_steps):
    model, x = _model(), _data()
    q = qstrat.Quantizer(model, "pof2s")
    tuned = q.quantize_model(x, verbose=0, weight_bit=4, include_bias_corr=False, **FT)
    kept = [b.layer for b in q.fast_finetune.blocks if b.kept]
    assert kept
    for name in kept:  # a layer fast finetune changed holds grid values, which its quantizer leaves as they are
        wrapper = tuned.get_layer(f"quant_{name}")
        w = keras.ops.convert_to_numpy(wrapper.layer.kernel)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrapper.quantized_weight("kernel")), w)


def test_with_bias_correction_the_final_error_never_goes_up(few_steps):
    model, x = _model(), _data()
    plain = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    q = qstrat.Quantizer(model, "pof2s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a put-back warns
        tuned = q.quantize_model(x, verbose=0, **FT)
    f = _out(model, x)
    assert _mse(_out(tuned, x), f) <= _mse(_out(plain, x), f)
    if q.fast_finetune.reverted:  # put back: plain PTQ, bit for bit
        np.testing.assert_array_equal(_out(tuned, x), _out(plain, x))


def test_when_the_outputs_error_goes_up_every_block_is_put_back(monkeypatch):
    from qstrat.passes.refine import fast_ft

    def spoil(block, x, y, *args):  # a "finetuning" that doubles the kernel, and says it helped
        kernel = block.wrapper.layer.kernel
        kernel.assign(keras.ops.convert_to_numpy(kernel) * 2)
        return fast_ft.BlockResult(block.name, 1.0, 0.5, 1, True)

    model, x = _model(), _data()
    plain = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    monkeypatch.setattr(fast_ft, "_train", spoil)
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match="every layer was put back"):
        back = q.quantize_model(x, verbose=0, **FT)
    assert q.fast_finetune.reverted and q.fast_finetune.output_mse_after > q.fast_finetune.output_mse_before
    for a, b in zip(plain.weights, back.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_either_switched_off_is_plain_ptq_bit_for_bit():
    model, x = _model(), _data()
    plain = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the idle keys warn that they do nothing: that is the point here
        off = qstrat.Quantizer(model, "pof2s").quantize_model(
            x, verbose=0, include_fast_ft=False, fast_ft_epochs=3, fast_ft_lr=0.5, include_act_eq=False, act_eq_beta=0.9
        )
    for a, b in zip(plain.weights, off.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    np.testing.assert_array_equal(_out(plain, x), _out(off, x))


def test_the_result_is_the_same_on_every_run(few_steps):
    model, x = _model(), _data()
    q = qstrat.Quantizer(model, "pof2s")
    a = q.quantize_model(x, verbose=0, weight_bit=4, include_bias_corr=False, **FT)
    assert not q.fast_finetune.reverted
    b = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, weight_bit=4, include_bias_corr=False, **FT)
    np.testing.assert_array_equal(_out(a, x), _out(b, x))


def test_samples_are_capped_and_float_inputs_are_a_choice(few_steps):
    model, x = _model(), _data()
    q = qstrat.Quantizer(model, "fs")
    q.quantize_model(x, verbose=0, **FT, fast_ft_samples=40, fast_ft_input="float")
    result = q.fast_finetune
    assert result.samples == 40 and result.inputs == "float"
    assert [b.layer for b in result.blocks] == ["c1", "dw", "c2", "down", "fc"]  # fs keeps bn1: in c1's block
    assert all(b.mse_after <= b.mse_before for b in result.blocks)
    assert any(b.kept for b in result.blocks)


def test_a_generator_skips_fast_finetune_with_a_warning(few_steps):
    model, x = _model(), _data()
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match="fast finetune .* was skipped") as record:
        q.quantize_model((x[i : i + 32] for i in range(0, 96, 32)), verbose=0, include_bias_corr=False, **FT)
    assert q.fast_finetune is None
    assert [w.filename for w in record if "fast finetune" in str(w.message)] == [__file__]  # the user's call


def test_a_strided_1x1_conv_trains_at_stride_1_on_the_pixels_it_reads():
    i = keras.Input((9, 8, 4))
    conv = L.Conv2D(3, 1, strides=(2, 3), padding="same", name="s")
    model = keras.Model(i, conv(i))
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(
        np.random.default_rng(1).normal(size=(8, 9, 8, 4)).astype("float32"), verbose=0
    )
    wrapper = qmodel.get_layer("quant_s")
    block = Block("s", (wrapper,), None, None, None)
    x = np.random.default_rng(2).normal(size=(5, 9, 8, 4)).astype("float32")
    want = keras.ops.convert_to_numpy(Chain([wrapper], name="whole")(x))
    with _unstrided(block) as pick:
        assert wrapper.layer.strides == (1, 1)
        got = keras.ops.convert_to_numpy(Chain([wrapper], name="picked")(pick(x)))
    assert wrapper.layer.strides == (2, 3)
    np.testing.assert_array_equal(got, want)


def test_a_batch_as_large_as_the_samples_makes_the_result_independent_of_their_order(few_steps, monkeypatch):
    from qstrat.passes.refine import fast_ft

    model, x = _model(), _data()
    common = {**FT, "fast_ft_samples": 40, "weight_bit": 4, "include_bias_corr": False}  # 35 train, 5 held out

    def tuned(seed, batch):
        monkeypatch.setattr(fast_ft, "SEED", seed)
        q = qstrat.Quantizer(model, "pof2s")
        out = _out(q.quantize_model(x, verbose=0, **{**common, "fast_ft_batch_size": batch}), x)
        assert any(b.kept for b in q.fast_finetune.blocks)
        return out

    # Batches of 8: the shuffling seed picks them, and the result moves with it (so the seed is live here).
    assert not np.array_equal(tuned(0, 8), tuned(1, 8))
    # A batch size above the 35 training samples: every step takes them all, whatever the seed.
    np.testing.assert_array_equal(tuned(0, 64), tuned(1, 64))
