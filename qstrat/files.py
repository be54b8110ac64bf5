"""Writing exported files safely: check the destination first, write atomically."""

from __future__ import annotations

import contextlib
import os
import uuid

from qstrat.errors import ConfigError, QstratError


def check_writable(path: str, where: str = "path") -> None:
    """Fail before any long work when ``path`` cannot be written (``where``: the argument or flag that gave it)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(where, f"expected a file path, got {type(path).__name__}", "Give the file to write.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ConfigError(where, f"{path} is a folder", "Give the path of the file to write, a name inside it.")
    if not os.path.isdir(folder):
        raise ConfigError(where, f"the folder {folder} does not exist", "Create it first, or choose another path.")
    # A file really created and removed: os.access says yes to root, and on a read-only filesystem.
    trial = os.path.join(folder, f".qstrat-write-check.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.close(os.open(trial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(trial)
    except OSError as exc:
        raise ConfigError(
            where, f"cannot write in the folder {folder} ({exc.strerror})", "Choose a folder you can write to."
        ) from None


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
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):  # the disk full, the folder gone or made read-only since the check
            raise QstratError(f"{path}: cannot write the file ({exc.strerror or exc}); nothing was written.") from None
        raise
