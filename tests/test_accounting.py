"""Parameter and FLOP accounting (sparsescale/accounting.py) against built models and hand counts."""

import jax
import pytest
from flax import nnx, traverse_util

from sparsescale import accounting
from sparsescale import model as model_lib
from sparsescale.accounting import moe_layer_counts, moe_layer_flops_per_token
from sparsescale.moe import MoE, MoEConfig


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mlp": "swiglu"},
        {"pos": "learned", "tie_embeddings": True},
        {"d_model": 48, "n_heads": 3, "n_layers": 3, "d_ff": 96},
        {"moe": MoEConfig(num_experts=4, top_k=2, every=2)},
    ],
)
def test_param_counts_match_built_model(overrides):
    cfg = model_lib.preset("cpu_100k", **overrides)
    model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sizes = {"/".join(map(str, k)): v.size for k, v in traverse_util.flatten_dict(params).items()}
    counts = accounting.param_counts(cfg)
    assert counts["total"] == sum(sizes.values())
    embedding = sum(v for k, v in sizes.items() if k.startswith(("embed", "unembed", "pos_embed")))
    assert counts["non_embedding"] == counts["total"] - embedding
    prunable = sum(v for k, v in sizes.items() if "/attn/" in k or "/mlp/" in k or "/moe/w_" in k)
    assert counts["prunable"] == prunable
    experts = sum(v for k, v in sizes.items() if "/moe/w_" in k)
    unused = experts * (1 - cfg.moe.top_k / cfg.moe.num_experts) if cfg.moe else 0
    assert counts["active"] == counts["total"] - unused  # a token uses top_k of E experts
    half = accounting.param_counts(cfg, 0.5)
    assert half["nonzero"] == counts["total"] - prunable // 2


def test_flops_per_token_hand_count():
    cfg = model_lib.preset("cpu_25k")  # d=32, 2 layers, d_ff=128, untied, V=256
    # matmul params: 2·(4·32² + 2·32·128) + 32·256 (unembedding) = 24576 + 8192
    expected = 6 * (24576 + 8192) + 6 * 2 * 64 * 32
    assert accounting.flops_per_token(cfg, 64) == expected
    # 50% sparsity removes half the prunable matmul FLOPs.
    assert accounting.flops_per_token(cfg, 64, 0.5) == expected - 6 * 24576 // 2


def test_moe_layer_counts_and_flops():
    cfg = MoEConfig(num_experts=8, top_k=2)
    D, F = 8, 16
    # gelu: 2*D*F per expert; router D*E.  D=8, F=16: expert 256, router 64.
    counts = moe_layer_counts(cfg, D, F, "gelu")
    assert counts["total"] == 8 * 256 + 64 and counts["active"] == 2 * 256 + 64
    assert counts["nonzero"] == counts["total"]
    assert moe_layer_flops_per_token(cfg, D, F, "gelu") == 6 * (2 * 256 + 64)
    sparse = moe_layer_counts(cfg, D, F, "swiglu", expert_density=0.25)
    assert sparse["total"] == 8 * 384 + 64 and sparse["nonzero"] == 8 * 96 + 64
    assert sparse["active_nonzero"] == 2 * 96 + 64
    assert moe_layer_flops_per_token(cfg, D, F, "swiglu", expert_density=0.25) == 6 * (2 * 96 + 64)
    for kind in ("gelu", "swiglu"):  # agrees with the parameters the layer actually holds
        layer = MoE(cfg, D, F, kind, rngs=nnx.Rngs(0))
        held = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
        assert held == moe_layer_counts(cfg, D, F, kind)["total"]
