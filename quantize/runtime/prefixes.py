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

# What all kept caches may hold together, in bytes (Q8CHAT_PREFIX_MB; 0 turns reuse off). A kept cache is a copy
# of the positions its conversation wrote; at the default model's 46 KB per position for INT8 (FP32 K and V) and
# 23 KB for BF16, 256 MB keeps about 3,700 positions for both models: some ten visitors' 250-token chats with
# their 128 new tokens.
BUDGET_BYTES = int(float(os.environ.get("Q8CHAT_PREFIX_MB", "256")) * 1e6)
FORGOTTEN = 10_000  # visitors whose Clear is remembered (a reply still running then keeps nothing)


@dataclass(frozen=True)
class Keeping:
    """What a reply may take of its visitor's kept conversation and when they asked: the visitor (None: nothing
    kept), at most how many prompt tokens (None: all it can; the comparison gives INT8 what BF16 can take, so both
    read as much), and their count of Clears then (None: read when it is submitted)."""

    visitor: Hashable | None = None
    at_most: int | None = None
    epoch: int | None = None


@dataclass
class Kept:
    decoder: weakref.ref  # the model that wrote it: another one's K and V mean nothing
    tokens: list[int]  # the token at each position the cache holds
    cache: Cache

    @property
    def nbytes(self) -> int:
        """What it holds in memory: a copy of the positions its reply wrote."""
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
        self.budget, self.nbytes = budget, 0  # nbytes: what the kept caches hold together
        self.kept: OrderedDict[tuple, Kept] = OrderedDict()
        self.clears: OrderedDict[Hashable, int] = OrderedDict()  # per visitor, how many times forgotten
        self.lock = threading.Lock()  # kept by the model thread, forgotten by Clear's thread

    def epoch(self, visitor: Hashable) -> int:
        """The visitor's count of Clears: a reply records it as it starts, and keeps nothing if it has moved."""
        with self.lock:
            return self.clears.get(visitor, 0)

    def usable(self, kept: Kept | None, decoder: object, prompt: list[int]) -> int:
        """How many of `prompt`'s first tokens `kept` holds for `decoder`: all but the prompt's last at most,
        whose logits the reply needs."""
        if kept is None or kept.decoder() is not decoder:
            return 0
        return common_prefix(kept.tokens, prompt[:-1])

    def shared(self, visitor: Hashable, decoder: object, prompt: list[int]) -> int:
        """What `take` would reuse for this prompt now, without taking it."""
        with self.lock:
            return self.usable(self.kept.get((visitor, id(decoder))), decoder, prompt)

    def take(
        self, visitor: Hashable, decoder: object, prompt: list[int], into: object, at_most: int | None = None
    ) -> int:
        """Copies into the fresh cache `into` the longest start of `prompt` this visitor's last reply on `decoder`
        left (`at_most` of its tokens, if given), and returns how many positions that is (0 when nothing is kept
        or nothing matches). What was kept is handed over, not shared: a second reply of the visitor at the same
        time reads its prompt in full."""
        if not isinstance(into, Cache):
            return 0
        with self.lock:
            kept = self.kept.pop((visitor, id(decoder)), None)
            self.nbytes -= kept.nbytes if kept else 0
        n = min(self.usable(kept, decoder, prompt), len(prompt) if at_most is None else at_most)
        if n <= 0:
            return 0
        into.k[:, :, :n] = kept.cache.k[:, :, :n]
        into.v[:, :, :n] = kept.cache.v[:, :, :n]
        into.length = n
        return n

    def keep(self, visitor: Hashable, decoder: object, tokens: list[int], cache: object, epoch: int) -> None:
        """Keep a copy of a finished reply's cache (`tokens`: its prompt and what it said) as long as what it
        holds, dropping the least recently used ones until all fit the budget. Nothing is kept from a reply the
        visitor cleared since it started (`epoch`), nor a cache larger than the whole budget."""
        if not isinstance(cache, Cache) or cache.length == 0:
            return
        n = cache.length
        if 2 * cache.k[:, :, :n].numel() * cache.k.element_size() > self.budget:
            return
        copy = Cache(cache.k[:, :, :n].clone(), cache.v[:, :, :n].clone())
        copy.length = n
        kept = Kept(weakref.ref(decoder), tokens[:n], copy)
        with self.lock:
            if self.clears.get(visitor, 0) != epoch:
                return
            old = self.kept.pop((visitor, id(decoder)), None)
            self.kept[(visitor, id(decoder))] = kept
            self.nbytes += kept.nbytes - (old.nbytes if old else 0)
            while self.nbytes > self.budget:
                self.nbytes -= self.kept.popitem(last=False)[1].nbytes

    def forget(self, visitor: Hashable) -> None:
        """Clear: the visitor's conversation is gone, its caches too, and a reply of theirs still running keeps
        nothing."""
        with self.lock:
            self.clears[visitor] = self.clears.pop(visitor, 0) + 1
            if len(self.clears) > FORGOTTEN:
                self.clears.popitem(last=False)
            for key in [k for k in self.kept if k[0] == visitor]:
                self.nbytes -= self.kept.pop(key).nbytes

    def clear(self) -> None:
        """A model switch: every kept cache belongs to a model that is going."""
        with self.lock:
            self.kept.clear()
            self.nbytes = 0
