"""SIGTERM (what Slurm and most schedulers send) handled like Ctrl-C, and never mid-bookkeeping.

Inside `interrupts()`, SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt naming the
signal), so the launcher's Ctrl-C path (stop the trainers, close their attempts as interrupted,
release the lock) runs for both. Inside `deferred()` (starting a trainer and recording its attempt,
closing attempts) a signal is only noted and raised when the block ends, so launch.json never holds
an attempt whose process the launcher does not know about.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The launcher was asked to stop (Ctrl-C or a signal); `signame` names the cause."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


_depth = 0
_pending: str | None = None


def _handler(signum: int, frame) -> None:
    global _pending
    name = signal.Signals(signum).name
    if _depth:
        _pending = _pending or name
        return
    raise Interrupted(name)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` inside the block (main thread only; elsewhere the
    caller's handlers stay)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _pending = None
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals arriving inside the block are raised when it ends (on normal exit)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _pending and not _depth:
        name, _pending = _pending, None
        raise Interrupted(name)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Signals arriving inside the block (the clean-up after an interrupt) are dropped."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        _pending = None
