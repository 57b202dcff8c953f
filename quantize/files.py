"""Folders and files that appear whole or not at all: a reader (the app, a rerun, a second process) never sees
half of one, even if the writer is killed at any instant."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux renameat2). False where the kernel or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, dst: Path) -> None:
    """Put the complete folder `new` at `dst`, replacing what is there. With a dst in place, the two are swapped
    in one step, so at every instant dst is either the old folder or the new one; the old one is then deleted.
    (Two renames would leave a window with no dst at all.)"""
    new, dst = Path(new), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.replace(new, dst)
        return
    if _exchange(new, dst):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old folder
        return
    old = dst.with_name(dst.name + ".old")  # fallback: a short window without dst, repaired by `recover_dir`
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path) -> None:
    """After a kill inside `replace_dir`'s fallback: bring the old folder back if no new one took its place."""
    old = Path(dst).with_name(Path(dst).name + ".old")
    if old.is_dir() and not Path(dst).exists():
        os.replace(old, dst)


def write_file(path: Path, data: bytes | str) -> None:
    """Write `path` whole: into a temporary file of its own beside it (two writers never share one), synced to
    disk, then one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
