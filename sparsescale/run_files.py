"""The run directory contract, JAX-free: file names, the summary schema, atomic writes, locks and
the metrics reader. The trainer writes it; `launch` and `analysis` read it through this module.

    <workdir>/
      config.json      the run's resolved config (RunConfig.to_dict()), written once it is checked
      metrics.jsonl    one JSON object per logged step ({"step": ..., "train/loss": ..., ...})
      tb/              TensorBoard events
      checkpoints/     orbax checkpoints (state, data iterator, metadata)
      checkpoints.corrupt/  checkpoints that failed to restore, moved aside (never deleted)
      summary.json     SUMMARY_COLUMNS (present: the run finished)
      failed.json      {"error", "step"}: a non-finite loss stopped the run
      .lock            held by the trainer while it runs (one trainer per workdir)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
CORRUPT_CHECKPOINTS = "checkpoints.corrupt"  # checkpoints that did not restore, kept aside
SUMMARY = "summary.json"
FAILED = "failed.json"
LOCK = ".lock"
LAUNCH = "launch.json"  # written by the launcher (launch/state.py) next to the trainer's files
FROM_RECORD = "from_record.json"  # launcher: this summary.json came from a committed record

# summary.json, in this order; `launch collect` tables and `analysis.load` use the same columns.
# Parameter counts: "nonembedding" excludes the token (and position) embeddings, which are never
# pruned; "prunable" is the share the sparsity applies to; "nonzero" counts the non-embedding
# parameters left after pruning plus the embeddings ("active" counts MoE experts used per token).
SUMMARY_COLUMNS = (
    "run_id", "experiment", "tag", "model",
    "n_params_total", "n_params_nonembedding", "n_params_prunable", "n_params_nonzero",
    "n_params_active", "flops_per_token", "tokens", "train_flops",
    "sparsity", "structure", "nm_n", "nm_m", "block_size", "num_experts", "top_k",
    "method", "allocation", "schedule", "steps", "batch_size", "lr", "seed", "task", "config_hash",
    "eval_loss", "eval_bpb", "train_loss", "wall_time_s", "energy_j", "energy_source", "device",
    "data_fingerprint", "status",
)  # fmt: skip


class RunFileError(RuntimeError):
    """A run file exists but cannot be used; the message names the file and the cause."""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON to a temp file in the same directory, fsyncs, then renames over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None if it is missing or unreadable (see `load_json` to raise)."""
    try:
        return load_json(path)
    except (FileNotFoundError, RunFileError):
        return None


def load_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`; FileNotFoundError if missing, RunFileError naming it if damaged."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunFileError(f"{path}: cannot read ({e}).") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path}: not valid JSON ({e}); the file is damaged.") from e


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[bool]:
    """An flock on `path` (created if missing); yields False if non-blocking and already held.
    The kernel releases it when the holder exits, however it exits."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete line of a metrics.jsonl (missing file: []). A torn last line (a kill
    mid-write) is skipped; a damaged line elsewhere raises RunFileError naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # torn by a kill mid-write
            raise RunFileError(f"{path}: line {i + 1} is not valid JSON ({e}).") from e
    return rows


def write_metrics(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replaces a metrics.jsonl with `rows`, one JSON object per line, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keeps the lines up to `last_step` (those a resumed run will not write again), atomically."""
    if Path(path).exists():
        write_metrics(path, [r for r in read_metrics(path) if r.get("step", 0) <= last_step])


def write_summary(workdir: str | os.PathLike, row: dict) -> dict:
    """Writes summary.json with exactly SUMMARY_COLUMNS (in order); returns what was written."""
    missing = [c for c in SUMMARY_COLUMNS if c not in row]
    extra = [c for c in row if c not in SUMMARY_COLUMNS]
    if missing or extra:
        raise ValueError(f"summary row: missing {missing}, unknown {extra} (see SUMMARY_COLUMNS).")
    bad = [c for c in ("eval_loss", "train_loss") if not math.isfinite(row[c])]
    if bad:
        raise ValueError(f"summary row: {bad} not finite; a run without losses has no summary.")
    summary = {c: row[c] for c in SUMMARY_COLUMNS}
    write_json_atomic(Path(workdir) / SUMMARY, summary)
    return summary
