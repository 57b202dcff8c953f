"""The machine the models run on: its CPU, its memory and the rules for using them, and the C library's heap.

One place for what the app, the maintainer command and the bench all ask of the machine: how much memory the
models may take (the OS's, the container's and the configured limit), whether BF16 and INT8 fit together, and
resident memory measured and given back.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HEADROOM = 1.15  # on top of the weights: KV caches, activations, one layer's load temporaries
# cgroup v2, then v1: (limit, usage); a Space's container limit is not in /proc/meminfo
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


# ---------------------------------------------------------------- memory rules


def memory_room() -> int:
    """Bytes the models may take: the OS's available memory, the container's cgroup room and
    Q8CHAT_MEMORY_BYTES, whichever is least (called with no model loaded)."""
    room = [os_room()]
    if os.environ.get("Q8CHAT_MEMORY_BYTES"):
        room.append(int(os.environ["Q8CHAT_MEMORY_BYTES"]))
    return min(room)


def os_room() -> int:
    """Bytes free now: the OS's available memory, or the container's cgroup room if that is less."""
    import psutil

    room = [psutil.virtual_memory().available]
    for limit, usage in CGROUP_FILES:
        try:
            room.append(int(Path(limit).read_text()) - int(Path(usage).read_text()))
            break
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return min(room)


def why_pair_does_not_fit(bf16: int, int8: int) -> str | None:
    """The one rule for holding both models (the app, the quantize step's speed stage, the bench): None when `bf16`
    and `int8` bytes of weights fit in the memory there is now, else the sentence that says why only INT8 runs."""
    room = memory_room()
    if (bf16 + int8) * HEADROOM <= room:
        return None
    return (
        f"BF16 is not loaded: its {bf16 / 1e9:.2f} GB of weights and INT8's {int8 / 1e9:.2f} GB, with room for "
        f"caches and activations ({(bf16 + int8) * HEADROOM / 1e9:.2f} GB), need more than the {room / 1e9:.2f} GB "
        "of memory this machine has free, so INT8 answers alone, with no comparison."
    )


# ---------------------------------------------------------------- the C library's heap


def malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so resident memory is the model."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MADV_DONTNEED = 4  # Linux: the range's anonymous pages are dropped and read back as zeros


def release_pages(t: torch.Tensor) -> None:
    """Give the whole pages inside a contiguous tensor's memory back to the OS while the tensor stays allocated
    (a free cache slot: its pages are resident again only when written). A no-op where libc has no madvise."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        try:
            ctypes.CDLL("libc.so.6").madvise(
                ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED
            )
        except (OSError, AttributeError):
            pass


def release_memory() -> None:
    """Collect what Python no longer reaches, then give the freed pages back to the OS."""
    gc.collect()
    malloc_trim()


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Every reply decodes in a fresh worker thread, and glibc gives threads their own malloc arenas (up to 8 per
    core), each keeping freed KV-cache pages: resident memory then creeps up with traffic. Two arenas hold it
    flat (the same as MALLOC_ARENA_MAX=2, set before any thread starts)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- resident memory


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def settled_rss() -> int:
    """Resident memory once temporaries are freed (glibc keeps freed pages unless trimmed)."""
    release_memory()
    return rss_bytes()


def reset_peak_rss() -> None:
    """Start a new high-water mark of resident memory. ru_maxrss cannot do this: a child process starts with its
    parent's, even after exec. Linux resets VmHWM when "5" is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Highest resident memory since the last reset_peak_rss (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- the CPU


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        return set()


@dataclass(frozen=True)
class CPU:
    model: str
    flags: dict
    threads: int
    native_bf16: bool
    machine: str

    def line(self) -> str:
        isa = "/".join(k for k, v in self.flags.items() if v) or "baseline x86-64"
        bf16 = "native BF16" if self.native_bf16 else "BF16 emulated (no native BF16)"
        return f"{self.model} · {isa} · {bf16} · {self.threads} threads"

    def asdict(self) -> dict:
        return asdict(self)


def describe_cpu() -> CPU:
    """What the numbers were measured on, so nobody over-reads them on another machine."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = {
        "AVX2": "avx2" in flags,
        "AVX-512": "avx512f" in flags,
        "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags),
        "AMX": "amx_tile" in flags,
    }
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    return CPU(name, isa, torch.get_num_threads(), native_bf16, f"{platform.machine()} {os.cpu_count()} cpus")
