"""The ``qstrat`` commands: a thin layer over the Python API.

The argument parser lives in the launcher, `qstrat_cli`, so that ``--help``
and usage errors answer before Keras is imported; `main` here is the same
entry point, for ``python -m qstrat.cli``.

Everything a command can check up front is checked before any work: the
output path (a ``.keras`` file in a folder that exists), the model file, the
custom objects, the calibration arrays against the model's inputs.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from qstrat.calibration.inputs import input_specs  # noqa: E402
from qstrat.cli_files import check_out_path, load_calib, load_custom_objects, not_the_input, parse_set  # noqa: E402
from qstrat.errors import QstratError  # noqa: E402
from qstrat.saving import load_model, save_model  # noqa: E402 - the CLI loads and saves models through them

# The Python parameters a command's errors may name (they come from the API it calls), and the flag each one is.
FLAGS = {
    "quantize": {
        "calib_dataset": "--calib",
        "calib_steps": "--calib-steps",
        "calib_batch_size": "--batch-size",
        "target_sqnr": "--target-sqnr",
        "max_raised": "--max-raised",
        "raise_to": "--raise-to",
    },
    "export": {"calib_data": "--data", "opset": "--opset", "int8_io": "--int8-io"},
    "analyze": {"batch_size": "--batch-size", "steps": "--steps"},
}


def in_flags(command: str, message: str) -> str:
    """An error message with the flags it means, where it names the Python parameter (``calib_data``)."""
    import re

    named = [(p, f) for p, f in FLAGS.get(command, {}).items() if re.search(rf"(?<![\w-]){p}(?![\w-])", message)]
    if not named:
        return message
    return f"{message} (On the command line: " + ", ".join(f"{p} is {f}" for p, f in named) + ".)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as "qstrat: warning: ..." on stderr: the command's user has no use for qstrat's line numbers."""
    print(f"qstrat: warning: {message}", file=file or sys.stderr)


def cmd_quantize(args) -> int:
    with warnings.catch_warnings():  # the command's warnings are for its user; the caller's display comes back after
        warnings.showwarning = _show_warning
        return _quantize(args)


def _quantize(args) -> int:
    import qstrat

    given = [flag for flag, v in (("--max-raised", args.max_raised), ("--raise-to", args.raise_to)) if v is not None]
    if given and args.target_sqnr is None:
        raise QstratError(
            f"{' and '.join(given)}: mixed precision's budget, used with --target-sqnr DB only. "
            "Give --target-sqnr as well, or leave them out."
        )
    out = check_out_path(args.out) if args.out else None
    if out:
        not_the_input(out, args.model, "--out")
    custom_objects = load_custom_objects(args.custom_objects)
    model = load_model(args.model, custom_objects)
    data = load_calib(args.calib, args.calib_key, [s[0] for s in input_specs(model)])
    strategy, custom = _strategy_args(args.strategy)
    q = qstrat.Quantizer(model, strategy, custom, custom_objects)
    budget = {"target_sqnr": args.target_sqnr, "max_raised": args.max_raised, "raise_to": args.raise_to}
    qmodel = q.quantize_model(
        data,
        args.calib_steps,
        args.batch_size,
        verbose=0 if args.json else 1,
        **{k: v for k, v in budget.items() if v is not None},
        **parse_set(args.set),
    )
    if out:
        save_model(qmodel, out)
    if args.json:
        print(json.dumps(_quantize_json(q, out), default=str))
        return 0
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
    if q.mixed_precision is not None:
        m = q.mixed_precision
        verdict = "met" if m.met else "NOT met"
        print(f"\nmixed precision: target {verdict} with {len(m.raised)} layers raised (SQNR {m.score:.2f} dB)")
        print(f"reproduce it with: --set 'layer_config={json.dumps(m.layer_config)}'")
    if out:
        print(f"\nwrote {args.out}")
    return 0


def _quantize_json(q, out: str | None) -> dict:
    from dataclasses import asdict

    return {
        "out": out,
        "layers": [asdict(r) for r in q.report.layers.values()],
        "optimize": [asdict(e) for e in q.optimize_report.events] if q.optimize_report is not None else [],
        "bias_corrections": [asdict(c) for c in q.bias_corrections],
        "position_changes": [asdict(c) for c in q.position_changes],
        "timings": q.timings,
        "mixed_precision": asdict(q.mixed_precision) if q.mixed_precision is not None else None,
    }


def cmd_export(args) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _export(args)


_FORMATS = {"onnx": "an ONNX", "tflite": "a TFLite"}


def _export(args) -> int:
    """``qstrat export QMODEL.keras --format onnx|tflite -o OUT``."""
    other = {"onnx": [("--int8-io", args.int8_io)], "tflite": [("--opset", args.opset is not None)]}[args.format]
    unused = [flag for flag, given in [*other, ("--data-key", args.data_key and not args.data)] if given]
    if unused:
        needs = {"--int8-io": "--format tflite", "--opset": "--format onnx", "--data-key": "--data"}
        raise QstratError(
            "; ".join(f"{flag} applies with {needs[flag]} only" for flag in unused)
            + ": leave it out (nothing was done)."
        )
    out = os.path.abspath(args.out)
    suffix = "." + args.format
    if not out.endswith(suffix):
        raise QstratError(f"-o {args.out}: {_FORMATS[args.format]} file must end in {suffix}")
    from qstrat.files import check_writable

    check_writable(out, "-o")
    custom_objects = load_custom_objects(args.custom_objects)
    qmodel = load_model(args.model, custom_objects)
    if args.format == "onnx":
        from qstrat.export.onnx_export import export_onnx

        names = [s[0] for s in input_specs(qmodel)]
        data = load_calib(args.data, args.data_key, names, "--data-key") if args.data else None
        report = export_onnx(qmodel, out, args.opset, data=data)
        if args.json:
            print(json.dumps({"out": out, **report.to_dict()}, default=str))
            return 0
        print(report.summary())
    else:
        from qstrat.export.tflite import export_tflite

        # fs leaves layer outputs in float: --data gives them ranges.
        calib = (
            load_calib(args.data, args.data_key, [s[0] for s in input_specs(qmodel)], "--data-key")
            if args.data
            else None
        )
        report = export_tflite(qmodel, out, int8_io=args.int8_io, calib_data=calib)
        if args.json:
            print(json.dumps({"out": out, **report}, default=str))
            return 0
        print(f"{out}: {report['bytes'] / 1024:.1f} KiB")
    print(f"wrote {args.out}")
    return 0


def _strategy_args(name: str) -> tuple[str, str | None]:
    """``--strategy`` as (built-in name, custom file or None)."""
    from qstrat.strategy import names_a_file

    if names_a_file(name):
        return "pof2s", name  # a file: a custom strategy over pof2s (its "base" picks another)
    return name, None


def cmd_inspect(args) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _inspect(args)


def _inspect(args) -> int:
    """``qstrat inspect MODEL.keras [--strategy S] [--json]`` or ``qstrat inspect --supported``."""
    from qstrat.inspect import rows_table, supported, supported_table

    if args.supported:
        names = [args.strategy] if args.strategy != "pof2s" or args.model else ["pof2s", "fs", "tqt"]
        print(json.dumps(supported(names), indent=1) if args.json else supported_table(names))
        return 0
    if not args.model:
        raise QstratError("qstrat inspect: give a model file, or --supported for the table of layer types")
    import qstrat

    custom_objects = load_custom_objects(args.custom_objects)
    model = load_model(args.model, custom_objects)
    strategy, custom = _strategy_args(args.strategy)
    rows = qstrat.Quantizer(model, strategy, custom, custom_objects).inspect_model(**parse_set(args.set))
    print(json.dumps(rows, indent=1) if args.json else rows_table(rows))
    return 0


def cmd_analyze(args) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _analyze(args)


def _analyze(args) -> int:
    """``qstrat analyze FLOAT.keras QMODEL.keras --data DATA.npz [--html OUT.html] [--json]``."""
    from qstrat.files import check_writable
    from qstrat.inspect import analyze

    for flag, path, suffix in (("--html", args.html, ".html"), ("--json-out", args.json_out, ".json")):
        if path:
            if not path.endswith(suffix):
                raise QstratError(f"{flag} {path}: give a file ending in {suffix}")
            check_writable(path, flag)
    if args.html:
        from qstrat.inspect.html import require_matplotlib

        require_matplotlib()  # known before the analysis, not after it
    custom_objects = load_custom_objects(args.custom_objects)
    float_model = load_model(args.float_model, custom_objects)
    qmodel = load_model(args.model, custom_objects)
    data = load_calib(args.data, args.data_key, [s[0] for s in input_specs(qmodel)], "--data-key")
    result = analyze(
        float_model,
        qmodel,
        data,
        args.batch_size,
        args.steps,
        alone=not args.no_alone,
        left_out=args.left_out,
        verbose=0 if args.json else 1,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        agreement = "" if result.agreement is None else f", top-1 agreement {100 * result.agreement:.2f}%"
        print(f"outputs against the float model: SQNR {result.output_sqnr_db:.1f} dB{agreement}\n")
        print(result.table())
    written = 0
    for path, write in ((args.json_out, result.write_json), (args.html, result.write_html)):  # the plots last
        if path:
            write(path)
            if not args.json:
                print(("" if written else "\n") + f"wrote {path}")
            written += 1
    return 0


def cmd_strategy(args) -> int:
    from qstrat.strategy import keys_table_markdown, load_strategy

    if args.what == "keys":
        if args.json:
            from dataclasses import asdict

            from qstrat.strategy.keys import SECTIONS

            print(json.dumps({s: [asdict(k) for k in keys.values()] for s, keys in SECTIONS.items()}, default=str))
            return 0
        print(keys_table_markdown())
        return 0
    if args.what == "convert":
        return _convert_strategy(args)
    if not args.name:
        raise QstratError("qstrat strategy show: name a strategy (pof2s, fs, tqt) or a JSON file")
    # show prints the strategy as JSON already, with or without --json
    base, custom = _strategy_args(args.name)  # a file as --strategy reads one
    s = load_strategy(base, custom) if custom else load_strategy(base)
    print(json.dumps(s.to_dict(args.verbose), indent=2))
    return 0


def _convert_strategy(args) -> int:
    """``qstrat strategy convert OLD.json -o NEW.json``: validate, then write the seed's layout with a report."""
    from qstrat.strategy import dump_quantize_strategy, load_strategy, read_strategy_file
    from qstrat.strategy.reference_layout import convert, is_reference_layout

    if not args.name or not args.out:
        raise QstratError("qstrat strategy convert: give the file to convert and -o NEW.json")
    out = os.path.abspath(args.out)
    if not out.endswith(".json") or not os.path.isdir(os.path.dirname(out)):
        raise QstratError(f"-o {args.out}: give a .json file in a folder that exists")
    from qstrat.files import check_writable

    check_writable(out, "-o")
    not_the_input(out, args.name, "-o")
    custom_objects = load_custom_objects(args.custom_objects)
    data = read_strategy_file(args.name)
    said = {"source": args.name, "reference_layout": is_reference_layout(data), "mapped": [], "changed": []}
    if said["reference_layout"]:
        conversion = convert(data, custom_objects)
        said["mapped"], said["changed"] = list(conversion.report), list(conversion.warnings)
    if not args.json:
        if not said["reference_layout"]:
            print(f"{args.name} is in qstrat's layout already: validated and written as it loads.")
        else:
            print(f"{args.name}: the reference tool's layout. What mapped where:")
            for line in said["mapped"]:
                print(f"  {line}")
            for line in said["changed"]:
                print(f"  changed: {line}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its changes are printed above
        strategy = load_strategy("pof2s", args.name, custom_objects)  # as a Quantizer loads it: validated
    dump_quantize_strategy(strategy, out)
    print(json.dumps({**said, "out": out}) if args.json else f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    from qstrat import demo

    return demo.main(as_json=args.json)


def main(argv=None) -> int:
    """The ``qstrat`` command (the same as the launcher's)."""
    from qstrat_cli import main as launch

    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
