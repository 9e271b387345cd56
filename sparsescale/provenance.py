"""Which code produced a result: `code_version()`, recorded in launch records, run records and
every benchmark result (`tuning.write`)."""

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
