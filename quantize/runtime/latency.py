"""Latency bookkeeping: turn per-token time stamps into TTFT, ms/token, tokens/s — and the interleaved
INT8-vs-BF16 measurement that the quantize report, the benchmark and the app's Benchmark tab share."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from quantize.runtime.generate import Sampling, stream

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
    """One generation: start time and a time stamp per token; in the app, also how many replies of its model
    shared the forward pass that made each token (runtime/scheduler.py batches them) and how long that pass took
    (between two tokens of a reply the other models' passes run too), and how many of its prompt's
    tokens were kept from the visitor's last turn rather than read (runtime/prefixes.py), which its TTFT shows."""

    start: float
    stamps: list[float] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)
    took: list[float] = field(default_factory=list)  # seconds of its model's own pass that made each token
    kept: int = 0

    @property
    def ttft_ms(self) -> float | None:
        return (self.stamps[0] - self.start) * 1e3 if self.stamps else None

    @property
    def decode_ms(self) -> list[float]:
        """Gaps between consecutive tokens: the per-token decode cost (the first token is prefill, not here)."""
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]

    def summary(self) -> dict:
        others = statistics.median(self.shared[1:]) - 1 if len(self.shared) > 1 else None
        own = [s * 1e3 for s in self.took[1:] if s is not None]  # the first token's is the prompt's pass
        return summarize(self.decode_ms, self.ttft_ms, len(self.stamps)) | {
            "others_median": others,
            "own_pass_ms": statistics.median(own) if own else None,
            "kept_tokens": self.kept,
        }


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
    """time_generation for a torch model; a peer engine (llama.cpp in quantize/tools/peer.py) brings its own loop as a
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
