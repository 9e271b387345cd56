"""Loading sweep tables, run directories and the published data into the tidy schema."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis import load

PUBLISHED = load.PUBLISHED_DIR  # in-repo package data: these tests never skip


def _runs():
    return pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "model": ["s", "s", "m"],
            "n_params_total": [1e6, 1e6, 4e6],
            "n_params_nonzero": [1e6, 0.5e6, 4e6],
            "sparsity": [0.0, 0.5, 0.0],
            "structure": ["dense", "unstructured", "dense"],
            "tokens": [1e8, 1e8, 1e8],
            "eval_loss": [3.0, 3.2, 2.7],
            "status": ["finished", "finished", "failed"],
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_round_trip_fills_optional_columns(tmp_path, suffix):
    path = tmp_path / f"results{suffix}"
    runs = _runs()
    runs.to_csv(path, index=False) if suffix == ".csv" else runs.to_parquet(path)
    df = load.load_results(path)
    assert list(df.columns[: len(load.COLUMNS)]) == list(load.COLUMNS)
    assert list(df["run_id"]) == ["a", "b"]  # the failed run is dropped
    assert df["n_params_active"].tolist() == [1e6, 0.5e6]  # = non-zero for non-MoE
    assert df["num_experts"].tolist() == [0, 0] and df["nm_m"].isna().all()
    assert len(load.load_results(path, only_finished=False)) == 3


def test_sweep_root_prefers_table_then_summaries(tmp_path):
    for row in _runs().to_dict("records"):
        run_dir = tmp_path / row["run_id"]
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps(row))
    df = load.load_results(tmp_path)
    assert sorted(df["run_id"]) == ["a", "b"]
    assert df.set_index("run_id").loc["b", "eval_loss"] == 3.2
    _runs().head(1).to_csv(tmp_path / "results.csv", index=False)
    assert list(load.load_results(tmp_path)["run_id"]) == ["a"]


def test_bad_tables_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['eval_loss'\]"):
        load.tidy(_runs().drop(columns="eval_loss"))
    bad = _runs()
    bad.loc[1, "sparsity"] = 75.0  # a percentage, not a fraction
    with pytest.raises(ValueError, match="fraction removed"):
        load.tidy(bad)
    bad = _runs()
    bad.loc[0, "structure"] = "2:4"
    with pytest.raises(ValueError, match="unknown structure"):
        load.tidy(bad)
    with pytest.raises(FileNotFoundError, match="summary.json"):
        load.load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load.load_results(tmp_path / "nope.csv")


def test_published_tables_map_to_tidy_schema():
    t5 = load.load_frantar(PUBLISHED, "t5")
    vit = load.load_frantar(PUBLISHED, "vit")
    assert (len(t5), len(vit)) == (48, 112)
    raw = pd.read_csv(PUBLISHED / "t5-data.csv")
    np.testing.assert_allclose(np.sort(t5["eval_loss"]), np.sort(raw["val-loss"]))
    # N = non-zero = 24*12*768^2 * scale * (1 - S); D = steps * 65536 tokens.
    expect_n = 24 * 12 * 768**2 * raw["scale"] * (1 - raw["sparsity"])
    np.testing.assert_allclose(np.sort(t5["n_params_nonzero"]), np.sort(expect_n))
    assert set(t5["tokens"]) == {s * 65536 for s in raw["steps"]}
    assert set(vit["structure"]) == {"dense", "unstructured"}
    assert vit["tokens"].min() > 1e8  # images seen
    chin = load.load_chinchilla(PUBLISHED, drop_highest=5)
    full = pd.read_csv(PUBLISHED / "chinchilla_svg_extracted_data.csv")
    assert len(chin) == len(full) - 5
    assert chin["eval_loss"].max() == full["loss"].nlargest(6).iloc[-1]
    np.testing.assert_allclose(
        chin["train_flops"], 6 * chin["n_params_nonzero"] * chin["tokens"], rtol=1e-12
    )


def test_sizes_are_non_embedding_with_each_models_prunable_fraction():
    """Embeddings are never pruned: N_FIT = non-embedding − pruned, SIZE = non-embedding."""
    runs = pd.DataFrame(
        {
            "n_params_total": [14416, 14416, 381600],
            "n_params_nonembedding": [6224, 6224, 332448],
            "n_params_prunable": [6144, 6144, 331776],
            "n_params_nonzero": [14416, 14416 - 0.75 * 6144, 381600],
            "sparsity": [0.0, 0.75, 0.0],
            "tokens": 1e6,
            "eval_loss": 3.0,
        }
    )
    df = load.tidy(runs)
    np.testing.assert_allclose(df[load.SIZE], [6224, 6224, 332448])
    np.testing.assert_allclose(df[load.N_FIT], [6224, 6224 - 0.75 * 6144, 332448])
    np.testing.assert_allclose(df[load.PRUNABLE_FRACTION], [6144 / 6224] * 2 + [331776 / 332448])
    # Without a non-embedding count (published tables) the reported counts are N.
    plain = load.tidy(runs.drop(columns=["n_params_nonembedding", "n_params_prunable"]))
    np.testing.assert_allclose(plain[load.N_FIT], plain["n_params_nonzero"])
    assert (plain[load.PRUNABLE_FRACTION] == 1).all()
