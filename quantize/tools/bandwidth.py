"""The memory-bandwidth floor of a decode: how fast this machine copies DRAM, and each model's time just to stream
the bytes a token reads at that rate, with how far the measured time is above it."""

from __future__ import annotations

import statistics
import time

import torch

from quantize.runtime import latency

BANDWIDTH_MIB = 512  # far beyond any last-level cache, so the copy runs from DRAM


def copy_bandwidth(threads: int, mib: int = BANDWIDTH_MIB, repeats: int = 5) -> float:
    """DRAM bandwidth in bytes/s as a large tensor copy sees it with `threads` torch threads: best of `repeats`,
    counting 2 x size per copy since it reads and writes every byte (the STREAM convention)."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch pays page faults, not bandwidth
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def add_floors(res: dict, threads: int, sizes: dict, memory: dict) -> None:
    """Each model's bandwidth floor (the time just to stream its weights once per token) and the ratios."""
    bw = res["bandwidth_bytes_per_s"] = copy_bandwidth(threads)
    for name, m in res["models"].items():
        m["prefill_tokens_per_s"] = res["prompt_tokens"] / m["ttft_ms"] * 1e3
        if name not in sizes:  # a server's weights are not known here
            continue
        m.update(sizes[name], **memory.get(name, {}))
        m["floor_ms"] = m["bytes_per_token"] / bw * 1e3
        m["x_floor"] = m["median_ms"] / m["floor_ms"]
    if "bf16" in res["models"]:
        res["speedup_per_round"] = latency.round_ratios(res, "bf16", "int8")
        res["speedup_median"] = statistics.median(res["speedup_per_round"])
    if "peer" in res["models"]:
        timed = [n for n in ("bf16", "int8") if n in res["models"]]
        res["peer_ratio_per_round"] = {n: latency.round_ratios(res, n, "peer") for n in timed}
        res["peer_ratio_median"] = {n: statistics.median(v) for n, v in res["peer_ratio_per_round"].items()}
