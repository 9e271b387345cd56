"""ml_collections ConfigDict → frozen dataclasses, validated before anything compiles."""

from __future__ import annotations

import dataclasses

import ml_collections

from sparsescale import data as data_lib
from sparsescale import model as model_lib
from sparsescale import pruner as pruner_lib
from sparsescale import sharding as shard_lib
from sparsescale import sparsity as sp
from sparsescale.train import OptimConfig, RunConfig


def _fields(cls, d: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config.{where}: unknown keys {sorted(unknown)}; known: {sorted(names)}.")
    return d


def run_config(config: ml_collections.ConfigDict) -> RunConfig:
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    model = dict(c["model"])
    name = model.pop("name", "")
    moe = model.pop("moe", None)
    if moe and moe.get("num_experts", 0) > 0:
        from sparsescale.moe import MoEConfig

        model["moe"] = MoEConfig(**_fields(MoEConfig, moe, "model.moe"))
    if name:
        base = dict(model_lib.PRESETS.get(name) or {})
        if not base:
            model_lib.preset(name)  # raises with the list of presets
        model = {**base, **{k: v for k, v in model.items() if v is not None}}
    else:
        model = {k: v for k, v in model.items() if v is not None}
    model_cfg = model_lib.ModelConfig(**_fields(model_lib.ModelConfig, model, "model"))

    s = dict(c["sparsity"])
    schedule = sp.Schedule(**_fields(sp.Schedule, dict(s.pop("schedule")), "sparsity.schedule"))
    structure = sp.structure_from_config(
        s.pop("structure"),
        s.pop("sparsity"),
        s.pop("n"),
        s.pop("m"),
        tuple(s.pop("block")),
        s.pop("balanced", False),
    )
    s["include"] = tuple(s.get("include", sp.DEFAULT_INCLUDE))
    s["exclude"] = tuple(s.get("exclude", sp.DEFAULT_EXCLUDE))
    pruning = pruner_lib.PruningConfig(
        structure=structure, schedule=schedule, **_fields(pruner_lib.PruningConfig, s, "sparsity")
    )
    if pruning.dense_grad and not model_cfg.dense_grad:
        model_cfg = dataclasses.replace(model_cfg, dense_grad=True)

    data_cfg = data_lib.DataConfig(**_fields(data_lib.DataConfig, dict(c["data"]), "data"))
    data_lib.validate(data_cfg)
    mesh = dict(c.get("mesh", {}))
    if "rules" in mesh:
        mesh["rules"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in mesh["rules"])
    mesh_cfg = shard_lib.MeshConfig(**_fields(shard_lib.MeshConfig, mesh, "mesh"))
    optim = OptimConfig(**_fields(OptimConfig, dict(c["train"]), "train"))
    return RunConfig(
        model=model_cfg,
        data=data_cfg,
        pruning=pruning,
        optim=optim,
        mesh=mesh_cfg,
        run_id=c.get("run_id", ""),
        experiment=c.get("experiment", ""),
        model_name=name,
        tag=c.get("tag", ""),
    )
