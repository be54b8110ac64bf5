"""No silent key: every key of every built-in strategy acts, warns, or is listed here with the reason.

For each built-in strategy and each key (pipeline keys and the keys of
``user_defined_quantize_config``), the key is set to another valid value and
the model is quantized again. The key acts when that changes the quantized
model's outputs, its quantize info, the quantize report or the optimize
report. Otherwise it must be listed:

- `INERT_KEYS`: does not act yet; setting it warns (`qstrat.PendingKeyWarning`)
  and changes nothing. The later issues (DPU fidelity, export, QAT, refine)
  shrink the list; the goal is an empty one.
- `NOT_APPLICABLE`: the strategy has nothing for it to act on; setting it
  warns that it does nothing.
- `REFUSED`: the strategy's quantizers accept one value only; another is a
  ConfigError naming the parameter.
"""

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat.errors import ConfigError
from qstrat.passes.refine import fast_ft
from qstrat.passes.refine.constraints import RULES
from qstrat.strategy import load_strategy
from qstrat.strategy.keys import SECTIONS
from qstrat.strategy.user_keys import HANDY_FAMILIES, HANDY_KEYS, HANDY_SUFFIXES

_DPU = "the DPU softmax and LayerNormalization units are not described precisely enough to simulate bit for bit"

# key -> why it does not act yet. Each must warn when set (keys.py `pending`), except
# quantize_with_xcompiler, which accepts only false: its true would need the Vitis AI
# compiler, which does not exist here, and is refused with an error that says so.
INERT_KEYS = {
    "convert_softmax_to_dpu_version": _DPU,
    "convert_layernorm_to_dpu_version": _DPU,
    "quantize_with_xcompiler": "needs the external Vitis AI compiler, which qstrat does not call: false only",
}

# Keys of quantization-aware training: they act in get_qat_model (and the model it trains), and
# quantize_model (PTQ) warns that they do nothing there.
QAT_KEYS = {
    "train_with_bn": "fake folding of each conv that absorbed a BatchNormalization",
    "freeze_bn_delay": "training steps before the fake-folded statistics freeze",
}

# (strategy, key) -> why this model never violates the constraint the key enforces, so the key acts and
# changes nothing here; qstrat/passes/refine/positions_test.py shows each rule moving a violated position.
_SWISH = (
    "a calibrated swish's shift (input position + hard-sigmoid position - output position) is the hard "
    "sigmoid's output position less about one bit, which adjust_dpu_sigmoid keeps at 7 or more: inside [0, 15]"
)
NOT_VIOLATED = {
    ("pof2s", "adjust_dpu_shift_swish"): _SWISH,
    ("tqt", "adjust_dpu_shift_swish"): _SWISH,
    ("tqt", "align_pool"): (
        "tqt calibrates No_OF positions; a pooling output's range is never wider than its input's, and this "
        "model's averages keep the maximum within a factor of 2, so input and output positions are equal"
    ),
}

# (strategy, key) -> why the key cannot act in that strategy: it configures something the strategy does not
# have. Setting it changes nothing and warns that it does nothing.
_FS_NO_OUTPUTS = "fs quantizes layer inputs and weights only: no output quantizer to fuse or to set"
_NO_TQT = "no TQT quantizer to convert"
NOT_APPLICABLE = {
    ("fs", "calib_position_policy"): "fs has no power-of-2 quantizers, whose positions this policy calibrates",
    ("fs", "convert_to_fs_quantize_strategy"): "fs's quantizers are float-scale already",
    ("fs", "convert_to_pof2s_quantize_strategy"): _NO_TQT,
    ("pof2s", "convert_to_pof2s_quantize_strategy"): _NO_TQT,
    ("fs", "no_quant_in_conv_bn_act"): _FS_NO_OUTPUTS,
    ("fs", "no_quant_in_conv_act"): _FS_NO_OUTPUTS,
    ("fs", "no_quant_in_add_act"): _FS_NO_OUTPUTS,
    **{("fs", f"activation_{suffix}"): _FS_NO_OUTPUTS for suffix in HANDY_SUFFIXES},
    **{
        ("fs", rule): "fs has no power-of-2 quantizers, whose positions the DPU compiler constraints adjust"
        for rule in RULES
    },
    **{
        ("fs", f"bias_{suffix}"): "fs leaves biases in float (the runtime adds them in int32)"
        for suffix in HANDY_SUFFIXES
    },
}

# (strategy, key) -> why the test's other value is refused with a ConfigError (which must name the parameter):
# the strategy's quantizers accept only one value of it.
REFUSED = {
    ("fs", "input_round_mode"): "fs's framework quantizers (TensorFlow's FakeQuant op) round HALF_UP only",
    ("fs", "weight_round_mode"): "fs's framework quantizers (TensorFlow's FakeQuant op) round HALF_UP only",
    ("fs", "export_rounding"): "fs's framework quantizers (TensorFlow's FakeQuant op) round HALF_UP only",
    **{("tqt", f"{fam}_symmetry"): "TQT thresholds are symmetric" for fam in ("weight", "bias", "activation")},
    **{
        ("tqt", f"{fam}_per_channel"): "TQT learns one threshold per tensor" for fam in ("weight", "bias", "activation")
    },
}

# Where output_format writes: a folder of its own, never the working directory.
OUT = tempfile.mkdtemp(prefix="qstrat-keys-")
atexit.register(shutil.rmtree, OUT, True)

# Keys that act only with others set: the others are set in both runs. Bias correction is off
# (it would only make each run slower) except where its own key is tried.
_CLE = {"include_cle": True, "fold_conv_bn": True, "separable_conv": True}
CONTEXT = {
    "cle_to_relu6": {**_CLE, "convert_relu6_to_relu": False},
    "cle_steps": _CLE,
    "cle_balance_method": _CLE,
    "cle_weight_threshold": _CLE,
    "cle_bias_absorption": _CLE,
    "include_act_eq": _CLE,
    "act_eq_beta": {**_CLE, "include_act_eq": True},
    "no_quant_in_conv_bn_act": {"fold_conv_bn": False, "convert_bn_to_dwconv": False},
    "include_fast_ft": {"fast_ft_epochs": 1},  # one epoch: enough to tell, and faster
    "fast_ft_epochs": {"include_fast_ft": True},
    **{
        k: {"include_fast_ft": True, "fast_ft_epochs": 1}
        for k in ("fast_ft_lr", "fast_ft_batch_size", "fast_ft_samples", "fast_ft_input")
    },
    "freeze_bn_delay": {"train_with_bn": True},
    "output_format": {"output_dir": os.path.join(OUT, "format")},
    "onnx_opset_version": {"output_format": "onnx", "output_dir": os.path.join(OUT, "opset")},
    "output_dir": {"output_format": "onnx", "output_dir": os.path.join(OUT, "dir")},
    **{
        f"{fam}_method_percentile": {f"{fam}_method": "Percentile"} for fam in ("input", "weight", "bias", "activation")
    },
}

PARTITION_VALUES = {
    "input_layers": ["conv_act"],
    "output_layers": ["add_relu"],
    "ignore_layers": ["conv_act"],
    "layer_config": {"conv_act": "int16"},
}
HANDY_VALUES = {
    "bit": 4,
    "method": "Percentile",
    "method_percentile": 60.0,
    "round_mode": "FLOOR",
    "narrow_range": True,
}


def model():
    """Every layer kind the keys touch: separable conv, ReLU6 between convs, conv with activation,
    conv + BN + ReLU + 1x1 conv (CLE with bias absorption), Add + ReLU, a BN that cannot fold,
    a keras.ops op, Dropout, a submodel output nothing uses, and the layers with DPU versions."""
    keras.utils.set_random_seed(3)
    j = keras.Input((12, 12, 3))
    used = L.SeparableConv2D(8, 3, padding="same", name="sep")(j)
    dead = L.Conv2D(2, 1, name="dead")(j)
    stem = keras.Model(j, [used, dead], name="stem")
    i = keras.Input((12, 12, 3), name="image")
    x = L.ReLU(6.0, name="relu6")(stem(i)[0])
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv_act")(x)
    y = L.Conv2D(8, 1, name="conv_bn")(x)
    y = L.BatchNormalization(name="bn")(y)
    y = L.ReLU(name="relu")(y)
    y = L.Conv2D(8, 1, name="tail")(y)
    y = L.Conv2D(8, 1, name="tail2")(L.ReLU(name="tail_relu")(y))  # a chain of two CLE pairs: steps matter
    z = L.ReLU(name="add_relu")(L.Add(name="merge")([x, y]))
    z = L.BatchNormalization(name="lone_bn")(z)
    z = keras.ops.multiply(z, 0.5)
    gate = L.Conv2D(8, 1, activation="sigmoid", name="gate")(z)  # DPU versions: sigmoid, the hard-sigmoid
    hard = L.ReLU(6.0, name="hs_relu")(z + 3.0) / 6.0  # pattern, LeakyReLU 0.1, AveragePooling2D
    leaky = L.LeakyReLU(0.1, name="leaky")(L.Conv2D(8, 1, name="leaky_conv")(hard))
    z = L.Add(name="mix")([gate, hard, leaky])
    z = L.AveragePooling2D(3, strides=1, name="avg")(z)
    # Branches of small values, whose positions sit far from the rest: the DPU position constraints
    # (sigmoid input, Add read shift, Multiply write shift, shift_cut, concat and pool alignment) have work to do.
    tiny = L.Conv2D(8, 1, name="tiny")(z)
    parts = [
        L.Activation("sigmoid", name="small_gate")(L.Conv2D(8, 1, name="small")(z)),
        L.Add(name="tiny_sum")([L.Multiply(name="tiny_times")([tiny, z]), tiny]),
        L.Add(name="tiny_add")([tiny, z]),
        L.Activation("swish", name="swish")(z),
    ]
    z = L.Concatenate(name="cat")(parts)
    z = L.DepthwiseConv2D(1, name="cut")(z)  # large weights on small channels: shift_cut below 0
    z = L.AveragePooling2D(4, name="pool")(z)
    z = L.Dropout(0.25, name="drop")(L.GlobalAveragePooling2D(name="gap")(z))
    net = keras.Model(i, L.Dense(4, name="head")(z))
    rng = np.random.default_rng(0)
    for name in ("bn", "lone_bn"):  # BN statistics away from the identity, so folding is visible
        bn = net.get_layer(name)
        bn.set_weights([rng.uniform(0.5, 2.0, 8), rng.uniform(-1, 1, 8), rng.uniform(-1, 1, 8), rng.uniform(0.5, 2, 8)])
    for name, scale in (("tiny", 1e-6), ("small", 1e-5)):
        kernel, bias = net.get_layer(name).get_weights()
        net.get_layer(name).set_weights([kernel * scale, bias])
    kernel, bias = net.get_layer("cut").get_weights()
    net.get_layer("cut").set_weights([np.repeat([1e-3, 1.0, 1e-3, 1e-3], 8).reshape(kernel.shape), bias])
    # bn's outputs sit well above 0 (beta - 3 gamma > 0), so bias absorption has offsets to move into tail.
    gamma, _, mean, var = net.get_layer("bn").get_weights()
    net.get_layer("bn").set_weights([gamma * 0.1, rng.uniform(1.0, 2.0, 8), mean, var])
    return net


def ft_model():
    """For the fast finetune keys: three blocks (conv + BN + ReLU, depthwise, dense) where `model` has thirteen.
    Fast finetune's cost is mostly per block, and its keys act the same on any block."""
    keras.utils.set_random_seed(4)
    i = keras.Input((12, 12, 3), name="image")
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(L.Conv2D(8, 3, padding="same", name="conv")(i)))
    x = L.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)
    return keras.Model(i, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)), name="ft_model")


FT_KEYS = ("include_fast_ft", "fast_ft_epochs", "fast_ft_lr", "fast_ft_batch_size", "fast_ft_samples", "fast_ft_input")
MODEL = None
FT_MODEL = None
_BASES: dict = {}
# Four batches of 8; the first spans a 4x wider range, so a vote over batches and one search over all differ.
DATA = (
    np.random.default_rng(1).uniform(-1, 1, (32, 12, 12, 3)) * np.repeat([4.0, 1, 1, 1], 8)[:, None, None, None]
).astype("float32")
STRATEGIES = ("pof2s", "fs", "tqt")  # the built-ins; the other names are aliases of these


def net_for(key: str):
    """The model a key's case quantizes: `ft_model` for the fast finetune keys, else `model`."""
    global MODEL, FT_MODEL
    if key in FT_KEYS:
        FT_MODEL = FT_MODEL or ft_model()
        return FT_MODEL
    MODEL = MODEL or model()
    return MODEL


def fingerprint(strategy: str, overrides: dict, net=None):
    """What a user can see of a quantization: outputs, quantize info, reports; or the ConfigError's text."""
    global MODEL
    MODEL = MODEL or model()
    q = qstrat.Quantizer(net or MODEL, strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            qmodel = q.quantize_model(DATA, verbose=0, calib_batch_size=8, **overrides)
        except ConfigError as exc:
            return ("error", str(exc))
    out = keras.ops.convert_to_numpy(qmodel(DATA[:8]))
    info = json.dumps(qstrat.get_quantize_info(qmodel), sort_keys=True, default=str)
    written = ""
    if q.output_path:  # what output_format wrote, and where: the .keras zip carries dates, so its name only
        with open(q.output_path, "rb") as f:
            data = f.read() if q.output_path.endswith(".onnx") else b""
        written = q.output_path + hashlib.sha256(data).hexdigest()
    return (out.tobytes(), info, q.report.table(), q.optimize_report.table() if q.optimize_report else "", written)


def qat_fingerprint(strategy: str, overrides: dict) -> bytes:
    """The QAT model's layer types, and its weights and inference outputs after one training step."""
    global MODEL
    MODEL = MODEL or model()
    q = qstrat.Quantizer(MODEL, strategy)
    # No_OF positions: Pof2S's Min_MSE search, traced for every quantizer of the training step, takes minutes
    # here, and the QAT keys act the same with either method.
    methods = {f"{family}_method": "No_OF" for family in HANDY_FAMILIES} if strategy == "pof2s" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = q.get_qat_model(verbose=0, **methods, **overrides)
    qat.compile(keras.optimizers.SGD(0.01), "mse")
    qat.train_on_batch(DATA[:8], np.ones((8, 4), "float32"))
    kinds = " ".join(type(getattr(layer, "layer", layer)).__name__ for layer in qat.layers)
    weights = b"".join(np.asarray(keras.ops.convert_to_numpy(w)).tobytes() for w in qat.weights)
    return kinds.encode() + weights + keras.ops.convert_to_numpy(qat(DATA[:8])).tobytes()


def fingerprint_warns(strategy: str, overrides: dict, net=None) -> None:
    qstrat.Quantizer(net or MODEL or model(), strategy).quantize_model(
        DATA[:8], verbose=0, calib_batch_size=8, **overrides
    )


def family_value(strategy: str, family: str, param: str) -> bool:
    """The value the strategy gives ``param`` in its first quantizer of a handy key's family (False if none)."""
    registry = load_strategy(strategy).to_dict()["quantize_registry_config"]
    target_type = HANDY_FAMILIES[family]
    configs = [registry["input_quantize_config"]["quantizer_config"]] if family == "input" else []
    for pattern in registry["layer_quantize_config"]:
        for t in pattern["quant_config"]:
            if t["target_type"] == target_type and t.get("quantizer_config"):
                configs.append(t["quantizer_config"])
    return next((bool(c["params"][param]) for c in configs if param in c["params"]), False)


def other_value(strategy: str, section: str, key: str):
    """A valid value for the key other than the strategy's."""
    if section == "user":
        if key in PARTITION_VALUES:
            return PARTITION_VALUES[key]
        family, suffix = key.split("_", 1)
        if suffix in HANDY_VALUES:
            return HANDY_VALUES[suffix]
        return not family_value(strategy, family, HANDY_SUFFIXES[suffix])  # a boolean: the other one
    spec = SECTIONS[section][key]
    value = load_strategy(strategy).to_dict()[section][key]
    if spec.kind == "bool":
        return not value
    if spec.choices:
        return next(c for c in spec.choices if c != value)
    if key == "output_dir":
        return os.path.join(OUT, "elsewhere")
    if spec.kind == "int":  # the smallest value (one CLE step changes what ten do), or the next
        return spec.minimum if value != spec.minimum else value + 1
    if spec.maximum is not None:  # act_eq_beta: the other end of its range
        return spec.minimum if value != spec.minimum else spec.maximum
    return value * 1000.0 + 1.0  # cle_weight_threshold: no channel pair passes, so CLE rescales nothing


def all_keys():
    for section, keys in SECTIONS.items():
        for key in keys:
            yield section, key
    for key in (*HANDY_KEYS, *PARTITION_VALUES):
        yield "user", key


CASES = [(s, section, key) for s in STRATEGIES for section, key in all_keys()]


def test_the_inert_list_is_what_keys_py_says_is_pending():
    pending = {key for keys in SECTIONS.values() for key, spec in keys.items() if spec.pending}
    assert pending == set(INERT_KEYS) - {"quantize_with_xcompiler"}


@pytest.fixture(autouse=True)
def few_fast_ft_steps(monkeypatch):
    """Fast finetune's epochs of two steps at least (not 50): one step already moves the result, so whether a key
    acts still shows, at a fraction of the time."""
    monkeypatch.setattr(fast_ft, "MIN_STEPS", 2)


@pytest.mark.parametrize("strategy,section,key", CASES, ids=[f"{s}-{k}" for s, _, k in CASES])
def test_every_key_acts_or_is_listed(strategy, section, key):
    context = {"include_bias_corr": False, **CONTEXT.get(key, {})} if key != "include_bias_corr" else {}
    value = other_value(strategy, section, key)
    net = net_for(key)
    ckey = (strategy, json.dumps(context, sort_keys=True), net.name)
    base = _BASES.get(ckey) or _BASES.setdefault(ckey, fingerprint(strategy, context, net))
    if key == "quantize_with_xcompiler":
        with pytest.raises(ConfigError, match="compiler"):
            load_strategy(strategy, quantize_with_xcompiler=True)
        return
    if key in INERT_KEYS:
        # Whichever of the two values is not the key's default is the one that must warn.
        set_one = {**context, key: value} if value != SECTIONS[section][key].default else context
        with pytest.warns(qstrat.PendingKeyWarning, match=key):
            fingerprint_warns(strategy, set_one, net)
        assert fingerprint(strategy, {**context, key: value}, net) == base, f"{key} acts now: take it off INERT_KEYS"
        return
    flipped = fingerprint(strategy, {**context, key: value}, net)
    if key in QAT_KEYS:
        assert flipped == base, f"{key} changed quantize_model's result"
        with pytest.warns(UserWarning, match="train_with_bn = true does nothing in quantize_model"):
            fingerprint_warns(strategy, {**context, key: value, "train_with_bn": True})
        qat = qat_fingerprint(strategy, {**context, key: value})
        if not load_strategy(strategy).optimize["fold_conv_bn"]:  # fs: BatchNormalization stays a layer
            assert qat == qat_fingerprint(strategy, context)
            with pytest.warns(UserWarning, match="train_with_bn = true does nothing while fold_conv_bn is off"):
                qstrat.Quantizer(MODEL, strategy).get_qat_model(verbose=0, **{**context, key: value})
            return
        assert qat != qat_fingerprint(strategy, context)
        return
    if (strategy, key) in NOT_VIOLATED:
        assert flipped == base, f"{key} changed the model: take it off NOT_VIOLATED"
        return
    if (strategy, key) in NOT_APPLICABLE:
        assert flipped == base
        with pytest.warns(UserWarning, match=f"{key} = .* does nothing"):
            fingerprint_warns(strategy, {**context, key: value}, net)
        return
    if (strategy, key) in REFUSED:
        about = HANDY_KEYS[key][1] if key in HANDY_KEYS else key
        assert flipped[0] == "error" and about in flipped[1], flipped
        return
    assert flipped[0] != "error", f"{strategy}: {key} = {value!r} was refused and is not in REFUSED: {flipped[1]}"
    assert flipped != base, f"{strategy}: setting {key} = {value!r} changed nothing and the key is not listed"
