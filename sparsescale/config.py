"""The run config schema: frozen dataclasses, and the ml_collections → dataclass mapping.

Each config section fills the `RunConfig` field of the same name (`model`, `data`, `sparsity`,
`train`, `mesh`); `launch` (Slurm resources) is read by the launcher only. Everything is validated
here, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import ml_collections
from flax import traverse_util

from sparsescale import data as data_lib
from sparsescale import model as model_lib
from sparsescale import sharding as shard_lib
from sparsescale import sparsity as sp

SECTIONS = ("model", "data", "sparsity", "train", "mesh", "launch")
TOP_LEVEL = ("run_id", "experiment", "tag")

# Config fields a resume may change: they change what is logged or how fast, not the result.
RESULT_NEUTRAL = (
    "run_id", "experiment", "tag", "mesh", "train.log_every", "train.eval_every",
    "train.ckpt_every", "train.keep_ckpts", "data.data_dir", "data.worker_count",
    "data.read_threads", "data.prefetch_batches",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer (AdamW, warmup + cosine), seed and the loop's logging/eval/checkpoint cadence."""

    steps: int = 1000
    lr: float = 3e-3
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_ckpts: int = 2

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}.")
        if not (self.lr > 0 and 0 <= self.warmup_frac < 1 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(
                f"train: need lr > 0, warmup_frac in [0, 1), min_lr_ratio in [0, 1]; got "
                f"lr={self.lr}, warmup_frac={self.warmup_frac}, min_lr_ratio={self.min_lr_ratio}."
            )
        if min(self.log_every, self.eval_batches, self.ckpt_every, self.keep_ckpts) < 1:
            raise ValueError("train: log_every, eval_batches, ckpt_every, keep_ckpts must be >= 1.")
        if self.eval_every < 0:
            raise ValueError(
                f"train.eval_every must be >= 0 (0: only at the end), got {self.eval_every}."
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: model_lib.ModelConfig
    data: data_lib.DataConfig
    sparsity: sp.SparsityConfig
    train: TrainConfig
    mesh: shard_lib.MeshConfig = shard_lib.MeshConfig()
    run_id: str = ""
    experiment: str = ""
    model_name: str = ""
    tag: str = ""

    def __post_init__(self):
        if self.data.seq_len > self.model.max_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_len={self.model.max_len}."
            )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def hash(self) -> str:
        """Hash of everything that changes the result (not the run's name, experiment or tag)."""
        d = self.to_dict()
        for k in ("run_id", "experiment", "tag"):
            d.pop(k)
        if d["sparsity"]["schedule"]["updates"] is None:  # unset: same hash as before it existed
            d["sparsity"]["schedule"].pop("updates")
        if d["data"]["eval_batch_size"] is None:
            d["data"].pop("eval_batch_size")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _fields(cls, d: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config.{where}: unknown keys {sorted(unknown)}; known: {sorted(names)}.")
    return d


def _sparsity_config(s: dict) -> sp.SparsityConfig:
    schedule = sp.Schedule(**_fields(sp.Schedule, dict(s.pop("schedule")), "sparsity.schedule"))
    kind, target = s.pop("structure"), float(s.pop("target"))
    n, m = int(s.pop("n")), int(s.pop("m"))
    structure = sp.structure_from_config(
        kind, target, n, m, tuple(s.pop("block")), s.pop("balanced", False)
    )
    if kind == "dense" and target != 0.0:
        raise ValueError(
            f"config.sparsity: structure 'dense' with target {target}; set "
            "sparsity.structure to 'unstructured', 'nm' or 'block' to prune."
        )
    if kind == "nm" and target != 0.0 and abs(target - (1 - n / m)) > 1e-9:
        raise ValueError(
            f"config.sparsity: structure 'nm' keeps n={n} of every m={m} (sparsity {1 - n / m:g}), "
            f"but target is {target:g}; set n and m (target may be left at 0)."
        )
    s["include"] = tuple(s.get("include", sp.DEFAULT_INCLUDE))
    s["exclude"] = tuple(s.get("exclude", sp.DEFAULT_EXCLUDE))
    return sp.SparsityConfig(
        structure=structure, schedule=schedule, **_fields(sp.SparsityConfig, s, "sparsity")
    )


def _model_config(model: dict) -> tuple[str, model_lib.ModelConfig]:
    model = dict(model)
    name = model.pop("name", "")
    moe = model.pop("moe", None)
    if moe and moe.get("num_experts", 0) > 0:
        from sparsescale.moe import MoEConfig

        model["moe"] = MoEConfig(**_fields(MoEConfig, moe, "model.moe"))
    overrides = {k: v for k, v in model.items() if v is not None}
    if name:
        model = {**dict(model_lib.PRESETS.get(name) or model_lib.preset(name)), **overrides}
    else:
        model = overrides
    return name, model_lib.ModelConfig(**_fields(model_lib.ModelConfig, model, "model"))


def run_config(config: ml_collections.ConfigDict | dict) -> RunConfig:
    """The validated RunConfig of an experiment config (see experiments/common.py for the keys)."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = set(c) - set(SECTIONS) - set(TOP_LEVEL)
    if unknown:
        raise ValueError(
            f"config: unknown top-level keys {sorted(unknown)}; known: {[*TOP_LEVEL, *SECTIONS]}."
        )
    name, model_cfg = _model_config(c["model"])
    sparsity_cfg = _sparsity_config(dict(c["sparsity"]))
    if sparsity_cfg.dense_grad and not model_cfg.dense_grad:
        model_cfg = dataclasses.replace(model_cfg, dense_grad=True)

    data_cfg = data_lib.DataConfig(**_fields(data_lib.DataConfig, dict(c["data"]), "data"))
    data_lib.validate(data_cfg)
    mesh = dict(c.get("mesh", {}))
    if "rules" in mesh:
        mesh["rules"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in mesh["rules"])
    mesh_cfg = shard_lib.MeshConfig(**_fields(shard_lib.MeshConfig, mesh, "mesh"))
    train_cfg = TrainConfig(**_fields(TrainConfig, dict(c["train"]), "train"))
    return RunConfig(
        model=model_cfg,
        data=data_cfg,
        sparsity=sparsity_cfg,
        train=train_cfg,
        mesh=mesh_cfg,
        run_id=c.get("run_id", ""),
        experiment=c.get("experiment", ""),
        model_name=name,
        tag=c.get("tag", ""),
    )


def config_changes(saved: dict, cfg: RunConfig) -> list[str]:
    """Dotted fields in which `cfg` differs from a saved config.json, less RESULT_NEUTRAL ones."""
    old = traverse_util.flatten_dict(saved, sep=".")
    new = traverse_util.flatten_dict(cfg.to_dict(), sep=".")
    neutral = lambda k: any(k == n or k.startswith(n + ".") for n in RESULT_NEUTRAL)  # noqa: E731
    return sorted(
        f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
        for k in set(old) | set(new)
        if not neutral(k) and old.get(k) != new.get(k)
    )


def summary_fields(cfg: RunConfig, counts: dict) -> dict:
    """The summary.json columns (run_files.SUMMARY_COLUMNS) that describe the run: its config and
    `counts` (accounting.run_accounting); the trainer adds the results."""
    structure = cfg.sparsity.structure
    moe = cfg.model.moe
    return {
        "run_id": cfg.run_id,
        "experiment": cfg.experiment,
        "tag": cfg.tag,
        "model": cfg.model_name,
        **counts,
        "sparsity": sp.target_sparsity(structure),
        "structure": "moe"
        if moe is not None and moe.num_experts > 0 and structure is None
        else ("dense" if structure is None else structure.name),
        "nm_n": structure.n if isinstance(structure, sp.NM) else None,
        "nm_m": structure.m if isinstance(structure, sp.NM) else None,
        "block_size": structure.block[0] if isinstance(structure, sp.Block) else None,
        "num_experts": moe.num_experts if moe is not None else 0,
        "top_k": moe.top_k if moe is not None else 0,
        "method": cfg.sparsity.method,
        "allocation": cfg.sparsity.allocation,
        "schedule": json.dumps(dataclasses.asdict(cfg.sparsity.schedule), sort_keys=True),
        "steps": cfg.train.steps,
        "batch_size": cfg.data.batch_size,
        "lr": cfg.train.lr,
        "seed": cfg.train.seed,
        "task": cfg.data.name,
        "config_hash": cfg.hash(),
    }
