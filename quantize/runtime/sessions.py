"""Visitors' replies in progress, per browser session: Stop and Clear reach a running reply through here, and a
reply its visitor cleared before it started is dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Generation:
    """One visitor's reply in progress."""

    stop: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # Clear: end without showing anything more


class Sessions:
    def __init__(self, remembered: int = 10_000) -> None:
        self.running: dict[str, list[Generation]] = {}  # a session may have a few replies at once
        self.lock = threading.Lock()  # replies of one session start and end on different threads
        self.clear_counts: dict[str, int] = {}  # per session, how many times Clear was pressed
        self.cleared_at: dict[str, float] = {}  # per session, when Clear was last pressed (time.monotonic)
        self.remembered = (
            remembered  # bounded: demo.unload would forget sessions, but breaks Gradio 6's Examples
        )

    @contextmanager
    def generation(self, session: str) -> Iterator[Generation]:
        """Register a reply for the length of the block, so that Stop and Clear find it."""
        gen = Generation()
        with self.lock:
            self.running.setdefault(session, []).append(gen)
        try:
            yield gen
        finally:
            with self.lock:
                mine = self.running.get(session, [])
                if gen in mine:
                    mine.remove(gen)
                if not mine:
                    self.running.pop(session, None)

    def stop(self, session: str) -> None:
        """The session's replies stop at their next token; what was written stays."""
        with self.lock:
            for gen in self.running.get(session, []):
                gen.stop.set()

    def clear(self, session: str) -> int:
        """Stop and abandon the running reply; replies asked for before now are dropped. Returns the session's
        clear count, which the page sends back with its next request."""
        self.clear_counts[session] = self.clear_counts.get(session, 0) + 1
        self.cleared_at[session] = time.monotonic()
        if len(self.clear_counts) > self.remembered:
            self.cleared_at.pop(next(iter(self.clear_counts)), None)
            self.clear_counts.pop(next(iter(self.clear_counts)))
        with self.lock:
            for gen in self.running.get(session, []):
                gen.abandoned = True
                gen.stop.set()
        return self.clear_counts[session]

    def cleared_since(self, session: str | None, seen: int, joined_at: float | None = None) -> bool:
        """A request sent when the page had seen `seen` clears, or one that joined the queue at `joined_at`
        (time.monotonic), and Clear was pressed since. (The page's clear count is a state Gradio reads when the
        request runs, after Clear wrote it: for a request that waited in the queue only its join time tells.)"""
        if not session:
            return False
        later = joined_at is not None and self.cleared_at.get(session, float("-inf")) > joined_at
        return later or (seen or 0) < self.clear_counts.get(session, 0)
