"""`python -m launch posttrain <experiment> --root R`: the post-training regime of a sweep.

Each finished dense run of the sweep is restored from its final checkpoint and pruned one-shot
(`sparsescale.posttrain`); its rows are appended to `<root>/posttrain.csv` as soon as they are
computed (with the `code_version` that computed them), so an interrupted pass loses at most the
run it was on, and runs already in the file are not pruned again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from launch.sweep import Sweep
from sparsescale import config as config_lib
from sparsescale import posttrain, provenance

POSTTRAIN_FILE = "posttrain.csv"


def post_config(methods=None, structures=None) -> posttrain.PostTrainConfig:
    """The PostTrainConfig of the given names (None: all); ValueError names an unknown one."""
    default = posttrain.PostTrainConfig()
    return posttrain.PostTrainConfig(
        methods=tuple(methods or default.methods),
        structures=tuple(structures or default.structures),
    )


def run(expanded: Sweep, root: Path, post: posttrain.PostTrainConfig) -> tuple[Path, int]:
    """(path of the table, number of dense runs added to it)."""
    path = Path(root) / POSTTRAIN_FILE
    table = pd.read_csv(path) if path.exists() else pd.DataFrame({"run_id": []})
    pending = [
        (r.run_id, dataclasses.replace(config_lib.run_config(c), run_id=r.run_id))
        for r, c in zip(expanded.runs, expanded.configs, strict=True)
        if r.run_id not in set(table["run_id"])
    ]
    added, version = 0, provenance.code_version()
    for rows in posttrain.evaluate_runs(pending, root, post):
        rows = pd.DataFrame(rows).assign(code_version=version)
        table = pd.concat([table, rows]) if len(table) else rows
        tmp = path.with_suffix(".csv.tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(path)  # atomic: the table is whole at every moment
        added += 1
        print(
            f"posttrain: {rows['run_id'].iloc[0]} ({added} of the pending dense runs)", flush=True
        )
    return path, added
