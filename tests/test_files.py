"""quantize/files.py from the outside: a folder replaced with `replace_dir` is, at every instant and after a kill
at any point, one complete version (never missing, never a mix); `recover_dir` brings back the old folder a
fallback swap left aside; `write_file` leaves the whole old or the whole new content.

The kill tests run a child process that swaps versions in a loop. Either the parent SIGKILLs it after a varying
number of finished swaps, wherever it happens to be (a reader thread in the parent watching dst all along), or
the child SIGKILLs itself right before its k-th file-system operation (seen through Python's audit hooks), for
every k of its run: every point between two operations is a kill point once. The parent then looks at dst."""

import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from quantize import files

NAMES = ("config.json", "weights.bin", "tokenizer.json", "README.md")
KILLS = 25

# Installed once the child's imports are done: with a kill point k > 0, the child SIGKILLs itself right before its
# k-th file-system operation (an audit event is raised before the operation runs); k = 0 never.
KILL_AT = """
import os, signal, sys
_seen = 0
def _hook(event, args):
    global _seen
    if KILL_AT and event in {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.scandir",
                             "shutil.rmtree", "ctypes.dlopen", "ctypes.call_function"}:
        _seen += 1
        if _seen == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(_hook)
"""

# The child: version i of the folder holds every file in NAMES, each naming i (its length depends on i too);
# `replace_dir` puts it at dst, then the child prints i (a printed i is a finished swap). argv: root, first
# version, "exchange" or "fallback", repo root, kill point, number of versions.
SWAPPER = (
    """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from quantize import files
root, first, mode, KILL_AT, count = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[5]), int(sys.argv[6])
if mode == "fallback":
    files._exchange = lambda a, b: False
dst = root / "dst"
"""
    + KILL_AT
    + """
for i in range(first, first + count):
    new = root / f"v{i}"
    new.mkdir()
    for name in """
    + repr(NAMES)
    + """:
        (new / name).write_text(f"v{i} " * (1 + i % 4096))
    files.replace_dir(new, dst)
    print(i, flush=True)
"""
)

WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from quantize import files
path, first = Path(sys.argv[1]), int(sys.argv[2])
for i in range(first, first + 10**9):
    files.write_file(path, f"v{i} " * 20000)
    print(i, flush=True)
"""
FOREVER = str(10**9)


def version_of(folder: Path) -> int:
    """The one version every file of `folder` names; fails on a missing, extra, partial or mixed file."""
    contents = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(contents) == sorted(NAMES), contents.keys()
    assert len(set(contents.values())) == 1, {k: v[:12] for k, v in contents.items()}
    words = next(iter(contents.values())).split()
    assert len(set(words)) == 1, "a partial or mixed file"
    i = int(words[0][1:])
    assert len(words) == 1 + i % 4096, "a file cut short"
    return i


def make_version(folder: Path, i: int) -> None:
    folder.mkdir(parents=True)
    for name in NAMES:
        (folder / name).write_text(f"v{i} " * (1 + i % 4096))


def kill_after(proc: subprocess.Popen, lines: int) -> int:
    """Let the child report `lines` iterations, then SIGKILL it wherever it is; returns the last iteration it
    reported finished (the child may be ahead of what was read: the rest of its output is read after the kill)."""
    for _ in range(lines):
        line = proc.stdout.readline()
        assert line, f"the child stopped: {proc.stderr.read()}"
    proc.kill()
    rest = proc.stdout.read()  # to EOF, including what the buffer already holds
    assert proc.wait(30) == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()
    return int((line + rest).split()[-1])


def renameat2_exchange_works(tmp: Path) -> bool:
    """This filesystem swaps two paths in one renameat2(RENAME_EXCHANGE) call (asked of the kernel directly)."""
    a, b = tmp / "probe-a", tmp / "probe-b"
    a.mkdir()
    b.mkdir()
    (a / "a").touch()
    libc = ctypes.CDLL(None, use_errno=True)
    ok = hasattr(libc, "renameat2") and libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0
    swapped = ok and (b / "a").exists() and not (a / "a").exists()
    for p in (a, b):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    return swapped


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_killed_at_any_point_dst_is_one_complete_version(tmp_path, mode):
    """Exchange: dst is complete after every kill, and a reader watching dst the whole time never finds it
    missing. Fallback (no RENAME_EXCHANGE): complete again once `recover_dir` has run."""
    if mode == "exchange" and not renameat2_exchange_works(tmp_path):
        pytest.skip("this filesystem has no renameat2 RENAME_EXCHANGE")
    dst = tmp_path / "dst"
    make_version(dst, 0)
    missing, seen, stop = [], set(), threading.Event()

    def watch() -> None:  # a concurrent reader: dst must exist at every instant
        while not stop.is_set():
            try:
                os.stat(dst)
            except FileNotFoundError:
                missing.append(1)
            try:
                seen.add((dst / "README.md").read_text()[:12])
            except FileNotFoundError:
                pass  # the file of a folder swapped out between the two lookups; dst itself was there

    reader = threading.Thread(target=watch, daemon=True)
    if mode == "exchange":
        reader.start()
    try:
        for run in range(KILLS):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SWAPPER,
                    str(tmp_path),
                    str((run + 1) * 10**6),
                    mode,
                    str(ROOT),
                    "0",
                    FOREVER,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            last = kill_after(proc, 1 + (run * 7) % 13)
            if mode == "fallback":
                files.recover_dir(dst)
            got = version_of(dst)
            # the last swap the child reported, or the one it finished right before the kill
            assert got in (last, last + 1), (got, last)
    finally:
        stop.set()
        if reader.is_alive():
            reader.join(30)
    if mode == "exchange":
        assert not missing, f"dst was missing {len(missing)} times while the child swapped"
        assert len(seen) > KILLS, "the reader did not watch the swaps happen"


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_killed_before_each_operation_dst_is_one_complete_version(tmp_path, mode):
    """Two swaps, killed right before each file-system operation in turn. Exchange: dst is there and complete at
    every kill point, with no repair. Fallback: at the kill point between its two renames dst is missing (the
    window it has), and `recover_dir` makes it complete again. Either way dst never goes back to an older
    version as the kill point moves on."""
    if mode == "exchange" and not renameat2_exchange_works(tmp_path):
        pytest.skip("this filesystem has no renameat2 RENAME_EXCHANGE")
    states = []  # (dst there before any repair, version after recover_dir)
    for k in itertools.count(1):
        root = tmp_path / f"k{k}"
        make_version(root / "dst", 0)
        proc = subprocess.run(
            [sys.executable, "-c", SWAPPER, str(root), "1", mode, str(ROOT), str(k), "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode == 0:  # k is past the last operation: the two swaps finished
            assert proc.stdout.split() == ["1", "2"] and version_of(root / "dst") == 2
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        there = (root / "dst").exists()
        files.recover_dir(root / "dst")
        states.append((there, version_of(root / "dst")))
        shutil.rmtree(root)
    versions = [v for _, v in states]
    assert len(states) >= 10 and versions == sorted(versions) and set(versions) == {0, 1, 2}, states
    if mode == "exchange":
        assert all(there for there, _ in states), states
    else:
        assert not all(there for there, _ in states), "the fallback's window was never hit"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_replace_dir_puts_the_new_folder_whole_and_leaves_nothing(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    elif not renameat2_exchange_works(tmp_path):
        pytest.skip("this filesystem has no renameat2 RENAME_EXCHANGE")
    dst, new = tmp_path / "out" / "dst", tmp_path / "new"
    files.replace_dir(_folder(tmp_path / "first", {"a.txt": "1", "b.txt": "1"}), dst)  # dst did not exist
    assert _read(dst) == {"a.txt": "1", "b.txt": "1"}
    files.replace_dir(_folder(new, {"a.txt": "2", "c.txt": "2"}), dst)
    assert _read(dst) == {"a.txt": "2", "c.txt": "2"}  # the new folder, not a merge: b.txt is gone
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst"]  # no dst.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # new was moved, the old folder deleted


def test_recover_dir_brings_back_the_old_folder_only_when_dst_is_missing(tmp_path):
    dst, old = tmp_path / "dst", tmp_path / "dst.old"
    _folder(old, {"a.txt": "old", "b.txt": "old"})  # a fallback swap killed between its two renames
    files.recover_dir(dst)
    assert _read(dst) == {"a.txt": "old", "b.txt": "old"} and not old.exists()

    _folder(old, {"a.txt": "older"})  # killed after the new folder was in place: dst stays the new one
    files.recover_dir(dst)
    assert _read(dst) == {"a.txt": "old", "b.txt": "old"}

    files.recover_dir(tmp_path / "never-made")  # nothing to recover: nothing happens
    assert not (tmp_path / "never-made").exists()


def test_write_file_killed_at_any_point_leaves_one_whole_version(tmp_path):
    path = tmp_path / "report.json"
    files.write_file(path, "v0 " * 20000)
    for run in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str((run + 1) * 10**6), str(ROOT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        last = kill_after(proc, 1 + (run * 5) % 11)
        words = path.read_text().split()
        assert len(words) == 20000 and len(set(words)) == 1, "a partial or mixed file"
        assert int(words[0][1:]) in (last, last + 1)
    files.write_file(path, b"bytes too")
    assert path.read_bytes() == b"bytes too"


def _folder(path: Path, content: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in content.items():
        (path / name).write_text(text)
    return path


def _read(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_two_writers_of_one_safetensors_file_each_write_a_whole_one(tmp_path):
    """Two runs writing the same file at once (one --out, two commands): each writes its own temporary file, so
    the file is one of the two whole versions and neither writer fails."""
    from safetensors.torch import load_file

    path, both_inside = tmp_path / "engine.safetensors", threading.Barrier(2)
    versions = {k: {"w": torch.full((256, 256), float(k))} for k in (1, 2)}
    errors = []

    def write(k: int) -> None:
        def tensor():
            both_inside.wait(timeout=30)  # both writers are half-way through their files
            return versions[k]["w"]

        try:
            files.write_safetensors(path, {"w": tensor}, {"format": "pt"}, {"w": ("F32", [256, 256])})
        except Exception as e:  # noqa: BLE001 - what a writer raised is the finding
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = load_file(path)["w"]
    assert any(torch.equal(got, v["w"]) for v in versions.values())
    assert [p.name for p in tmp_path.iterdir()] == ["engine.safetensors"]  # no temporary file left


def test_an_index_that_names_files_outside_its_folder_is_refused(tmp_path):
    """A model folder's index is a list of its own files: '../' or an absolute path is refused, never read."""
    import json

    from quantize.errors import ModelError
    from quantize.runtime import decoders

    secret = tmp_path / "secret.safetensors"
    files.write_safetensors(secret, {"w": lambda: torch.zeros(2)}, {"format": "pt"})
    for name in ("../secret.safetensors", str(secret)):
        folder = tmp_path / f"model-{len(name)}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(ModelError, match="outside its folder"):
            decoders.open_bf16(folder)
