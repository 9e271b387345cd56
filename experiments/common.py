"""Shared base config for experiments: `base_config()` plus named presets (smoke/quick/medium/full).

Every experiment file imports `base_config()` and overrides what it studies. Keys mirror the library
dataclasses (sparsescale/config.py maps them).
"""

from __future__ import annotations

import functools
import math

import ml_collections

# Each size's dense optimum peak LR (AdamW, 5% warmup, cosine): the parabola vertex of its grid in
# the crossover's `lr` / `lr_800k` presets (850 steps, ≈ 21 tokens per non-embedding parameter;
# docs/figures/crossover/lr/). Measured, not extrapolated; `tuned_lr` reads between them.
LR_MEASURED = {
    "cpu_6k": 0.0150,
    "cpu_12k": 0.0163,
    "cpu_25k": 0.0178,
    "cpu_50k": 0.0171,
    "cpu_100k": 0.0144,
    "cpu_330k": 0.0117,
    "cpu_800k": 0.0113,
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_id = ""
    c.experiment = ""
    c.tag = ""  # free-form label copied into summary.json (e.g. the token-budget regime)

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
    # validation rows per batch; None: batch_size (set it to evaluate every size on one window set)
    c.data.eval_batch_size = ml_collections.FieldReference(None, field_type=int)
    c.data.seed = 0
    c.data.synthetic_entropy = 1.0  # nats/byte, only for data.name = "synthetic"
    c.data.synthetic_order = 2

    c.sparsity = ml_collections.ConfigDict()
    c.sparsity.structure = "dense"  # dense | unstructured | nm | block
    c.sparsity.target = 0.0
    c.sparsity.n = 2
    c.sparsity.m = 4
    c.sparsity.block = (16, 16)
    c.sparsity.balanced = False  # block: same number of blocks in every block-column
    c.sparsity.impl = "masked"  # masked | block (block-sparse execution, see SparsityConfig)
    c.sparsity.switch_density = ml_collections.FieldReference(None, field_type=float)
    c.sparsity.allocation = "uniform"
    c.sparsity.method = "magnitude"
    c.sparsity.seed = 0
    c.sparsity.schedule = ml_collections.ConfigDict()
    c.sparsity.schedule.kind = "gradual"
    c.sparsity.schedule.start = 0.25
    c.sparsity.schedule.end = 0.75
    c.sparsity.schedule.every = 10
    # None: update every `every` steps; N: N update intervals over [start, end] at any run length
    c.sparsity.schedule.updates = ml_collections.FieldReference(None, field_type=int)
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

    c.launch = ml_collections.ConfigDict()  # Slurm resources per run (launch/backends/slurm.py)
    c.launch.cpus_per_task = 2
    c.launch.mem_gb = 8.0
    c.launch.timeout_min = 60
    c.launch.tasks = 1
    c.launch.nodes = 1
    c.launch.gpus_per_node = 0  # Slurm GPUs of each node (0: none requested)

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


@functools.cache
def non_embedding_params(model_name: str) -> int:
    """Non-embedding parameters of a model preset: the N every size rule here uses."""
    from sparsescale import accounting
    from sparsescale import model as model_lib

    return accounting.param_counts(model_lib.preset(model_name))["non_embedding"]


@functools.cache
def tuned_lr(model_name: str) -> tuple[float, str]:
    """(peak LR, how it was obtained) for a model preset: its measured optimum ("tuned"), else the
    measured optima read off piecewise linearly in log LR vs log N (non-embedding parameters)
    between the two neighbouring sizes ("interpolated"), else the nearest segment's slope
    continued ("extrapolated"). Every experiment preset trains at this LR."""
    if model_name in LR_MEASURED:
        return LR_MEASURED[model_name], "tuned"
    points = sorted(
        (math.log(non_embedding_params(name)), math.log(lr)) for name, lr in LR_MEASURED.items()
    )
    x = math.log(non_embedding_params(model_name))
    inside = points[0][0] <= x <= points[-1][0]
    i = next((i for i in range(1, len(points) - 1) if x < points[i][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    lr = math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return lr, "interpolated" if inside else "extrapolated"


def lr_overrides(model_name: str) -> dict:
    """The sweep override that trains `model_name` at its tuned LR (`tuned_lr`)."""
    return {"train.lr": round(tuned_lr(model_name)[0], 5)}


def steps_for_budget(
    model_name: str, tokens_per_param: float, batch_size: int, seq_len: int, min_steps: int
) -> int:
    """Steps that give `tokens_per_param` tokens per non-embedding parameter (at least
    `min_steps`): token budgets that scale with model size."""
    params = non_embedding_params(model_name)
    return max(min_steps, round(tokens_per_param * params / (batch_size * seq_len)))


def experiment_config(experiment: str, presets: dict, arg: str) -> ml_collections.ConfigDict:
    """Base config for one preset of an experiment: smoke settings first (for "smoke"), then the
    preset's batch_size, seq_len and, when given, steps and schedule update interval."""
    p = preset_of(presets, arg, experiment)
    c = base_config()
    c.experiment = experiment
    if arg == "smoke":
        c = smoke(c)
    c.data.batch_size = p["batch_size"]
    c.data.seq_len = c.model.max_len = p["seq_len"]
    if "steps" in p:
        c.train.steps = p["steps"]
    if "every" in p:
        c.sparsity.schedule.every = p["every"]
    return c


def preset_of(presets: dict, arg: str, experiment: str) -> dict:
    if arg not in presets:
        raise ValueError(f"{experiment}: unknown preset {arg!r}; choose one of {sorted(presets)}.")
    return presets[arg]


def sparsity_overrides(structure: str, sparsity: float = 0.0, **structure_args) -> dict:
    """Overrides for one sparsity variant; sparsity 0 (or structure "dense") is the dense baseline."""
    if structure == "dense" or (structure in ("unstructured", "block") and sparsity == 0.0):
        return {"sparsity.structure": "dense", "sparsity.target": 0.0}
    out = {"sparsity.structure": structure, "sparsity.target": float(sparsity)}
    out.update({f"sparsity.{k}": v for k, v in structure_args.items()})
    return out


def seed_overrides(seed: int) -> dict:
    """One seed drives both the initialisation and the data order."""
    return {"train.seed": seed, "data.seed": seed, "sparsity.seed": seed}


def report(results, out_dir, title: str, n_boot: int = 100):
    """analysis report (fits with bootstrap intervals, tolerance, figures) for a results subset."""
    import dataclasses

    from analysis import derived
    from analysis import report as report_lib

    cfg = dataclasses.replace(report_lib.DEFAULT_FIT_CONFIG, n_boot=n_boot)
    return report_lib.build_report(
        results,
        out_dir,
        fit_config=cfg,
        tol=derived.Tolerance(0.02),
        title=title,
        prunable_fraction=None,  # embeddings and norms are never pruned: use the runs' share
    )
