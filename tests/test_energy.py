"""sparsescale/energy.py: the measured path against a fake RAPL counter (exact joules, wraps
included), the estimate's arithmetic, resumes, and the label every summary carries."""

import json

import jax
import pytest

from sparsescale import config as config_lib
from sparsescale import energy, provenance, train


def _zone(root, i, uj, max_uj):
    zone = root / f"intel-rapl:{i}"
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(str(uj))
    (zone / "max_energy_range_uj").write_text(str(max_uj))
    return zone


def test_rapl_counter_sums_packages_and_survives_a_wrap(tmp_path):
    a, b = _zone(tmp_path, 0, 1_000_000, 10_000_000), _zone(tmp_path, 1, 9_000_000, 10_000_000)
    _zone(tmp_path, "0:0", 7, 10_000_000)  # a sub-domain of package 0: not counted twice
    read = energy._rapl_counter(str(tmp_path / "intel-rapl:*"))
    assert read() == 0.0
    (a / "energy_uj").write_text("3500000")  # +2.5 J
    (b / "energy_uj").write_text("500000")  # wrapped: +1.5 J
    assert read() == pytest.approx(4.0)
    meter = energy.Meter(10.0, None, read, "measured: test")
    (a / "energy_uj").write_text("4500000")  # +1 J
    assert meter.joules() == pytest.approx(11.0) and meter.source == "measured: test"
    assert energy._rapl_counter(str(tmp_path / "nothing*")) is None


def test_estimate_is_watts_times_time_and_resumes_keep_both_labels(monkeypatch):
    clock = iter([100.0, 130.0])
    monkeypatch.setattr(energy.time, "perf_counter", lambda: next(clock))
    meter = energy.Meter(joules_before=50.0, watts=20.0)
    assert meter.joules() == pytest.approx(50.0 + 20.0 * 30.0)
    assert meter.source.startswith("estimated: ") and "no energy counter" in meter.source
    monkeypatch.setattr(energy.time, "perf_counter", lambda: 0.0)
    same = energy.Meter(1.0, meter.source, watts=20.0, source=meter.source)
    assert same.source == meter.source  # resumed on the same hardware: one label
    other = energy.Meter(1.0, "measured: RAPL", watts=20.0)
    assert other.source.startswith("measured: RAPL + estimated: ")


def test_summary_records_energy_and_its_source_across_a_resume(tmp_path, smoke_config):
    cfg = config_lib.run_config(smoke_config(**{"train.steps": 10, "train.ckpt_every": 5}))
    summary = train.run(cfg, tmp_path / "run")
    assert summary["energy_j"] > 0 and summary["energy_source"] == energy.meter().source
    assert summary["energy_source"].startswith(("estimated: ", "measured: "))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["energy_j"] == summary["energy_j"]
    # more steps: resumes from step 10's checkpoint and adds to its joules
    longer = config_lib.run_config(smoke_config(**{"train.steps": 15, "train.ckpt_every": 5}))
    (tmp_path / "run" / "summary.json").unlink()
    more = train.run(longer, tmp_path / "run", allow_config_change=True)
    assert more["energy_j"] > summary["energy_j"]
    # and the device it trained on, once: the same device before and after the resume
    assert summary["device"] == more["device"] == provenance.device_name()
    assert more["device"].startswith("cpu: ") and more["device"].endswith(f"× {jax.device_count()}")
    assert (
        provenance.device_name("gpu: NVIDIA H200 × 1") == f"gpu: NVIDIA H200 × 1 + {more['device']}"
    )


def test_a_resume_from_a_checkpoint_without_energy_says_so(tmp_path, smoke_config):
    """A run resumed from a checkpoint written before energy accounting counts only the steps
    after it: its source says so, and figure 6's energy table leaves it out."""
    import pandas as pd

    from analysis import costs

    cfg = config_lib.run_config(smoke_config(**{"train.steps": 10, "train.ckpt_every": 5}))
    train.run(cfg, tmp_path / "run")
    f = tmp_path / "run" / "checkpoints" / "10" / "meta" / "metadata"  # orbax's JsonSave file
    meta = json.loads(f.read_text())
    assert meta["energy_j"] > 0
    f.write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("energy")}))
    longer = config_lib.run_config(smoke_config(**{"train.steps": 15, "train.ckpt_every": 5}))
    (tmp_path / "run" / "summary.json").unlink()
    more = train.run(longer, tmp_path / "run", allow_config_change=True)
    assert more["energy_source"].startswith("unmetered before step 10")
    assert more["energy_source"].endswith(energy.meter().source)
    row = {"status": "done", "tokens": 1, "sparsity": 0.0, "num_experts": 0, "model": "m",
           "seed": 0, "steps": 15, "train_flops": 1.0}  # fmt: skip
    whole = {**row, "energy_j": 2.0, "energy_source": energy.meter().source}
    partial = {**row, "energy_j": 1.0, "energy_source": more["energy_source"], "seed": 1}
    table = costs.energy_table(pd.DataFrame([whole, partial]))
    assert list(table["seed"]) == [0]
