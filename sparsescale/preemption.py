"""Stop requests: a signal asks the trainer to checkpoint at the next step boundary and exit.

Slurm sends SIGTERM on preemption and, with `--signal`, SIGUSR1/SIGUSR2 before a time limit
(submitit asks for SIGUSR2); local launchers send SIGTERM. Inside `StopRequests`, each of these only
records its name; the loop asks `requested()` after every step, saves every live run's checkpoint at
that step and raises `Preempted`, which `main` turns into exit status `PREEMPTED_EXIT`: the launcher
resumes such a run from its checkpoint without counting a failed try.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved, resume me
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, signame: str, step: int):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint saved")
        self.signame, self.step = signame, step


@contextlib.contextmanager
def signals_held():
    """Holds SIGNALS in this thread (blocked: pending, not lost). A trainer started inside
    inherits the block and releases it once its StopRequests handlers are in place, so a stop
    request that comes while it starts up (a requeued Slurm job can be signalled at once) is
    answered with a checkpoint instead of killing it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopRequests:
    """Context manager: while inside, SIGNALS set `signame` instead of killing the process (main
    thread only; elsewhere the process keeps its handlers)."""

    def __init__(self):
        self.signame: str | None = None
        self._old: dict = {}
        self._multiprocess = False

    def _note(self, signum, frame) -> None:
        self.signame = self.signame or signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        import jax  # here, so that the launcher reads PREEMPTED_EXIT without loading jax

        self._multiprocess = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in SIGNALS}
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # held by `signals_held`
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def requested(self) -> str | None:
        """The signal's name once any process of the job got one, else None. With several
        processes every one must stop at the same step (saving is collective), so they agree
        through one all-gather per call."""
        if not self._multiprocess:
            return self.signame
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signame is not None))
        return (self.signame or "a signal to another process") if np.any(flags) else None
