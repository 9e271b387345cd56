"""Parameter and FLOP accounting in closed form (dense, sparse and MoE), in one place.

Conventions, used everywhere (budgets, summaries, fits): embeddings (token, learned positions,
an untied output head) are never pruned; `non_embedding` counts everything else; `prunable` is
the attention and MLP/expert kernels the sparsity applies to; `nonzero` subtracts the pruned
weights; `active` counts the experts one token uses. Training FLOPs are 6 × the active non-zero
matmul parameters per token plus attention scores. Tests check the counts against built models.
"""

from __future__ import annotations

import math

from sparsescale import model as model_lib
from sparsescale import moe as moe_lib
from sparsescale import sparsity as sp


def mlp_params(d_model: int, d_ff: int, mlp: str) -> int:
    """Kernels of one MLP (or one expert): up/down, plus the gate for SwiGLU."""
    return (3 if mlp == "swiglu" else 2) * d_model * d_ff


def moe_layer_counts(
    cfg: moe_lib.MoEConfig, d_model: int, d_ff: int, mlp: str, *, expert_density: float = 1.0
) -> dict[str, int]:
    """Parameters of one MoE layer (router included): total, active (router + top_k experts), and
    both again with expert kernels at `expert_density` (the router is never pruned)."""
    moe_lib.validate(cfg)
    moe_lib._check_mlp(d_model, d_ff, mlp)
    per_expert = mlp_params(d_model, d_ff, mlp)
    router = d_model * cfg.num_experts
    kept = round(per_expert * expert_density)
    return {
        "total": cfg.num_experts * per_expert + router,
        "active": cfg.top_k * per_expert + router,
        "nonzero": cfg.num_experts * kept + router,
        "active_nonzero": cfg.top_k * kept + router,
    }


def moe_layer_flops_per_token(
    cfg: moe_lib.MoEConfig, d_model: int, d_ff: int, mlp: str, *, expert_density: float = 1.0
) -> int:
    """Training FLOPs per token of one MoE layer: 6 × active non-zero matmul parameters (useful
    work only: no capacity padding, no elementwise ops)."""
    counts = moe_layer_counts(cfg, d_model, d_ff, mlp, expert_density=expert_density)
    return 6 * counts["active_nonzero"]


def param_counts(cfg: model_lib.ModelConfig, prunable_sparsity: float = 0.0) -> dict[str, int]:
    """Total, non-embedding, prunable, active and non-zero parameter counts of a model.
    `prunable_sparsity` is the overall fraction removed from the prunable kernels."""
    d = cfg.d_model
    attn = 4 * d * d
    prunable = active_prunable = router = 0
    for i in range(cfg.n_layers):
        prunable += attn
        active_prunable += attn
        if cfg.is_moe_layer(i):
            layer = moe_layer_counts(cfg.moe, d, cfg.d_ff, cfg.mlp)
            experts = layer["total"] - d * cfg.moe.num_experts
            prunable += experts
            active_prunable += layer["active"] - d * cfg.moe.num_experts
            router += d * cfg.moe.num_experts
        else:
            prunable += mlp_params(d, cfg.d_ff, cfg.mlp)
            active_prunable += mlp_params(d, cfg.d_ff, cfg.mlp)
    embedding = cfg.vocab_size * d + (0 if cfg.tie_embeddings else d * cfg.vocab_size)
    embedding += cfg.max_len * d if cfg.pos == "learned" else 0
    norms = 2 * d * cfg.n_layers + d
    non_embedding = prunable + router + norms
    removed = int(round(prunable_sparsity * prunable))
    return {
        "total": non_embedding + embedding,
        "non_embedding": non_embedding,
        "prunable": prunable,
        "nonzero": non_embedding + embedding - removed,
        "active": non_embedding - prunable + active_prunable + embedding,
        "active_nonzero": non_embedding
        - prunable
        + int(round(active_prunable * (1 - prunable_sparsity)))
        + embedding,
    }


def flops_per_token(
    cfg: model_lib.ModelConfig, seq_len: int, prunable_sparsity: float = 0.0
) -> float:
    """Training FLOPs per token: 6 × (non-zero active matmul params incl. the output head)
    + 6 · layers · seq_len · d_model for attention scores (Kaplan et al. 2020)."""
    counts = param_counts(cfg, prunable_sparsity)
    matmul = (
        counts["active_nonzero"]
        - cfg.vocab_size * cfg.d_model  # the input embedding is a lookup, not a matmul
        - (cfg.max_len * cfg.d_model if cfg.pos == "learned" else 0)
        - (2 * cfg.d_model) * cfg.n_layers
        - cfg.d_model
    )
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.d_model
    return 6.0 * matmul + 6.0 * cfg.n_layers * seq_len * cfg.d_model


def run_accounting(cfg, pruner=None) -> dict:
    """Parameter counts, FLOPs and tokens of a run (a `config.RunConfig`) at its final sparsity;
    `pruner` (if given) supplies the per-layer allocation, else the structure's target."""
    counts = param_counts(cfg.model)
    if pruner is not None and pruner.paths:
        removed = sum(
            int(round(pruner.final_sparsity[p] * math.prod(s))) for p, s in pruner.shapes.items()
        )
        prunable_sparsity = removed / counts["prunable"]
    else:
        prunable_sparsity = sp.target_sparsity(cfg.sparsity.structure)
    counts = param_counts(cfg.model, prunable_sparsity)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len, prunable_sparsity)
    tokens = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
    return {
        "n_params_total": counts["total"],
        "n_params_nonembedding": counts["non_embedding"],
        "n_params_prunable": counts["prunable"],
        "n_params_nonzero": counts["nonzero"],
        "n_params_active": counts["active_nonzero"],
        "flops_per_token": fpt,
        "tokens": tokens,
        "train_flops": fpt * tokens,
    }


def estimate_cost(config) -> dict:
    """Tokens, training FLOPs (and what a masked, i.e. dense, execution computes) and parameter
    counts of a run from its ml_collections config."""
    from sparsescale.config import run_config

    cfg = run_config(config)
    acc = run_accounting(cfg)
    keys = ("tokens", "train_flops", "n_params_total", "n_params_nonembedding", "n_params_nonzero")
    dense = flops_per_token(cfg.model, cfg.data.seq_len, 0.0) * acc["tokens"]
    return {**{k: acc[k] for k in keys}, "dense_train_flops": dense}
