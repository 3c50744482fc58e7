"""How a training run talks to the world: typed events out, commands in.

The trainer never calls the UI or prints. It emits events (dataclasses below, whose fields are the schema) to
an ``EventBus``; the job's snapshot, the terminal progress bar and the tests subscribe and read fields. The
other way, ``Commands`` (stop, save now, sample now) are polled by the loop at every step; a run in another
process receives the same names as files in its run folder (``RunFolder.request_command``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, ClassVar

COMMAND_NAMES = ("stop", "save", "sample")


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"


@dataclass(frozen=True)
class Log(Event):
    """A line for the log; ``level`` is "info" or "warning"."""
    message: str
    level: str = "info"
    kind: ClassVar[str] = "log"


@dataclass(frozen=True)
class State(Event):
    """What the run is doing: preparing, loading model, caching latents, training, saving, exporting ..."""
    state: str
    kind: ClassVar[str] = "state"


@dataclass(frozen=True)
class Progress(Event):
    """Training progress (``total`` > 0), or the progress of a stage before training (``stage``, ``done``/``of``)."""
    step: int = 0
    total: int = 0
    epoch: int = 0
    it_per_s: float = 0.0
    eta_s: float | None = None
    elapsed_s: float = 0.0
    stage: str = ""
    done: int | None = None
    of: int | None = None
    kind: ClassVar[str] = "progress"

    @property
    def eta(self) -> str:
        """The ETA as ``m:ss`` or ``h:mm:ss`` ("" while unknown)."""
        if self.eta_s is None:
            return ""
        h, rem = divmod(int(max(self.eta_s, 0)), 3600)
        m, s = divmod(rem, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass(frozen=True)
class Metric(Event):
    """One logged step: its loss and learning rate, and other numbers (memory in GB, tokens/s ...)."""
    step: int
    loss: float
    lr: float
    values: dict[str, float] = field(default_factory=dict)
    kind: ClassVar[str] = "metric"

    def record(self) -> dict[str, float]:
        """The flat row written to ``metrics.jsonl``."""
        return {"step": self.step, "loss": self.loss, "lr": self.lr, **self.values}


@dataclass(frozen=True)
class Sample(Event):
    step: int
    path: str
    kind: ClassVar[str] = "sample"


@dataclass(frozen=True)
class Checkpoint(Event):
    step: int
    path: str
    kind: ClassVar[str] = "checkpoint"


@dataclass(frozen=True)
class Finished(Event):
    files: list[str]
    message: str
    kind: ClassVar[str] = "finished"


@dataclass(frozen=True)
class Stopped(Event):
    """Stopped by the user at ``step``; resumable."""
    step: int
    message: str
    kind: ClassVar[str] = "stopped"


@dataclass(frozen=True)
class Failed(Event):
    """The run failed; ``message`` is a sentence for the user."""
    message: str
    kind: ClassVar[str] = "failed"


class EventBus:
    """Hands each event to the listeners, on the emitting thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []

    def emit(self, event: Event) -> Event:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit(Log(message, level))

    def state(self, state: str) -> None:
        self.emit(State(state))

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners.append(listener)


class Commands:
    """Requests from outside (UI button, Ctrl+C, a command file) that the training loop takes at its next step."""

    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def request(self, name: str) -> None:
        if name not in COMMAND_NAMES:
            raise ValueError(f"unknown command {name!r}; one of {', '.join(COMMAND_NAMES)}")
        with self._lock:
            self._pending.add(name)

    def take(self, name: str) -> bool:
        """True once if ``name`` was requested (the request is consumed)."""
        with self._lock:
            if name in self._pending:
                self._pending.discard(name)
                return True
            return False
