"""Preemption: SIGTERM (Slurm's warning) and SIGUSR1 (`#SBATCH --signal=USR1@120`) only set a flag; the trainer
checks it before the first step and after each step, writes a checkpoint (when a step was taken) and exits 0, so the
job can be requeued and resume.

`catch_preemption()` installs the handlers as early as possible: `dsv4 pretrain` enters it before importing torch
or composing the config, and `pretrain()` enters it again (reusing the outer flag, or installing its own when called
directly, e.g. by `dsv4 demo`), so a signal during set-up stops the run instead of killing it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class PreemptionFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; its handlers stay as they are
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


_active: PreemptionFlag | None = None


@contextlib.contextmanager
def catch_preemption() -> Iterator[PreemptionFlag]:
    """The preemption flag for this block: the one an enclosing `catch_preemption()` installed, else a new one
    whose handlers are removed again when the block ends."""
    global _active
    if _active is not None:
        yield _active
        return
    with PreemptionFlag() as flag:
        _active = flag
        try:
            yield flag
        finally:
            _active = None
