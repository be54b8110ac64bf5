"""Output paths: what is refused before any work, and what an atomic write does to links, modes and special files."""

import os
import stat

import pytest

from qstrat.errors import ConfigError
from qstrat.files import check_folder, check_writable, replacing, write_atomically

portable = pytest.mark.portable


@portable
def test_an_empty_path_or_one_ending_in_a_separator_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="the path is empty"):
        check_writable("", "out")
    with pytest.raises(ConfigError, match="is a folder"):
        check_writable(f"{tmp_path}/new/", "out")  # a folder's name, though no such folder exists yet
    assert list(tmp_path.iterdir()) == []


@portable
def test_a_link_is_followed_the_link_stays_and_its_target_is_replaced(tmp_path):
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "v3.onnx"
    target.write_bytes(b"OLD")
    link = tmp_path / "current.onnx"
    link.symlink_to(target)
    check_writable(str(link), "out")
    write_atomically(str(link), b"NEW")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"NEW"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["v3.onnx"]  # no temporary file left


@portable
def test_a_link_to_a_missing_folder_is_refused_before_any_work(tmp_path):
    link = tmp_path / "out.onnx"
    link.symlink_to(tmp_path / "gone" / "out.onnx")
    with pytest.raises(ConfigError, match="gone does not exist"):
        check_writable(str(link), "out")


@portable
def test_a_file_keeps_its_permissions_and_a_new_one_gets_the_umask(tmp_path):
    private = tmp_path / "private.onnx"
    private.write_bytes(b"OLD")
    private.chmod(0o600)
    write_atomically(str(private), b"NEW")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_bytes() == b"NEW"
    old = os.umask(0o027)
    try:
        write_atomically(str(tmp_path / "new.onnx"), b"NEW")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.onnx").stat().st_mode) == 0o640


@portable
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_pipe_is_refused_not_replaced(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(ConfigError, match="is not a regular file"):
        check_writable(str(pipe), "out")
    with pytest.raises(ConfigError, match="is not a regular file"):
        write_atomically(str(pipe), b"NEW")
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


@portable
def test_check_folder_creates_nothing_and_refuses_a_file_in_the_way(tmp_path):
    check_folder(str(tmp_path / "a" / "b"), "output_dir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_folder(str(tmp_path / "f"), "output_dir")
    with pytest.raises(ConfigError, match="is a file"):
        check_folder(str(tmp_path / "f" / "sub"), "output_dir")


@portable
def test_an_error_while_writing_leaves_the_old_file_and_no_temporary_one(tmp_path):
    old = tmp_path / "m.keras"
    old.write_bytes(b"OLD")
    with pytest.raises(RuntimeError, match="interrupted"), replacing(str(old), ".keras") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"HALF")
        raise RuntimeError("interrupted")
    assert old.read_bytes() == b"OLD"
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]
