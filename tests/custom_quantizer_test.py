"""A user's quantizer end to end: registered, named in a strategy, calibrated, saved and loaded back.

The quantizer here is written the way the README's "Custom quantizers"
section says, using only the public protocol; the README's own example is
run as written too, so the docs cannot drift from the code.
"""

import pathlib
import re

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import ConfigError, QstratError
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.quantizers import RangeStats, StateSpec, registry
from qstrat.zoo import digits

pytestmark = pytest.mark.portable

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "AbsMaxTestQuantizer"


class AbsMaxTestQuantizer(qstrat.BaseQuantizer):
    """scale = max|x| / qmax, per tensor or per channel; rounds half to even, clipped straight-through gradient."""

    accepted = ("bit_width", "per_channel", "channel_axis")

    def state_spec(self, shape):
        return {"scale": StateSpec(self.channels(shape), 1.0)}

    def __call__(self, x, state, training=False):
        scale = ops.convert_to_tensor(state["scale"])
        if self.axis is not None:
            shape = [1] * len(x.shape)
            shape[self.axis] = -1
            scale = ops.reshape(scale, shape)
        u = x * (1.0 / scale)
        u = u + ops.stop_gradient(ops.round(u) - u)
        return ops.clip(u, self.grid.qmin, self.grid.qmax) * scale

    def _state(self, amax):
        return {"scale": (np.maximum(amax, 1e-8) / self.grid.qmax).astype(np.float32)}

    def state_from_tensor(self, tensor):
        t = np.abs(np.asarray(tensor, np.float64))
        if self.axis is None:
            return self._state(t.max())
        return self._state(np.moveaxis(t, self.axis, 0).reshape(t.shape[self.axis], -1).max(axis=1))

    def state_from_stats(self, stats):
        if not isinstance(stats, RangeStats):  # the default observer_spec for a class without "method"
            raise TypeError(f"expected RangeStats, got {type(stats).__name__}")
        return self._state(np.maximum(-np.asarray(stats.min, np.float64), np.asarray(stats.max, np.float64)))


def absmax(**params):
    return {"type": NAME, "params": params}


# Over pof2s (BN folding, CLE, bias correction stay on): the model input, every
# conv/dense weight, bias and output and every activation get the custom quantizer.
STRATEGY = {
    "quantize_registry_config": {
        "input_quantize_config": {"input_layers": [], "quantizer_config": absmax(bit_width=8)},
        "layer_quantize_config": [
            {
                "pattern_name": "conv_dense",
                "layer_type": "Conv2D|Dense",
                "quant_config": [
                    {
                        "target_name": "kernel",
                        "target_type": "weight",
                        "quantizer_config": absmax(bit_width=6, per_channel=True, channel_axis=-1),
                    },
                    {"target_name": "bias", "target_type": "bias", "quantizer_config": absmax(bit_width=8)},
                    {"target_name": "output", "target_type": "output", "quantizer_config": absmax(bit_width=8)},
                ],
            },
            {
                "pattern_name": "activation",
                "layer_type": "Activation|ReLU|LeakyReLU",
                "quant_config": [
                    {"target_name": "output", "target_type": "output", "quantizer_config": absmax(bit_width=8)}
                ],
            },
        ],
    }
}


def float_model():
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1), name="digit")
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(i)
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    return keras.Model(i, keras.layers.Dense(10, name="head")(h))


def quantizer_layers(model):
    """{layer name: {key: (quantizer, {state key: array})}} for every quantizer of a quantized model."""
    out = {}
    for layer in model.layers:
        if isinstance(layer, FakeQuant):
            out[layer.name] = {"": (layer.quantizer, _arrays(layer.state))}
        elif isinstance(layer, QuantizeWrapper):
            out[layer.name] = {k: (q, _arrays(layer.state[k])) for k, q in layer.quantizers.items()}
    return out


def _arrays(state):
    return {k: ops.convert_to_numpy(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The float model, its quantized copy (calibrated on real digits) and the saved file."""
    saved_registry = dict(registry._REGISTRY)
    try:
        qstrat.register_quantizer(name=NAME)(AbsMaxTestQuantizer)
        images = digits()[0]
        model = float_model()
        q = qstrat.Quantizer(model, "pof2s", custom_quantize_strategy=STRATEGY)
        qmodel = q.quantize_model(images[:256], calib_batch_size=32, verbose=0)
        path = tmp_path_factory.mktemp("custom") / "custom.keras"
        qmodel.save(path)
        yield {"q": q, "model": model, "qmodel": qmodel, "path": path, "images": images}
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved_registry)


def test_every_quantizer_is_the_custom_one(quantized):
    layers = quantizer_layers(quantized["qmodel"])
    fq_targets = {layer.target for layer in quantized["qmodel"].layers if isinstance(layer, FakeQuant)}
    assert fq_targets == {"digit/output", "conv1_relu/output", "conv2_relu/output", "head/output"}
    wrapped = {name: set(qs) for name, qs in layers.items() if name.startswith("quant_")}
    assert wrapped == {n: {"kernel", "bias"} for n in ("quant_conv1", "quant_conv2", "quant_head")}
    assert {type(q) for qs in layers.values() for q, _ in qs.values()} == {AbsMaxTestQuantizer}
    assert quantized["q"].bias_corrections  # bias correction ran, and re-calibrated the biases below


def test_weight_state_comes_from_the_weights(quantized):
    for layer in quantized["qmodel"].layers:
        if not isinstance(layer, QuantizeWrapper):
            continue
        kernel = ops.convert_to_numpy(layer.layer.kernel).astype(np.float64)
        per_out_channel = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(layer.state["kernel"]["scale"]), (per_out_channel / 31).astype(np.float32)
        )
        bias = ops.convert_to_numpy(layer.layer.bias).astype(np.float64)  # as corrected by bias correction
        assert np.abs(bias).max() > 0
        assert ops.convert_to_numpy(layer.state["bias"]["scale"]) == np.float32(np.abs(bias).max() / 127)


def test_activation_state_comes_from_the_calibration_data(quantized):
    # Calibration observes the optimized float model (CLE applied, biases not yet corrected).
    fmodel = quantized["q"].optimize_model()
    fqs = [layer for layer in quantized["qmodel"].layers if isinstance(layer, FakeQuant)]
    owners = [fq.target.split("/")[0] for fq in fqs]
    probe = keras.Model(fmodel.inputs, [fmodel.get_layer(name).output for name in owners])
    seen = probe.predict(quantized["images"][:256], verbose=0)
    for fq, values in zip(fqs, seen, strict=True):
        expected = np.abs(values).max() / 127
        got = float(ops.convert_to_numpy(fq.state["scale"]))
        assert got != 1.0  # calibrated: not the StateSpec initial value
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=fq.target)


def test_quantized_outputs_are_close_to_float_but_not_equal(quantized):
    x = quantized["images"]
    f = quantized["model"].predict(x, verbose=0)
    y = quantized["qmodel"].predict(x, verbose=0)
    assert not np.array_equal(f, y)
    sqnr_db = 10 * np.log10(np.sum(f.astype(np.float64) ** 2) / np.sum((f.astype(np.float64) - y) ** 2))
    assert sqnr_db > 20, sqnr_db


def test_saved_and_loaded_bit_for_bit_with_the_same_state(quantized):
    qmodel, images = quantized["qmodel"], quantized["images"]
    restored = qstrat.load_model(quantized["path"])
    before, after = quantizer_layers(qmodel), quantizer_layers(restored)
    assert set(after) == set(before)
    for name, targets in before.items():
        assert set(after[name]) == set(targets)
        for key, (q, state) in targets.items():
            q2, state2 = after[name][key]
            assert type(q2) is AbsMaxTestQuantizer and q2 == q and q2.get_config() == q.get_config()
            assert set(state2) == set(state) == {"scale"}
            for k in state:
                np.testing.assert_array_equal(state2[k], state[k], err_msg=f"{name}.{key}.{k}")
                assert state2[k].dtype == state[k].dtype
    assert qstrat.get_quantize_info(restored) == qstrat.get_quantize_info(qmodel)
    np.testing.assert_array_equal(restored.predict(images, verbose=0), qmodel.predict(images, verbose=0))


def test_loading_without_the_class_registered_fails_clearly(quantized, monkeypatch):
    monkeypatch.delitem(registry._REGISTRY, NAME)
    with pytest.raises(QstratError, match=f'got "{NAME}".*must be registered with qstrat.register_quantizer first'):
        qstrat.load_model(quantized["path"])


@pytest.fixture
def scratch_registry(monkeypatch):
    """Classes a test registers leave the registry when it ends."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Custom quantizers\n", 1)[1].split("\n## ", 1)[0]


def test_an_incomplete_class_is_refused_with_the_readme_message(scratch_registry):
    class HalfQuantizer(qstrat.BaseQuantizer):
        def state_spec(self, shape):
            return {}

        def __call__(self, x, state, training=False):
            return ops.multiply(x, 0.5)

    with pytest.raises(ConfigError) as err:
        qstrat.register_quantizer(HalfQuantizer)
    message = f"ConfigError: {err.value}"
    assert "does not define state_from_tensor and state_from_stats, which every quantizer must" in message
    assert message in re.findall(r"```\n(ConfigError: .*?)\n```", readme_section(), re.S)
    # Refused at registration, so a strategy naming it fails when it is loaded, before any model work.
    strategy = {"quantize_registry_config": {"input_quantize_config": {"quantizer_config": {"type": "HalfQuantizer"}}}}
    with pytest.raises(ConfigError, match=r'got "HalfQuantizer".*must be registered with qstrat.register_quantizer'):
        qstrat.Quantizer(float_model(), "pof2s", custom_quantize_strategy=strategy)


def test_readme_example_runs_as_written(scratch_registry, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", readme_section(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md (Custom quantizers)", "exec"), ns)

    printed = capsys.readouterr().out.split()
    assert printed[-1] == "True" and ns["same"] is True
    assert (tmp_path / "digits_absmax.keras").exists()
    cls, qmodel, restored = ns["AbsMaxQuantizer"], ns["qmodel"], ns["restored"]
    assert qstrat.quantizers.get_quantizer_class("AbsMaxQuantizer") is cls
    before, after = quantizer_layers(qmodel), quantizer_layers(restored)
    fq_targets = {layer.target for layer in qmodel.layers if isinstance(layer, FakeQuant)}
    assert fq_targets == {f"{ns['model'].layers[0].name}/output", "conv/output", "head/output"}
    assert {layer.layer.name for layer in qmodel.layers if isinstance(layer, QuantizeWrapper)} == {"conv", "head"}
    assert set(qmodel.get_layer("quant_conv").quantizers) == {"kernel", "bias"}
    for name, targets in before.items():
        for key, (q, state) in targets.items():
            assert type(q) is cls and type(after[name][key][0]) is cls
            np.testing.assert_array_equal(after[name][key][1]["scale"], state["scale"])
    head = qmodel.get_layer("quant_head")
    kernel = ops.convert_to_numpy(head.layer.kernel)
    assert float(printed[0]) == pytest.approx(np.abs(kernel).max() / 7, rel=1e-6)  # the example's comment
