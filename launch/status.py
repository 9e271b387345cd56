"""The sweep status table, read from the sweep root alone (`python -m launch status <root>`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch import state
from launch.sweep import read_sweep_json, spec_name

ORDER = (state.DONE, state.RUNNING, state.QUEUED, state.FAILED, state.PENDING)


def sweep_statuses(root: Path, record: dict[str, Any] | None = None) -> list[state.RunStatus]:
    """Status of every run in `<root>/sweep.json` (one squeue call for all Slurm attempts)."""
    root = Path(root)
    record = record or read_sweep_json(root)
    workdirs = [root / r["run_id"] for r in record["runs"]]
    alive = state.squeue_alive(state.slurm_job_ids(workdirs))
    return [state.run_status(w, alive) for w in workdirs]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def eta_seconds(status: state.RunStatus, steps: int, tokens_per_step: int) -> float | None:
    if status.status != state.RUNNING or not status.tokens_per_s or status.step is None:
        return None
    return max(steps - status.step, 0) * tokens_per_step / status.tokens_per_s


def format_table(record: dict[str, Any], statuses: Sequence[state.RunStatus]) -> str:
    """Plain-text table: one line per run, then counts per status."""
    runs = {r["run_id"]: r for r in record["runs"]}
    header = ("run", "status", "step", "loss", "try", "eta", "error")
    rows = []
    for s in statuses:
        run = runs[s.run_id]
        step = "-" if s.step is None else f"{s.step}/{run['steps']}"
        loss = "-" if s.loss is None else f"{s.loss:.4g}"
        eta = _duration(eta_seconds(s, run["steps"], run["tokens_per_step"]))
        error = (s.error or "")[:80]
        rows.append((s.run_id, s.status, step, loss, str(s.attempts), eta, error))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    counts = Counter(s.status for s in statuses)
    lines.append(
        f"{spec_name(record['experiment'], record['arg'])}  "
        + "  ".join(f"{name} {counts[name]}" for name in ORDER)
        + f"  (of {len(statuses)})"
    )
    return "\n".join(lines)


def status_text(root: Path) -> str:
    record = read_sweep_json(root)
    return format_table(record, sweep_statuses(root, record))
