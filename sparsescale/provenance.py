"""Which code produced a result, `code_version()`, recorded in launch records, run records and
every benchmark result (`benchmarked.write`); and on what, `device_name()`, in every run summary."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = "SPARSESCALE_CODE_VERSION"


@functools.cache
def code_version(repo: Path = REPO) -> str:
    """`git describe --always --dirty` of the checkout at `repo` (this package's, by default);
    else $SPARSESCALE_CODE_VERSION (a copy of the tree without its git history, such as a lent
    device machine's); else "unknown"."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=30,
        )
        described = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        described = ""
    return described or os.environ.get(ENV) or "unknown"


@functools.cache
def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), or "unknown CPU"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                "unknown CPU")  # fmt: skip


def device_name(before: str | None = None) -> str:
    """ "<backend>: <device kind> × <count>" of this JAX process (on a CPU, the processor's model),
    after `before` (the device of the run's earlier steps) when that was another."""
    import jax

    kind = cpu_model() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    here = f"{jax.default_backend()}: {kind} × {jax.device_count()}"
    return here if before in (None, "", here) else f"{before} + {here}"
