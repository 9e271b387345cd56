"""Load sweep results and published scaling data into one tidy table (one row per run).

Columns follow the run directory's summary (`sparsescale.run_files.SUMMARY_COLUMNS`, as `launch collect`
writes them; see `COLUMNS`); missing optional columns are filled
with sensible defaults so that every later step can rely on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sparsescale import run_files

# The run directory's summary columns (sparsescale/run_files.py owns them; `status` is also what
# `launch collect` sets: done, failed, ...).
COLUMNS = run_files.SUMMARY_COLUMNS
REQUIRED = ("n_params_nonzero", "tokens", "eval_loss")
# Derived by `tidy` (the parameter-count convention of every fit, table and axis): embeddings are
# never pruned, so sizes are non-embedding parameters and sparsity removes from the prunable part.
SIZE = "n_nonembedding"  # the model's non-embedding parameters (dense count; total when unknown)
N_FIT = "n_nonzero_nonembedding"  # non-zero non-embedding parameters: N of every law fit
PRUNABLE_FRACTION = "prunable_fraction"  # prunable / non-embedding parameters of the model
ACTIVE = "n_active_nonembedding"  # non-embedding parameters used per token (MoE: routed experts)
STRUCTURES = ("dense", "unstructured", "nm", "block", "moe")
_TABLE_NAMES = ("results.parquet", "results.csv")
PUBLISHED_DIR = Path(__file__).resolve().parent / "published"  # in the checkout (SOURCES.md)


def load_results(source: str | Path, *, only_finished: bool = True) -> pd.DataFrame:
    """Reads a results table (CSV/Parquet) or a sweep root into a tidy DataFrame.

    A sweep root is read from its `results.parquet` / `results.csv` when present, else from every
    `*/summary.json` below it. With `only_finished`, rows whose `status` is set and is not
    "finished"/"ok"/"done" are dropped (failed or running runs have no final loss).
    """
    path = Path(source)
    if path.is_dir():
        table = next((path / n for n in _TABLE_NAMES if (path / n).is_file()), None)
        if table is not None:
            frame = _read_table(table)
        else:
            summaries = sorted(path.glob("**/summary.json"))
            if not summaries:
                raise FileNotFoundError(
                    f"{path} holds neither {' nor '.join(_TABLE_NAMES)} nor any */summary.json; "
                    "expected a sweep root written by `launch` or a results table"
                )
            frame = pd.DataFrame([_read_summary(p) for p in summaries])
        origin = str(path)
    elif path.is_file():
        frame = _read_table(path)
        origin = str(path)
    else:
        raise FileNotFoundError(f"results source {path} does not exist")
    frame = tidy(frame, origin=origin)
    if only_finished:
        ok = frame["status"].isna() | frame["status"].str.lower().isin(
            ["finished", "ok", "done", "success", "completed", "fit", ""]
        )
        frame = frame[ok].reset_index(drop=True)
    return frame


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, comment="#")
    raise ValueError(f"{path}: unknown table format {path.suffix!r}; expected .csv or .parquet")


def _read_summary(path: Path) -> dict:
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    flat = {}
    for key, value in record.items():  # tolerate one level of nesting ({"params": {...}})
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if not isinstance(v, dict | list)})
        elif not isinstance(value, list):
            flat[key] = value
    flat.setdefault("run_id", path.parent.name)
    return flat


def tidy(frame: pd.DataFrame, *, origin: str = "<DataFrame>") -> pd.DataFrame:
    """Validates required columns and fills optional ones; returns a new DataFrame."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{origin}: missing required column(s) {missing}; got {sorted(frame.columns)}; "
            f"expected the `launch collect` schema ({', '.join(COLUMNS)})"
        )
    df = frame.copy()
    n = len(df)
    if "sparsity" not in df:
        df["sparsity"] = 0.0
    df["sparsity"] = df["sparsity"].astype(float).fillna(0.0)
    bad = df[(df["sparsity"] < 0) | (df["sparsity"] >= 1)]
    if len(bad):
        raise ValueError(
            f"{origin}: sparsity must be a fraction removed in [0, 1); rows {list(bad.index[:5])} "
            f"have {list(bad['sparsity'][:5])}"
        )
    for col in ("n_params_nonzero", "tokens", "eval_loss"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    if "structure" not in df:
        df["structure"] = np.where(df["sparsity"] > 0, "unstructured", "dense")
    df["structure"] = df["structure"].fillna("dense").astype(str)
    unknown = sorted(set(df["structure"]) - set(STRUCTURES))
    if unknown:
        raise ValueError(f"{origin}: unknown structure(s) {unknown}; expected one of {STRUCTURES}")
    defaults = {
        "run_id": [f"row{i}" for i in range(n)],
        "experiment": "",
        "tag": "",
        "model": "",
        "n_params_total": df["n_params_nonzero"] / (1.0 - df["sparsity"]),
        "n_params_nonembedding": np.nan,
        "n_params_prunable": np.nan,
        "nm_n": np.nan,
        "nm_m": np.nan,
        "block_size": np.nan,
        "num_experts": 0,
        "top_k": 0,
        "method": "",
        "allocation": "",
        "schedule": "",
        "steps": np.nan,
        "batch_size": np.nan,  # summaries before these two columns existed
        "lr": np.nan,
        "flops_per_token": np.nan,
        "train_flops": np.nan,
        "eval_bpb": np.nan,
        "train_loss": np.nan,
        "seed": 0,
        "task": "",
        "config_hash": "",
        "wall_time_s": np.nan,
        "energy_j": np.nan,  # summaries before energy was recorded
        "energy_source": "",
        "device": "",  # summaries before the device was recorded
        "data_fingerprint": "",
        "status": None,
    }
    for col, value in defaults.items():
        if col not in df:
            df[col] = value
    if "n_params_active" not in df:
        df["n_params_active"] = df["n_params_nonzero"]
    df["n_params_active"] = df["n_params_active"].astype(float).fillna(df["n_params_nonzero"])
    df["n_params_total"] = df["n_params_total"].astype(float)
    df["num_experts"] = df["num_experts"].fillna(0).astype(int)
    df["top_k"] = df["top_k"].fillna(0).astype(int)
    df["seed"] = df["seed"].fillna(0).astype(int)
    for col in ("experiment", "tag", "model", "method", "allocation", "schedule", "task"):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    df["status"] = df["status"].astype(object).where(df["status"].notna(), None)
    df["status"] = df["status"].map(lambda s: None if s is None else str(s))
    _add_parameter_counts(df)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra].reset_index(drop=True)


def _add_parameter_counts(df: pd.DataFrame) -> None:
    """SIZE, N_FIT, ACTIVE and PRUNABLE_FRACTION from the counts a run reports (in place).

    Pruned parameters = total − non-zero; they all lie outside the embeddings, so the non-zero
    non-embedding count is non-embedding − pruned. Without a non-embedding count (published
    tables) the reported counts are used as they are.
    """
    nonemb = pd.to_numeric(df["n_params_nonembedding"], errors="coerce").astype(float)
    known = nonemb.notna() & (nonemb > 0)
    total = df["n_params_total"].astype(float)
    nonzero = df["n_params_nonzero"].astype(float)
    df[SIZE] = np.where(known, nonemb, total)
    df[N_FIT] = np.where(known, nonemb - (total - nonzero), nonzero)
    active = df["n_params_active"].astype(float)
    df[ACTIVE] = np.where(known, active - (total - nonemb), active)
    prunable = pd.to_numeric(df["n_params_prunable"], errors="coerce").astype(float)
    df[PRUNABLE_FRACTION] = (prunable / df[SIZE]).where(prunable.notna(), 1.0).clip(0, 1)


# --- published data -------------------------------------------------------------------------------

_FRANTAR_DATASETS = {"t5": "t5_c4", "vit": "vit_jft4b"}


def load_frantar(
    published_dir: str | Path = PUBLISHED_DIR, dataset: str = "t5", *, split: str = "fit"
) -> pd.DataFrame:
    """Frantar et al. (ICLR 2024) T5/C4 or ViT/JFT-4B runs in the tidy schema.

    `dataset` is "t5" or "vit"; `split` is "fit" (the authors' fitting runs), "heldout" (T5's
    extrapolation point) or "all". N = non-zero params; D = tokens (T5, inferred as
    steps*65536) or training images (ViT, `total_examples`).
    """
    if dataset not in _FRANTAR_DATASETS:
        raise ValueError(f"dataset={dataset!r}; expected one of {sorted(_FRANTAR_DATASETS)}")
    if split not in ("fit", "heldout", "all"):
        raise ValueError(f"split={split!r}; expected 'fit', 'heldout' or 'all'")
    path = Path(published_dir) / "frantar_table.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected the published-data directory")
    raw = pd.read_csv(path, comment="#")
    raw = raw[raw["dataset"] == _FRANTAR_DATASETS[dataset]]
    if split != "all":
        raw = raw[raw["split"] == split]
    is_t5 = dataset == "t5"
    tokens = raw["tokens_inferred"] if is_t5 else raw["total_examples"]
    frame = pd.DataFrame(
        {
            "run_id": [f"{dataset}_{r}" for r in raw["source_row"]],
            "experiment": f"frantar2024_{dataset}",
            "model": [f"scale{s:g}" if s == s else "heldout" for s in raw["scale"]],
            "n_params_total": raw["n_total"].to_numpy(float),
            "n_params_prunable": raw["n_total"].to_numpy(float),
            "n_params_nonzero": raw["n_nonzero"].to_numpy(float),
            "sparsity": raw["sparsity"].to_numpy(float),
            "structure": np.where(raw["sparsity"] > 0, "unstructured", "dense"),
            "steps": raw["steps"].to_numpy(float),
            "tokens": tokens.to_numpy(float),
            "eval_loss": raw["val_loss"].to_numpy(float),
            "task": _FRANTAR_DATASETS[dataset],
            "data_unit": "tokens" if is_t5 else "images",  # what D counts (figure labels)
            "status": raw["split"].to_numpy(str),
        }
    )
    return tidy(frame, origin=str(path))


def load_chinchilla(
    published_dir: str | Path = PUBLISHED_DIR, *, drop_highest: int = 5
) -> pd.DataFrame:
    """Epoch AI's re-extraction of Hoffmann et al. (2022) dense runs (tokens = FLOP / 6N).

    Besiroglu et al. (2024) drop the `drop_highest` highest-loss rows before fitting.
    """
    path = Path(published_dir) / "chinchilla_svg_extracted_data.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected the published-data directory")
    raw = pd.read_csv(path)
    if drop_highest:
        raw = raw.drop(raw["loss"].nlargest(drop_highest).index)
    n = raw["Model Size"].to_numpy(float)
    frame = pd.DataFrame(
        {
            "run_id": [f"chinchilla_{i}" for i in raw.index],
            "experiment": "hoffmann2022",
            "n_params_total": n,
            "n_params_nonzero": n,
            "sparsity": 0.0,
            "structure": "dense",
            "tokens": raw["Training FLOP"].to_numpy(float) / (6.0 * n),
            "train_flops": raw["Training FLOP"].to_numpy(float),
            "eval_loss": raw["loss"].to_numpy(float),
            "task": "massivetext",
        }
    )
    return tidy(frame, origin=str(path))
