"""Shared base config for experiments: `base_config()` plus named presets (smoke/quick/medium/full).

Every experiment file imports `base_config()` and overrides what it studies. Keys mirror the library
dataclasses (sparsescale/config.py maps them).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_id = ""
    c.experiment = ""

    c.model = ml_collections.ConfigDict()
    c.model.name = "cpu_25k"  # a preset from sparsescale.model.PRESETS; fields below override it
    c.model.d_model = ml_collections.FieldReference(None, field_type=int)
    c.model.n_layers = ml_collections.FieldReference(None, field_type=int)
    c.model.n_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.d_ff = ml_collections.FieldReference(None, field_type=int)
    c.model.max_len = 128
    c.model.mlp = "gelu"
    c.model.pos = "rope"
    c.model.tie_embeddings = False
    c.model.dtype = "float32"
    c.model.moe = ml_collections.ConfigDict()
    c.model.moe.num_experts = 0  # 0: dense MLPs
    c.model.moe.top_k = 2
    c.model.moe.every = 2

    c.data = ml_collections.ConfigDict()
    c.data.name = "stdlib_code"
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.data.seed = 0

    c.sparsity = ml_collections.ConfigDict()
    c.sparsity.structure = "dense"  # dense | unstructured | nm | block
    c.sparsity.sparsity = 0.0
    c.sparsity.n = 2
    c.sparsity.m = 4
    c.sparsity.block = (16, 16)
    c.sparsity.allocation = "uniform"
    c.sparsity.method = "magnitude"
    c.sparsity.seed = 0
    c.sparsity.schedule = ml_collections.ConfigDict()
    c.sparsity.schedule.kind = "gradual"
    c.sparsity.schedule.start = 0.25
    c.sparsity.schedule.end = 0.75
    c.sparsity.schedule.every = 10
    c.sparsity.schedule.power = 3.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600
    c.train.lr = 3e-3
    c.train.warmup_frac = 0.05
    c.train.weight_decay = 0.1
    c.train.clip = 1.0
    c.train.seed = 0
    c.train.log_every = 20
    c.train.eval_every = 0
    c.train.eval_batches = 8
    c.train.ckpt_every = 200

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.expert = 1
    c.mesh.tensor = 1
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny and fast: for tests and CI (seconds)."""
    c.model.name = "cpu_25k"
    c.model.max_len = 32
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.train.steps = 10
    c.train.log_every = 5
    c.train.ckpt_every = 5
    c.train.eval_batches = 2
    c.sparsity.schedule.every = 2
    return c
