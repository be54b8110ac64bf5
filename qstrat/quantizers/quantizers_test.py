"""The quantizer classes: state from tensors and from observers, twins, registry, Keras state."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.calibration import make_observer
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.quantizers import (
    FSQuantizer,
    MAFSQuantizer,
    Pof2SQuantizer,
    Quantizer,
    TQTQuantizer,
    get_quantizer_class,
    register_quantizer,
    registered_quantizers,
    registry,
)
from qstrat.quantizers.grid import int_grid

pytestmark = pytest.mark.portable

METHODS = ["No_OF", "Min_MSE", "Min_KL", "Percentile"]


def np_(t):
    return ops.convert_to_numpy(t)


def data(shape=(32, 6, 6, 8), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(5, size=shape) * np.linspace(0.2, 3, shape[-1])).astype(np.float32)


CASES = [
    (Pof2SQuantizer, {}),
    (Pof2SQuantizer, {"per_channel": True}),
    (Pof2SQuantizer, {"symmetry": False}),
    (Pof2SQuantizer, {"unsigned": True}),
    (Pof2SQuantizer, {"narrow_range": True, "bit_width": 4, "round_mode": "HALF_AWAY_FROM_ZERO"}),
    (FSQuantizer, {"per_channel": False}),
    (FSQuantizer, {"per_channel": True, "symmetry": True}),
    (FSQuantizer, {"per_channel": True, "channel_axis": 0}),
    (MAFSQuantizer, {}),
    (MAFSQuantizer, {"symmetry": False, "per_channel": True}),
    (TQTQuantizer, {}),
    (TQTQuantizer, {"unsigned": True, "bit_width": 6}),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cls,kw", CASES)
def test_keras_call_equals_twin_for_calibrated_state(cls, kw, method):
    q = cls(method=method, **kw)
    x = data()
    if q.params.is_unsigned:
        x = np.abs(x)
    state = q.state_from_tensor(x)
    assert set(state) == set(q.state_spec(x.shape))
    for k, spec in q.state_spec(x.shape).items():
        assert np.shape(state[k]) == spec.shape
    y = np_(q(ops.convert_to_tensor(x), state))
    assert np.array_equal(y, q.reference(x, state))
    spec = q.observer_spec()
    obs = make_observer(spec)
    for part in np.array_split(x, 3, axis=1):  # batches along a non-channel axis
        obs.update(part)
    from_obs = q.state_from_stats(obs.result())
    assert set(from_obs) == set(state)
    for k in state:
        assert np.shape(from_obs[k]) == np.shape(state[k])


def test_pof2_state_is_an_integer_position_and_holds_the_data():
    x = data()
    q = Pof2SQuantizer(per_channel=True)
    pos = q.state_from_tensor(x)["pos"]
    assert np.array_equal(pos, np.round(pos)) and pos.shape == (8,)
    amax = np.abs(x).reshape(-1, 8).max(axis=0)
    assert np.all(127 * 2.0**-pos >= x.reshape(-1, 8).max(axis=0)) and np.all(128 * 2.0**-pos >= amax)


def test_tqt_calibration_gives_the_pof2_position():
    x = data()
    for method in METHODS:
        p = Pof2SQuantizer(method=method)
        t = TQTQuantizer(method=method)
        pos = p.state_from_tensor(x)["pos"]
        st = t.state_from_tensor(x)
        assert t.position(st) == pos
        assert np.array_equal(np_(t(ops.convert_to_tensor(x), st)), np_(p(ops.convert_to_tensor(x), {"pos": pos})))
        assert t.describe(st)["quantize_pos"] == int(pos)


def test_float_scale_min_mse_is_not_min_max():
    x = np.r_[np.random.default_rng(1).normal(size=20000), [40.0, -35.0]].astype(np.float32)
    mm = FSQuantizer(per_channel=False, bit_width=4).state_from_tensor(x)
    mse = FSQuantizer(per_channel=False, bit_width=4, method="Min_MSE").state_from_tensor(x)
    assert mse["scale"] < 0.5 * mm["scale"]


def test_mafs_observer_is_a_moving_average():
    q = MAFSQuantizer(ema_decay=0.5)
    obs = make_observer(q.observer_spec())
    obs.update(np.array([-1.0, 1.0], np.float32))
    obs.update(np.array([-3.0, 3.0], np.float32))
    stats = obs.result()
    # biased: 0.5*(0.5*1) + 0.5*3 = 1.75, debiased by 1 - 0.25
    assert float(stats.max) == pytest.approx(1.75 / 0.75)
    assert float(q.state_from_stats(stats)["scale"]) == pytest.approx((1.75 / 0.75) / 127)


def test_batch_vote_policy_takes_the_most_common_position():
    q = Pof2SQuantizer(method="No_OF")
    obs = make_observer(q.observer_spec("batch_vote"))
    for amax in (1.0, 1.0, 4.0, 0.9, 1.0):  # positions 7, 7, 5, 7, 7
        obs.update(np.array([-amax, amax / 2], np.float32))
    assert int(q.state_from_stats(obs.result())["pos"]) == 7
    with pytest.raises(UnsupportedError, match="asymmetric"):
        Pof2SQuantizer(symmetry=False).observer_spec("batch_vote")
    with pytest.raises(ConfigError, match='position_policy: expected one of "global", "batch_vote"'):
        q.observer_spec("majority")


def test_float_formats_need_no_calibration():
    x = data()
    q = FSQuantizer(data_format="FP16", bit_width=16)
    assert q.state_from_tensor(x) == {} and q.observer_spec() is None
    assert np.array_equal(np_(q(ops.convert_to_tensor(x), {})), x.astype(np.float16).astype(np.float32))


def test_build_creates_layer_weights():
    layer = keras.layers.Layer()
    q = Pof2SQuantizer(per_channel=True, symmetry=False)
    v = q.build(layer, (None, 4, 4, 8), "kernel")
    assert set(v) == {"pos", "zero_point"} and tuple(v["pos"].shape) == (8,)
    assert not v["pos"].trainable and len(layer.non_trainable_weights) == 2
    t = TQTQuantizer().build(layer, (None, 8), "out")
    assert t["log_th"].trainable and tuple(t["log_th"].shape) == ()
    x = data((4, 8))
    y = np_(TQTQuantizer()(ops.convert_to_tensor(x), t))  # variables work as state
    assert y.shape == x.shape


def test_channel_axis_must_exist():
    with pytest.raises(ConfigError, match=r"channel_axis 3 does not exist in a tensor of shape \(4, 8\)"):
        Pof2SQuantizer(per_channel=True, channel_axis=3).state_spec((4, 8))


def test_describe_reports_parameters_and_state():
    q = Pof2SQuantizer(bit_width=6, round_mode="HALF_UP")
    info = q.describe(q.state_from_tensor(data()))
    assert info["quantizer"] == "Pof2SQuantizer" and info["bit_width"] == 6 and info["round_mode"] == "HALF_UP"
    assert isinstance(info["pos"], float)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Classes a test registers leave the registry when it ends."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_registry_lookup_and_custom_quantizers(scratch_registry):
    assert get_quantizer_class("Pof2SQuantizer") is Pof2SQuantizer
    with pytest.raises(ConfigError, match='Did you mean "FSQuantizer"'):
        get_quantizer_class("FsQuantizer")
    with pytest.raises(ConfigError, match="must be registered with qstrat.register_quantizer"):
        get_quantizer_class("NoSuchQuantizer")

    @register_quantizer(name="TernaryTestQuantizer")
    class Ternary(Quantizer):
        accepted = ("bit_width",)

        def state_spec(self, shape):
            return {}

        def __call__(self, x, state, training=False):
            return ops.sign(x)

        def state_from_tensor(self, tensor):
            return {}

        def state_from_stats(self, stats):
            return {}

    assert get_quantizer_class("TernaryTestQuantizer") is Ternary
    assert Ternary().get_config() == {"bit_width": 8}
    with pytest.raises(ConfigError, match="already registered"):
        register_quantizer(name="TernaryTestQuantizer")(type("Other", (Ternary,), {}))
    with pytest.raises(ConfigError, match="not a Quantizer subclass"):
        register_quantizer(name="Bogus")(int)


def _unregistered(name):
    """Registering ``name`` must fail: it must not be in the registry afterwards."""
    assert name not in registered_quantizers()


def test_registration_refuses_a_class_missing_required_methods(scratch_registry):
    class Half(Quantizer):
        def state_spec(self, shape):
            return {}

        def __call__(self, x, state, training=False):
            return ops.multiply(x, 0.5)

    with pytest.raises(ConfigError) as err:
        register_quantizer(name="HalfMissingTest")(Half)
    msg = str(err.value)
    assert msg.startswith("register_quantizer(HalfMissingTest): Half does not define state_from_tensor and ")
    assert "state_from_stats, which every quantizer must" in msg
    assert "calibrates weight and bias targets" in msg  # what each missing method is for
    assert "calibrates activation and model-input targets" in msg
    assert "state_spec(" not in msg and "__call__(" not in msg  # only the missing ones are listed
    _unregistered("HalfMissingTest")

    with pytest.raises(
        ConfigError, match=r"does not define state_spec, __call__, state_from_tensor and state_from_stats"
    ):
        register_quantizer(type("Empty", (Quantizer,), {}))
    _unregistered("Empty")


def test_registration_refuses_methods_qstrat_cannot_call(scratch_registry):
    def make(**methods):
        base = {
            "state_spec": lambda self, shape: {},
            "__call__": lambda self, x, state, training=False: x,
            "state_from_tensor": lambda self, tensor: {},
            "state_from_stats": lambda self, stats: {},
        }
        return type("Custom", (Quantizer,), {**base, **methods})

    with pytest.raises(
        ConfigError, match=r"Custom.__call__\(x, state\) cannot be called as __call__\(x, state, training=False\)"
    ):
        register_quantizer(name="NoTrainingArgTest")(make(__call__=lambda self, x, state: x))
    with pytest.raises(ConfigError, match=r"observer_spec\(\) cannot be called as observer_spec\(policy\)"):
        register_quantizer(name="NoPolicyArgTest")(make(observer_spec=lambda self: None))
    with pytest.raises(ConfigError, match="defines __init__, which qstrat does not call"):
        register_quantizer(name="InitTest")(make(__init__=lambda self, **p: None))
    with pytest.raises(ConfigError, match=r"accepted: .*got bit_widht, .*Did you mean \"bit_width\"\?"):
        register_quantizer(name="TypoTest")(make(accepted=("bit_widht",)))
    with pytest.raises(ConfigError, match=r"defaults: defaults set per_channel, which the class does not accept"):
        register_quantizer(name="StrayDefaultTest")(make(accepted=("bit_width",), defaults={"per_channel": True}))
    with pytest.raises(ConfigError, match=r"defaults.bit_width: expected an integer in \[1, \d+\], got 0"):
        register_quantizer(name="BadDefaultTest")(make(accepted=("bit_width",), defaults={"bit_width": 0}))
    for name in ("NoTrainingArgTest", "NoPolicyArgTest", "InitTest", "TypoTest", "StrayDefaultTest", "BadDefaultTest"):
        _unregistered(name)
    # Extra optional arguments are fine, and so is a complete class.
    ok = make(__call__=lambda self, x, state, training=False, extra=None: x)
    assert register_quantizer(name="CompleteTest")(ok) is ok and get_quantizer_class("CompleteTest") is ok


def test_an_unregistered_incomplete_subclass_says_what_is_missing_when_used():
    class Bare(Quantizer):
        pass

    q = Bare()
    with pytest.raises(UnsupportedError, match="Bare does not define state_from_stats; every quantizer must"):
        q.state_from_stats(None)
    with pytest.raises(UnsupportedError, match="no NumPy twin"):
        q.reference(np.zeros(2), {})


def test_unsigned_grid_clips_negatives_to_zero():
    q = Pof2SQuantizer(unsigned=True)
    x = np.array([-1.0, 0.3, 2.0], np.float32)
    y = np_(q(ops.convert_to_tensor(x), q.state_from_tensor(np.abs(x))))
    assert y[0] == 0.0 and y.min() >= 0 and q.grid == int_grid(8, unsigned=True)
