"""Where power-of-2 quantization loses the mini-Xception's agreement: which quantizers, which grids.

On `bench/refine.py`'s mini-Xception split (128 calibration images, 348
evaluated, 71 of them faces; top-1 agreement with the float model on all and
on the faces, output SQNR), two tables.

First, without bias correction (which moves float biases to make up for
every quantizer's error at once), each configuration scored with all its
quantizers, with only the tensors' (`FakeQuant`: the model's input and
layer outputs; the weights float), and with only the layers' own
(`QuantizeWrapper`: weights and biases; the activations float), with how
many tensor quantizers it has. The configurations: pof2s (plain, with
activation-aware equalization, without CLE), pof2s with 4-bit weights,
pof2s with float scales (plain and without CLE; its own quantizers, at
the same tensors, with the same per-tensor symmetric signed grids, as
`FSQuantizer`s: any float scale, not only powers of 2), and fs as it is, with per-tensor weights, and with
per-tensor weights and symmetric signed activations. fs quantizes the
inputs of its compute layers; pof2s, as the DPU, every tensor a layer
writes (the depthwise half of a separable convolution, every Add, pool and
the logits included).

Second, with the strategies' defaults (bias correction on): pof2s against
pof2s with float scales, plain, without CLE, and with fast finetune
(without CLE, and with activation-aware equalization).

Third, with ``--bits``, on `bench/refine.py`'s peer-size split (100
calibration images, 638 evaluated, 269 of them faces): how many bits the
activations need for 95% agreement on all images and 97% on the faces.
pof2s with its defaults, its weights and biases kept at 8 bits, its tensors
at ``activation_bit`` 8, 9, 10, 12 and 16 (the model's input stays at 8),
plain and with fast finetune without CLE; and with 16-bit weights and
biases and 8-bit tensors.

Run: ``.venv/bin/python bench/error_sources.py`` (about 12 minutes on 2 cores);
``--bits`` prints only the third table (about 15 minutes).
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refine import VARIANTS  # noqa: E402  (bench/refine.py, beside this script)
from refine_data import scores, task  # noqa: E402

FLOAT_SCALES = "pof2s, float scales"
SETTINGS = {  # name: (built-in strategy, overrides); FLOAT_SCALES: pof2s with FSQuantizers (`_float_scales`)
    "pof2s": ("pof2s", {}),
    "pof2s w4": ("pof2s", {"weight_bit": 4}),
    FLOAT_SCALES: ("pof2s", {}),
    "fs": ("fs", {}),
    "fs per-tensor": ("fs", {"weight_per_channel": False}),
    "fs per-tensor symmetric": (
        "fs",
        {"weight_per_channel": False, "input_symmetry": True, "activation_symmetry": True},
    ),
}
SPLIT = (  # (setting, variant) of the first table
    ("pof2s", "plain"),
    ("pof2s", "+act_eq"),
    ("pof2s", "no CLE"),
    ("pof2s w4", "plain"),
    (FLOAT_SCALES, "plain"),
    (FLOAT_SCALES, "no CLE"),
    ("fs per-tensor symmetric", "plain"),
    ("fs per-tensor", "plain"),
    ("fs", "plain"),
)
DEFAULTS = ("plain", "no CLE", "+fast_ft, no CLE", "+both")  # the second table's variants, for both grids
BITS = (  # the third table's rows: (label, pof2s overrides)
    *((f"activations {b}-bit", {"activation_bit": b}) for b in (8, 9, 10, 12, 16)),
    ("weights and biases 16-bit", {"weight_bit": 16, "bias_bit": 16}),
)


def _float_scales(data):
    """A strategy's JSON with every Pof2SQuantizer an FSQuantizer of the same parameters."""
    if isinstance(data, dict):
        return {k: "FSQuantizer" if v == "Pof2SQuantizer" else _float_scales(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_float_scales(v) for v in data]
    return data


def _quantized(model, calib, setting: str, variant: str, **more):
    import qstrat
    from qstrat.strategy.load import builtin_dict

    base, extra = SETTINGS[setting]
    custom = _float_scales(builtin_dict(base)) if setting == FLOAT_SCALES else None
    q = qstrat.Quantizer(model, base, custom_quantize_strategy=custom)
    return q.quantize_model(calib, verbose=0, **extra, **VARIANTS[variant], **more)


def _enable(qmodel, tensors: bool, layers: bool) -> int:
    """The activations' quantizers on or off, and the weights'; returns how many the activations have."""
    from qstrat.layers import set_quantizers_enabled

    set_quantizers_enabled(qmodel, layers, which="weights")
    return set_quantizers_enabled(qmodel, tensors, which="activations")


def _score(r: dict) -> str:
    return f"{r['agree']:6.2f} / {r['faces']:6.2f}% {r['sqnr']:5.2f} dB"


def _bits() -> None:
    model, calib, x, labels, faces = task("xception", split="peers")
    print(
        f"\nmini-Xception, peer-size split ({len(calib)} calibration, {len(x)} evaluated, {int(faces.sum())} faces), "
        "pof2s with its defaults: agreement all / faces and SQNR, plain | with fast finetune, no CLE",
        flush=True,
    )
    for label, extra in BITS:
        cells = [
            _score(scores(model, _quantized(model, calib, "pof2s", variant, **extra), x, labels, faces))
            for variant in ("plain", "+fast_ft, no CLE")
        ]
        print(f"  {label:26s} {cells[0]} | {cells[1]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import keras

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", action="store_true", help="only the activation bits the agreement targets need")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(
        f"qstrat bench/error_sources.py: Keras {keras.__version__}, {keras.backend.backend()}, {os.cpu_count()} cores"
    )
    if args.bits:
        _bits()
        return 0
    model, calib, x, labels, faces = task("xception")
    print(
        f"\nmini-Xception ({len(x)} evaluated images, {int(faces.sum())} faces), without bias correction: agreement "
        "all / faces and SQNR with all quantizers | the activations' alone | the weights' alone",
        flush=True,
    )
    for setting, variant in SPLIT:
        qmodel = _quantized(model, calib, setting, variant, include_bias_corr=False)
        parts = []
        for tensors, layers in ((True, True), (True, False), (False, True)):
            count = _enable(qmodel, tensors, layers)
            parts.append(_score(scores(model, qmodel, x, labels, faces)))
        title = f"{setting} {'' if variant == 'plain' else variant}"
        print(f"  {title:29s} {count:2d} tensors  " + " | ".join(parts), flush=True)
    print("\nwith the strategy's defaults (bias correction on): agreement all / faces and SQNR", flush=True)
    for variant in DEFAULTS:
        cells = [
            _score(scores(model, _quantized(model, calib, s, variant), x, labels, faces))
            for s in ("pof2s", FLOAT_SCALES)
        ]
        print(f"  {variant:17s} pof2s {cells[0]} | float scales {cells[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
