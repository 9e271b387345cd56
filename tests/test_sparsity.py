"""Structures, allocation and schedules against numpy references and hand-worked examples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsescale import sparsity as sp

SETTINGS = settings(max_examples=10, deadline=None)


def _scores(seed, shape, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=shape) if ties else rng.normal(size=shape)
    return jnp.asarray(np.abs(x), jnp.float32)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 6),
    n=st.integers(1, 6),
    sparsity=st.floats(0, 0.99),
    ties=st.booleans(),
)
def test_unstructured_exact_count_and_magnitude_order(seed, k, n, sparsity, ties):
    scores = _scores(seed, (k * 4, n * 3), ties)
    mask = np.asarray(sp.Unstructured(sparsity).mask(scores))
    removed = int(np.floor(sparsity * scores.size + 0.5))
    assert mask.sum() == scores.size - removed
    s = np.asarray(scores)
    if 0 < mask.sum() < mask.size:  # every kept score >= every removed score
        assert s[mask].min() >= s[~mask].max()


def test_unstructured_ties_go_to_lower_index():
    scores = jnp.ones((2, 4))
    mask = sp.Unstructured(0.5).mask(scores)
    np.testing.assert_array_equal(mask.reshape(-1), [1, 1, 1, 1, 0, 0, 0, 0])


def reference_topk_mask(scores, num_keep):
    """The `num_keep` largest scores by a stable sort, ties to the lower flat index."""
    flat = np.asarray(scores, np.float32).reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))  # by descending score, then index
    keep = np.zeros(flat.size, bool)
    keep[order[: max(0, min(int(num_keep), flat.size))]] = True
    return keep.reshape(np.shape(scores))


@pytest.mark.parametrize("kind", ["normal", "ties", "signed_ties", "specials"])
def test_topk_mask_matches_sort_reference(kind):
    """Same masks as a full sort for every count, on random, tied, signed and ±inf/±0 scores."""
    rng = np.random.default_rng(0)
    x = {
        "normal": rng.normal(size=(12, 20)),
        "ties": np.abs(rng.integers(0, 4, size=(12, 20))),
        "signed_ties": rng.integers(-3, 4, size=(12, 20)) * 0.5,
        "specials": rng.choice([-np.inf, -1.5, -0.0, 0.0, 1e-30, 2.0, np.inf], size=(12, 20)),
    }[kind]
    scores = jnp.asarray(x, jnp.float32)
    masks = jax.jit(jax.vmap(sp.topk_mask, in_axes=(None, 0)))(scores, jnp.arange(-1, 242))
    for num_keep, mask in zip(range(-1, 242), np.asarray(masks), strict=True):
        np.testing.assert_array_equal(mask, reference_topk_mask(x, num_keep), err_msg=num_keep)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (2, 8), (5, 10), (3, 7)]),
    groups=st.integers(1, 4),
    n_out=st.integers(1, 5),
    lead=st.sampled_from([(), (3,)]),
)
def test_nm_group_property(seed, nm, groups, n_out, lead):
    n, m = nm
    scores = _scores(seed, (*lead, groups * m, n_out))
    mask = np.asarray(sp.NM(n, m).mask(scores))
    per_group = mask.reshape(*lead, groups, m, n_out).sum(axis=-2)
    assert (per_group == n).all()
    # The kept ones are the n largest of each group (numpy reference).
    s = np.asarray(scores).reshape(*lead, groups, m, n_out)
    kth = -np.sort(-s, axis=-2)[..., n - 1 : n, :]
    assert (s[mask.reshape(s.shape)] >= np.broadcast_to(kth, s.shape)[mask.reshape(s.shape)]).all()


def test_nm_hand_example():
    # One column, K=8, 2:4: groups [4,1,3,2] -> keep 4,3; [0,9,8,7] -> keep 9,8.
    scores = jnp.array([4, 1, 3, 2, 0, 9, 8, 7], jnp.float32)[:, None]
    np.testing.assert_array_equal(sp.NM(2, 4).mask(scores)[:, 0], [1, 0, 1, 0, 0, 1, 1, 0])
    assert sp.NM(2, 4).sparsity == 0.5 and sp.NM(5, 10).sparsity == 0.5


def test_nm_ramp_ends_exactly_nm_and_keeps_pattern():
    scores = _scores(0, (16, 8))
    structure = sp.NM(1, 4)
    final = structure.group_mask(scores)
    for fraction in (0.0, 0.3, 0.6, 1.0):
        mask = structure.mask(scores, fraction * structure.sparsity)
        assert mask.sum() == scores.size - int(np.floor(fraction * 0.75 * scores.size + 0.5))
        assert bool(jnp.all(mask >= final))  # never removes a weight of the n:m pattern
    np.testing.assert_array_equal(structure.mask(scores, structure.sparsity), final)


@SETTINGS
@given(seed=st.integers(0, 2**16), sparsity=st.floats(0, 0.95), bh=st.sampled_from([1, 2, 4]))
def test_block_property(seed, sparsity, bh):
    block = (bh, 2)
    scores = _scores(seed, (8, 8))
    mask = np.asarray(sp.Block(sparsity, block).mask(scores))
    tiles = mask.reshape(8 // bh, bh, 4, 2)
    per_tile = tiles.sum(axis=(1, 3))
    assert set(np.unique(per_tile)) <= {0, bh * 2}  # whole blocks only
    nblocks = per_tile.size
    assert (per_tile > 0).sum() == nblocks - int(np.floor(sparsity * nblocks + 0.5))
    # Kept blocks have the largest L2 norms (numpy reference).
    norms = np.sqrt((np.asarray(scores).reshape(8 // bh, bh, 4, 2) ** 2).sum(axis=(1, 3)))
    kept = per_tile > 0
    if 0 < kept.sum() < kept.size:
        assert norms[kept].min() >= norms[~kept].max()


def test_masks_are_deterministic_and_random_baseline_is_seeded():
    scores = _scores(3, (8, 8))
    a = sp.Unstructured(0.5).mask(scores)
    np.testing.assert_array_equal(a, sp.Unstructured(0.5).mask(scores))
    r1 = sp.random_scores(jax.random.key(1), (8, 8))
    r2 = sp.random_scores(jax.random.key(1), (8, 8))
    r3 = sp.random_scores(jax.random.key(2), (8, 8))
    np.testing.assert_array_equal(r1, r2)
    m1, m3 = sp.Unstructured(0.5).mask(r1), sp.Unstructured(0.5).mask(r3)
    assert m1.sum() == m3.sum() == 32 and not bool(jnp.all(m1 == m3))


def test_traced_sparsity_does_not_recompile():
    structure = sp.Unstructured(0.9)
    f = jax.jit(structure.mask)
    scores = _scores(0, (8, 8))
    counts = [int(f(scores, s).sum()) for s in (0.0, 0.25, 0.5)]
    assert counts == [64, 48, 32]
    assert f._cache_size() == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sp.NM(4, 4), "0 < n < m"),
        (lambda: sp.NM(5, 4), "0 < n < m"),
        (lambda: sp.NM(0, 4), "0 < n < m"),
        (lambda: sp.Unstructured(1.0), r"\[0, 1\)"),
        (lambda: sp.Unstructured(-0.1), r"\[0, 1\)"),
        (lambda: sp.Block(1.2, (4, 4)), r"\[0, 1\)"),
        (lambda: sp.NM(2, 4).validate((6, 8), "blocks/0/mlp/up/kernel"), "divisible by m=4"),
        (lambda: sp.Block(0.5, (4, 4)).validate((8, 6), "q/kernel"), "does not divide"),
        (lambda: sp.select_paths(["embed/embedding"], sp.DEFAULT_INCLUDE, ()), "no layer"),
        (lambda: sp.structure_from_config("diagonal"), "Unknown sparsity structure"),
        (lambda: sp.Schedule(kind="gradual", start=0.8, end=0.2), "start <= end"),
        (lambda: sp.Schedule(updates=0), "updates must be None .* int >= 1"),
        (lambda: sp.Schedule(updates=2.5), "updates must be None .* int >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_default_include_exclude_rules():
    paths = [
        "blocks/0/attn/q/kernel",
        "blocks/0/mlp/up/kernel",
        "blocks/1/moe/w_in",
        "embed/embedding",
        "unembed/kernel",
        "blocks/0/attn_norm/scale",
        "blocks/1/moe/router/kernel",
    ]
    chosen = sp.select_paths(paths, sp.DEFAULT_INCLUDE, sp.DEFAULT_EXCLUDE)
    assert chosen == ["blocks/0/attn/q/kernel", "blocks/0/mlp/up/kernel"]


def test_erk_matches_hand_computation():
    shapes = {"a": (10, 10), "b": (10, 40)}
    dens = sp.erk_densities(shapes, 0.5)
    # raw: a 20/100 = 0.2, b 50/400 = 0.125; eps·(0.2·100 + 0.125·400) = 250 -> eps = 250/70.
    eps = 250 / 70
    assert dens["a"] == pytest.approx(0.2 * eps) and dens["b"] == pytest.approx(0.125 * eps)
    kept = dens["a"] * 100 + dens["b"] * 400
    assert kept == pytest.approx(250)


def test_erk_caps_dense_layers_and_redistributes():
    shapes = {"tiny": (2, 2), "big": (64, 64)}
    dens = sp.erk_densities(shapes, 0.5)
    assert dens["tiny"] == 1.0
    assert dens["tiny"] * 4 + dens["big"] * 4096 == pytest.approx(0.5 * 4100)


def test_global_magnitude_uses_one_threshold():
    rng = np.random.default_rng(0)
    scores = {"a": jnp.asarray(rng.random((4, 4))), "b": jnp.asarray(3 * rng.random((8, 4)))}
    masks = sp.global_masks(scores, 0.5)
    flat = np.concatenate([np.asarray(scores[k]).ravel() for k in "ab"])
    threshold = np.sort(flat)[len(flat) // 2]  # 24 removed out of 48
    for k in "ab":
        np.testing.assert_array_equal(masks[k], np.asarray(scores[k]) >= threshold)


def test_cubic_schedule_endpoints_and_monotone():
    s = sp.Schedule(kind="gradual", start=0.25, end=0.75, every=10, power=3)
    total = 1000
    g = np.array([float(s.progress(t, total)) for t in range(0, total + 1, 5)])
    assert g[0] == 0 and float(s.progress(250, total)) == 0 and float(s.progress(750, total)) == 1
    assert (np.diff(g) >= 0).all()
    # Zhu & Gupta at the midpoint: 1 - (1 - 0.5)^3 = 0.875.
    assert float(s.progress(500, total)) == pytest.approx(0.875)
    updates = [t for t in range(total + 1) if bool(s.is_update(t, total))]
    assert updates[0] == 250 and updates[-1] == 750 and len(updates) == 51
    assert float(sp.Schedule(kind="one_shot", start=0.5).progress(499, 100)) == 1.0
    assert float(sp.Schedule(kind="one_shot", start=0.5).progress(49, 100)) == 0.0


def test_matched_schedule_means_same_fractions_at_every_size():
    s = sp.Schedule()
    for total in (400, 4000):
        assert float(s.progress(total // 2, total)) == pytest.approx(0.875)


def test_updates_interval_hand_worked():
    # T=1000, start 0.25, end 0.75: t0=250, t1=750; 500 steps / 10 updates -> every 50 steps;
    # 500 / 3 = 166.7 -> 167; more updates than steps -> 1.
    assert sp.Schedule(updates=10).interval(1000) == 50
    assert sp.Schedule(updates=3).interval(1000) == 167
    assert sp.Schedule(updates=1000).interval(1000) == 1
    assert sp.Schedule(every=7).interval(1000) == 7  # updates None: `every` unchanged


def test_fixed_updates_give_the_same_update_fractions_at_every_run_length():
    s = sp.Schedule(kind="gradual", start=0.25, end=0.75, every=10, updates=10)
    fractions = {}
    for total in (400, 800):  # intervals 20 and 40 steps; `every` would give 21 vs 41 updates
        steps = [t for t in range(total + 1) if bool(s.is_update(t, total))]
        fractions[total] = [t / total for t in steps]
    expected = [0.25 + 0.05 * i for i in range(11)]  # t0, 10 intervals later t1
    assert fractions[400] == pytest.approx(expected) and fractions[800] == pytest.approx(expected)
    assert s.num_updates(400) == s.num_updates(800) == 11
    dynamic = dataclasses.replace(s, kind="dynamic")  # [t0, t1): 10 drop-and-grow updates
    assert dynamic.num_updates(400) == dynamic.num_updates(800) == 10
