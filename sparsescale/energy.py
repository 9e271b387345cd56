"""Energy of a run: measured where the hardware has a counter, else estimated, always labelled.

Measured: NVIDIA GPUs through NVML (`pynvml`, from the `nvidia-ml-py` package, when installed:
total energy of the visible GPUs), else Linux RAPL (`/sys/class/powercap/intel-rapl:*`: CPU
packages, the whole socket, other processes included). Estimated, where neither exists:
`ESTIMATE_W_PER_THREAD` × the process's CPU threads × wall time, plus `ESTIMATE_W_PER_GPU` per
local GPU: a full-load upper bound, not a measurement. The trainer accumulates the joules across
resumes (checkpoint metadata) and writes `energy_j` and `energy_source` to summary.json.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from pathlib import Path

ESTIMATE_W_PER_THREAD = 10.0  # a server core at full load (~300 W over 32 cores)
ESTIMATE_W_PER_GPU = 700.0  # an H100 SXM at its power limit
RAPL_GLOB = "/sys/class/powercap/intel-rapl:*"  # packages (intel-rapl:N), and sub-domains (N:M)


def _rapl_counter(root_glob: str = RAPL_GLOB) -> Callable[[], float] | None:
    """Joules read from the RAPL package counters (wraps handled), or None if unreadable."""
    zones = [Path(z) for z in sorted(glob.glob(root_glob)) if Path(z).name.count(":") == 1]
    try:
        ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        last = [int((z / "energy_uj").read_text()) for z in zones]
    except (OSError, ValueError):
        return None
    if not zones:
        return None
    total = [0.0]

    def read() -> float:
        for i, z in enumerate(zones):
            now = int((z / "energy_uj").read_text())
            total[0] += (now - last[i]) % ranges[i]  # one wrap at most between reads
            last[i] = now
        return total[0] / 1e6

    return read


def _nvml_counter() -> Callable[[], float] | None:
    """Joules of the visible NVIDIA GPUs since their driver loaded (NVML), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # NVML itself lists every GPU
        indices = (
            range(pynvml.nvmlDeviceGetCount())
            if visible is None
            else [int(i) for i in visible.split(",") if i.strip()]
        )
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        if not handles:
            return None
        return lambda: sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles) / 1e3
    except Exception:  # noqa: BLE001 (no library, no driver, no GPU, no counter: estimate)
        return None


class Meter:
    """Joules used since `joules_before` (restored from a checkpoint), and how they were got."""

    def __init__(
        self,
        joules_before: float = 0.0,
        source_before: str | None = None,
        counter: Callable[[], float] | None = None,
        source: str | None = None,
        watts: float | None = None,
    ):
        self.counter, self.source = counter, source
        if counter is None:  # estimated
            threads = len(os.sched_getaffinity(0))
            gpus = _local_gpus()
            self.watts = watts if watts is not None else (
                ESTIMATE_W_PER_THREAD * threads + ESTIMATE_W_PER_GPU * gpus
            )  # fmt: skip
            self.source = source or (
                f"estimated: {ESTIMATE_W_PER_THREAD:g} W × {threads} CPU threads"
                + (f" + {ESTIMATE_W_PER_GPU:g} W × {gpus} GPUs" if gpus else "")
                + " × wall time (no energy counter)"
            )
        self.before = joules_before
        if source_before and source_before != self.source:
            self.source = f"{source_before} + {self.source}"  # resumed on other hardware
        self.t0 = time.perf_counter()
        self.c0 = counter() if counter is not None else 0.0

    def joules(self) -> float:
        if self.counter is None:
            return self.before + self.watts * (time.perf_counter() - self.t0)
        return self.before + self.counter() - self.c0


def _local_gpus() -> int:
    import jax

    return sum(d.platform == "gpu" for d in jax.local_devices())


def meter(joules_before: float = 0.0, source_before: str | None = None) -> Meter:
    """The best meter this host has: NVML on a GPU host, else RAPL, else the estimate."""
    for counter, source in (
        (_nvml_counter(), "measured: NVML total energy of the visible GPUs"),
        (_rapl_counter(), "measured: RAPL CPU-package counters (whole sockets)"),
    ):
        if counter is not None:
            return Meter(joules_before, source_before, counter, source)
    return Meter(joules_before, source_before)
