"""How a training run talks to the world: events out, commands in.

The trainer never calls the UI or prints. It emits ``Event`` objects (progress, metrics, log lines, sample
images, checkpoints, finished, failed) to an ``EventBus`` and polls ``Commands`` (stop, save now, sample now)
at every step. The UI, the command line and the tests each listen in their own way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# The kinds of event a run emits, with the data each carries:
#   log         message, level
#   state       state ("preparing", "caching", "training", "saving", "exporting", ...)
#   progress    step, total, epoch, it_per_s, eta_s, elapsed_s
#   metrics     step, loss, lr, memory_gb (and any other numbers)
#   sample      step, path
#   checkpoint  step, path
#   finished    files (list of paths), message
#   stopped     step, message (stopped by the user; resumable)
#   failed      message (a human sentence), advice
EVENT_KINDS = ("log", "state", "progress", "metrics", "sample", "checkpoint", "finished", "stopped", "failed")


@dataclass
class Event:
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class EventBus:
    """Collects events in order; listeners are called on the emitting thread, readers poll by index."""

    def __init__(self, keep: int = 5000):
        self._events: list[Event] = []
        self._offset = 0  # number of events dropped from the front
        self._keep = keep
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []

    def emit(self, kind: str, **data: Any) -> Event:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = Event(kind, data)
        with self._lock:
            self._events.append(event)
            if len(self._events) > self._keep:
                drop = len(self._events) - self._keep
                del self._events[:drop]
                self._offset += drop
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", message=message, level=level)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def since(self, index: int) -> tuple[list[Event], int]:
        """Events after absolute position ``index`` and the new position to poll from next time."""
        with self._lock:
            start = max(index - self._offset, 0)
            return list(self._events[start:]), self._offset + len(self._events)

    def last(self, kind: str) -> Event | None:
        with self._lock:
            for event in reversed(self._events):
                if event.kind == kind:
                    return event
        return None


class Commands:
    """Requests from outside (UI button, Ctrl+C) that the training loop takes at its next step."""

    NAMES = ("stop", "save", "sample")

    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def request(self, name: str) -> None:
        if name not in self.NAMES:
            raise ValueError(f"unknown command {name!r}")
        with self._lock:
            self._pending.add(name)

    def take(self, name: str) -> bool:
        """True once if ``name`` was requested (the request is consumed)."""
        with self._lock:
            if name in self._pending:
                self._pending.discard(name)
                return True
            return False

    def peek(self, name: str) -> bool:
        with self._lock:
            return name in self._pending
