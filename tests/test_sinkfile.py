"""Tests for broker.sinkfile: replacing a sink's file, on the real file system.

The suite runs as root, so giving a file to another owner and group is tested for real.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.sinkfile import remove, sweep_leftovers, write_atomic

ROOT = os.getuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="giving files away needs root")
QUICK = 5.0


def test_an_atomic_write_leaves_exactly_the_content_with_the_mode(tmp_path: Path) -> None:
    """The file holds the bytes with exactly `mode` (whatever the umask), replaces what was
    there by rename (a new inode), and no temporary file is left."""
    path = tmp_path / "token"
    path.write_text("old")
    old_inode = path.stat().st_ino
    umask = os.umask(0o077)
    try:
        write_atomic(path, b"new-content", 0o640, None, None)
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"new-content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != old_inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_an_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    """A symlink planted at the path is replaced by the file; its target is not touched."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path = tmp_path / "token"
    path.symlink_to(victim)
    write_atomic(path, b"token", 0o600, None, None)
    assert not path.is_symlink()
    assert path.read_bytes() == b"token"
    assert victim.read_text() == "keep me"


@needs_root
def test_owner_and_group_are_set_before_the_file_appears(tmp_path: Path) -> None:
    """The file belongs to the configured owner and group as soon as it is at the path, and
    no file in the directory is ever looser than `mode` (watched while writing 300 times)."""
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_gid
    path = tmp_path / "token"
    seen: list[tuple[str, int, int, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for entry in os.scandir(tmp_path):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                seen.append((entry.name, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for i in range(300):
            write_atomic(path, f"token-{i}".encode(), 0o640, nobody.pw_uid, group)
    finally:
        stop.set()
        watcher.join(QUICK)
    assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, group)
    assert len(seen) > 300
    assert all(mode & ~0o640 == 0 for _name, mode, _uid, _gid in seen), "a looser file was seen"
    at_path = [(uid, gid) for name, _mode, uid, gid in seen if name == "token"]
    assert set(at_path) == {(nobody.pw_uid, group)}


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the unprivileged user `nobody` owns, outside pytest's root-only base."""
    with tempfile.TemporaryDirectory(prefix="sinkfile-") as name:
        directory = Path(name)
        os.chown(directory, pwd.getpwnam("nobody").pw_uid, -1)
        yield directory


def _write_as_nobody(directory: Path, owner: int | None, group: int | None, caps: str) -> None:
    """write_atomic run by `nobody` (supplementary group: `group`) holding only `caps`, as
    the systemd unit's drop-ins in docs/operations.md ("Sinks") set it up."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    nobody = pwd.getpwnam("nobody")
    groups = ["--groups", str(group)] if group is not None else ["--clear-groups"]
    capabilities = [f"--inh-caps=+{caps}", f"--ambient-caps=+{caps}"] if caps else []
    code = (
        "import sys; from pathlib import Path; from broker.sinkfile import write_atomic; "
        "owner, group = (None if a == '-' else int(a) for a in sys.argv[2:4]); "
        "write_atomic(Path(sys.argv[1]), b'token', 0o640, owner, group)"
    )
    argv = [str(a) if a is not None else "-" for a in (directory / "token", owner, group)]
    done = subprocess.run(
        [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", *groups,
         *capabilities, sys.executable, "-c", code, *argv],
        capture_output=True, text=True, timeout=30, check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@needs_root
def test_a_daemon_with_only_cap_chown_gives_the_file_to_another_owner(nobody_dir: Path) -> None:
    """A daemon user holding CAP_CHOWN alone (not CAP_FOWNER) writes a sink for another owner
    and group: the mode is set while the file is still its own."""
    other_uid, other_gid = 4242, 4343
    _write_as_nobody(nobody_dir, other_uid, other_gid, "chown")
    st = (nobody_dir / "token").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (other_uid, other_gid, 0o640)
    assert (nobody_dir / "token").read_bytes() == b"token"


@needs_root
def test_a_daemon_without_capabilities_sets_a_group_it_belongs_to(nobody_dir: Path) -> None:
    """With no capability at all, a group the daemon's user belongs to is set, mode exact."""
    other_gid = 4343
    _write_as_nobody(nobody_dir, None, other_gid, "")
    st = (nobody_dir / "token").stat()
    nobody = pwd.getpwnam("nobody")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, other_gid, 0o640)


def test_remove_says_whether_there_was_a_file(tmp_path: Path) -> None:
    """remove() deletes the file and reports True; with no file it reports False."""
    path = tmp_path / "token"
    path.write_text("x")
    assert remove(path) is True
    assert not path.exists()
    assert remove(path) is False


def test_leftover_temporary_files_of_a_killed_write_are_swept(tmp_path: Path) -> None:
    """Only `.NAME.XXXXXXXX.tmp` files beside the sink go; anything else stays."""
    path = tmp_path / "token"
    leftovers = [tmp_path / ".token.0a1b2c3d.tmp", tmp_path / ".token.ffffffff.tmp"]
    keep = [tmp_path / ".token.tmp", tmp_path / ".other.0a1b2c3d.tmp", tmp_path / "token"]
    for file in leftovers + keep:
        file.write_text("x")
    assert sweep_leftovers(path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
