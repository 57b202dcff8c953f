"""Prefix reuse: the K and V of a visitor's conversation so far stay in memory after a reply, so their next turn
reads only what is new (llama.cpp server's `cache_prompt`, vLLM's prefix caching). One cache is kept per visitor
and model, within a byte budget; the least recently used goes first.

What is kept is a function of the tokens alone: a later prompt reuses the longest run of tokens it shares with
what the cache holds, position by position, and reads the rest. Only the engine's caches are kept; the generic
path's (transformers' DynamicCache) are not.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from quantize.runtime.engine import Cache

# What all kept caches may hold together, in bytes (Q8CHAT_PREFIX_MB; 0 turns reuse off). At the default model's
# 46 KB per position for INT8 (FP32 K and V) and 23 KB for BF16, 256 MB keeps about 3,700 positions of
# conversation for both models: some 15 visitors' 250-token chats.
BUDGET_BYTES = int(float(os.environ.get("Q8CHAT_PREFIX_MB", "256")) * 1e6)


@dataclass
class Kept:
    decoder: weakref.ref  # the model that wrote it: another one's K and V mean nothing
    tokens: list[int]  # the token at each position the cache holds
    cache: Cache

    @property
    def nbytes(self) -> int:
        """What it holds in memory at most: its whole capacity (positions never written are never touched)."""
        return 2 * self.cache.k.numel() * self.cache.k.element_size()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Prefixes:
    """Kept caches by (visitor, model), least recently used first."""

    def __init__(self, budget: int = BUDGET_BYTES) -> None:
        self.budget = budget
        self.kept: OrderedDict[tuple, Kept] = OrderedDict()
        self.lock = threading.Lock()  # kept by the model thread, forgotten by Clear's thread

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.kept.values())

    def take(self, visitor: Hashable, decoder, prompt: list[int], capacity: int) -> tuple[Cache | None, int]:
        """A cache of `capacity` positions for `prompt` that already holds the longest start of it this visitor's
        last reply on `decoder` left, and the number of positions that is: at most all but the prompt's last
        token, whose logits the reply needs. (None, 0) when nothing is kept or nothing matches. What was kept
        is handed over, not shared: a second reply of the visitor at the same time reads its prompt in full."""
        with self.lock:
            kept = self.kept.pop((visitor, id(decoder)), None)
        if kept is None or kept.decoder() is not decoder:
            return None, 0
        n = common_prefix(kept.tokens, prompt[:-1])
        if n == 0:
            return None, 0
        cache = kept.cache
        if cache.k.shape[2] < capacity:  # too short for this turn: the prefix moves into a new cache
            cache = decoder.new_cache(capacity)
            cache.k[:, :, :n] = kept.cache.k[:, :, :n]
            cache.v[:, :, :n] = kept.cache.v[:, :, :n]
        cache.length = n  # positions after n are written over by this turn
        return cache, n

    def keep(self, visitor: Hashable, decoder, tokens: list[int], cache: object) -> None:
        """Keep a finished reply's cache (`tokens`: its prompt and what it said), dropping the least recently
        used ones until all fit the budget. A cache larger than the whole budget is not kept."""
        if not isinstance(cache, Cache) or cache.length == 0:
            return
        kept = Kept(weakref.ref(decoder), tokens[: cache.length], cache)
        if kept.nbytes > self.budget:
            return
        with self.lock:
            self.kept.pop((visitor, id(decoder)), None)
            self.kept[(visitor, id(decoder))] = kept
            while self.nbytes > self.budget:
                self.kept.popitem(last=False)

    def forget(self, visitor: Hashable) -> None:
        """Clear: the visitor's conversation is gone, its caches too."""
        with self.lock:
            for key in [k for k in self.kept if k[0] == visitor]:
                del self.kept[key]

    def clear(self) -> None:
        """A model switch: every kept cache belongs to a model that is going."""
        with self.lock:
            self.kept.clear()
