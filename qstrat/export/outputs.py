"""The file ``output_format`` asks ``quantize_model`` to write: its path, checked first, and the writing."""

from __future__ import annotations

import json
import os

from qstrat.errors import ConfigError
from qstrat.files import check_folder, check_writable, write_atomically
from qstrat.strategy import Strategy


def output_target(strategy: Strategy) -> str | None:
    """The file ``output_format`` asks for, checked now, before any long work. Its folder is created only when
    the file is written (`write_output`): a run that fails leaves none behind."""
    fmt = strategy.refine["output_format"]
    if not fmt:
        return None
    folder = strategy.refine["output_dir"] or "."  # empty: the current folder, as a bare file name is
    where = "refine_pipeline_config.output_dir"
    check_folder(folder, where)
    path = os.path.join(folder, f"quantized_model.{fmt}")
    if os.path.isdir(folder):
        check_writable(path, where)
    return path


# Calibration samples the ONNX export counts rounding mismatches on (arrays only: a stream is not read twice).
_EXPORT_SAMPLES = 256


def sample_arrays(data, n: int | None = _EXPORT_SAMPLES):
    """The first ``n`` samples (None: all) of array calibration data, as given; None for a stream."""
    import numpy as np

    if isinstance(data, np.ndarray):
        return data[:n]
    if isinstance(data, list | tuple) and data and all(isinstance(d, np.ndarray) for d in data):
        return [d[:n] for d in data]
    if isinstance(data, dict) and data and all(isinstance(d, np.ndarray) for d in data.values()):
        return {k: d[:n] for k, d in data.items()}
    return None


def write_output(qmodel, strategy, target: str, calib_dataset):
    """Write ``qmodel`` to ``target`` as the strategy's ``output_format`` says; the ONNX export report, or None."""
    try:
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    except OSError as exc:  # made impossible since `output_target` checked it
        raise ConfigError(
            "refine_pipeline_config.output_dir", f"cannot create {os.path.dirname(target)}: {exc}", "Choose another."
        ) from None
    if strategy.refine["output_format"] == "keras":
        from qstrat.saving import save_model

        save_model(qmodel, target)
        return None
    from qstrat.export.onnx_export import export_onnx
    from qstrat.export.rounding import calibration_fingerprint

    whole = sample_arrays(calib_dataset, None)  # the whole calibration set when it is arrays; a stream is read once
    meta = {"qstrat.calib_fingerprint": calibration_fingerprint(whole) if whole is not None else "streamed"}
    report = export_onnx(
        qmodel,
        target,
        strategy.refine["onnx_opset_version"],
        data=sample_arrays(calib_dataset),
        strategy=strategy,
        metadata=meta,
    )
    write_atomically(target[: -len(".onnx")] + "_export_report.json", json.dumps(report.to_dict(), indent=1).encode())
    return report
