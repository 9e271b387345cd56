"""Mask updates over training and the optimizer wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsescale import pruner as pr
from sparsescale import sparsity as sp

SHAPES = {("attn", "kernel"): (16, 8), ("mlp", "kernel"): (8, 16)}


def _kernels(seed=0):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    return {p: jax.random.normal(k, s) for (p, s), k in zip(SHAPES.items(), keys, strict=True)}


def test_zeros_stay_zero_under_adamw_with_weight_decay_and_momentum():
    kernels = _kernels()
    masks = {p: sp.Unstructured(0.75).mask(jnp.abs(k)) for p, k in kernels.items()}
    params = {p: jnp.where(masks[p], k, 0.0) for p, k in kernels.items()}
    tx = pr.keep_pruned_zero(
        optax.chain(optax.adamw(0.1, weight_decay=0.5), optax.add_noise(1.0, 0.9, 0))
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = {p: jnp.ones_like(v) * (1 + i) for p, v in params.items()}  # dense grads
        updates, state = tx.update(grads, state, params, masks=masks)
        return optax.apply_updates(params, updates), state

    for i in range(200):
        params, state = step(params, state, i)
    for p in params:
        assert (np.asarray(params[p])[~np.asarray(masks[p])] == 0.0).all()
        assert (np.asarray(params[p])[np.asarray(masks[p])] != 0.0).all()  # kept ones still train
    mu = state[0][0].mu
    for p in params:
        assert (np.asarray(mu[p])[~np.asarray(masks[p])] == 0.0).all()


def test_newly_pruned_weights_become_zero_and_regrown_start_with_fresh_moments():
    params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
    tx = pr.keep_pruned_zero(optax.adam(0.1))
    state = tx.init(params)
    all_kept = {"w": jnp.ones((2, 4), bool)}
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones((2, 4))}, state, params, masks=all_kept)
        params = optax.apply_updates(params, updates)
    assert float(state[0].mu["w"][0, 0]) > 0
    pruned = {"w": jnp.array([[False, True, True, True], [True] * 4])}
    updates, state = tx.update({"w": jnp.ones((2, 4))}, state, params, masks=pruned)
    params = optax.apply_updates(params, updates)
    assert float(params["w"][0, 0]) == 0.0 and float(state[0].mu["w"][0, 0]) == 0.0
    # Regrow at Adam step t=5: moments start from zero, so the update is Adam's with m = v = 0
    # before this step: lr·m̂/(√v̂ + ε), m̂ = (1−β1)g/(1−β1^t), v̂ = (1−β2)g²/(1−β2^t).
    updates, state = tx.update({"w": jnp.full((2, 4), 2.0)}, state, params, masks=all_kept)
    t, g = 5, 2.0
    m_hat, v_hat = 0.1 * g / (1 - 0.9**t), 0.001 * g**2 / (1 - 0.999**t)
    assert float(updates["w"][0, 0]) == pytest.approx(
        -0.1 * m_hat / (np.sqrt(v_hat) + 1e-8), rel=1e-4
    )


def test_gradual_pruner_follows_schedule_inside_jit():
    cfg = sp.SparsityConfig(
        structure=sp.Unstructured(0.75), schedule=sp.Schedule("gradual", 0.25, 0.75, 10, 3.0)
    )
    pruner = pr.Pruner(cfg, SHAPES, total_steps=100)
    kernels = _kernels()
    masks = pruner.initial_masks(kernels)
    assert all(bool(m.all()) for m in masks.values())
    update = jax.jit(pruner.update)
    total = sum(np.prod(s) for s in SHAPES.values())
    for step in range(0, 101):
        masks = update(step, kernels, masks)
        kept = sum(int(m.sum()) for m in masks.values())
        if step >= 25 and (step - 25) % 10 == 0 and step <= 75:
            g = 1 - (1 - (step - 25) / 50) ** 3
            expected = sum(
                s[0] * s[1] - int(np.floor(g * 0.75 * s[0] * s[1] + 0.5)) for s in SHAPES.values()
            )
            assert kept == expected, step
    assert kept == total // 4
    assert update._cache_size() == 1  # one compile for all steps


def test_erk_and_global_allocations_hit_the_overall_target():
    kernels = _kernels()
    total = sum(np.prod(s) for s in SHAPES.values())
    for allocation in ("erk", "global"):
        cfg = sp.SparsityConfig(
            structure=sp.Unstructured(0.5), allocation=allocation, schedule=sp.Schedule("constant")
        )
        masks = pr.Pruner(cfg, SHAPES, 10).initial_masks(kernels)
        kept = sum(int(m.sum()) for m in masks.values())
        assert abs(kept - total / 2) <= len(SHAPES), allocation


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dynamic_sparse_training_keeps_exact_counts_and_changes_masks(method):
    cfg = sp.SparsityConfig(
        structure=sp.Unstructured(0.8),
        schedule=sp.Schedule("dynamic", 0.0, 0.75, 5, drop_fraction=0.3),
        method=method,
    )
    pruner = pr.Pruner(cfg, SHAPES, total_steps=100)
    kernels = _kernels()
    masks = pruner.initial_masks(kernels)
    counts = {p: int(m.sum()) for p, m in masks.items()}
    grads = {p: jax.random.normal(jax.random.key(7), s) for p, s in SHAPES.items()}
    new = jax.jit(pruner.update)(5, kernels, masks, grads)
    for p in SHAPES:
        assert int(new[p].sum()) == counts[p]
        changed = int(jnp.sum(new[p] & ~masks[p]))
        assert changed > 0
        if method == "rigl":  # grown = largest |grad| among the connections not kept
            grown = np.asarray(new[p] & ~masks[p])
            g = np.abs(np.asarray(grads[p]))
            survivors = np.asarray(new[p] & masks[p])
            candidates = g[~survivors]
            assert g[grown].min() >= np.sort(candidates)[-grown.sum()]
    same = jax.jit(pruner.update)(6, kernels, masks, grads)  # not an update step
    for p in SHAPES:
        np.testing.assert_array_equal(same[p], masks[p])


def test_srste_requires_nm_and_random_masks_are_nested():
    with pytest.raises(ValueError, match="N:M"):
        sp.SparsityConfig(structure=sp.Unstructured(0.5), method="srste")
    with pytest.raises(ValueError, match="dynamic"):
        sp.SparsityConfig(structure=sp.Unstructured(0.5), method="rigl")
    cfg = sp.SparsityConfig(structure=sp.Unstructured(0.75), method="random")
    pruner = pr.Pruner(cfg, SHAPES, 100)
    kernels = _kernels()
    m50 = pruner.update(50, kernels, pruner.initial_masks(kernels))
    m75 = pruner.update(75, kernels, m50)
    for p in SHAPES:
        assert bool(jnp.all(m75[p] <= m50[p]))  # same random scores: masks only shrink


def test_srste_decay_only_on_pruned_weights():
    w = jnp.array([[1.0, -2.0], [3.0, 4.0]])
    mask = jnp.array([[True, False], [False, True]])
    np.testing.assert_allclose(sp.srste_decay(w, mask, 0.5), [[0.0, -1.0], [1.5, 0.0]])
