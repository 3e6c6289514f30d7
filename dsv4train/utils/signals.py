"""Preemption: SIGTERM (Slurm's warning) and SIGUSR1 (`#SBATCH --signal=USR1@120`) only set a flag; the trainer
checks it after each step, writes a checkpoint and exits 0, so the job can be requeued and resume."""

from __future__ import annotations

import signal


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

    def __enter__(self) -> "PreemptionFlag":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
