"""Data read at run time ships inside the package: the benchmarked machine data
(`sparsescale/benchmarked/*.json`) and the H100 target config, found through importlib.resources and
present in a built (non-editable) wheel, which holds the library only."""

import importlib.resources
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sparsescale import benchmarked
from sparsescale.kernels import aot

REPO = Path(__file__).resolve().parents[1]
DATA = [
    "sparsescale/benchmarked/block_sparse_cpu.json",
    "sparsescale/benchmarked/stacking.json",
    "sparsescale/benchmarked/threads.json",
    "sparsescale/kernels/h100_target_config.txtpb",
]


def test_importlib_resources_finds_the_package_data():
    for name in ("block_sparse_cpu", "stacking", "threads"):
        measured = benchmarked.load(name)
        assert measured and measured.get("cores"), name
    assert 0 < benchmarked.break_even_density((64, 64), "cpu") < 1
    assert (
        benchmarked.break_even_density((64, 64), "no_such_backend")
        == benchmarked.DEFAULT_BREAK_EVEN
    )
    config = importlib.resources.files("sparsescale.kernels") / "h100_target_config.txtpb"
    assert config.read_text().strip()
    assert aot.h100_target_config_path().read_text() == config.read_text()


def test_defaults_when_measurements_do_not_apply(caplog):
    stack, why = benchmarked.max_stack(10_000, cores=999)
    assert (stack, "default") == (benchmarked.DEFAULT_MAX_STACK, why.split()[0])
    jobs, threads, why = benchmarked.jobs_threads(cores=999)
    assert (jobs, threads) == (999, 1) and "one job per core" in why
    assert "no measurement for 999 cores" in caplog.text


@pytest.mark.slow
def test_built_wheel_holds_the_library_and_its_data_only(tmp_path):
    """Built from the checkout's layout, the wheel has the package data and no top-level name
    but `sparsescale` (analysis/, launch/, experiments/, benchmarks/ stay in the checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src)
    for name in ("sparsescale", "analysis", "launch", "experiments", "benchmarks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("sparsescale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(DATA) <= names, sorted(set(DATA) - names)
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sparsescale"}, top


def test_write_records_the_machine(tmp_path):
    out = benchmarked.write(
        "threads", {"cores": 2, "best": {"jobs": 2, "threads": 1}}, tmp_path / "t.json"
    )
    record = json.loads(out.read_text())
    assert record["best"] == {"jobs": 2, "threads": 1} and record["measured"]
    assert {"host", "cpu", "cores", "backend"} <= set(record["measured_on"])
