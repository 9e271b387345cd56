"""Training loop: sharded == single device, two processes == one, kill/resume is bit-identical,
accounting formulas, config validation."""

import json
import math
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsescale import accounting, train
from sparsescale import config as config_lib
from sparsescale import data as data_lib
from sparsescale import model as model_lib
from sparsescale import step as step_lib

REPO = Path(__file__).resolve().parents[1]


def _losses(cfg, devices, steps):
    trainer = step_lib.build(cfg, devices)
    state = trainer.init_fn()
    it = data_lib.train_iterator(cfg.data)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step_fn(state, step_lib.global_batch(trainer, next(it)))
        losses.append(float(metrics["train/loss"]))
    return np.array(losses), float(metrics["sparsity/overall"])


def test_sharded_equals_single_device(smoke_config):
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
    loss = jnp.mean(step_lib.cross_entropy(logits, tokens[:, 1:]))
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
    counts = accounting.param_counts(cfg)
    assert counts["total"] == sum(sizes.values())
    embedding = sum(v for k, v in sizes.items() if k.startswith(("embed", "unembed", "pos_embed")))
    assert counts["non_embedding"] == counts["total"] - embedding
    prunable = sum(v for k, v in sizes.items() if "/attn/" in k or "/mlp/" in k)
    assert counts["prunable"] == prunable
    half = accounting.param_counts(cfg, 0.5)
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
    assert accounting.flops_per_token(cfg, 64) == expected
    # 50% sparsity removes half the prunable matmul FLOPs.
    assert accounting.flops_per_token(cfg, 64, 0.5) == expected - 6 * 24576 // 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.name": "cpu_huge"}, "Unknown model preset"),
        ({"sparsity.structure": "nm", "sparsity.n": 50, "sparsity.m": 100}, "divisible by m=100"),
        ({"sparsity.structure": "nm", "sparsity.n": 4, "sparsity.m": 4}, "0 < n < m"),
        ({"sparsity.target": 1.5}, r"\[0, 1\)"),
        ({"data.name": "no_such_dataset_xyz"}, "no_such_dataset_xyz"),
        ({"data.seq_len": 64}, "exceeds model.max_len"),
        ({"train.steps": 0}, "train.steps"),
        ({"mesh.data": 3}, "needs 3 devices"),
        ({"sparsity.structure": "block", "sparsity.block": (5, 5)}, "does not divide"),
        ({"sparsity.structure": "dense", "sparsity.target": 0.75}, "structure 'dense' with target"),
        ({"sparsity.structure": "nm", "sparsity.target": 0.9}, "but target is 0.9"),
        ({"train.eval_every": -1}, "eval_every must be >= 0"),
        ({"data.batch_size": 6, "mesh.data": 4}, "not divisible by the 4 batch shards"),
    ],
)
def test_invalid_configs_fail_before_compile(overrides, message, smoke_config):
    c = smoke_config(**overrides)
    with pytest.raises(ValueError, match=message):
        cfg = config_lib.run_config(c)
        step_lib.build(cfg, jax.devices())  # shape checks need the model's shapes (no compile)


# ------------------------------------------------------------------------------------------------
# Subprocess tests: resume after SIGKILL, two processes.


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, final_state, main_cmd, metric_lines, run_env):
    args = ["--config.train.steps=24", "--config.train.ckpt_every=4", "--config.train.log_every=1"]
    ref = tmp_path / "ref"
    subprocess.run(main_cmd(ref, *args), env=run_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        main_cmd(killed, *args), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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
    subprocess.run(main_cmd(killed, *args), env=run_env(), check=True, capture_output=True)

    ref_lines, got_lines = metric_lines(ref), metric_lines(killed)
    assert [d["step"] for d in got_lines] == list(range(1, 25))
    assert [d["train/loss"] for d in got_lines] == [d["train/loss"] for d in ref_lines]
    step_ref, state_ref = final_state(ref)
    step_got, state_got = final_state(killed)
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
def test_two_processes_match_one(tmp_path, main_cmd, metric_lines, run_env):
    args = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.ckpt_every=6"]
    one = tmp_path / "one"
    subprocess.run(main_cmd(one, *args), env=run_env(devices=4), check=True, capture_output=True)

    port = _free_port()
    two = tmp_path / "two"
    procs = []
    for i in range(2):
        env = run_env(devices=2)
        multihost = [
            "--multihost",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        procs.append(
            subprocess.Popen(
                main_cmd(two, *multihost, *args),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=400)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    a, b = metric_lines(one), metric_lines(two)
    np.testing.assert_allclose(
        [d["train/loss"] for d in b], [d["train/loss"] for d in a], rtol=1e-5
    )
    sa = json.loads((one / "summary.json").read_text())
    sb = json.loads((two / "summary.json").read_text())
    assert sb["eval_loss"] == pytest.approx(sa["eval_loss"], rel=1e-5)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path, smoke_config):
    from sparsescale import checkpoint as ckpt

    saved = step_lib.build(
        config_lib.run_config(smoke_config(**{"mesh.data": 4})), jax.devices()[:4]
    )
    state = saved.init_fn()
    it = data_lib.train_iterator(saved.cfg.data)
    for _ in range(3):
        state, _ = saved.step_fn(state, step_lib.global_batch(saved, next(it)))
    checkpointer = ckpt.Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(3, state, it, {"wall_time_s": 0.0})
    expected = next(it)

    other_cfg = smoke_config(**{"mesh.data": 1, "mesh.tensor": 2, "mesh.fsdp": 2})
    other = step_lib.build(config_lib.run_config(other_cfg), jax.devices()[:4])
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
def test_dynamic_and_srste_training_keep_their_invariants(overrides, smoke_config):
    c = smoke_config(**{"train.steps": 8, "sparsity.schedule.start": 0.0, **overrides})
    cfg = config_lib.run_config(c)
    trainer = step_lib.build(cfg, jax.devices()[:1])
    state = trainer.init_fn()
    it = data_lib.train_iterator(cfg.data)
    first_masks = jax.tree.map(np.asarray, state["masks"])
    for _ in range(6):
        state, metrics = trainer.step_fn(state, step_lib.global_batch(trainer, next(it)))
        assert np.isfinite(float(metrics["train/loss"]))
    up = state["params"]["blocks"][0]["mlp"]["up"]["kernel"]
    mask = np.asarray(state["masks"]["blocks"][0]["mlp"]["up"]["mask"])
    if cfg.sparsity.method == "srste":  # exact 2:4 masks; pruned weights keep training (dense)
        assert (mask.reshape(-1, 4, mask.shape[-1]).sum(1) == 2).all()
        assert (np.asarray(up)[~mask] != 0).any()
    else:  # exact count kept, pruned weights exactly zero, and the masks moved
        assert float(metrics["sparsity/overall"]) == pytest.approx(0.5, abs=1e-3)
        assert (np.asarray(up)[~mask] == 0).all()
        changed = jax.tree.map(lambda a, b: (a != np.asarray(b)).any(), first_masks, state["masks"])
        assert any(jax.tree.leaves(changed))


# ------------------------------------------------------------------------------------------------
# Faults: each injects one and checks that nothing written is lost and the message names the cause.


def _train(smoke_config, workdir, **overrides):
    base = {"train.steps": 8, "train.ckpt_every": 4, "train.log_every": 2}
    return train.run(config_lib.run_config(smoke_config(**{**base, **overrides})), workdir)


def test_bad_input_fails_before_writing_anything(tmp_path, smoke_config):
    cfg = config_lib.run_config(smoke_config(**{"data.batch_size": 6, "mesh.data": 4}))
    with pytest.raises(ValueError, match="batch shards"):
        train.run(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        train.run(config_lib.run_config(smoke_config()), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_rerunning_a_finished_run_leaves_it_untouched(tmp_path, smoke_config):
    first = _train(smoke_config, tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "summary.json", tmp_path / "metrics.jsonl")}
    assert _train(smoke_config, tmp_path) == first
    assert {p: p.read_bytes() for p in before} == before


def test_resume_at_final_step_rebuilds_the_same_summary(tmp_path, smoke_config):
    """Killed between the last checkpoint and summary.json: the re-run writes the same summary."""
    first = _train(smoke_config, tmp_path)
    (tmp_path / "summary.json").unlink()
    again = _train(smoke_config, tmp_path)
    assert again == first and math.isfinite(again["train_loss"])


@pytest.mark.parametrize("damage", ["truncate", "empty_json", "delete_state"])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, smoke_config, metric_lines, caplog, damage
):
    ref = _train(smoke_config, tmp_path / "ref")
    work = tmp_path / "work"
    _train(smoke_config, work, **{"train.steps": 8})
    (work / "summary.json").unlink()  # as if killed right after saving step 8
    step_dir = work / "checkpoints" / "8"
    if damage == "truncate":
        for f in (step_dir / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 8:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "empty_json":
        for f in step_dir.rglob("*.json"):
            f.write_text("")
        for f in (step_dir / "meta").rglob("*"):
            if f.is_file():
                f.write_text("")
    else:
        shutil.rmtree(step_dir / "state")
    with caplog.at_level("WARNING", logger="sparsescale"):
        got = _train(smoke_config, work)
    assert "Skipped checkpoint step 8" in caplog.text
    assert got["eval_loss"] == ref["eval_loss"] and got["train_loss"] == ref["train_loss"]
    assert [r["train/loss"] for r in metric_lines(work)] == [
        r["train/loss"] for r in metric_lines(tmp_path / "ref")
    ]
    assert list((work / "checkpoints.corrupt").iterdir())  # kept aside, not deleted


def test_resume_with_a_changed_config_is_refused(tmp_path, smoke_config):
    _train(smoke_config, tmp_path, **{"train.steps": 8, "train.ckpt_every": 4})
    (tmp_path / "summary.json").unlink()
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(train.RunDirError, match=r"train\.lr: 0\.003 -> 0\.01"):
        _train(smoke_config, tmp_path, **{"train.lr": 0.01})
    with pytest.raises(train.RunDirError, match="sparsity.structure.sparsity"):
        _train(smoke_config, tmp_path, **{"sparsity.target": 0.75})
    assert (tmp_path / "config.json").read_text() == saved  # never rewritten before the check
    # Logging cadence does not change the result: allowed.
    _train(smoke_config, tmp_path, **{"train.log_every": 4})


def test_second_trainer_on_a_workdir_is_refused(tmp_path, smoke_config):
    from sparsescale import run_files

    tmp_path.mkdir(exist_ok=True)
    with run_files.file_lock(tmp_path / run_files.LOCK):
        with pytest.raises(train.RunDirError, match="in use by another trainer"):
            _train(smoke_config, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_metrics_survive_deletion_and_a_torn_last_line(tmp_path, smoke_config, metric_lines):
    ref = tmp_path / "ref"
    _train(smoke_config, ref, **{"train.log_every": 1})
    work = tmp_path / "work"
    real_append = train.MetricsLog.append

    def delete_midway(self, row):
        if row["step"] == 3:
            self.path.unlink()  # a user deletes the file mid-run
        real_append(self, row)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.MetricsLog, "append", delete_midway)
        _train(smoke_config, work, **{"train.log_every": 1, "train.steps": 8})
    assert [r["step"] for r in metric_lines(work)] == list(range(1, 9))
    # A kill mid-write leaves a torn last line; the resume drops it and goes on.
    (work / "summary.json").unlink()
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')
    _train(smoke_config, work, **{"train.log_every": 1})
    assert [r["train/loss"] for r in metric_lines(work)] == [
        r["train/loss"] for r in metric_lines(ref)
    ]


def test_failed_json_says_when_there_is_no_checkpoint(tmp_path, smoke_config):
    with pytest.raises(train.NonFiniteLoss, match="no checkpoint was saved yet"):
        _train(smoke_config, tmp_path, **{"train.lr": 1e9, "train.ckpt_every": 100})
