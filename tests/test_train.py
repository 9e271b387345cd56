"""Training loop: sharded == single device, two processes == one, kill/resume is bit-identical,
accounting formulas, config validation."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import common
from launch.sweep import apply_overrides
from sparsescale import config as config_lib
from sparsescale import data as data_lib
from sparsescale import model as model_lib
from sparsescale import train

REPO = Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
    c = common.smoke(common.base_config())
    c.sparsity.structure = "unstructured"
    c.sparsity.sparsity = 0.5
    c.sparsity.schedule.start = 0.1
    c.sparsity.schedule.end = 0.6
    return apply_overrides(c, overrides, "test")


def _losses(cfg, devices, steps):
    trainer = train.build(cfg, devices)
    state = trainer.init_fn()
    it = data_lib.train_iterator(cfg.data)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step_fn(state, train.global_batch(trainer, next(it)))
        losses.append(float(metrics["train/loss"]))
    return np.array(losses), float(metrics["sparsity/overall"])


def test_sharded_equals_single_device():
    base = smoke_config(**{"train.steps": 10})
    ref, ref_sparsity = _losses(config_lib.run_config(base), jax.devices()[:1], 10)
    assert ref_sparsity == pytest.approx(0.5)
    for mesh in (dict(data=4), dict(data=2, tensor=2), dict(data=1, tensor=4), dict(fsdp=4)):
        mesh_overrides = {f"mesh.{k}": mesh.get(k, 1) for k in ("data", "fsdp", "tensor")}
        c = smoke_config(**{"train.steps": 10, **mesh_overrides})
        got, sparsity = _losses(config_lib.run_config(c), jax.devices()[:4], 10)
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=str(mesh))
        assert sparsity == ref_sparsity


def test_zero_output_layer_gives_ln_256():
    cfg = model_lib.preset("cpu_25k", max_len=16)
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
    model.unembed.kernel[...] = jnp.zeros_like(model.unembed.kernel[...])
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 256)
    logits, _ = model(tokens[:, :-1])
    loss = jnp.mean(train.cross_entropy(logits, tokens[:, 1:]))
    assert float(loss) == pytest.approx(math.log(256), rel=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mlp": "swiglu"},
        {"pos": "learned", "tie_embeddings": True},
        {"d_model": 48, "n_heads": 3, "n_layers": 3, "d_ff": 96},
    ],
)
def test_param_counts_match_built_model(overrides):
    cfg = model_lib.preset("cpu_100k", **overrides)
    model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sizes = {"/".join(map(str, k)): v.size for k, v in _flat(params).items()}
    counts = model_lib.param_counts(cfg)
    assert counts["total"] == sum(sizes.values())
    embedding = sum(v for k, v in sizes.items() if k.startswith(("embed", "unembed", "pos_embed")))
    assert counts["non_embedding"] == counts["total"] - embedding
    prunable = sum(v for k, v in sizes.items() if "/attn/" in k or "/mlp/" in k)
    assert counts["prunable"] == prunable
    half = model_lib.param_counts(cfg, 0.5)
    assert half["nonzero"] == counts["total"] - prunable // 2


def _flat(d, prefix=()):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def test_flops_per_token_hand_count():
    cfg = model_lib.preset("cpu_25k")  # d=32, 2 layers, d_ff=128, untied, V=256
    # matmul params: 2·(4·32² + 2·32·128) + 32·256 (unembedding) = 24576 + 8192
    expected = 6 * (24576 + 8192) + 6 * 2 * 64 * 32
    assert model_lib.flops_per_token(cfg, 64) == expected
    # 50% sparsity removes half the prunable matmul FLOPs.
    assert model_lib.flops_per_token(cfg, 64, 0.5) == expected - 6 * 24576 // 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.name": "cpu_huge"}, "Unknown model preset"),
        ({"sparsity.structure": "nm", "sparsity.n": 50, "sparsity.m": 100}, "divisible by m=100"),
        ({"sparsity.structure": "nm", "sparsity.n": 4, "sparsity.m": 4}, "0 < n < m"),
        ({"sparsity.sparsity": 1.5}, r"\[0, 1\)"),
        ({"data.name": "no_such_dataset_xyz"}, "no_such_dataset_xyz"),
        ({"data.seq_len": 64}, "exceeds model.max_len"),
        ({"train.steps": 0}, "train.steps"),
        ({"mesh.data": 3}, "needs 3 devices"),
        ({"sparsity.structure": "block", "sparsity.block": (5, 5)}, "does not divide"),
    ],
)
def test_invalid_configs_fail_before_compile(overrides, message):
    c = smoke_config(**overrides)
    with pytest.raises(ValueError, match=message):
        cfg = config_lib.run_config(c)
        train.build(cfg, jax.devices())  # shape checks need the model's shapes (no compile)


# ------------------------------------------------------------------------------------------------
# Subprocess tests: resume after SIGKILL, two processes.


def _main_cmd(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "sparsescale.main",
        f"--config={REPO}/experiments/train.py:smoke",
        f"--workdir={workdir}",
        *overrides,
    ]


def _env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _final_state(workdir):
    from sparsescale import checkpoint as ckpt

    manager = ckpt.Checkpointer(Path(workdir) / "checkpoints", async_save=False)
    step = manager.latest_step()
    import orbax.checkpoint as ocp

    restored = manager.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    manager.close()
    return step, restored["state"]


def _metric_lines(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    args = ["--config.train.steps=24", "--config.train.ckpt_every=4", "--config.train.log_every=1"]
    ref = tmp_path / "ref"
    subprocess.run(_main_cmd(ref, *args), env=_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _main_cmd(killed, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_at = np.random.default_rng().integers(6, 18)
    deadline = time.time() + 300
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        committed = list(killed.glob("checkpoints/*/commit_success.txt"))
        if len(lines) >= kill_at and committed:  # so the restart really resumes
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    subprocess.run(_main_cmd(killed, *args), env=_env(), check=True, capture_output=True)

    ref_lines, got_lines = _metric_lines(ref), _metric_lines(killed)
    assert [d["step"] for d in got_lines] == list(range(1, 25))
    assert [d["train/loss"] for d in got_lines] == [d["train/loss"] for d in ref_lines]
    step_ref, state_ref = _final_state(ref)
    step_got, state_got = _final_state(killed)
    assert step_ref == step_got == 24
    for a, b in zip(jax.tree.leaves(state_ref), jax.tree.leaves(state_got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["eval_loss"] == json.loads((ref / "summary.json").read_text())["eval_loss"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    args = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.ckpt_every=6"]
    one = tmp_path / "one"
    subprocess.run(_main_cmd(one, *args), env=_env(devices=4), check=True, capture_output=True)

    port = _free_port()
    two = tmp_path / "two"
    procs = []
    for i in range(2):
        env = _env(devices=2)
        multihost = [
            "--multihost",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        procs.append(
            subprocess.Popen(
                _main_cmd(two, *multihost, *args),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=400)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    a, b = _metric_lines(one), _metric_lines(two)
    np.testing.assert_allclose(
        [d["train/loss"] for d in b], [d["train/loss"] for d in a], rtol=1e-5
    )
    sa = json.loads((one / "summary.json").read_text())
    sb = json.loads((two / "summary.json").read_text())
    assert sb["eval_loss"] == pytest.approx(sa["eval_loss"], rel=1e-5)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    from sparsescale import checkpoint as ckpt

    saved = train.build(config_lib.run_config(smoke_config(**{"mesh.data": 4})), jax.devices()[:4])
    state = saved.init_fn()
    it = data_lib.train_iterator(saved.cfg.data)
    for _ in range(3):
        state, _ = saved.step_fn(state, train.global_batch(saved, next(it)))
    checkpointer = ckpt.Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(3, state, it, {"wall_time_s": 0.0})
    expected = next(it)

    other_cfg = smoke_config(**{"mesh.data": 1, "mesh.tensor": 2, "mesh.fsdp": 2})
    other = train.build(config_lib.run_config(other_cfg), jax.devices()[:4])
    abstract = ckpt.abstract_with_shardings(jax.eval_shape(other.init_fn), other.state_shardings)
    it2 = data_lib.train_iterator(other.cfg.data)
    restored, meta = checkpointer.restore(3, abstract, it2)
    checkpointer.close()
    assert meta["wall_time_s"] == 0.0
    np.testing.assert_array_equal(next(it2), expected)  # data iterator resumed exactly
    kernel = restored["params"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "overrides",
    [
        {"sparsity.method": "rigl", "sparsity.schedule.kind": "dynamic"},
        {"sparsity.method": "set", "sparsity.schedule.kind": "dynamic"},
        {"sparsity.method": "srste", "sparsity.structure": "nm", "sparsity.schedule.every": 1},
    ],
)
def test_dynamic_and_srste_training_keep_their_invariants(overrides):
    c = smoke_config(**{"train.steps": 8, "sparsity.schedule.start": 0.0, **overrides})
    cfg = config_lib.run_config(c)
    trainer = train.build(cfg, jax.devices()[:1])
    state = trainer.init_fn()
    it = data_lib.train_iterator(cfg.data)
    first_masks = jax.tree.map(np.asarray, state["masks"])
    for _ in range(6):
        state, metrics = trainer.step_fn(state, train.global_batch(trainer, next(it)))
        assert np.isfinite(float(metrics["train/loss"]))
    up = state["params"]["blocks"][0]["mlp"]["up"]["kernel"]
    mask = np.asarray(state["masks"]["blocks"][0]["mlp"]["up"]["mask"])
    if cfg.pruning.method == "srste":  # exact 2:4 masks; pruned weights keep training (dense)
        assert (mask.reshape(-1, 4, mask.shape[-1]).sum(1) == 2).all()
        assert (np.asarray(up)[~mask] != 0).any()
    else:  # exact count kept, pruned weights exactly zero, and the masks moved
        assert float(metrics["sparsity/overall"]) == pytest.approx(0.5, abs=1e-3)
        assert (np.asarray(up)[~mask] == 0).all()
        changed = jax.tree.map(lambda a, b: (a != np.asarray(b)).any(), first_masks, state["masks"])
        assert any(jax.tree.leaves(changed))
