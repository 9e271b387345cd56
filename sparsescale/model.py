"""Decoder-only transformer LM built from sparse layers, and its size presets (counts and FLOPs:
accounting.py).

Legend for tensor names: B batch, L sequence length, D d_model, H heads, K head dim, F d_ff,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsescale.layers import Mask, SparseLinear, lazy_sharding


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_len: int = 128
    mlp: str = "gelu"  # "gelu" | "swiglu"
    pos: str = "rope"  # "rope" | "learned"
    # Tied: the head reuses the embedding table, which is then initialised with std 1/sqrt(d_model)
    # (untied: std 1), like the untied head's kernel, so the initial logits have std ≈ 1 and the
    # initial loss is near ln V. (With std 1 the input embedding dominates the residual stream, so
    # each token's own logit starts ≈ d_model: ≈ 115 nats/byte on cpu_600k.)
    tie_embeddings: bool = False
    dtype: str = "float32"  # activation/compute dtype; params stay float32
    dense_grad: bool = False  # straight-through kernel gradients (RigL, SR-STE)
    moe: object | None = (
        None  # sparsescale.moe.MoEConfig; MoE replaces the MLP every moe.every layers
    )

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model: d_model={self.d_model} must be divisible by n_heads={self.n_heads}."
            )
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"model.mlp must be 'gelu' or 'swiglu', got {self.mlp!r}.")
        if self.pos not in ("rope", "learned"):
            raise ValueError(f"model.pos must be 'rope' or 'learned', got {self.pos!r}.")
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.d_model // self.n_heads}.")
        if min(self.vocab_size, self.d_model, self.n_layers, self.d_ff, self.max_len) < 1:
            raise ValueError(f"model: all sizes must be positive, got {self}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe.num_experts > 0 and (i + 1) % self.moe.every == 0


# Non-embedding parameters 12·D²·layers (GELU MLP with F = 4D). CPU presets span 6K → 4.7M (770×),
# accelerator presets reach 1B.
PRESETS: dict[str, dict] = {
    "cpu_6k": dict(d_model=16, n_layers=2, n_heads=1, d_ff=64),
    "cpu_12k": dict(d_model=24, n_layers=2, n_heads=2, d_ff=96),
    "cpu_25k": dict(d_model=32, n_layers=2, n_heads=2, d_ff=128),
    "cpu_50k": dict(d_model=48, n_layers=2, n_heads=3, d_ff=192),
    "cpu_100k": dict(d_model=64, n_layers=2, n_heads=4, d_ff=256),
    "cpu_330k": dict(d_model=96, n_layers=3, n_heads=6, d_ff=384),
    "cpu_600k": dict(d_model=128, n_layers=3, n_heads=8, d_ff=512),
    "cpu_800k": dict(d_model=128, n_layers=4, n_heads=8, d_ff=512),
    "cpu_1.8m": dict(d_model=192, n_layers=4, n_heads=6, d_ff=768),
    "cpu_4.7m": dict(d_model=256, n_layers=6, n_heads=8, d_ff=1024),
    # d_model a multiple of 200 = lcm(8, 100): every pruned kernel admits 2:8 and 50:100 groups
    # (structure figure).
    "cpu_480k_d200": dict(d_model=200, n_layers=1, n_heads=10, d_ff=800),
    "cpu_960k_d200": dict(d_model=200, n_layers=2, n_heads=10, d_ff=800),
    "cpu_3.8m_d400": dict(d_model=400, n_layers=2, n_heads=20, d_ff=1600),
    # the crossover's shape rule (F = 4D, 4 layers), head width 64: its accelerator arm
    "acc_3.1m": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024),
    "acc_7.1m": dict(d_model=384, n_layers=4, n_heads=6, d_ff=1536),
    "acc_20m": dict(d_model=640, n_layers=4, n_heads=10, d_ff=2560),
    "acc_19m": dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048),
    "acc_85m": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "acc_300m": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    "acc_1b": dict(d_model=2048, n_layers=20, n_heads=16, d_ff=8192),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------


def rope(x_BxLxHxK: jax.Array, positions_L, base: float = 10_000.0) -> jax.Array:
    """Rotary embedding of the two halves of the head dim. Positions given as a numpy array give
    constant sin/cos tables (computed once, not per element inside the step)."""
    xp = np if isinstance(positions_L, np.ndarray) else jnp
    half = x_BxLxHxK.shape[-1] // 2
    freqs = base ** (-np.arange(half, dtype=np.float32) / half)
    angles_Lx1x1xK = positions_L.astype(np.float32)[:, None, None, None] * freqs
    sin, cos = xp.sin(angles_Lx1x1xK), xp.cos(angles_Lx1x1xK)
    x_BxLxHx2xK = x_BxLxHxK.reshape(*x_BxLxHxK.shape[:-1], 2, half)
    # (x1, x2) -> (−x2, x1) as a flip of the halves: no slices or concatenation to transpose.
    rotated = jnp.flip(x_BxLxHx2xK, axis=-2) * np.array([-1.0, 1.0], np.float32)[:, None]
    out = x_BxLxHx2xK * cos + rotated * sin
    return out.reshape(x_BxLxHxK.shape).astype(x_BxLxHxK.dtype)


def _probs(q_BxHxQxK: jax.Array, k_BxHxSxK: jax.Array) -> jax.Array:
    """Causal softmax (float32) of q·kᵀ for the last Q of S positions: query i sees keys
    ≤ S − Q + i."""
    nq, ns = q_BxHxQxK.shape[2], k_BxHxSxK.shape[2]
    s_BxHxQxS = jnp.einsum(
        "bhqk,bhsk->bhqs", q_BxHxQxK, k_BxHxSxK, preferred_element_type=jnp.float32
    )
    seen_QxS = jnp.arange(ns)[None, :] <= jnp.arange(nq)[:, None] + (ns - nq)
    s_BxHxQxS = jnp.where(seen_QxS, s_BxHxQxS, -jnp.inf)
    e = jnp.exp(s_BxHxQxS - jnp.max(s_BxHxQxS, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@jax.custom_vjp
def _attend(q_BxHxQxK, k_BxHxSxK, v_BxHxSxK):
    return _attend_fwd(q_BxHxQxK, k_BxHxSxK, v_BxHxSxK)[0]


def _attend_fwd(q, k, v):
    p = _probs(q, k)
    out = jnp.einsum("bhqs,bhsk->bhqk", p.astype(v.dtype), v)
    return out, (q, k, v, p, out)


def _attend_bwd(res, dout):
    # Softmax backward as in flash attention: the row sums Σ_s p·dp equal Σ_k dout·out, a
    # reduction over the head dim instead of another pass over the scores.
    q, k, v, p, out = res
    f32 = jnp.float32
    dp = jnp.einsum("bhqk,bhsk->bhqs", dout, v, preferred_element_type=f32)
    row = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    ds = (p * (dp - row)).astype(q.dtype)
    dq = jnp.einsum("bhqs,bhsk->bhqk", ds, k)
    dk = jnp.einsum("bhqs,bhqk->bhsk", ds, q)
    dv = jnp.einsum("bhqs,bhqk->bhsk", p.astype(dout.dtype), dout)
    return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)


def causal_attention(
    q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, block: int = 32
) -> jax.Array:
    """`jax.nn.dot_product_attention(q, k, v, is_causal=True)`, computed per block of `block`
    queries against the keys up to the block's end only, so the fully masked upper blocks of the
    scores are never formed; heads-major inside (batched matmuls XLA runs without copies)."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    q = q * (q.shape[-1] ** -0.5)
    l = q.shape[2]
    out_BxHxLxK = jnp.concatenate(
        [
            _attend(q[:, :, s : s + block], k[:, :, : s + block], v[:, :, : s + block])
            for s in range(0, l, block)
        ],
        axis=2,
    )
    return jnp.swapaxes(out_BxHxLxK, 1, 2)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, axes, rngs, init_scale: float = 1.0):
    return SparseLinear(
        d_in,
        d_out,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        kernel_init=nnx.initializers.normal(init_scale / math.sqrt(d_in)),
        kernel_axes=axes,
        dense_grad=cfg.dense_grad,
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        self.q = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.k = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.v = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.o = _linear(cfg, d, d, ("heads", "embed"), rngs, out_scale)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, l, d = x_BxLxD.shape
        x_NxD = x_BxLxD.reshape(b * l, d)  # 2-D matmuls: see `Mlp`
        split = lambda t: t.reshape(b, l, cfg.n_heads, cfg.head_dim)
        q, k, v = split(self.q(x_NxD)), split(self.k(x_NxD)), split(self.v(x_NxD))
        if cfg.pos == "rope":
            positions = np.arange(l)
            q, k = rope(q, positions), rope(k, positions)
        out_BxLxHxK = causal_attention(q, k, v)
        return self.o(out_BxLxHxK.reshape(b * l, d)).reshape(b, l, d)


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.mlp
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        self.up = _linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
        self.gate = (
            _linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
            if cfg.mlp == "swiglu"
            else None
        )
        self.down = _linear(cfg, cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs, out_scale)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        # Tokens flattened to one axis: the kernel gradients then contract one axis, which XLA's
        # CPU dot takes as is (contracting batch and length made it transpose every activation).
        x_NxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
        h_NxF = self.up(x_NxD)
        if self.gate is not None:
            h_NxF = jax.nn.silu(self.gate(x_NxD)) * h_NxF
        else:
            h_NxF = jax.nn.gelu(h_NxF)
        return self.down(h_NxF).reshape(x_BxLxD.shape)


class TransformerBlock(nnx.Module):
    """Pre-norm attention + MLP (or MoE) residual block. (Not `sparsity.Block`, the structure.)"""

    @lazy_sharding
    def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        norm = lambda: nnx.RMSNorm(
            cfg.d_model, rngs=rngs, scale_metadata={"out_sharding": ("embed",)}
        )
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.attn = Attention(cfg, rngs=rngs)
        if cfg.is_moe_layer(index):
            from sparsescale.moe import ExpertLinear, MoE

            self.moe = MoE(cfg.moe, cfg.d_model, cfg.d_ff, cfg.mlp, rngs=rngs, dtype=dtype)
            for expert in nnx.iter_graph(self.moe):  # experts are prunable like dense MLPs
                if isinstance(expert[1], ExpertLinear):
                    kernel = expert[1].kernel
                    expert[1].mask = Mask(
                        jnp.ones(kernel.shape, jnp.bool_),
                        out_sharding=kernel.get_metadata()["out_sharding"],
                    )
                    expert[1].dense_grad = cfg.dense_grad
            self.mlp = None
        else:
            self.moe = None
            self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict]:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD))
        h = self.mlp_norm(x_BxLxD)
        if self.moe is not None:
            y, aux = self.moe(h)
            return x_BxLxD + y, aux
        return x_BxLxD + self.mlp(h), {}


class Transformer(nnx.Module):
    """Decoder-only byte-level LM. `__call__(tokens_BxL) -> (logits_BxLxV, aux)`; `aux` holds the
    summed MoE auxiliary loss (`aux_loss`) and per-layer router statistics."""

    @lazy_sharding
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nnx.initializers.normal(
                1.0 / math.sqrt(cfg.d_model) if cfg.tie_embeddings else 1.0
            ),
            embedding_metadata={"out_sharding": ("vocab", "embed")},
            rngs=rngs,
        )
        self.pos_embed = (
            nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.d_model)),
                out_sharding=(None, "embed"),
            )
            if cfg.pos == "learned"
            else None
        )
        self.blocks = nnx.List([TransformerBlock(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = nnx.RMSNorm(
            cfg.d_model, rngs=rngs, scale_metadata={"out_sharding": ("embed",)}
        )
        self.unembed = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nnx.initializers.normal(1.0 / math.sqrt(cfg.d_model)),
                kernel_metadata={"out_sharding": ("embed", "vocab")},
                rngs=rngs,
            )
        )

    def __call__(self, tokens_BxL: jax.Array) -> tuple[jax.Array, dict]:
        dtype = jnp.dtype(self.cfg.dtype)
        x_BxLxD = self.embed(tokens_BxL).astype(dtype)
        if self.pos_embed is not None:
            x_BxLxD = x_BxLxD + self.pos_embed[: tokens_BxL.shape[1]].astype(dtype)
        aux_loss, stats = jnp.zeros((), jnp.float32), {}
        for i, block in enumerate(self.blocks):
            x_BxLxD, aux = block(x_BxLxD)
            if aux:
                aux_loss = aux_loss + aux["aux_loss"]
                stats.update({f"moe/{i}/{k}": v for k, v in aux.items()})
        b, l, d = x_BxLxD.shape
        x_NxD = self.final_norm(x_BxLxD).reshape(b * l, d)  # 2-D matmul: see `Mlp`
        if self.unembed is None:
            logits_NxV = self.embed.attend(x_NxD)
        else:
            logits_NxV = self.unembed(x_NxD)
        logits_BxLxV = logits_NxV.reshape(b, l, -1)
        return logits_BxLxV.astype(jnp.float32), {"aux_loss": aux_loss, **stats}
