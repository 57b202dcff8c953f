"""The generation loop: one token per forward pass, KV cache, a time stamp per produced token.

The benchmark, the panel's interleaved benchmark and the quality check time it (the app's replies run the same
steps through runtime/scheduler.py): INT8 and BF16 always run the same loop, so their per-token numbers are
comparable and come from the loop itself, not from the UI's streaming cadence.
A decoder is anything with `new_cache(max_len)` and `forward(ids, cache) -> logits`: the engine
(runtime/engine.py) for the families it runs, or `decoders.HFDecoder`, the generic path through transformers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    token_id: int
    t: float  # time.perf_counter() when this token was known
    batch: int = 1  # how many sequences shared the forward pass that made it (runtime/scheduler.py)
    took: float | None = (
        None  # seconds that pass took: its model's own work, without the other models' passes
    )


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


# Temperatures below this are greedy: dividing logits by 1e-300 overflows them to inf and the softmax to NaN, and
# at 0.01 a softmax is already its argmax unless two logits are within ~0.1 of each other.
GREEDY_BELOW = 0.01


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def stream(
    decoder,
    input_ids: torch.Tensor,
    sampling: Sampling,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    stop: threading.Event | None = None,
) -> Iterator[Step]:
    """Yield each new token with its time stamp. Stops at max_new_tokens, an eos id, or when `stop` is set."""
    greedy = sampling.temperature < GREEDY_BELOW
    generator = None if greedy else torch.Generator().manual_seed(sampling.seed)
    ids = input_ids.reshape(-1)
    cache = decoder.new_cache(ids.numel() + sampling.max_new_tokens)
    with torch.inference_mode():
        for _ in range(sampling.max_new_tokens):
            if stop is not None and stop.is_set():
                return
            token = next_token(decoder.forward(ids, cache)[-1], sampling, generator)
            yield Step(token, time.perf_counter())
            if token in eos_ids:
                return
            ids = torch.tensor([token])
