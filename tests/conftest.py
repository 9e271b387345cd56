"""Test setup: 4 fake CPU devices (before JAX initialises) and float32 everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)


import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from experiments import common  # noqa: E402
from launch.sweep import apply_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_smoke_config(**overrides):
    c = common.smoke(common.base_config())
    c.sparsity.structure = "unstructured"
    c.sparsity.target = 0.5
    c.sparsity.schedule.start = 0.1
    c.sparsity.schedule.end = 0.6
    return apply_overrides(c, overrides, "test")


def make_main_cmd(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "sparsescale.main",
        f"--config={REPO}/experiments/single_run.py:smoke",
        f"--workdir={workdir}",
        *overrides,
    ]


def make_run_env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def read_final_state(workdir):
    from sparsescale import checkpoint as ckpt

    manager = ckpt.Checkpointer(Path(workdir) / "checkpoints", async_save=False)
    step = manager.latest_step()
    import orbax.checkpoint as ocp

    restored = manager.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    manager.close()
    return step, restored["state"]


def read_metric_lines(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(ref, got, steps: int) -> None:
    """The run in `got` (interrupted and resumed) equals the uninterrupted one in `ref`: one
    metrics row per step with the same losses, the same final state bit for bit, the same eval."""
    import jax
    import numpy as np

    got_lines = read_metric_lines(got)
    assert [d["step"] for d in got_lines] == list(range(1, steps + 1))
    assert [d["train/loss"] for d in got_lines] == [d["train/loss"] for d in read_metric_lines(ref)]
    (step_ref, state_ref), (step_got, state_got) = read_final_state(ref), read_final_state(got)
    assert step_ref == step_got == steps
    for a, b in zip(jax.tree.leaves(state_ref), jax.tree.leaves(state_got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eval_ref = json.loads((Path(ref) / "summary.json").read_text())["eval_loss"]
    assert json.loads((Path(got) / "summary.json").read_text())["eval_loss"] == eval_ref


@pytest.fixture
def same_training():
    """`same_training(ref, got, steps)`: asserts a resumed run equals the uninterrupted one."""
    return assert_same_training


@pytest.fixture
def smoke_config():
    """`smoke_config(**overrides)`: the smoke experiment config, 50% unstructured, with overrides."""
    return make_smoke_config


@pytest.fixture
def run_env():
    """`run_env(devices=1)`: environment for a trainer subprocess on `devices` fake CPU devices."""
    return make_run_env


@pytest.fixture
def final_state():
    """`final_state(workdir)`: (step, state) of the run's newest checkpoint."""
    return read_final_state


@pytest.fixture
def metric_lines():
    """`metric_lines(workdir)`: the rows of the run's metrics.jsonl."""
    return read_metric_lines


@pytest.fixture
def main_cmd():
    """`main_cmd(workdir, *overrides)`: the command line that trains the smoke run in `workdir`."""
    return make_main_cmd


SMOKE_EXPERIMENT = """
import ml_collections
from experiments import common

def get_config(arg):
    c = common.smoke(common.base_config())
    c.experiment = "launchtest"
    c.sparsity.structure = "unstructured"
    c.sparsity.target = 0.5
    c.train.steps = {steps}
    c.train.log_every = {log_every}
    c.train.ckpt_every = {ckpt_every}
    c.launch = ml_collections.ConfigDict(
        dict(cpus_per_task=1, mem_gb=2.0, timeout_min=10, tasks=1))
    return c

def get_sweep(arg):
    return {sweep!r}
"""


def make_experiment(directory, sweep, steps=6, log_every=3, ckpt_every=3) -> Path:
    path = Path(directory) / "launchtest.py"
    path.write_text(
        SMOKE_EXPERIMENT.format(
            sweep=sweep, steps=steps, log_every=log_every, ckpt_every=ckpt_every
        )
    )
    return path


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def experiment_file():
    """`experiment_file(dir, sweep, steps=6, log_every=3, ckpt_every=3)`: a smoke experiment
    file (50% unstructured, experiment "launchtest") declaring `sweep`; returns its path."""
    return make_experiment


@pytest.fixture
def wait_for():
    """`wait_for(predicate, timeout_s, what)`: polls until `predicate()` or fails naming `what`."""
    return wait_until


def make_launcher_env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def read_attempts(root: Path, run_id: str) -> list[dict]:
    from sparsescale import run_files

    return run_files.read_json(Path(root) / run_id / "launch.json")["attempts"]


@pytest.fixture(scope="session")
def launcher_env():
    """`launcher_env()`: the test session's env without its 4 fake devices (runs use one each)."""
    return make_launcher_env


@pytest.fixture(scope="session")
def attempts():
    """`attempts(root, run_id)`: the launch attempts recorded in the run's launch.json."""
    return read_attempts
