"""preemption.signals_held: a stop signal that reaches a trainer before its handlers exist."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

import pytest

from sparsescale import preemption

# Signalled while it sleeps, before StopRequests installs its handlers.
CHILD = """
import sys, time
from sparsescale import preemption
print("up", flush=True)
time.sleep(1.0)
with preemption.StopRequests() as stop:
    print(stop.requested(), flush=True)
"""


@pytest.mark.parametrize("held", [True, False])
def test_a_signal_during_startup_reaches_the_handlers_only_when_held(held):
    """Held: the SIGUSR1 stays pending and becomes a stop request once the handlers are in
    place. Not held (the control): its default action kills the child."""
    with preemption.signals_held() if held else contextlib.nullcontext():
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # restored here
    assert child.stdout.readline() == "up\n"
    child.send_signal(signal.SIGUSR1)
    out, _ = child.communicate(timeout=120)
    if held:
        assert (child.returncode, out.strip()) == (0, "SIGUSR1")
    else:
        assert child.returncode == -signal.SIGUSR1
