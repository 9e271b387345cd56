"""The sweep status table, read from the sweep root alone (`python -m launch status <root>`)."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch import state
from launch import sweep as sweep_lib
from launch.sweep import read_sweep_json, spec_name
from sparsescale import run_files

CALIBRATION_FILE = "calibration.json"  # written by `launch calibrate` (launch/cost.py)
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


def _model_of(run: dict[str, Any]) -> str | None:
    return run.get("model") or run.get("overrides", {}).get("model.name")


@dataclasses.dataclass(frozen=True)
class SweepEta:
    """The whole sweep's remaining time. `lanes`: runs training at once now (None: nothing
    runs, `seconds` is then the work left for one run at a time); `unknown`: unfinished runs
    without any rate for their model; `source`: where pending runs' rates came from."""

    seconds: float
    lanes: int | None
    unknown: int
    source: str

    def text(self) -> str:
        where = f"{self.lanes} runs at a time" if self.lanes else "not running; one run at a time"
        missing = f", {self.unknown} runs without a rate not counted" if self.unknown else ""
        if self.seconds == 0 and self.unknown:
            return f"sweep eta unknown until a run reports its speed ({where}{missing})"
        return f"sweep eta {_duration(self.seconds)} ({where}; {self.source}{missing})"


def sweep_eta(
    record: dict[str, Any],
    statuses: Sequence[state.RunStatus],
    calibration: dict[str, Any] | None = None,
) -> SweepEta:
    """Remaining time of the sweep from the cost model, corrected by measured progress.

    Running runs finish at their own measured tokens/s. A run not yet started takes its tokens at
    the rate measured in this sweep for its model (running runs' tokens/s, finished runs' tokens
    over wall time, so start-up and evaluation are included); for a model with no run measured
    yet, at its calibrated rate (`calibration.json`, `launch calibrate`) scaled by how the
    measured models compare with their calibration. The work is shared by the runs training now
    (`lanes`). A model with neither takes its steps' FLOPs (`step_flops` in sweep.json) at the
    FLOP rate the measured runs reach. Failed runs are not counted (retries are not certain)."""
    runs = {r["run_id"]: r for r in record["runs"]}
    calibration = calibration or {}
    measured: dict[str, list[float]] = {}
    for s in statuses:
        run = runs[s.run_id]
        model = _model_of(run)
        if s.status == state.RUNNING and s.tokens_per_s:
            measured.setdefault(model, []).append(float(s.tokens_per_s))
        elif s.status == state.DONE and s.wall_time_s and s.tokens:
            # a stacked job's runs each report the whole job's wall time: per lane, k runs' tokens
            measured.setdefault(model, []).append(s.tokens * s.stacked / s.wall_time_s)
    rate = {m: statistics.median(v) for m, v in measured.items()}
    flop_rates = [  # FLOP/s per lane of each measured model, for the models nobody measured
        rate[_model_of(runs[s.run_id])]
        * runs[s.run_id]["step_flops"]
        / runs[s.run_id]["tokens_per_step"]
        for s in statuses
        if _model_of(runs[s.run_id]) in rate and runs[s.run_id].get("step_flops")
    ]
    flop_rate = statistics.median(flop_rates) if flop_rates else None
    ratios = [
        rate[m] / calibration[m]["tokens_per_s"]
        for m in rate
        if isinstance(calibration.get(m), dict) and calibration[m].get("tokens_per_s")
    ]
    correction = statistics.median(ratios) if ratios else 1.0
    running_s, work_s, unknown, used_calibration, used_flops = [], 0.0, 0, False, False
    for s in statuses:
        run = runs[s.run_id]
        if s.status == state.RUNNING:
            left = eta_seconds(s, run["steps"], run["tokens_per_step"])
            if left is not None:
                running_s.append(left)
                work_s += left
                continue
        if s.status not in (state.PENDING, state.QUEUED, state.RUNNING):
            continue  # done, or failed
        # queued: from the start; pending with metrics: resumes from its last checkpoint, about
        done_steps = (s.step or 0) if s.status in (state.RUNNING, state.PENDING) else 0
        tokens = max(run["steps"] - done_steps, 0) * run["tokens_per_step"]
        model = _model_of(run)
        if model in rate:
            work_s += tokens / rate[model]
        elif isinstance(calibration.get(model), dict) and calibration[model].get("tokens_per_s"):
            work_s += tokens / (calibration[model]["tokens_per_s"] * correction)
            used_calibration = True
        elif flop_rate and run.get("step_flops"):
            work_s += tokens / run["tokens_per_step"] * run["step_flops"] / flop_rate
            used_flops = True
        else:
            unknown += 1
    lanes = sum(s.status == state.RUNNING for s in statuses) or None
    seconds = max([work_s / (lanes or 1), *running_s])
    source = "measured rates"
    if used_calibration:
        source += f" and calibration × {correction:.2g}" if ratios else " and calibration"
    if used_flops:
        source += " and FLOPs at the measured FLOP rate"
    return SweepEta(seconds, lanes, unknown, source)


def _loss_text(s: state.RunStatus) -> str:
    """The eval loss once the run has one, else the train loss; labelled."""
    if s.eval_loss is not None:
        return f"eval {s.eval_loss:.4g}"
    return "-" if s.loss is None else f"train {s.loss:.4g}"


def _shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters in the middle (ids differ at both ends)."""
    if len(text) <= width:
        return text
    if width < 5:
        return text[:width]
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


def short_labels(record: dict[str, Any]) -> tuple[list[str], str]:
    """(one label per run, what the labels hold): the values of the overrides that differ
    between runs, in the order they were given (`cpu_25k 0.5 nm`); the run ids where the runs do
    not all set the same keys."""
    runs = record["runs"]
    keys = [tuple(r.get("overrides", {})) for r in runs]
    if not runs or any(k != keys[0] for k in keys):
        return [r["run_id"] for r in runs], "run"
    varying = [k for k in keys[0] if len({repr(r["overrides"][k]) for r in runs}) > 1] or list(
        keys[0]
    )
    if not varying:
        return [r["run_id"] for r in runs], "run"
    short = sweep_lib._short_keys(varying)
    labels = [" ".join(sweep_lib._format_value(r["overrides"][k]) for k in varying) for r in runs]
    if len(set(labels)) < len(labels):
        return [r["run_id"] for r in runs], "run"
    return labels, " ".join(short[k] for k in varying)


def format_table(
    record: dict[str, Any],
    statuses: Sequence[state.RunStatus],
    calibration: dict[str, Any] | None = None,
    compact: bool = False,
    width: int = 100,
    height: int = 30,
    selected: set[str] | None = None,
) -> str:
    """Plain-text table, then counts per status and the sweep's ETA (of the `selected` runs
    only, when a launcher trains part of the sweep).

    Full: one line per run. Compact (fits `width` × `height`): runs labelled by the values of the
    overrides that differ between them, running, queued and failed runs first, done and pending
    runs left out when there is no room (counted below the table), errors cut to the width."""
    runs = {r["run_id"]: r for r in record["runs"]}
    ids = [r["run_id"] for r in record["runs"]]
    labels, label_header = short_labels(record) if compact else (ids, "run")
    label_of = dict(zip(ids, labels, strict=True))
    header = (label_header, "status", "step", "loss", "try", "eta", "error")
    shown = list(statuses)
    if compact:
        rank = {state.RUNNING: 0, state.FAILED: 1, state.QUEUED: 2, state.PENDING: 3, state.DONE: 4}
        shown = sorted(statuses, key=lambda s: rank.get(s.status, 5))[: max(height - 5, 1)]
        shown = [s for s in statuses if s in shown]  # keep the sweep's order
    rows = []
    for s in shown:
        run = runs[s.run_id]
        step = "-" if s.step is None else f"{s.step}/{run['steps']}"
        eta = _duration(eta_seconds(s, run["steps"], run["tokens_per_step"]))
        name = label_of.get(s.run_id, s.run_id)
        rows.append([name, s.status, step, _loss_text(s), str(s.attempts), eta, s.error or ""])
    if compact and rows:
        rows = [[_shorten(r[0], max(width // 3, 12)), *r[1:]] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    room = max(width - sum(widths[:-1]) - 2 * (len(header) - 1), 20) if compact else 80
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *[[*r[:-1], _shorten(r[-1], room)] for r in rows]]
    ]
    if compact and len(shown) < len(statuses):
        left_out = Counter(s.status for s in statuses if s not in shown)
        lines.append("… not shown: " + ", ".join(f"{n} {k}" for k, n in sorted(left_out.items())))
    counts = Counter(s.status for s in statuses)
    lines.append(
        f"{spec_name(record['experiment'], record['arg'])}  "
        + "  ".join(f"{name} {counts[name]}" for name in ORDER)
        + f"  (of {len(statuses)})"
    )
    if counts[state.DONE] < len(statuses):
        todo = statuses if selected is None else [s for s in statuses if s.run_id in selected]
        eta = sweep_eta(record, todo, calibration).text()
        lines.append(eta if selected is None else eta.replace("sweep eta", "eta of this launch", 1))
    return "\n".join(lines)


def read_calibration(root: Path) -> dict[str, Any]:
    """The calibration entries measured on this host's device (`cost.usable_calibration`)."""
    from launch import cost

    calibration = run_files.read_json(Path(root) / CALIBRATION_FILE)
    return cost.usable_calibration(calibration)[0] if isinstance(calibration, dict) else {}


def status_text(root: Path, compact: bool = False, width: int = 100, height: int = 30) -> str:
    record = read_sweep_json(root)
    statuses = sweep_statuses(root, record)
    return format_table(record, statuses, read_calibration(root), compact, width, height)
