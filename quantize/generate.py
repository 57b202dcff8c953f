"""The generation loop: one token per forward pass, KV cache, a time stamp per produced token.

The app streams from it, the benchmark and the quality check time it: INT8 and BF16 always run the same loop,
so their per-token numbers are comparable and come from the loop itself, not from the UI's streaming cadence.
A decoder is anything with `new_cache(max_len)` and `forward(ids, cache) -> logits`: the engine
(quantize/engine.py) for the families it runs, or `HFDecoder`, the generic path through a transformers model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class Step:
    token_id: int
    t: float  # time.perf_counter() when this token was known


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature <= 0:
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
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
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


class HFCache:
    """What a transformers model hands back as its cache (a DynamicCache or legacy tuples)."""

    def __init__(self, past: DynamicCache | None) -> None:
        self.past, self.length = past, 0


class HFDecoder:
    """The generic path: any transformers causal LM (INC's INT8 ones too) behind the engine's interface."""

    def __init__(self, model: torch.nn.Module, label: str) -> None:
        self.model, self.label, self.config = model.eval(), label, model.config.to_dict()
        # BLOOM (ALiBi) and MPT have no position table; 4096 bounds a chat there
        self.max_len = getattr(model.config, "max_position_embeddings", None) or 4096

    @property
    def weight_bytes(self) -> int:
        from quantize.models import weight_bytes

        return weight_bytes(self.model)

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: all but the input embedding, of which one row is gathered. A tied
        embedding is also lm_head, read in full, so it stays in."""
        from quantize.models import weight_bytes

        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        out_ptrs = {p.data_ptr() for p in out.parameters()} if out is not None else set()
        tied = any(p.data_ptr() in out_ptrs for p in emb.parameters())
        return self.weight_bytes - (0 if tied else weight_bytes(emb))

    def new_cache(self, max_len: int | None = None) -> HFCache:
        # models that only take legacy tuples (BLOOM, MPT in transformers 4.45) start from None
        return HFCache(DynamicCache() if self.model._supports_cache_class else None)

    def forward(self, ids: torch.Tensor, cache: HFCache, all_logits: bool = False) -> torch.Tensor:
        out = self.model(input_ids=ids.reshape(1, -1), past_key_values=cache.past, use_cache=True)
        cache.past, cache.length = out.past_key_values, cache.length + ids.numel()
        return (out.logits[0] if all_logits else out.logits[0, -1:]).float()
