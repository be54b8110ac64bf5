"""The ``qstrat`` command's launcher: arguments are parsed before anything heavy is imported.

``qstrat --help`` (and any usage error) answers at once: Keras and its backend
load only when a command runs, after TensorFlow's log level is set. The
commands themselves live in `qstrat.cli`.

qstrat quantize MODEL.keras --calib DATA.npz [--strategy pof2s|fs|tqt|FILE.json]
                [--set weight_bit=4 ...] [--out OUT.keras] [--calib-steps N] [--batch-size B]
                [--target-sqnr DB [--max-raised F] [--raise-to int16]] [--json]
                [--custom-objects module:Name ...]
qstrat export QMODEL.keras --format onnx|tflite -o OUT [--opset N] [--data DATA.npz] [--int8-io]
qstrat inspect MODEL.keras [--strategy S] [--set KEY=VALUE ...] [--json]; qstrat inspect --supported
qstrat analyze FLOAT.keras QMODEL.keras --data DATA.npz [--html OUT.html] [--json-out OUT.json] [--json]
qstrat strategy show NAME [--verbose 0|1|2]
qstrat strategy keys
qstrat demo
"""

from __future__ import annotations

import argparse
import os
import sys


def _positive(text: str) -> int:
    """A count flag's value: a positive integer, else argparse's usage error naming the flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qstrat", description="Strategy-driven quantization for Keras 3.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="post-training quantization of a .keras model")
    q.add_argument("model", help="the float model (.keras, or a legacy .h5/.hdf5)")
    q.add_argument(
        "--calib",
        required=True,
        help="calibration data: .npy, or .npz with one array per model input, named after the inputs",
    )
    q.add_argument("--calib-key", help="which array of the .npz to use (one-input models)")
    q.add_argument("--strategy", default="pof2s", help="pof2s, fs, tqt, or a strategy JSON file")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="strategy override, e.g. weight_bit=4")
    q.add_argument("--calib-steps", type=_positive, default=None)
    q.add_argument("--batch-size", type=_positive, default=32)
    q.add_argument("--out", help="where to write the quantized model (a .keras file; checked before any work)")
    q.add_argument("--target-sqnr", type=float, help="mixed precision: raise the most sensitive layers until the "
                   "outputs' SQNR against the float model reaches this (dB)")  # fmt: skip
    q.add_argument("--max-raised", type=float, help="mixed precision: at most this fraction of layers (default 0.1)")
    q.add_argument("--raise-to", help="mixed precision: int16 (the default), or a float type (float32, ...)")
    q.add_argument("--json", action="store_true", help="print the report as JSON (no progress output)")
    q.add_argument(
        "--custom-objects",
        action="append",
        metavar="MODULE:NAME",
        help="a custom layer class the model uses, e.g. mypkg.layers:MyConv (repeatable)",
    )
    q.set_defaults(command_name="quantize")
    s = sub.add_parser(
        "strategy",
        help="show a strategy or the pipeline keys; convert a file in the reference tool's layout",
        description="qstrat strategy show NAME|FILE; qstrat strategy keys; "
        "qstrat strategy convert OLD.json -o NEW.json (the reference tool's layout to qstrat's)",
    )
    s.add_argument("what", choices=["show", "keys", "convert"])
    s.add_argument("name", nargs="?")
    s.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    s.add_argument("--json", action="store_true", help="keys: the key table as JSON; convert: the report as JSON")
    s.add_argument("-o", "--out", help="convert: where to write the strategy in qstrat's layout (.json)")
    s.add_argument(
        "--custom-objects",
        action="append",
        metavar="MODULE:NAME",
        help="convert: a custom layer class the file names, e.g. mypkg.layers:MyConv (repeatable)",
    )
    s.set_defaults(command_name="strategy")
    e = sub.add_parser(
        "export",
        help="write a quantized .keras model as ONNX QDQ or TFLite int8",
        description="qstrat export QMODEL.keras --format onnx -o OUT.onnx [--data DATA.npz]",
    )
    e.add_argument("model", help="a quantized model (.keras) written by qstrat quantize")
    e.add_argument("--format", required=True, choices=["onnx", "tflite"])
    e.add_argument("-o", "--out", required=True, help="the file to write (.onnx or .tflite; written atomically)")
    e.add_argument("--opset", type=int, default=None, help="onnx: the opset (default: the lowest that holds the grids)")
    e.add_argument(
        "--data",
        help="onnx: sample inputs (.npy/.npz, as for quantize --calib): the report counts the elements ONNX rounds differently",
    )
    e.add_argument("--data-key", help="which array of the .npz to use (one-input models)")
    e.add_argument("--int8-io", action="store_true", help="tflite: int8 inputs and outputs")
    e.add_argument("--json", action="store_true", help="print the export report as JSON")
    e.add_argument(
        "--custom-objects", action="append", metavar="MODULE:NAME", help="a custom layer class the model uses"
    )
    e.set_defaults(command_name="export")
    i = sub.add_parser(
        "inspect",
        help="what each layer gets under a strategy, without data; --supported: the layer types per strategy",
        description="qstrat inspect MODEL.keras [--strategy S] [--json]; qstrat inspect --supported",
    )
    i.add_argument("model", nargs="?", help="the float model (.keras, or a legacy .h5/.hdf5)")
    i.add_argument("--strategy", default="pof2s", help="pof2s, fs, tqt, or a strategy JSON file")
    i.add_argument("--set", action="append", metavar="KEY=VALUE", help="strategy override, e.g. weight_bit=4")
    i.add_argument("--supported", action="store_true", help="print the table of layer types each strategy quantizes")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument(
        "--custom-objects", action="append", metavar="MODULE:NAME", help="a custom layer class the model uses"
    )
    i.set_defaults(command_name="inspect")
    a = sub.add_parser(
        "analyze",
        help="per-layer error and sensitivity of a quantized model against its float model",
        description="qstrat analyze FLOAT.keras QMODEL.keras --data DATA.npz [--html OUT.html] [--json]",
    )
    a.add_argument("float_model", help="the float model the quantized one was made from")
    a.add_argument("model", help="the quantized model (.keras) written by qstrat quantize")
    a.add_argument("--data", required=True, help="analysis inputs (.npy/.npz, as for quantize --calib)")
    a.add_argument("--data-key", help="which array of the .npz to use (one-input models)")
    a.add_argument("--batch-size", type=_positive, default=32)
    a.add_argument("--steps", type=_positive, default=None, help="batches to read (default: all)")
    a.add_argument("--html", help="write the HTML report here (self-contained; checked before any work)")
    a.add_argument("--json-out", help="write the analysis as JSON here")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON instead of a table")
    a.add_argument("--no-alone", action="store_true", help="skip each layer quantized alone (one pass per layer)")
    a.add_argument("--left-out", action="store_true", help="also each layer left in float, the rest quantized")
    a.add_argument(
        "--custom-objects", action="append", metavar="MODULE:NAME", help="a custom layer class the models use"
    )
    a.set_defaults(command_name="analyze")
    d = sub.add_parser("demo", help="quantize two real models on real data")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.set_defaults(command_name="demo")
    return p


def _run(argv) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras loads its backend
    from qstrat import cli
    from qstrat.errors import QstratError

    try:
        return getattr(cli, f"cmd_{args.command_name}")(args)
    except QstratError as exc:
        print(f"qstrat: error: {cli.in_flags(args.command_name, str(exc))}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    """``qstrat``: the command's exit status (2: an error qstrat explains; 130: interrupted)."""
    try:
        return _run(argv)
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        # Every file qstrat writes is written whole or not at all: an earlier one stays as it was.
        print("qstrat: interrupted.", file=sys.stderr)
        return 130


def _interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, also where an import wrapped it in another error."""
    for _ in range(20):
        if exc is None:
            return False
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
