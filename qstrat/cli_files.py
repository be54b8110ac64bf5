"""What the ``qstrat`` commands read and where they write: ``--set`` items, the output path, custom objects and
calibration arrays, each checked before any work, with an error that names the flag."""

from __future__ import annotations

import importlib
import json
import os
import sys
import zipfile
import zlib

from qstrat.errors import CalibrationDataError, ConfigError, QstratError


def parse_set(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items -> ``{key: value}``, each value read as JSON, else kept as a string."""
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


def check_out_path(out: str) -> str:
    """The absolute path to write the quantized model to, or a clear error, before any work is done."""
    path = os.path.abspath(out)
    if os.path.isdir(path):
        raise QstratError(
            f"--out {out}: is a folder. Give a file name, e.g. --out {os.path.join(out, 'model_q.keras')}."
        )
    if not path.endswith(".keras"):
        stem = os.path.splitext(out)[0]
        raise QstratError(
            f"--out {out}: the quantized model is written in the .keras format, which Keras loads only "
            f"from a file ending in .keras. Use --out {stem}.keras."
        )
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise QstratError(f"--out {out}: the folder {folder} does not exist. Create it first (mkdir -p {folder}).")
    if not os.access(folder, os.W_OK):
        raise QstratError(f"--out {out}: the folder {folder} is not writable.")
    return path


def not_the_input(out: str, source: str, flag: str) -> None:
    """Refuse to write over the file the command reads: it would be lost, replaced by what was made of it."""
    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source):
        stem, ext = os.path.splitext(source)
        raise QstratError(
            f"{flag} {out}: that is {source}, the file this command reads; writing there would replace it. "
            f"Give another name, e.g. {flag} {stem}_q{ext}."
        )


def load_custom_objects(items: list[str] | None) -> dict[str, type]:
    """``["mypkg.layers:MyConv", ...]`` -> ``{"MyConv": class}``, with errors that say what failed."""
    out: dict[str, type] = {}
    for item in items or []:
        module, sep, name = item.partition(":")
        if not sep or not module or not name:
            raise QstratError(f'--custom-objects "{item}": expected MODULE:NAME, e.g. mypkg.layers:MyConv.')
        sys.path.insert(0, os.getcwd())  # a module next to the user's files, as `python -m` would find it
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure becomes one clear line
            raise QstratError(
                f'--custom-objects "{item}": cannot import {module} ({type(exc).__name__}: {exc}).'
            ) from None
        finally:
            sys.path.pop(0)
        if not hasattr(mod, name):
            raise QstratError(f'--custom-objects "{item}": module {module} has no attribute "{name}".')
        out[name] = getattr(mod, name)
    return out


def load_calib(path: str, key: str | None, input_names: list[str], key_flag: str = "--calib-key"):
    """Calibration arrays from a .npy or .npz, matched to the model's inputs by name."""
    import numpy as np

    if str(path).endswith((".keras", ".h5", ".hdf5")):
        raise CalibrationDataError(f"{path}: a model file, not data. Give the data as a .npy or .npz file.")
    if key is not None and len(input_names) > 1:
        raise CalibrationDataError(
            f"{path}: {key_flag} {key} picks one array, for a model with one input; this one has "
            f"{len(input_names)} ({', '.join(input_names)}). Leave out {key_flag} and name each array of the .npz "
            "after the input it feeds."
        )
    try:
        # An .npz reads each array when it is taken: those reads fail here too, on a damaged file.
        return _pick(np.load(path, allow_pickle=False), path, key, input_names, key_flag)
    except CalibrationDataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CalibrationDataError(
            f"{path}: cannot read calibration data ({type(exc).__name__}: {exc}). Give a .npy or .npz file "
            "(np.save or np.savez) of numeric arrays."
        ) from None


def _pick(data, path: str, key: str | None, input_names: list[str], key_flag: str):
    """The arrays of a loaded .npy or .npz that feed the model's inputs."""
    import numpy as np

    if isinstance(data, np.ndarray):
        if key is not None:
            raise CalibrationDataError(
                f"{path}: {key_flag} {key} picks an array of a .npz, and a .npy holds one array. "
                f"Leave out {key_flag}, or save an .npz."
            )
        if len(input_names) > 1:
            raise CalibrationDataError(
                f"{path}: one array for a model with {len(input_names)} inputs ({', '.join(input_names)}). "
                "Save one array per input, named after it: np.savez(path, "
                + ", ".join(f"{n}=..." for n in input_names)
                + ")."
            )
        return data
    names = list(data.files)
    if key is not None:
        if key not in names:
            raise CalibrationDataError(f"{path}: no array named '{key}'; it holds {', '.join(names)}.")
        return data[key]
    if not names:
        raise CalibrationDataError(f"{path}: the archive holds no arrays.")
    if len(input_names) == 1:
        if len(names) == 1:
            return data[names[0]]
        if input_names[0] in names:
            return data[input_names[0]]
        raise CalibrationDataError(
            f"{path}: {len(names)} arrays ({', '.join(names)}) for a model with one input ('{input_names[0]}'). "
            f"Pick one with {key_flag} NAME, or save a single array."
        )
    if set(names) == set(input_names):
        return {n: data[n] for n in input_names}
    positional = [f"arr_{i}" for i in range(len(names))]
    if names == positional and len(names) == len(input_names):
        return [data[n] for n in names]  # np.savez(path, a, b): in the model's input order
    raise CalibrationDataError(
        f"{path}: the arrays are named {', '.join(names)}, but the model's inputs are {', '.join(input_names)}. "
        "Name each array after the input it feeds: np.savez(path, " + ", ".join(f"{n}=..." for n in input_names) + ")."
    )
