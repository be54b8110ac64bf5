"""The ``qstrat`` command: a thin layer over the Python API.

qstrat quantize MODEL.keras --calib DATA.npz [--strategy pof2s|fs|tqt|FILE.json]
                [--set weight_bit=4 ...] [--out OUT.keras] [--calib-steps N] [--batch-size B]
qstrat strategy show NAME [--verbose 0|1|2]
qstrat strategy keys
qstrat demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parse_set(items: list[str]) -> dict:
    from qstrat.errors import ConfigError

    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f'expected KEY=VALUE, got "{item}"', "For example: --set weight_bit=4")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare word: a string value such as HALF_UP
    return out


def _load_calib(path: str, key: str | None):
    import numpy as np

    from qstrat.errors import CalibrationDataError

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"{path}: cannot read calibration data ({exc}). Give a .npy or .npz file.") from None
    if isinstance(data, np.ndarray):
        return data
    names = list(data.files)
    if key is not None:
        if key not in names:
            raise CalibrationDataError(f"{path}: no array named '{key}'; it holds {', '.join(names)}.")
        return data[key]
    if not names:
        raise CalibrationDataError(f"{path}: the archive holds no arrays.")
    return data[names[0]] if len(names) == 1 else [data[n] for n in names]


def _load_model(path: str):
    import keras

    from qstrat.errors import QstratError

    if not os.path.exists(path):
        raise QstratError(f"{path}: no such model file.")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear message
        raise QstratError(f"{path}: cannot load the Keras model ({type(exc).__name__}: {exc}).") from None


def cmd_quantize(args) -> int:
    import qstrat

    model = _load_model(args.model)
    data = _load_calib(args.calib, args.calib_key)
    strategy, custom = args.strategy, None
    if strategy.endswith(".json") or os.path.sep in strategy:
        strategy, custom = "pof2s", args.strategy
    q = qstrat.Quantizer(model, strategy, custom)
    qmodel = q.quantize_model(data, args.calib_steps, args.batch_size, verbose=1, **_parse_set(args.set))
    if q.optimize_report is not None and q.optimize_report.events:
        print("optimize stage:")
        print(q.optimize_report.table())
        print()
    print(q.report.table())
    if q.bias_corrections:
        worst = max(q.bias_corrections, key=lambda c: c.max_abs_shift)
        print(
            f"\nbias correction: {len(q.bias_corrections)} layers corrected "
            f"(largest mean shift removed: {worst.max_abs_shift:.3g} in {worst.layer})"
        )
    if args.out:
        tmp = args.out + ".tmp.keras"
        qmodel.save(tmp)
        os.replace(tmp, args.out)
        print(f"\nwrote {args.out}")
    return 0


def cmd_strategy(args) -> int:
    from qstrat.strategy import keys_table_markdown, load_strategy

    if args.what == "keys":
        print(keys_table_markdown())
        return 0
    if not args.name:
        raise SystemExit("qstrat strategy show: name a strategy (pof2s, fs, tqt) or a JSON file")
    if args.name.endswith(".json"):
        s = load_strategy("pof2s", args.name)
    else:
        s = load_strategy(args.name)
    print(json.dumps(s.to_dict(args.verbose), indent=2))
    return 0


def cmd_demo(args) -> int:
    from qstrat import demo

    return demo.main()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qstrat", description="Strategy-driven quantization for Keras 3.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="post-training quantization of a .keras model")
    q.add_argument("model", help="the float model (.keras)")
    q.add_argument("--calib", required=True, help="calibration data (.npy, or .npz with one array per model input)")
    q.add_argument("--calib-key", help="which array of the .npz to use")
    q.add_argument("--strategy", default="pof2s", help="pof2s, fs, tqt, or a strategy JSON file")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="strategy override, e.g. weight_bit=4")
    q.add_argument("--calib-steps", type=int, default=None)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--out", help="where to write the quantized model (.keras)")
    q.set_defaults(func=cmd_quantize)
    s = sub.add_parser("strategy", help="show a strategy or the pipeline keys")
    s.add_argument("what", choices=["show", "keys"])
    s.add_argument("name", nargs="?")
    s.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    s.set_defaults(func=cmd_strategy)
    d = sub.add_parser("demo", help="quantize two real models on real data")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    from qstrat.errors import QstratError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QstratError as exc:
        print(f"qstrat: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
