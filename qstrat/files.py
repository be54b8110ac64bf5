"""Writing exported files safely: check the destination first, write atomically."""

from __future__ import annotations

import contextlib
import os
import uuid

from qstrat.errors import ConfigError


def check_writable(path: str, where: str = "path") -> None:
    """Fail before any long work when ``path`` cannot be written (``where``: the argument or flag that gave it)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(where, f"expected a file path, got {type(path).__name__}", "Give the file to write.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ConfigError(where, f"{path} is a folder", "Give the file to write, e.g. model.onnx.")
    if not os.path.isdir(folder):
        raise ConfigError(where, f"the folder {folder} does not exist", "Create it first, or choose another path.")
    if not os.access(folder, os.W_OK):
        raise ConfigError(where, f"the folder {folder} is not writable", "Choose a folder you can write to.")


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a new file beside ``path``, then rename it over ``path``.

    The new file honours the umask (unlike mkstemp's 0600). An error or Ctrl-C
    leaves the old file (if any) as it was and no partial file.
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
