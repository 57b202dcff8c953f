"""The scheduler: the app's replies decoded many at once on the one model thread (continuous batching).

A reply is a `Sequence`. It waits in line (in order of arrival, so none is starved) until one of `slots` is free.
Then its prompt is prefilled, at most PREFILL_CHUNK tokens a turn while others decode, between their steps, so a
newcomer's long prompt holds them up for one chunk at a time. Then it joins its model's batch: each turn, every
model with decoding sequences runs one `Engine.step` for all of them (a decoder without `step`, the generic
path, runs them one by one). A sequence leaves at its last token, at Stop, or when its visitor leaves; its slot is
free for the next turn.

Memory: a sequence's KV cache holds its prompt and its new tokens and nothing more, so the caches in slots hold
at most slots x (chat.MAX_INPUT_TOKENS + the largest max_new_tokens) positions. A cache's pages become resident
only as it is written, so an overcommitting kernel would let caches grow past the machine and its OOM killer end
the app: a sequence takes a slot only when its whole cache fits the room there is (`room`) beside what the caches
in slots may still write; else it waits for one to end, or, with none in slots, ends with NoRoom's sentence. A sequence that names its visitor
(`keeping`) leaves its cache to `prefixes` (runtime/prefixes.py, a byte budget of its own) for the visitor's next
turn, which then reads only the tokens after what it shares with it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import torch

from quantize.runtime.generate import Sampling, Step, next_token
from quantize.runtime.prefixes import Keeping, Prefixes

log = logging.getLogger(__name__)

# A newcomer's prompt is prefilled this many tokens per turn: at the default model's ~1 ms per prompt token (2
# threads), the others wait ~64 ms at most for a token while it is read. A multiple of the engine's PREFILL_STEP.
PREFILL_CHUNK = 64


@dataclass(eq=False)
class Sequence:
    """One reply: what it reads and how it samples, and the steps it has made so far (`out`: a Step for each new
    token, then None at its end, or the exception that ended it)."""

    decoder: object
    prompt: list[int]
    sampling: Sampling
    eos_ids: frozenset[int] = frozenset()
    stop: threading.Event = field(default_factory=threading.Event)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    keeping: Keeping = field(default_factory=Keeping)  # what it may take of its visitor's kept conversation
    place: int = 0  # its place in line: 1 for the next to get a slot, 0 once it has one
    read: int = 0  # prompt tokens in its cache so far
    kept: int = 0  # of which were kept from the visitor's last reply, not read
    said: list[int] = field(default_factory=list)  # the tokens produced so far
    last: int | None = None  # the newest token, the next step's input
    cache: object = None
    generator: torch.Generator | None = None

    def steps(self) -> Iterator[Step]:
        """Each new token as it is made, up to the end; raises what ended it, if anything did. Closing it (the
        visitor left) stops the sequence at the next turn."""
        try:
            while (item := self.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()


class NoRoom(RuntimeError):
    """A reply whose cache the machine's memory cannot hold; the message is the visitor's sentence."""


def cache_bytes(decoder: object, positions: int) -> int:
    """What a cache of `positions` takes once written (0 for a decoder that does not say its bytes per position)."""
    return positions * getattr(decoder, "position_bytes", 0)


class Scheduler:
    """Sequences in line, in prefill and in decode, turned over on `run_on` (one thread) while any are left.
    `room()` gives the bytes free for caches now: (what the OS and the cgroup leave, what the app's own budget
    leaves beside the weights and kept caches, or None)."""

    def __init__(
        self,
        slots: int,
        run_on: Executor,
        chunk: int = PREFILL_CHUNK,
        prefixes: Prefixes | None = None,
        room: Callable[[], tuple[int, int | None]] | None = None,
    ) -> None:
        self.slots, self.run_on, self.chunk, self.room = slots, run_on, chunk, room
        self.prefixes = prefixes or Prefixes(budget=0)
        self.lock = threading.Lock()
        self.waiting: deque[Sequence] = deque()
        self.active: list[
            Sequence
        ] = []  # in slots: prefilling until `read` reaches the prompt, then decoding
        self.running = False  # a loop is on run_on, or about to be
        self.pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a model's slots, gone with it

    def submit(self, seq: Sequence) -> Sequence:
        """Put a reply in line; it ends at once with a ValueError if there is nothing to read."""
        if not seq.prompt:
            seq.out.put(ValueError("An empty prompt has nothing to answer."))
            seq.out.put(None)
            return seq
        if seq.keeping.visitor is not None and seq.keeping.epoch is None:
            seq.keeping = replace(seq.keeping, epoch=self.prefixes.epoch(seq.keeping.visitor))
        with self.lock:
            self.waiting.append(seq)
            seq.place = max(0, len(self.waiting) - (self.slots - len(self.active)))
            if not self.running:
                self.run_on.submit(self.loop)  # raises (a shut-down pool) before the flag says a loop runs
                self.running = True
        return seq

    def loop(self) -> None:
        """Turns until no sequence is left; then run_on is free for other work (the benchmark). What fails outside
        a model's forward ends the sequences in slots with it; those in line get a new loop."""
        try:
            while self.admit():
                self.prefill_one()
                self.decode_all()
        except BaseException as e:
            log.exception("the scheduler's loop failed; the replies in slots end with it")
            with self.lock:
                for seq in list(self.active):
                    self.finish(seq, e)
                self.running = bool(self.waiting)
                if self.running:
                    self.run_on.submit(self.loop)
            raise

    def admit(self) -> bool:
        """Stopped sequences leave; waiting ones take the free slots in order. False (and the loop ends) when
        nothing is left to do."""
        with self.lock:
            for seq in [s for s in (*self.active, *self.waiting) if s.stop.is_set()]:
                self.finish(seq)
            while self.waiting and len(self.active) < self.slots:
                short = self.short_of_room(self.waiting[0])
                if short and self.active:
                    break  # it waits, first in line, for a reply in a slot to end and free its cache
                seq = self.waiting.popleft()
                if short:
                    self.finish(seq, NoRoom(short))
                    continue
                try:  # its cache may not fit in memory: that reply ends, the others go on
                    self.give_cache(seq)
                    if seq.sampling.temperature > 0:
                        seq.generator = torch.Generator().manual_seed(seq.sampling.seed)
                except Exception as e:  # noqa: BLE001 - handed to its reader
                    self.finish(seq, e)
                    continue
                seq.place = 0
                self.active.append(seq)
            for place, seq in enumerate(self.waiting):
                seq.place = place + 1
            self.running = bool(self.active)
            return self.running

    def short_of_room(self, seq: Sequence) -> str | None:
        """None when the sequence's whole cache fits the room beside the caches in slots, else why not."""
        positions = len(seq.prompt) + seq.sampling.max_new_tokens
        need = cache_bytes(seq.decoder, positions)
        if self.room is None or not need:
            return None
        written = sum(cache_bytes(s.decoder, s.read + len(s.said)) for s in self.active)
        reserved = sum(cache_bytes(s.decoder, len(s.prompt) + s.sampling.max_new_tokens) for s in self.active)
        os_room, budget = self.room()
        free = os_room - (reserved - written)  # the OS already counts what the caches in slots have written
        if budget is not None:
            free = min(free, budget - reserved)
        if need <= free:
            return None
        return (f"This conversation needs {need / 1e6:,.0f} MB of memory for its {positions:,} positions, and the "
                f"machine has {max(free, 0) / 1e6:,.0f} MB left now: try a shorter conversation or fewer new "
                "tokens.")  # fmt: skip

    def give_cache(self, seq: Sequence) -> None:
        """A cache for the sequence's prompt and new tokens (a slot of its model's pool, for a decoder with pools,
        so its batched steps attend in one call), with its visitor's kept prefix copied in where there is one:
        its prompt is read from the end of that on."""
        capacity, keeping, pool = len(seq.prompt) + seq.sampling.max_new_tokens, seq.keeping, self.pool(seq)
        seq.cache = pool.take(capacity) if pool else seq.decoder.new_cache(capacity)
        if keeping.visitor is not None:
            seq.kept = self.prefixes.take(
                keeping.visitor, seq.decoder, seq.prompt, seq.cache, keeping.at_most
            )
        seq.read = seq.kept

    def pool(self, seq: Sequence) -> object:
        """The cache pool of the sequence's model, made at its first reply; None for a decoder without pools."""
        if not hasattr(seq.decoder, "new_pool"):
            return None
        if seq.decoder not in self.pools:
            self.pools[seq.decoder] = seq.decoder.new_pool(self.slots)
        return self.pools[seq.decoder]

    def finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        """The sequence leaves its slot or the line; its reader gets the error, or the end. Its cache is kept for
        its visitor's next turn, unless it failed; else its memory goes with it. Under self.lock."""
        if seq in self.active:
            self.active.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        visitor = seq.keeping.visitor
        if error is None and visitor is not None and seq.cache is not None:
            self.prefixes.keep(visitor, seq.decoder, seq.prompt + seq.said, seq.cache, seq.keeping.epoch)
        if getattr(seq.cache, "pool", None) is not None:
            seq.cache.pool.give_back(seq.cache)
        seq.cache = None
        if error is not None:
            seq.out.put(error)
        seq.out.put(None)

    def prefill_one(self) -> None:
        """The oldest sequence still reading its prompt reads some more: one chunk while others are decoding (so
        they wait one chunk at most), the rest of it when none is (as generate.stream reads a prompt). At the
        prompt's end, its first token."""
        seq = next((s for s in self.active if s.read < len(s.prompt) and not s.stop.is_set()), None)
        if seq is None:
            return
        others = any(s.last is not None for s in self.active)
        ids = torch.tensor(seq.prompt[seq.read : seq.read + self.chunk] if others else seq.prompt[seq.read :])
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = seq.decoder.forward(ids, seq.cache)
        except Exception as e:  # noqa: BLE001 - the visitor's reply ends with it; the others go on
            with self.lock:
                self.finish(seq, e)
            return
        seq.read += len(ids)
        if seq.read == len(seq.prompt):
            self.emit([seq], logits, start)

    def decode_all(self) -> None:
        """One step for every decoding sequence, a batch per model. A batch that fails is run again one sequence
        at a time, so a failure (a full cache) ends only the replies it belongs to: the engine's `step` advances
        no cache unless the whole pass succeeds. A decoder without `step` (the generic path) runs its sequences
        one by one from the start, since each pass advances its own cache: a rerun would feed a token twice."""
        decoding = [
            s for s in self.active if s.last is not None and not s.stop.is_set()
        ]  # stopped: leave next
        for decoder in {id(s.decoder): s.decoder for s in decoding}.values():
            batch = [s for s in decoding if s.decoder is decoder]
            if not hasattr(decoder, "step"):
                for seq in batch:
                    self.decode([seq])
            elif not self.decode(batch) and len(batch) > 1:
                for seq in batch:
                    self.decode([seq])

    def decode(self, batch: list[Sequence]) -> bool:
        """One pass for the batch (one model's) and its tokens; False when the pass failed, and a sequence alone
        then ends with the error."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self.forward(batch[0].decoder, batch)
        except Exception as e:  # noqa: BLE001 - handed to its reader, or the batch is run one by one
            if len(batch) == 1:
                with self.lock:
                    self.finish(batch[0], e)
            return False
        self.emit(batch, logits, start)
        return True

    @staticmethod
    def forward(decoder, batch: list[Sequence]) -> torch.Tensor:
        """A batch of several runs `step`; one alone runs `forward`, the path generate.stream and the bench time,
        so a reply alone decodes as it did before there was a scheduler."""
        ids = torch.tensor([s.last for s in batch])
        if len(batch) > 1:
            return decoder.step(ids, [s.cache for s in batch])
        return decoder.forward(ids, batch[0].cache)

    def emit(self, batch: list[Sequence], logits: torch.Tensor, start: float) -> None:
        """Each sequence's next token from its row of logits (the pass began at `start`); one that is done, or whose
        sampling fails, leaves."""
        t = time.perf_counter()
        for seq, row in zip(batch, logits):
            try:
                token = next_token(row, seq.sampling, seq.generator)
            except Exception as e:  # noqa: BLE001 - handed to its reader
                with self.lock:
                    self.finish(seq, e)
                continue
            seq.said.append(token)
            seq.last = token
            seq.out.put(Step(token, t, len(batch), t - start))
            if token in seq.eos_ids or len(seq.said) >= seq.sampling.max_new_tokens:
                with self.lock:
                    self.finish(seq)
