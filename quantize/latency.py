"""Latency bookkeeping: turn per-token time stamps into TTFT, ms/token, tokens/s — and the interleaved
INT8-vs-BF16 measurement that the quantize report, the benchmark and the app's Benchmark tab share."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from quantize.generate import Sampling, stream

# What each measured engine is called in tables (bench, card).
LABELS = {
    "int8": "INT8 engine",
    "bf16": "BF16 engine",
    "hf_bf16": "transformers BF16",
    "peer": "llama.cpp Q8_0",
    "app": "app panel (INT8)",
}


@dataclass
class Timing:
    """One generation: start time and a time stamp per token."""

    start: float
    stamps: list[float] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float | None:
        return (self.stamps[0] - self.start) * 1e3 if self.stamps else None

    @property
    def decode_ms(self) -> list[float]:
        """Gaps between consecutive tokens: the per-token decode cost (the first token is prefill, not here)."""
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]

    def summary(self) -> dict:
        return summarize(self.decode_ms, self.ttft_ms, len(self.stamps))


def summarize(decode_ms: list[float], ttft_ms: float | None, tokens: int) -> dict:
    """The one summary of decode times, with the same keys everywhere (a reply, a benchmark, the card); None where
    there is nothing to measure. `tokens` counts the tokens of one generation."""
    median = statistics.median(decode_ms) if decode_ms else None
    return {
        "tokens": tokens,
        "ttft_ms": ttft_ms,
        "median_ms": median,
        "p10_ms": percentile(decode_ms, 10),
        "p90_ms": percentile(decode_ms, 90),
        "tokens_per_s": 1e3 / median if median else None,
    }


def fmt(value: float | None, spec: str = ".1f") -> str:
    """The one number formatter of tables and cards: a dash where nothing was measured."""
    return "–" if value is None else format(value, spec)


def round_ratios(result: dict, slow: str, fast: str) -> list[float]:
    """Per round of an `interleaved` result: how many times faster `fast` decodes than `slow` (slow ms / fast ms)."""
    m = result["models"]
    return [s / f for s, f in zip(m[slow]["round_median_ms"], m[fast]["round_median_ms"])]


def speedup_line(
    ratios: list[float], fast: str = "INT8", slow: str = "BF16", predicted: float | None = None
) -> str:
    """The one wording of a speed-up: the median of the per-round ratios, which way it goes, and every round;
    with `predicted` (slow's bytes read per token over fast's), what the bytes alone would give, so a reader sees
    how much of it is quantization and how much kernels."""
    median = statistics.median(ratios)
    rounds = f" (rounds {' '.join(f'{r:.2f}x' for r in ratios)})" if len(ratios) > 1 else ""
    way = "faster" if median >= 1 else "slower"
    bytes_say = f"; the bytes each token reads predict {predicted:.2f}x" if predicted else ""
    return f"**{fast} is {median:.2f}x {way} per token** than {slow}{rounds}{bytes_say}"


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def time_generation(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> Timing:
    """Greedy, exactly `new_tokens` tokens (no eos stop), so both models do the same work."""
    timing = Timing(time.perf_counter())
    for step in stream(model, input_ids, Sampling(max_new_tokens=new_tokens)):
        timing.stamps.append(step.t)
    return timing


def timed(model, input_ids: torch.Tensor, new_tokens: int) -> Timing:
    """time_generation for a torch model; a peer engine (llama.cpp in quantize/bench.py) brings its own loop as a
    `time_generation(input_ids, new_tokens)` method, stamped the same way."""
    own = getattr(model, "time_generation", None)
    return own(input_ids, new_tokens) if own is not None else time_generation(model, input_ids, new_tokens)


def interleaved(
    models: dict[str, torch.nn.Module],
    prompts: list[torch.Tensor],
    new_tokens: int,
    rounds: int,
    progress=None,
) -> dict:
    """Run every model on every prompt, `rounds` times, alternating the order each round so drift (thermal,
    other processes) hits both. Returns per-model summaries and the per-round ratio of median ms/token.
    A model may also be a peer engine with its own `time_generation` method (see `timed`)."""
    names = list(models)
    for name in names:  # warm-up: first calls pay for allocations and FBGEMM packing
        timed(models[name], prompts[0], min(4, new_tokens))
    per_round: list[dict[str, list[float]]] = []
    ttft: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        got: dict[str, list[float]] = {n: [] for n in names}
        for ids in prompts:
            for name in order:
                t = timed(models[name], ids, new_tokens)
                got[name] += t.decode_ms
                ttft[name].append(t.ttft_ms)
                if progress:
                    progress.update(1)
        per_round.append(got)
    out: dict = {"rounds": rounds, "prompts": len(prompts), "new_tokens": new_tokens, "models": {}}
    for name in names:
        all_ms = [x for g in per_round for x in g[name]]
        out["models"][name] = summarize(all_ms, statistics.median(ttft[name]), new_tokens) | {
            "round_median_ms": [statistics.median(g[name]) for g in per_round]
        }
    if len(names) >= 2:  # how many times faster the first model is than the second, per round
        out["speedup_per_round"] = round_ratios(out, names[1], names[0])
        out["speedup_median"] = statistics.median(out["speedup_per_round"])
    return out


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


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


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
