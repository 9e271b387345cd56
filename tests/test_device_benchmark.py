"""benchmarks/device.py (the accelerator benchmark) runs end to end on CPU with --tiny shapes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import device
from sparsescale import provenance

ROOT = Path(__file__).resolve().parent.parent


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_device_benchmark_tiny_writes_every_section(tmp_path):
    out = tmp_path / "device.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device.py"), "--tiny", "--out", str(out)],
        cwd=tmp_path,  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["backend"] == "cpu" and r["tiny"] and r["device_kind"] and r["jax_version"]
    # It names the code that measured it (this checkout, found from the package, not the cwd).
    assert r["code_version"] == provenance.code_version() != "unknown"
    assert r["measured_on"]["backend"] == "cpu" and r["measured"]
    assert r["reference"]["peak_bf16_flops_per_s"] == "unknown"  # CPU is not in the table
    assert _finite(r["reference"]["matmul_flops_per_s"])

    # Every case ran: no errors, no budget skips.
    cases = [r["reference"], *r["matmul"], *r["decode"], r["train_step"]]
    for case in cases:
        assert "error" not in case and "skipped" not in case, case
    assert len(r["matmul"]) >= 2  # square + LLM-shaped
    for case in r["matmul"]:
        assert _finite(case["dense_s"]) and len(case["shape"]) == 3
        names = set(case["variants"])
        assert {"block_0.5", "block_0.75", "block_0.875", "nm_2:4", "nm_1:4", "nm_1:8"} <= names
        for v in case["variants"].values():
            assert _finite(v["sparse_s"]) and _finite(v["speedup"]) and v["speedup"] > 0
            assert v["max_rel_err"] < 0.02  # bf16 output vs the f32 product of the kept weights
    for case in r["decode"]:
        assert [row["batch"] for row in case["rows"]][0] == 1
        for row in case["rows"]:
            assert _finite(row["variants"]["nm_2:4"]["speedup"])

    step = r["train_step"]
    for key in ("dense_step_s", "block_step_s", "speedup_block_over_dense", "dense_tokens_per_s"):
        assert _finite(step[key]), key
    assert _finite(step["dense_model_flops_per_s"]) and step["dense_mfu"] == "unknown"
    assert step["sparsity"] == 0.75 and step["block_budgets"]
    for key in ("dense_j_per_step", "block_j_per_step", "energy_block_over_dense"):
        assert _finite(step[key]) and step[key] > 0, key
    square = r["matmul"][0]
    assert square["energy_source"] == step["energy_source"]
    assert step["energy_source"].startswith(("estimated: ", "measured: "))
    assert _finite(square["dense_j"]) and square["dense_j"] > 0
    assert all(_finite(v["sparse_j"]) for v in square["variants"].values())

    assert set(r["targets"]) == {"block75_square", "nm24_decode"}
    for t in r["targets"].values():
        assert _finite(t["measured"]) and isinstance(t["passed"], bool) and t["threshold"] > 1


def test_device_benchmark_records_failures_and_budget():
    runner = device.Runner(budget_s=1e9)
    failed = runner.run("boom", lambda: 1 / 0)
    assert failed["error"].startswith("ZeroDivisionError") and "case_wall_s" in failed
    assert runner.run("ok", lambda: {"x": 1})["x"] == 1
    runner.budget_s = -1.0
    skipped = runner.run("late", lambda: {"x": 1})
    assert "budget" in skipped["skipped"] and runner.notes == [skipped["skipped"]]
    assert device.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert device.peak_bf16("NVIDIA H200") == 989e12
    assert device.peak_bf16("cpu") == "unknown"


def test_joules_per_call_reads_the_meter_around_back_to_back_calls(monkeypatch):
    """A fake counter that each call of `a` advances by 2 J and of `b` by 0.5 J."""
    import jax.numpy as jnp

    from sparsescale import energy

    joules, result = [0.0], jnp.zeros(())

    def step(j):
        joules[0] += j
        return result

    meter = energy.Meter(counter=lambda: joules[0], source="measured: fake")
    monkeypatch.setattr(energy, "meter", lambda: meter)
    monkeypatch.setitem(device.ENERGY, "min_s", 0.01)
    per_call, source = device.joules_per_call({"a": lambda: step(2.0), "b": lambda: step(0.5)})
    assert per_call == {"a": 2.0, "b": 0.5} and source == "measured: fake"
