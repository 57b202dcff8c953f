"""Visitors' replies in progress, per browser session: Stop and Clear reach a running reply through here, and a
reply its visitor cleared before it started is dropped."""

from __future__ import annotations

import threading
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
        self.running: dict[str, Generation] = {}
        self.clear_counts: dict[str, int] = {}  # per session, how many times Clear was pressed
        self.remembered = (
            remembered  # bounded: demo.unload would forget sessions, but breaks Gradio 6's Examples
        )

    @contextmanager
    def generation(self, session: str) -> Iterator[Generation]:
        """Register a reply for the length of the block, so that Stop and Clear find it."""
        gen = self.running[session] = Generation()
        try:
            yield gen
        finally:
            if self.running.get(session) is gen:
                del self.running[session]

    def stop(self, session: str) -> None:
        """The reply stops at its next token; what was written stays."""
        gen = self.running.get(session)
        if gen is not None:
            gen.stop.set()

    def clear(self, session: str) -> int:
        """Stop and abandon the running reply; replies asked for before now are dropped. Returns the session's
        clear count, which the page sends back with its next request."""
        self.clear_counts[session] = self.clear_counts.get(session, 0) + 1
        if len(self.clear_counts) > self.remembered:
            self.clear_counts.pop(next(iter(self.clear_counts)))
        gen = self.running.get(session)
        if gen is not None:
            gen.abandoned = True
            gen.stop.set()
        return self.clear_counts[session]

    def cleared_since(self, session: str | None, seen: int) -> bool:
        """A request sent when the page had seen `seen` clears, and Clear was pressed since."""
        return bool(session) and (seen or 0) < self.clear_counts.get(session, 0)
