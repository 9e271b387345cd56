"""What the benchmarks measured on this kind of machine, which the trainer and the launcher read:
package data beside this file, read through `importlib.resources` (so it works from a
non-editable install):

| file | written by | read by | default when missing |
|---|---|---|---|
| `block_sparse_<backend>.json` | `benchmarks/block_sparse.py` | `break_even_density` (the trainer's block-phase switch, `xla_block.choose_strategy`) | `DEFAULT_BREAK_EVEN` (0.5) |
| `stacking.json` | `benchmarks/stacking.py` | `max_stack` (launcher: runs per stacked job) | `DEFAULT_MAX_STACK` (4) |
| `threads.json` | `benchmarks/threads.py` | `jobs_threads` (local launcher: jobs × threads) | one job per core, 1 thread each |

Each benchmark stores the machine it measured on and the code version (`write` adds `measured_on`,
see `machine()`, and `code_version`).
A measurement taken with a different number of cores than this process may use is not applied
(stacking, threads). Whenever a default is used, the reason is logged (once per file).
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
import logging
import math
import os
import platform
import socket
import tempfile
from pathlib import Path
from typing import Any

from sparsescale import provenance

log = logging.getLogger(__name__)

DEFAULT_BREAK_EVEN = 0.5
DEFAULT_MAX_STACK = 4
_logged: set[str] = set()


def _note(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(message)


def load(name: str) -> dict[str, Any] | None:
    """The measurement `<name>.json` shipped with the package, or None (unreadable: logged)."""
    resource = importlib.resources.files(__name__) / f"{name}.json"
    try:
        return json.loads(resource.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        _note(
            f"bad:{name}",
            f"benchmarked machine data {name}.json is unreadable ({e}); using defaults",
        )
        return None


def path(name: str) -> Path:
    """Where `<name>.json` lives (and where the benchmarks write it): this package's directory."""
    return Path(str(importlib.resources.files(__name__) / f"{name}.json"))


def machine() -> dict[str, Any]:
    """The machine a measurement is taken on: host, CPU model, cores this process may use, OS,
    JAX backend and devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    info = {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import jax

        info.update(
            backend=jax.default_backend(),
            devices=[str(d) for d in jax.devices()],
            jax=jax.__version__,
        )
    except Exception as e:  # a benchmark driver that never imports jax still records the host
        info["backend"] = f"unknown ({type(e).__name__})"
    return info


def write(name: str, record: dict[str, Any], out: str | os.PathLike | None = None) -> Path:
    """Writes `record` (plus `measured`: the UTC time, `measured_on`: `machine()`, and
    `code_version`: the code that measured it) atomically to `out`, by default to the package
    data file `<name>.json`. Returns the path."""
    out = Path(out) if out is not None else path(name)
    record = {
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **record,
        "measured_on": machine(),
        "code_version": provenance.code_version(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, out)
    return out


def _source(name: str, measured: dict) -> str:
    on = measured.get("measured_on") or {}
    where = on.get("host") or measured.get("host") or measured.get("machine") or "?"
    return (
        f"{name}.json (measured {measured.get('measured') or measured.get('time', '?')} on {where})"
    )


def break_even_density(block: tuple[int, int], backend: str) -> float:
    """Density below which the block-sparse layer beats masked dense (forward + backward) on
    `backend`, from `block_sparse_<backend>.json` (nearest measured block area); 0 when the block
    path never won; `DEFAULT_BREAK_EVEN` when nothing was measured."""
    name = f"block_sparse_{backend}"
    measured = (load(name) or {}).get("break_even_density", {})
    if not measured:
        _note(
            name,
            f"no {name}.json benchmarked machine data: break-even density {DEFAULT_BREAK_EVEN}",
        )
        return DEFAULT_BREAK_EVEN
    area = block[0] * block[1]
    nearest = min(measured, key=lambda b: abs(math.log(math.prod(map(int, b.split("x"))) / area)))
    return float(measured[nearest] or 0.0)


def max_stack(n_params: int, cores: int | None = None) -> tuple[int, str]:
    """(best runs per stacked process, where it came from) for a model of `n_params`
    non-embedding parameters: the measurement of the nearest measured size on this many cores."""
    cores = cores or len(os.sched_getaffinity(0))
    measured = load("stacking")
    if not measured or measured.get("cores") != cores or not measured.get("best"):
        why = f"default {DEFAULT_MAX_STACK} (stacking.json has no measurement for {cores} cores)"
        _note(f"stacking:{cores}", f"benchmarked: max stack {why}")
        return DEFAULT_MAX_STACK, why
    nearest = min(
        measured["best"], key=lambda b: abs(math.log(b["n_params"]) - math.log(max(n_params, 1)))
    )
    return int(
        nearest["stack"]
    ), f"measured for {nearest['model']} in {_source('stacking', measured)}"


def jobs_threads(cores: int | None = None) -> tuple[int, int, str]:
    """(jobs, threads per job, where the choice came from) for `cores` cores (default: those this
    process may use)."""
    cores = cores or len(os.sched_getaffinity(0))
    measured = load("threads")
    if measured and measured.get("cores") == cores and "best" in measured:
        best = measured["best"]
        return (
            int(best["jobs"]),
            int(best["threads"]),
            f"measured in {_source('threads', measured)}",
        )
    why = f"one job per core (threads.json has no measurement for {cores} cores)"
    _note(f"threads:{cores}", f"benchmarked: {why}")
    return cores, 1, why
