"""Writing exported files safely: check the destination first, write atomically."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid

from qstrat.errors import ConfigError, QstratError


def check_writable(path: str, where: str = "path") -> None:
    """Fail before any long work when ``path`` cannot be written (``where``: the argument or flag that gave it).

    A symbolic link is followed: the file it points to is the one written.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(where, f"expected a file path, got {type(path).__name__}", "Give the file to write.")
    path = os.fspath(path)
    if not path:
        raise ConfigError(where, "the path is empty", "Give the file to write.")
    real = os.path.realpath(path)
    if path.endswith(("/", os.sep)) or os.path.isdir(real):
        raise ConfigError(where, f"{path} is a folder", "Give the path of the file to write, a name inside it.")
    _check_regular(real, path, where)
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise ConfigError(where, f"the folder {folder} does not exist", "Create it first, or choose another path.")
    _try_writing_in(folder, where)


def check_folder(folder: str, where: str) -> None:
    """Fail before any long work when files cannot be written in ``folder``, or it cannot be created (it is made
    only when they are written, so a failed run leaves no empty folder)."""
    real = os.path.realpath(folder)
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConfigError(where, f"{folder} is a file, not a folder", "Give a folder, or another path.")
    existing = real
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(where, f"cannot create {folder}: {existing} is a file", "Choose another folder.")
    _try_writing_in(existing, where)


def _check_regular(real: str, path: str, where: str) -> None:
    if os.path.exists(real) and not os.path.isfile(real):
        raise ConfigError(
            where,
            f"{path} exists and is not a regular file (a device, pipe or socket)",
            "Give the path of a regular file: qstrat writes a new file and renames it over the old one.",
        )


def _try_writing_in(folder: str, where: str) -> None:
    # A file really created and removed: os.access says yes to root, and on a read-only filesystem.
    trial = os.path.join(folder, f".qstrat-write-check.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.close(os.open(trial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(trial)
    except OSError as exc:
        raise ConfigError(
            where, f"cannot write in the folder {folder} ({exc.strerror})", "Choose a folder you can write to."
        ) from None


@contextlib.contextmanager
def replacing(path: str, suffix: str = "", what: str = "write the file"):
    """Within: the path of a new file beside ``path`` (ending in ``suffix``) to write; at the end it is renamed
    over ``path``.

    A symbolic link is followed: the file it points to is replaced, and the link
    stays. A file that exists keeps its permissions; a new one honours the umask
    (unlike mkstemp's 0600). Anything but a regular file (a device, a pipe) is
    refused, not replaced. An error or Ctrl-C leaves the old file (if any) as it
    was and no partial file.
    """
    path = os.fspath(path)
    real = os.path.realpath(path)
    _check_regular(real, path, "path")
    mode = stat.S_IMODE(os.stat(real).st_mode) if os.path.isfile(real) else None
    tmp = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.{uuid.uuid4().hex[:8]}{suffix or '.tmp'}")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):  # the disk full, the folder gone or made read-only since the check
            raise QstratError(f"{path}: cannot {what} ({exc.strerror or exc}); nothing was written.") from None
        raise


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a new file beside ``path``, then rename it over ``path`` (`replacing`)."""
    with replacing(path) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
