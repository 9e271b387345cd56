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
        f"--config={REPO}/experiments/train.py:smoke",
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
