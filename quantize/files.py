"""Folders and files that appear whole or not at all: a reader (the app, a rerun, a second process) never sees
half of one, even if the writer is killed at any instant."""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

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


SAFETENSORS_DTYPES = {"torch.int8": "I8", "torch.uint8": "U8", "torch.int64": "I64", "torch.float32": "F32",
                      "torch.bfloat16": "BF16", "torch.float16": "F16"}  # fmt: skip


SAFETENSORS_SIZES = {"I8": 1, "U8": 1, "I64": 8, "F32": 4, "BF16": 2, "F16": 2}


def write_safetensors(
    path: Path, tensors: dict[str, Callable], metadata: dict[str, str], layout: dict[str, tuple] | None = None
) -> None:
    """A safetensors file written whole, one tensor in memory at a time: `tensors` maps each name to a function that
    returns it; `layout` (name -> (safetensors dtype, shape)) saves calling each twice. (safetensors' own save_file
    builds the whole file in memory, several copies of it: 8 GB for a 2 GB shard.) The format: 8 bytes of header
    length, the JSON header (names, dtypes, shapes, byte offsets), the bytes."""
    path = Path(path)
    if layout is None:
        layout = {
            n: (SAFETENSORS_DTYPES[str(t.dtype)], list(t.shape))
            for n, t in ((n, g()) for n, g in tensors.items())
        }
    # a temporary file of its own: two runs writing one folder never write into each other's
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        write_safetensors_to(fd, tensors, metadata, layout)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors_to(
    fd: int, tensors: dict[str, Callable], metadata: dict[str, str], layout: dict
) -> None:
    """The safetensors bytes into the open file `fd`, synced to disk."""
    with os.fdopen(fd, "wb") as f:
        header, offset = {"__metadata__": metadata}, 0
        for name in tensors:
            dtype, shape = layout[name]
            size = SAFETENSORS_SIZES[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        f.write(len(blob).to_bytes(8, "little") + blob)
        for get in tensors.values():
            f.write(get().contiguous().view(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
