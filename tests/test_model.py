"""Attention and RoPE against plain reference computations, and the initial loss of the language
model: near ln(vocab) (uniform prediction) for the presets and
every model option, so no configuration starts from a needlessly bad point (the tied head once
started at ≈ 115 nats/byte on cpu_600k, see `ModelConfig.tie_embeddings`).

Kept fast: each case initialises a model and runs one forward pass on a tiny batch (2 × 32 random
bytes), both inside one `jax.jit` (eager execution compiles every op for every new shape). Only
small presets are initialised, one per shape family: `cpu_6k` (the smallest), `cpu_100k`,
`cpu_600k` (the shapes the tied-head bug was measured on) and `cpu_480k_d200`; the other CPU
presets and the accelerator presets are the same code at other widths and depths and are skipped
to keep this fast. The option matrix (tie_embeddings, pos, mlp, moe, alone and combined with a
tied head) runs on `cpu_6k`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparsescale import model as model_lib
from sparsescale import moe

LN_VOCAB = math.log(256)
BAND = 1.0  # nats/byte either side of ln(256); measured: 5.8-6.2 for every case here
SMALL = ["cpu_6k", "cpu_100k", "cpu_600k", "cpu_480k_d200"]
MOE = moe.MoEConfig(num_experts=4, top_k=2, every=1)
OPTIONS = {
    "tied": dict(tie_embeddings=True),
    "learned_pos": dict(pos="learned"),
    "swiglu": dict(mlp="swiglu"),
    "moe": dict(moe=MOE),
    "tied_learned_pos": dict(tie_embeddings=True, pos="learned"),
    "tied_swiglu": dict(tie_embeddings=True, mlp="swiglu"),
    "tied_moe": dict(tie_embeddings=True, moe=MOE),
    "all": dict(tie_embeddings=True, pos="learned", mlp="swiglu", moe=MOE),
}


def initial_loss(cfg: model_lib.ModelConfig) -> float:
    @jax.jit
    def loss(tokens):
        logits, _ = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return float(loss(jax.random.randint(jax.random.key(0), (2, 33), 0, cfg.vocab_size)))


@pytest.mark.parametrize("name", SMALL)
def test_initial_loss_of_presets_is_near_ln_vocab(name):
    assert abs(initial_loss(model_lib.preset(name)) - LN_VOCAB) < BAND


@pytest.mark.parametrize("option", list(OPTIONS))
def test_initial_loss_of_model_options_is_near_ln_vocab(option):
    loss = initial_loss(model_lib.preset("cpu_6k", **OPTIONS[option]))
    assert abs(loss - LN_VOCAB) < BAND, (option, loss)


def reference_rope(x, positions):
    """Rotary embedding as usually written: rotate the (first half, second half) pairs."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * 10_000.0 ** (-np.arange(half) / half)
    sin, cos = np.sin(angles)[None, :, None], np.cos(angles)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_rope_matches_reference_for_static_and_traced_positions():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 40, 3, 16)), np.float64)
    positions = np.arange(40)
    expected = reference_rope(x, positions)
    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(model_lib.rope(x32, positions), expected, rtol=1e-5, atol=1e-5)
    traced = jax.jit(model_lib.rope)(x32, jnp.asarray(positions))
    np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "b,l,h,k,block",
    [
        (2, 128, 4, 16, 32),
        (3, 50, 2, 8, 16),
        (2, 64, 3, 32, 64),
        (1, 7, 1, 4, 32),
        (2, 9, 2, 8, 1),
    ],
)
def test_blocked_causal_attention_matches_dense_masked_attention(b, l, h, k, block):
    """Values and gradients equal jax's dense masked-softmax attention (block sizes that do and
    do not divide the length, a single partial block, one query per block)."""
    q, key, v, cotangent = (
        jax.random.normal(kk, (b, l, h, k)) for kk in jax.random.split(jax.random.key(l), 4)
    )
    dense = lambda q, key, v: jax.nn.dot_product_attention(q, key, v, is_causal=True)
    blocked = lambda q, key, v: model_lib.causal_attention(q, key, v, block)
    with_grads = lambda f: jax.jit(lambda *a: (f(*a), jax.vjp(f, *a)[1](cotangent)))
    expected, dense_grads = with_grads(dense)(q, key, v)
    got, blocked_grads = with_grads(blocked)(q, key, v)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(blocked_grads, dense_grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
