"""Refining PTQ for accuracy: activation-aware equalization and fast finetune, alone and together.

On the digits MobileNet-style CNN (512 calibration digits; accuracy on 355
test digits, logit SQNR against the float model) and the mini-Xception (the
demo's split of its real images: 128 calibration, the rest evaluated; top-1
agreement with the float model on all of them and on the real faces among
them, and output SQNR): pof2s at 8-bit, pof2s with 4-bit weights, and fs,
each plain (the strategy's defaults), with ``include_act_eq``, with
``include_fast_ft``, and with both (for pof2s also both with
``fast_ft_input="float"``: each layer finetuned on the float model's
activations instead of the quantized model's), and fast finetune at
``fast_ft_lr`` 0.03 against the default's row (0.1), alone and (pof2s)
with activation-aware equalization; fast finetune in shuffled batches of
32 samples against the default's (``fast_ft_batch_size`` 256: one batch of
all the samples it trains on, so their order does not matter); and pof2s
(8-bit and 4-bit weights) without CLE, plain and with fast finetune. For
each: the wall time of ``quantize_model`` as a ratio to a warm
``model.predict`` of the calibration data, and the process's peak resident
memory, with how much of it the call added. Every configuration runs in a
fresh process, so that each peak is its own.

Then fast finetune's memory against the calibration set's size: the
mini-Xception quantized with fast finetune on 256 and on 4096 calibration
images (`zoo.face_images_n`), each in a fresh process; ``fast_ft_samples``
(256 by default) bounds what it holds.

Run: ``.venv/bin/python bench/refine.py`` (about an hour on 2 cores);
``--only digits`` or ``--only xception`` for one model; ``--memory`` for the
memory check alone; ``--seeds N`` for the mini-Xception with 4-bit weights
and fast finetune, and at 8-bit with fast finetune and no CLE, both in
shuffled batches of 32, under N shuffling seeds of those batches (about a
minute each): how far agreement moves with their order alone (``--epochs
E`` with it: at ``fast_ft_epochs`` E);
``--no-cle`` for the rows without CLE alone; ``--margins`` for how many
evaluated images the float mini-Xception itself nearly ties on (the gap
between its two largest logits against grid steps there), and how many of
the images pof2s and fs disagree on are those, and the agreement left with
the logits alone quantized, at positions 2 to 5; ``--peer-split`` for the
mini-Xception's main rows on the split sizes the peers were compared on
(100 calibration images; 638 evaluated, 269 of them faces: the 376 images
left over, topped up with mirrored and shifted copies of them), so that
its scores stand beside theirs; ``--oracle`` for pof2s at 8-bit calibrated,
and fast finetuned on every one of them, on the demo split's evaluated images
themselves: what these methods reach when fit to the images they are scored
on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refine_data import PEER_SPLIT, scores, task  # noqa: E402

VARIANTS = {
    "plain": {},
    "+act_eq": {"include_act_eq": True},
    "+fast_ft": {"include_fast_ft": True},
    "+both": {"include_act_eq": True, "include_fast_ft": True},
    "+both, float inputs": {"include_act_eq": True, "include_fast_ft": True, "fast_ft_input": "float"},
    "+fast_ft, lr 0.03": {"include_fast_ft": True, "fast_ft_lr": 0.03},
    "+both, lr 0.03": {"include_act_eq": True, "include_fast_ft": True, "fast_ft_lr": 0.03},
    "no CLE": {"include_cle": False},
    "+fast_ft, no CLE": {"include_cle": False, "include_fast_ft": True},
    "+fast_ft, batch 32": {"include_fast_ft": True, "fast_ft_batch_size": 32},
    "+fast_ft, no CLE, batch 32": {"include_cle": False, "include_fast_ft": True, "fast_ft_batch_size": 32},
    "+fast_ft, every sample": {"include_fast_ft": True, "fast_ft_samples": 512},
    "+fast_ft, no CLE, every sample": {"include_cle": False, "include_fast_ft": True, "fast_ft_samples": 512},
}
ORACLE_ROWS = ("plain", "+fast_ft, every sample", "+fast_ft, no CLE, every sample")  # pof2s, calibrated on the scored
MAIN = ("plain", "+act_eq", "+fast_ft", "+both")  # for every setting; the float-inputs row for pof2s only
LEARNING_RATE = "+fast_ft, lr 0.03"  # for every setting, after the main rows: against the default fast_ft_lr
BOTH_LEARNING_RATE = "+both, lr 0.03"  # for pof2s only
BATCH = "+fast_ft, batch 32"  # for every setting: shuffled batches of 32 against the default's one batch of all samples
NO_CLE = ("no CLE", "+fast_ft, no CLE")  # pof2s and pof2s w4: weight-only CLE off (act_eq then has no pairs)
SETTINGS = {"pof2s": ("pof2s", {}), "pof2s w4": ("pof2s", {"weight_bit": 4}), "fs": ("fs", {})}
MODELS = ("digits", "xception")
TITLES = {"digits": "digits MobileNet-style", "xception": "mini-Xception"}
PEER_ROWS = (  # (setting, variant) on the peers' split
    ("fs", "plain"),
    ("pof2s", "plain"),
    ("pof2s", "+act_eq"),
    ("pof2s", "+fast_ft"),
    ("pof2s", "+both"),
    ("pof2s", "no CLE"),
    ("pof2s", "+fast_ft, no CLE"),
    ("pof2s w4", "plain"),
    ("pof2s w4", "+fast_ft"),
)


def _rss_mb() -> float:
    """The process's resident memory now (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(
    model_name: str,
    setting: str,
    variant: str,
    calib_count: int | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    split: str = "demo",
) -> dict:
    """One configuration, in this process: scores, time ratio and memory (``seed``: fast finetune's shuffling
    seed instead of its own; ``epochs``: its ``fast_ft_epochs`` instead of the strategy's; ``split`` "peers":
    the mini-Xception on `refine_data.peer_split`)."""
    warnings.filterwarnings("ignore")
    import qstrat

    if seed is not None:
        from qstrat.passes.refine import fast_ft

        fast_ft.SEED = seed

    model, calib, x, labels, faces = task(model_name, calib_count, split)
    model.predict(calib, batch_size=32, verbose=0)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model.predict(calib, batch_size=32, verbose=0)
        times.append(time.perf_counter() - t)
    predict = sorted(times)[1]
    base, extra = SETTINGS[setting]
    before = _rss_mb()
    q = qstrat.Quantizer(model, base)
    t = time.perf_counter()
    more = {} if epochs is None else {"fast_ft_epochs": epochs}
    qmodel = q.quantize_model(calib, verbose=0, **extra, **VARIANTS[variant], **more)
    took = time.perf_counter() - t
    peak = _peak_mb()
    out = {"ratio": took / predict, "seconds": took, "peak_mb": peak, "added_mb": peak - before}
    if q.fast_finetune is not None:
        out["ft_samples"] = q.fast_finetune.samples
        out["ft_output_mse"] = [q.fast_finetune.output_mse_before, q.fast_finetune.output_mse_after]
    if calib_count is None:
        out.update(scores(model, qmodel, x, labels, faces))
    return out


def _spawn(*args: str, seed: int | None = None, epochs: int | None = None, split: str = "demo") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", *args, "--split", split]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"bench/refine.py: {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _line(setting: str, variant: str, r: dict) -> str:
    if "acc" in r:
        score = f"acc {r['acc']:6.2f}% (float {r['float_acc']:.2f}%)"
    else:
        score = f"agree {r['agree']:6.2f}% / faces {r['faces']:6.2f}%"
    return (
        f"  {setting:<9} {variant:<30} {score}  {r['sqnr']:5.2f} dB  {r['ratio']:7.1f}x predict"
        f"  peak {r['peak_mb']:6.0f} MiB (+{r['added_mb']:4.0f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=MODELS)
    parser.add_argument("--memory", action="store_true", help="only the 256 / 4096 calibration images memory check")
    parser.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="only the mini-Xception with fast finetune (4-bit weights; 8-bit without CLE), shuffling seeds 0 to N-1",
    )
    parser.add_argument(
        "--no-cle", action="store_true", help="only the pof2s rows without CLE (plain and with fast finetune)"
    )
    parser.add_argument(
        "--margins",
        action="store_true",
        help="only the float mini-Xception's top-2 logit gaps on the evaluated images, and pof2s's and fs's "
        "disagreements among them",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="only the mini-Xception's pof2s rows calibrated and fast finetuned on the evaluated images themselves",
    )
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument(
        "--epochs", type=int, help="with --seeds: fast finetune's fast_ft_epochs (the strategy's 5 by default)"
    )
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--split", default="demo", help=argparse.SUPPRESS)
    parser.add_argument(
        "--peer-split",
        action="store_true",
        help="only the mini-Xception's main rows on the peers' split sizes (100 calibration images; 638 evaluated, "
        "269 faces)",
    )
    args = parser.parse_args()
    if args.epochs is not None and not (args.seeds or args.one):
        parser.error("--epochs goes with --seeds")
    if args.one:
        name, setting, variant, *count = args.one
        count = int(count[0]) if count else None
        print(json.dumps(one(name, setting, variant, count, args.seed, args.epochs, args.split)))
        return 0
    import keras

    print(f"qstrat bench/refine.py: Keras {keras.__version__}, {keras.backend.backend()}, {os.cpu_count()} cores")
    if args.seeds:
        return _seeds(args.seeds, args.epochs)
    if args.margins:
        return _margins()
    if args.peer_split:
        return _peers()
    if args.oracle:
        return _oracle()
    if args.no_cle:
        for name in MODELS if args.only is None else (args.only,):
            print(f"\n{TITLES[name]}:", flush=True)
            _no_cle(name)
        return 0
    if not args.memory:
        for name in MODELS if args.only is None else (args.only,):
            print(f"\n{TITLES[name]}:", flush=True)
            for setting in SETTINGS:
                for variant in MAIN:
                    print(_line(setting, variant, _spawn(name, setting, variant)), flush=True)
            variant = "+both, float inputs"
            print(_line("pof2s", variant, _spawn(name, "pof2s", variant)), flush=True)
            for setting in SETTINGS:
                print(_line(setting, LEARNING_RATE, _spawn(name, setting, LEARNING_RATE)), flush=True)
            print(_line("pof2s", BOTH_LEARNING_RATE, _spawn(name, "pof2s", BOTH_LEARNING_RATE)), flush=True)
            for setting in SETTINGS:
                print(_line(setting, BATCH, _spawn(name, setting, BATCH)), flush=True)
            _no_cle(name)
    print("\nfast finetune's memory against the calibration set (mini-Xception, pof2s):", flush=True)
    peaks = {}
    for count in (256, 4096):
        r = _spawn("xception", "pof2s", "+fast_ft", str(count))
        peaks[count] = r
        print(
            f"  {count:5d} calibration images ({r['ft_samples']} finetuned on): peak {r['peak_mb']:6.0f} MiB, "
            f"the call added {r['added_mb']:5.0f} MiB, {r['seconds']:.0f} s",
            flush=True,
        )
    a, b = peaks[256], peaks[4096]
    print(f"  4096 / 256: peak {b['peak_mb'] / a['peak_mb']:.2f}x, added {b['added_mb'] / max(a['added_mb'], 1):.2f}x")
    return 0


def _no_cle(name: str) -> None:
    for setting in ("pof2s", "pof2s w4"):
        for variant in NO_CLE:
            print(_line(setting, variant, _spawn(name, setting, variant)), flush=True)


def _margins() -> int:
    """How many evaluated images the float mini-Xception itself nearly ties on: the gap between its two largest
    logits (the softmax's input) against the steps of an 8-bit power-of-2 grid there. A quantized model can swap
    such a pair with an error of that size, or tie them (the first of a tie is its top-1). Then, for pof2s and
    fs (plain), how many of the images each disagrees on are such near ties; and the agreement left when the
    logits alone are quantized (`_logits_alone`)."""
    import keras
    import numpy as np

    import qstrat

    warnings.filterwarnings("ignore")
    model, calib, x, _, faces = task("xception")
    logits = keras.Model(model.inputs, model.layers[-1].input).predict(x, batch_size=64, verbose=0)
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    steps = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
    print(
        f"\nmini-Xception float logits on the {len(x)} evaluated images ({int(faces.sum())} faces): "
        f"from {logits.min():.2f} to {logits.max():.2f}; gap between the two largest below",
        flush=True,
    )
    for step in steps:
        below = margin < step
        print(f"  {step:6.4f}: {int(below.sum()):3d} images, {int(below[faces].sum()):2d} of them faces", flush=True)
    top = model.predict(x, batch_size=64, verbose=0).argmax(1)
    for strategy in ("pof2s", "fs"):
        qmodel = qstrat.Quantizer(model, strategy).quantize_model(calib, verbose=0)
        differ = qmodel.predict(x, batch_size=64, verbose=0).argmax(1) != top
        counts = ", ".join(f"{int((differ & (margin < step)).sum())} below {step:g}" for step in steps)
        print(f"  {strategy} disagrees on {int(differ.sum())} images: {counts}", flush=True)
        if strategy == "pof2s":  # the position calibration gave the logits: the state of the softmax's input
            logits_q = qmodel.get_layer(model.layers[-1].name).input._keras_history.operation
            print(f"  pof2s holds the logits at position {int(np.asarray(logits_q.state['pos']))}", flush=True)
    _logits_alone(model)
    return 0


def _logits_alone(model) -> None:
    """Agreement with the float model when the logits alone are quantized, every other tensor float: on the signed
    8-bit power-of-2 grid the DPU holds them on (HALF_UP), at positions 2 to 5, on the demo split and the peers'.
    A rounding cannot swap two logits, only tie them, and the first of a tie is the top-1."""
    import keras
    import numpy as np

    print(
        "\nmini-Xception agreement with its logits alone quantized (signed 8-bit, power-of-2), all / faces:", flush=True
    )
    head = keras.Model(model.inputs, model.layers[-1].input)
    for split in ("demo", "peers"):
        _, _, x, _, faces = task("xception", split=split)
        logits = head.predict(x, batch_size=64, verbose=0)
        top = logits.argmax(1)
        row = []
        for pos in (2, 3, 4, 5):
            q = np.clip(np.floor(logits * 2.0**pos + 0.5), -128, 127)
            agree = q.argmax(1) == top
            row.append(f"pos {pos} (step 1/{2**pos}): {100 * agree.mean():6.2f} / {100 * agree[faces].mean():6.2f}%")
        print(f"  {split:<5} ({len(x)} images): " + ";  ".join(row), flush=True)


SEEDED = (  # the rows nearest their targets, in shuffled batches of 32: (setting, variant, title)
    ("pof2s w4", BATCH, "pof2s w4 +fast_ft, batch 32"),
    ("pof2s", "+fast_ft, no CLE, batch 32", "pof2s 8-bit +fast_ft, no CLE, batch 32"),
)


def _peers() -> int:
    """The mini-Xception's main rows on `refine_data.peer_split`, the split sizes the peers were compared on."""
    calib_n, eval_n, faces_n = PEER_SPLIT
    print(
        f"\nmini-Xception on the peers' split sizes ({calib_n} calibration images; {eval_n} evaluated, {faces_n} "
        "faces, mirrored copies making up the counts):",
        flush=True,
    )
    for setting, variant in PEER_ROWS:
        print(_line(setting, variant, _spawn("xception", setting, variant, split="peers")), flush=True)
    return 0


def _oracle() -> int:
    """pof2s on the mini-Xception calibrated, and fast finetuned on all of them, on the very images it is scored
    on (the demo split's evaluated images): how far these methods get with the data they are judged by."""
    print(
        "\nmini-Xception, pof2s 8-bit calibrated and fast finetuned on the evaluated images themselves "
        "(fast_ft_samples 512: every one of them):",
        flush=True,
    )
    for variant in ORACLE_ROWS:
        print(_line("pof2s", variant, _spawn("xception", "pof2s", variant, split="oracle")), flush=True)
    return 0


def _seeds(n: int, epochs: int | None = None) -> int:
    """The mini-Xception rows nearest their targets (4-bit weights with fast finetune; 8-bit with fast finetune
    and no CLE), in shuffled batches of 32, once per shuffling seed of those batches: how far their scores move
    with the order of the batches alone."""
    for setting, variant, title in SEEDED:
        more = "" if epochs is None else f", {epochs} epochs"
        print(f"\nmini-Xception, {title}{more}, by fast finetune's shuffling seed (the default is 0):", flush=True)
        rows = []
        for seed in range(n):
            r = _spawn("xception", setting, variant, seed=seed, epochs=epochs)
            rows.append(r)
            before, after = r["ft_output_mse"]
            print(
                f"  seed {seed}: agree {r['agree']:6.2f}% / faces {r['faces']:6.2f}%  {r['sqnr']:5.2f} dB  "
                f"outputs' MSE on the finetuned samples {before:.3g} -> {after:.3g}",
                flush=True,
            )
        mean = {k: sum(r[k] for r in rows) / n for k in ("agree", "faces", "sqnr")}
        low, high = min(r["agree"] for r in rows), max(r["agree"] for r in rows)
        print(
            f"  mean: agree {mean['agree']:6.2f}% / faces {mean['faces']:6.2f}%  {mean['sqnr']:5.2f} dB; "
            f"agreement from {low:.2f}% to {high:.2f}%",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
