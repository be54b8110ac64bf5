"""FakeQuant and QuantizeWrapper: exact bypass, twin-equal quantization, save/load, training."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat  # noqa: F401 - registers the layers for loading
from qstrat.errors import ConfigError
from qstrat.layers import FakeQuant, QuantizeWrapper, make_quantizer

pytestmark = pytest.mark.portable

POF2 = {"type": "Pof2SQuantizer", "params": {"bit_width": 8, "method": "Min_MSE", "round_mode": "HALF_UP"}}
FS_PC = {"type": "FSQuantizer", "params": {"bit_width": 4, "per_channel": True, "channel_axis": -1}}


def np_(t):
    return ops.convert_to_numpy(t)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def set_state(layer_state: dict, values: dict):
    for k, v in values.items():
        layer_state[k].assign(v)


def test_fake_quant_equals_its_quantizer_and_bypasses_exactly():
    x = rand(4, 10) * 3
    fq = FakeQuant(POF2, target="t/output", name="fq")
    fq.build(x.shape)
    q = make_quantizer(POF2)
    set_state(fq.state, q.state_from_tensor(x))
    assert np.array_equal(np_(fq(x)), q.reference(x, q.state_from_tensor(x)))
    fq.enabled.assign(0.0)
    assert np.array_equal(np_(fq(x)), x)


def test_fake_quant_config_round_trip():
    fq = FakeQuant(POF2, target="conv/output", name="fq")
    again = FakeQuant.from_config(fq.get_config())
    assert again.quantizer == fq.quantizer and again.target == "conv/output"


LAYERS = [
    (lambda: keras.layers.Conv2D(6, 3, padding="same", name="c"), (2, 8, 8, 3), {"kernel": FS_PC, "bias": POF2}),
    (lambda: keras.layers.DepthwiseConv2D(3, name="dw"), (2, 8, 8, 3), {"kernel": POF2}),
    (lambda: keras.layers.Conv2DTranspose(4, 3, name="ct"), (2, 5, 5, 3), {"kernel": POF2}),
    (lambda: keras.layers.Dense(5, activation="relu", name="d"), (3, 7), {"kernel": POF2, "bias": POF2}),
    (lambda: keras.layers.BatchNormalization(name="bn"), (3, 7), {"gamma": POF2, "beta": POF2}),
    (lambda: keras.layers.PReLU(name="pr"), (3, 7), {"alpha": POF2}),
]


@pytest.mark.parametrize("make,shape,targets", LAYERS)
def test_wrapper_bypass_is_the_float_layer_and_quantized_matches_twin(make, shape, targets):
    x = rand(*shape) * 2
    inner = make()
    ref = make()
    ref.build(shape)
    inner.build(shape)
    rng = np.random.default_rng(3)
    weights = [
        rng.normal(size=w.shape).astype("float32") * 0.3 + (1.0 if "variance" in w.path else 0.0) for w in inner.weights
    ]
    weights = [np.abs(w) if "variance" in v.path else w for w, v in zip(weights, inner.weights, strict=True)]
    inner.set_weights(weights)
    ref.set_weights(weights)
    w = QuantizeWrapper(inner, targets)
    w.build(shape)
    for attr in targets:
        var = getattr(inner, attr)
        set_state(w.state[attr], w.quantizers[attr].state_from_tensor(np_(var)))
    # Quantized: the same as the float layer with fake-quantized weights (computed by the twins).
    quantized = list(weights)
    for i, v in enumerate(inner.weights):
        attr = next((a for a in targets if getattr(inner, a) is v), None)
        if attr:
            q = w.quantizers[attr]
            quantized[i] = q.reference(weights[i], {k: np_(s) for k, s in w.state[attr].items()})
    ref.set_weights(quantized)
    assert np.allclose(np_(w(x)), np_(ref(x)), atol=1e-5)
    # Bypassed: exactly the float layer.
    for attr in targets:
        w.enabled[attr].assign(0.0)
    ref.set_weights(weights)
    assert np.array_equal(np_(w(x)), np_(ref(x)))


def test_wrapper_names_a_missing_weight():
    w = QuantizeWrapper(keras.layers.Dense(3, name="d"), {"depthwise_kernel": POF2})
    with pytest.raises(
        ConfigError,
        match=r'd\.depthwise_kernel: Dense has no weight named "depthwise_kernel"\. Its weights: kernel, bias',
    ):
        w.build((2, 4))


def test_quantized_model_saves_and_loads_with_identical_outputs(tmp_path):
    i = keras.Input((8, 8, 3))
    x = FakeQuant(POF2, name="in_q")(i)
    x = QuantizeWrapper(keras.layers.Conv2D(4, 3, name="c"), {"kernel": POF2, "bias": POF2})(x)
    x = FakeQuant(POF2, name="c_q")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    m = keras.Model(i, QuantizeWrapper(keras.layers.Dense(2, name="d"), {"kernel": FS_PC})(x))
    xs = rand(2, 8, 8, 3)
    for layer in m.layers:
        if isinstance(layer, FakeQuant):
            set_state(layer.state, {"pos": np.float32(4)})
        if isinstance(layer, QuantizeWrapper):
            for attr, q in layer.quantizers.items():
                set_state(layer.state[attr], q.state_from_tensor(np_(getattr(layer.layer, attr))))
    path = tmp_path / "q.keras"
    m.save(path)
    loaded = keras.models.load_model(path)
    assert np.array_equal(np_(m(xs)), np_(loaded(xs)))
    assert [type(layer).__name__ for layer in loaded.layers].count("QuantizeWrapper") == 2


def test_training_reaches_the_float_weights():
    i = keras.Input((6,))
    w = QuantizeWrapper(
        keras.layers.Dense(3, name="d"), {"kernel": {"type": "TQTQuantizer", "params": {"bit_width": 8}}}
    )
    m = keras.Model(i, FakeQuant({"type": "TQTQuantizer", "params": {"bit_width": 8}}, name="out_q")(w(i)))
    m.layers[-1].state["log_th"].assign(1.5)
    w.state["kernel"]["log_th"].assign(0.5)
    k0, t0 = np_(w.layer.kernel).copy(), float(np_(m.layers[-1].state["log_th"]))
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    m.fit(rand(16, 6), rand(16, 3, seed=1) * 4, epochs=2, verbose=0)
    assert not np.allclose(np_(w.layer.kernel), k0)  # straight-through to the float kernel
    assert float(np_(m.layers[-1].state["log_th"])) != t0  # TQT threshold trains


def test_recorded_corrections_add_up_and_survive_the_config_exactly():
    import json

    w = QuantizeWrapper(keras.layers.Dense(3, name="d"), {"kernel": POF2})
    first, second = np.array([0.1, -2.0, 1e-9]), np.array([0.2, 0.5, 3.0])
    w.record_correction("bias", first)
    w.record_correction("bias", second.astype("float32"))
    assert np.array_equal(w.corrections["bias"], first + second.astype("float32").astype(np.float64))
    config = json.loads(json.dumps(w.get_config()))  # plain JSON: lists of floats
    assert isinstance(config["corrections"]["bias"], list)
    back = QuantizeWrapper.from_config(config)
    assert np.array_equal(back.corrections["bias"], w.corrections["bias"])  # float64 through JSON, exactly


def _bn_model(wrapped: bool):
    i = keras.Input((5, 4))
    bn = keras.layers.BatchNormalization(axis=1, momentum=0.5, name="bn")  # on an axis no fold takes
    if wrapped:
        bn = QuantizeWrapper(bn, {"gamma": POF2, "beta": POF2})
    return keras.Model(i, bn(i))


def test_a_wrapped_batch_norm_updates_its_moving_statistics_in_training_as_the_float_one_does():
    x = rand(8, 5, 4) * 3 + 1
    float_model, q_model = _bn_model(False), _bn_model(True)
    wrapper = q_model.layers[-1]
    for attr, q in wrapper.quantizers.items():
        set_state(wrapper.state[attr], q.state_from_tensor(np_(getattr(wrapper.layer, attr))))
    before = [np_(v).copy() for v in wrapper.layer.non_trainable_variables]
    q_model(x, training=False)  # inference reads them, and leaves them
    assert all(np.array_equal(np_(v), b) for v, b in zip(wrapper.layer.non_trainable_variables, before, strict=True))
    for m in (float_model, q_model):
        m.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        m.fit(x, x, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for name in ("moving_mean", "moving_variance"):
        moved, expected = np_(getattr(wrapper.layer, name)), np_(getattr(float_model.layers[-1], name))
        assert not np.array_equal(moved, before[0 if name == "moving_mean" else 1])
        # The same statistics of the same batches, through the same update: up to the order of the sums.
        np.testing.assert_allclose(moved, expected, rtol=4 * np.finfo("float32").eps * x.size, atol=0)


@keras.saving.register_keras_serializable(package="qstrat_test")
class _Penalized(keras.layers.Dense):
    """A Dense whose call adds a loss: the mean of its outputs."""

    def call(self, inputs):
        out = super().call(inputs)
        self.add_loss(ops.mean(out))
        return out


def test_a_wrapped_layer_keeps_the_losses_its_call_and_its_activity_regularizer_add():
    x = rand(4, 6)
    reg = keras.regularizers.L1(0.1)
    dense = keras.layers.Dense(3, activation="relu", activity_regularizer=reg, kernel_regularizer="l2", name="d")
    w = QuantizeWrapper(dense, {"kernel": POF2})
    w.build(x.shape)
    set_state(w.state["kernel"], make_quantizer(POF2).state_from_tensor(np_(dense.kernel)))
    y = np_(w(x))
    kernel_q = np_(w.quantized_weight("kernel"))
    activity = 0.1 * np.abs(y).sum() / len(x)
    l2 = 0.01 * np.square(np_(dense.kernel)).sum()  # the float kernel's, as in the float model
    sums = np.finfo("float32").eps * np.prod(
        dense.kernel.shape
    )  # float32 sums of at most that many terms, in any order
    np.testing.assert_allclose(sorted(float(np_(v)) for v in w.losses), sorted([activity, l2]), rtol=sums)
    assert not np.array_equal(kernel_q, np_(dense.kernel))  # the output came from the quantized kernel
    again = QuantizeWrapper.from_config(w.get_config())
    assert "activity_regularizer" not in w.get_config()
    assert again.activity_regularizer.get_config() == reg.get_config()
    i = keras.Input((6,))
    p = QuantizeWrapper(_Penalized(2, name="p"), {"kernel": POF2})
    m = keras.Model(i, p(i))
    trainable, frozen = [v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables]
    _, _, losses = m.stateless_call(trainable, frozen, x, training=True, return_losses=True)
    assert len(losses) == 1  # once, within a stateless scope (JAX's training step) too
    out = np_(p(x))
    assert len(p.losses) == 1
    # A float32 mean of terms of both signs: off by at most n eps times the mean of their magnitudes.
    bound = np.finfo("float32").eps * out.size * np.abs(out).mean()
    np.testing.assert_allclose(float(np_(p.losses[0])), out.mean(), rtol=0, atol=bound)
