"""Many sequences at once (`python -m quantize.bench --concurrency 1 2 4 8`): the engines decode N greedy sequences
together through the app's own scheduler, INT8 and BF16 in interleaved rounds, and each N gives the per-sequence
ms per token and the aggregate tokens/s.

Per-sequence ms per token: the median gap between a sequence's consecutive tokens, over every sequence of every
round (what each visitor waits per token). Aggregate tokens/s: all new tokens over the time from the first
submit to the last token, prompts included (what the CPU serves).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import Executor

import torch

from quantize.runtime.generate import Sampling
from quantize.runtime.scheduler import Scheduler, Sequence


class OnThisThread(Executor):
    """Holds the scheduler's loop until `run`, which runs it on the calling thread: all torch work of the bench
    stays on the one thread that loaded the models. A second thread running torch brings a second OpenMP team,
    and with more team threads than cores libgomp stops spin-waiting (see chat.MODEL_THREAD): measured, INT8 at one
    sequence took 15.1 ms per token on a pool thread against 10.8 on the loading thread."""

    def __init__(self) -> None:
        self.held: list[Callable[[], None]] = []

    def submit(self, fn, /, *args, **kwargs) -> None:
        self.held.append(lambda: fn(*args, **kwargs))

    def run(self) -> None:
        while self.held:
            self.held.pop(0)()


def together(decoder, prompts: list[torch.Tensor], n: int, tokens: int) -> dict:
    """n sequences (the prompts in turn) of exactly `tokens` new tokens each, all submitted at once."""
    here = OnThisThread()
    scheduler = Scheduler(slots=n, run_on=here)
    start = time.perf_counter()
    seqs = [
        scheduler.submit(
            Sequence(decoder, prompts[i % len(prompts)].reshape(-1).tolist(), Sampling(max_new_tokens=tokens))
        )
        for i in range(n)
    ]
    here.run()  # to the last token of the last sequence
    stamps = [[step.t for step in seq.steps()] for seq in seqs]  # each sequence's queue kept its steps
    gaps = [(b - a) * 1e3 for s in stamps for a, b in zip(s, s[1:])]
    return {"gaps_ms": gaps, "tokens_per_s": n * tokens / (max(s[-1] for s in stamps) - start)}


def run_together(decoder, prompts: list[torch.Tensor], n: int, tokens: int) -> dict:
    """`together` on an engine; a server (runtime/remote.py) runs its own n requests at once."""
    own = getattr(decoder, "together", None)
    return own(prompts, n, tokens) if own is not None else together(decoder, prompts, n, tokens)


def measure(decoders: dict, prompts: list[torch.Tensor], levels: list[int], tokens: int, rounds: int) -> dict:
    """{N: {model: summary}} for each level N; the models' order alternates every round, as latency.interleaved
    does; every run is on this thread (OnThisThread)."""
    got = {n: {name: {"gaps_ms": [], "tokens_per_s": []} for name in decoders} for n in levels}
    names = list(decoders)
    for name in names:  # warm-up: allocations and FBGEMM's first calls, at the largest batch
        run_together(decoders[name], prompts, max(levels), min(4, tokens))
    for r in range(rounds):
        for n in levels:
            for name in names if r % 2 == 0 else names[::-1]:
                run = run_together(decoders[name], prompts, n, tokens)
                got[n][name]["gaps_ms"] += run["gaps_ms"]
                got[n][name]["tokens_per_s"].append(run["tokens_per_s"])
    return {
        str(n): {
            name: {
                "median_ms": statistics.median(m["gaps_ms"]),
                "p90_ms": statistics.quantiles(m["gaps_ms"], n=10)[-1],
                "tokens_per_s": statistics.median(m["tokens_per_s"]),
                "round_tokens_per_s": m["tokens_per_s"],
            }
            for name, m in per.items()
        }
        for n, per in got.items()
    }


def table(threads: int, result: dict, cpu: str) -> str:
    """The printed table: one row per N, per model its ms per token per sequence and its aggregate tokens/s,
    and how many times its batch-1 tokens/s that is."""
    names = list(next(iter(result.values())))
    widths = {name: max(16, len(name) + 11) for name in names}  # a server's NAME may be long
    head = "".join(
        f"{name.upper() + ' ms/token':>{widths[name]}}{name.upper() + ' tok/s':>{widths[name] - 3}}{'x N=1':>7}"
        for name in names
    )
    lines = [f"== {threads} thread{'s' if threads > 1 else ''}, sequences at once: {cpu}", f"{'N':>4}" + head]
    first = result[min(result, key=int)]
    for n, per in result.items():
        cells = "".join(
            f"{per[m]['median_ms']:>{widths[m]}.2f}{per[m]['tokens_per_s']:>{widths[m] - 3}.1f}"
            f"{per[m]['tokens_per_s'] / first[m]['tokens_per_s']:>7.2f}"
            for m in names
        )
        lines.append(f"{n:>4}" + cells)
    return "\n".join(lines)
