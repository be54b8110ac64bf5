"""Loading a model file, with one clear error for any problem and room for deep graphs.

`load_model` is ``keras.models.load_model(path, compile=False)`` plus what a
user should not have to know: the file is checked before Keras reads it, any
load failure becomes one `QstratError` naming the file, and Python's recursion
limit is raised for the load so that a quantized model deeper than ~1000
layers (Keras maps a functional graph recursively, one frame per layer) loads
as its float model does.
"""

from __future__ import annotations

import json
import os
import zipfile

from qstrat.errors import ConfigError, QstratError
from qstrat.graph.rebuild import recursion_room

# The room given to a legacy .h5 file, whose layer count is not read up front.
_H5_LAYERS = 10_000


def count_saved_layers(path: str) -> int:
    """How many layers a .keras file's config holds, nested models included (0 if it cannot be read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 0
    count, stack = 0, [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            layers = item.get("layers")
            if isinstance(layers, list):
                count += len(layers)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def load_model(
    path: str | os.PathLike, custom_objects: dict | None = None, compile: bool = False, safe_mode: bool = True
):
    """A Keras model from a .keras file (or a legacy .h5), float or quantized.

    Args:
        path: the model file.
        custom_objects: the user's own classes and functions the model uses, by name.
        compile: restore the saved compile() settings and the optimizer's state, to
            resume training (a QAT model saved mid-fit). Off by default: quantizing
            needs no loss or optimizer.
        safe_mode: as Keras': a ``Lambda`` layer's function is saved as bytecode, which runs only with
            ``safe_mode=False``; give it for a file you trust.

    Raises:
        QstratError: the file is missing, a folder, damaged, in another format,
            or Keras cannot load it (the message says why and how to fix it).
    """
    import keras

    if not isinstance(path, (str, os.PathLike)):
        raise QstratError(f"load_model: expected the path of a model file, got {type(path).__name__}.")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise QstratError(f"{path}: no such model file.")
    if os.path.isdir(path):
        raise QstratError(f"{path}: is a folder; give a .keras model file.")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise QstratError(
            f"{path}: not a .keras model (a .keras file is a zip archive; this one is not, so it is damaged "
            "or in another format). Save the model again with model.save('model.keras')."
        )
    if not path.endswith((".keras", ".h5", ".hdf5")):
        raise QstratError(f"{path}: unknown model format; give a .keras file (or a legacy .h5/.hdf5).")
    layers = count_saved_layers(path) if path.endswith(".keras") else _H5_LAYERS
    try:
        with recursion_room(layers):
            return keras.models.load_model(path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear message
        own = _qstrat_cause(exc)
        if own is not None:  # qstrat's own message first, not Keras's wrappers and config dumps around it
            raise QstratError(f"{path}: cannot load the Keras model: {own}") from None
        hint = ""
        if "safe_mode" in str(exc):
            hint = " For a file you trust: qstrat.load_model(path, safe_mode=False)."
        elif "Could not locate" in str(exc) or "Unknown layer" in str(exc):
            hint = " It uses a custom class: pass it in custom_objects (CLI: --custom-objects module:Name)."
        raise QstratError(f"{path}: cannot load the Keras model ({type(exc).__name__}: {exc}).{hint}") from None


def _qstrat_cause(exc: BaseException) -> QstratError | None:
    """The qstrat error a load failure came from (Keras wraps a layer's from_config error twice), or None."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, QstratError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def save_model(model, path: str | os.PathLike) -> None:
    """``model.save(path)``, atomically: Keras writes a temporary file beside ``path``, which then replaces it.

    An error or Ctrl-C while saving leaves any earlier file at ``path`` as it was.
    """
    from qstrat.files import check_writable, replacing

    check_writable(path, "save_model path")
    path = os.fspath(path)
    if not path.endswith(".keras"):
        stem = os.path.splitext(path)[0]
        raise ConfigError(
            "save_model path",
            f"{path} does not end in .keras: the model is saved in the .keras format, which Keras loads only "
            "from a file of that name",
            f"Use {stem}.keras.",
        )
    with replacing(path, ".keras", "save the model") as tmp:  # Keras saves only to a name ending in .keras
        model.save(tmp)
