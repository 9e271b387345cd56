"""The sweep launcher. It runs from the repository checkout and is not installed (only
`sparsescale` is, see pyproject.toml); its jobs import `experiments/` and `launch/` from it."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root this launcher runs from


def checkout_pythonpath(pythonpath: str | None) -> str:
    """`pythonpath` (a PYTHONPATH value) with the checkout first, so a job started in any
    directory imports this checkout's experiment files and launcher."""
    rest = [p for p in (pythonpath or "").split(os.pathsep) if p and p != str(CHECKOUT)]
    return os.pathsep.join([str(CHECKOUT), *rest])
