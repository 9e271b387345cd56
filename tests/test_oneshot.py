"""One-shot pruning (sparsescale.oneshot) against independent references: numpy re-derivations of
SparseGPT (the paper's column loop, and the exact constrained least squares), the error ordering
on layers with correlated, unevenly scaled inputs, exact counts and N:M patterns, sequential
calibration through a two-layer model, expert grams from the routing, and bad inputs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from sparsescale import layers, masking, oneshot
from sparsescale import model as model_lib
from sparsescale import moe as moe_lib
from sparsescale import sparsity as sp


def correlated_inputs(rng, tokens, k):
    """Inputs with correlated features of log-normal scales (uneven feature norms, as in LMs)."""
    mix = np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k)
    scales = np.exp(0.5 * rng.normal(size=k))
    return ((rng.normal(size=(tokens, k)) @ mix) * scales).astype(np.float32)


def output_error(x, w, w_hat):
    return np.sum((x @ w - x @ w_hat) ** 2) / np.sum((x @ w) ** 2)


def magnitude(w, structure):
    keep = np.asarray(structure.mask(jnp.abs(w)))
    return np.where(keep, w, 0)


def damped(h, damp=0.01):
    return h + damp * np.mean(np.diag(h)) * np.eye(len(h))


def paper_sparsegpt(w_kxn, h, sparsity, block, nm=None):
    """SparseGPT's loop as published (float64 numpy, rows = outputs): per block of columns, the
    mask by w²/[H⁻¹]_jj² (N:M: per group of m at its first column), then OBS updates."""
    w = w_kxn.T.astype(np.float64).copy()
    rows, k = w.shape
    hinv = np.linalg.cholesky(np.linalg.inv(damped(h.astype(np.float64)))).T
    keep = np.ones_like(w, dtype=bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, d = w[:, i1:i2].copy(), np.zeros((rows, i2 - i1)), np.diag(hinv)[i1:i2]
        keep1 = np.ones_like(w1, dtype=bool)
        if nm is None:
            removed = int(np.floor(sparsity * rows * i2 + 0.5)) - int(
                np.floor(sparsity * rows * i1 + 0.5)
            )
            score = (w1 / d) ** 2
            order = np.argsort(score, axis=None, kind="stable")
            keep1.flat[order[:removed]] = False
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = (w1[:, i : i + nm[1]] / d[i : i + nm[1]]) ** 2
                worst = np.argsort(score, axis=1, kind="stable")[:, : nm[1] - nm[0]]
                np.put_along_axis(keep1[:, i : i + nm[1]], worst, False, axis=1)
            q = np.where(keep1[:, i], w1[:, i], 0.0)
            err = (w1[:, i] - q) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(err, hinv[i1 + i, i1 + i : i2])
            err1[:, i] = err
        w[:, i1:i2], keep[:, i1:i2] = w1, keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return np.where(keep, w, 0).T, keep.T


def exact_refit(w_kxn, h, keep_kxn):
    """Row by row: w_kept = w0_kept + H_kk⁻¹ H_kp w0_p with the damped H."""
    hd, out = damped(h.astype(np.float64)), np.zeros(w_kxn.shape)
    for n in range(w_kxn.shape[1]):
        kept, gone = keep_kxn[:, n], ~keep_kxn[:, n]
        step = np.linalg.solve(hd[np.ix_(kept, kept)], hd[np.ix_(kept, gone)] @ w_kxn[gone, n])
        out[kept, n] = w_kxn[kept, n] + step
    return out


@pytest.mark.parametrize("structure", [sp.Unstructured(0.5), sp.NM(2, 4)], ids=str)
def test_reconstruction_error_ordering(structure):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x = correlated_inputs(rng, 1024, 64)
        w = rng.normal(size=(64, 48)).astype(np.float32)
        h = jnp.asarray(x.T @ x)
        wanda = np.where(np.asarray(oneshot.wanda_mask(jnp.asarray(w), h, structure, 0.5)), w, 0)
        gpt, _ = oneshot.sparsegpt(jnp.asarray(w), h, 0.5, structure=structure, block_size=16)
        errors = [output_error(x, w, np.asarray(v)) for v in (gpt, wanda, magnitude(w, structure))]
        assert errors[0] <= errors[1] <= errors[2], (seed, errors)


@pytest.mark.parametrize("structure", [sp.Unstructured(0.6), sp.NM(2, 4)], ids=str)
def test_sparsegpt_matches_the_published_loop_and_the_exact_refit(structure):
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 512, 48)
    w = rng.normal(size=(48, 20)).astype(np.float32)
    h = x.T @ x
    nm = (structure.n, structure.m) if isinstance(structure, sp.NM) else None
    ref_w, ref_keep = paper_sparsegpt(w, h, 0.6, block=16, nm=nm)
    kwargs = dict(structure=structure, block_size=16)
    seq_w, seq_keep = oneshot.sparsegpt(jnp.asarray(w), jnp.asarray(h), 0.6, refit=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(seq_keep), ref_keep)
    np.testing.assert_allclose(np.asarray(seq_w), ref_w, atol=2e-4 * np.abs(w).max())

    fit_w, fit_keep = oneshot.sparsegpt(jnp.asarray(w), jnp.asarray(h), 0.6, refit=True, **kwargs)
    np.testing.assert_array_equal(np.asarray(fit_keep), ref_keep)  # the refit keeps the mask
    np.testing.assert_allclose(
        np.asarray(fit_w), exact_refit(w, h, ref_keep), atol=1e-4 * np.abs(w).max()
    )
    assert output_error(x, w, np.asarray(fit_w)) <= output_error(x, w, np.asarray(seq_w))


@pytest.mark.parametrize(
    "structure",
    [
        sp.Unstructured(0.75),
        sp.Unstructured(0.3),
        sp.NM(2, 4),
        sp.NM(4, 8),
        sp.NM(5, 10),
        sp.NM(50, 100),
    ],
    ids=str,
)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_exact_counts_and_patterns(structure, method):
    k, n = 200, 12
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 400, k)
    w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
    cfg = oneshot.OneShotConfig(method=method, structure=structure, block_size=50)
    pruned, keep = map(
        np.asarray, oneshot.prune_layer(w, jnp.asarray(x.T @ x), cfg, structure.sparsity)
    )
    assert not np.any(pruned[~keep])
    if isinstance(structure, sp.NM):
        per_group = keep.reshape(k // structure.m, structure.m, n).sum(axis=1)
        assert np.all(per_group == structure.n)
    elif method == "wanda":  # compared within each output: each keeps the same count
        assert np.all(keep.sum(axis=0) == k - int(np.floor(structure.sparsity * k + 0.5)))
    else:
        assert keep.sum() == k * n - int(np.floor(structure.sparsity * k * n + 0.5))


class TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(16, 32, rngs=rngs)
        self.second = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.second(jax.nn.gelu(self.first(x)))


def test_a_users_model_is_pruned_in_forward_order_on_pruned_inputs():
    model = TwoLayer(nnx.Rngs(0))
    rng = np.random.default_rng(3)
    calibration = [jnp.asarray(correlated_inputs(rng, 64, 16)) for _ in range(3)]
    w1, b1 = np.asarray(model.first.kernel[...]), np.asarray(model.first.bias[...])
    w2 = np.asarray(model.second.kernel[...])
    cfg = oneshot.OneShotConfig(structure=sp.Unstructured(0.5), include=(".*",), exclude=())
    report = oneshot.prune(model, calibration, cfg)

    assert list(report) == ["first", "second"]
    assert isinstance(model.first, layers.SparseLinear) and isinstance(
        model.second, layers.SparseLinear
    )
    # The reference: layer 1 from the raw inputs, layer 2 from layer 1's *pruned* outputs.
    x = np.concatenate([np.asarray(c) for c in calibration])
    ref1, keep1 = map(
        np.asarray, oneshot.prune_layer(jnp.asarray(w1), jnp.asarray(x.T @ x), cfg, 0.5)
    )
    hidden = np.asarray(jax.nn.gelu(x @ ref1 + b1))
    ref2, keep2 = map(
        np.asarray, oneshot.prune_layer(jnp.asarray(w2), jnp.asarray(hidden.T @ hidden), cfg, 0.5)
    )
    np.testing.assert_allclose(np.asarray(model.first.kernel[...]), ref1, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.first.mask[...]), keep1)
    np.testing.assert_allclose(np.asarray(model.second.kernel[...]), ref2, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(model.second.mask[...]), keep2)
    assert report["first"]["tokens"] == len(x)
    # The pruned model computes the masked dense product.
    dense = np.asarray(jax.nn.gelu(x @ (ref1 * keep1) + b1)) @ (ref2 * keep2) + np.asarray(
        model.second.bias[...]
    )
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), dense, atol=1e-4)


def tiny_moe_config():
    return model_lib.preset(
        "cpu_25k", max_len=16, moe=moe_lib.MoEConfig(num_experts=4, top_k=2, every=2)
    )


def test_expert_grams_are_those_of_the_routed_tokens():
    cfg = tiny_moe_config()
    block = model_lib.Transformer(cfg, rngs=nnx.Rngs(0)).blocks[1].moe
    x = jax.random.normal(jax.random.key(0), (4, 16, cfg.d_model))
    grams = block.expert_input_grams(x)
    x_td = np.asarray(x).reshape(-1, cfg.d_model)
    logits = x_td @ np.asarray(block.router_kernel[...])
    chosen = np.argsort(-logits, axis=1)[:, : cfg.moe.top_k]
    w_in = np.asarray(block.w_in.kernel[...])
    for e in range(cfg.moe.num_experts):
        xe = x_td[np.any(chosen == e, axis=1)]
        he = np.asarray(jax.nn.gelu(xe @ w_in[e]))
        np.testing.assert_allclose(np.asarray(grams["w_in"][0][e]), xe.T @ xe, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(
            np.asarray(grams["w_out"][0][e]), he.T @ he, rtol=1e-4, atol=1e-3
        )
        assert int(grams["w_in"][1][e]) == len(xe)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_transformer_with_experts_becomes_an_ordinary_sparse_model(method):
    cfg = tiny_moe_config()
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16, 16), 0, 256)
    calibration = list(tokens[:3])
    structure = sp.NM(2, 4) if method == "wanda" else sp.Unstructured(0.75)
    report = oneshot.prune(
        model, calibration, oneshot.OneShotConfig(method=method, structure=structure)
    )

    pruned = {n for n in report}
    assert {
        "blocks/0/attn/q",
        "blocks/0/mlp/down",
        "blocks/1/moe/w_in",
        "blocks/1/moe/w_out",
    } <= pruned
    assert not any("router" in n or "embed" in n for n in pruned)
    if method != "magnitude":  # forward order: attention before the MLP, experts in before out
        order = list(report)
        assert (
            order.index("blocks/0/attn/q")
            < order.index("blocks/0/attn/o")
            < order.index("blocks/0/mlp/up")
        )
        assert order.index("blocks/1/moe/w_in") < order.index("blocks/1/moe/w_out")
        assert report["blocks/0/attn/q"]["tokens"] == 3 * 16 * 16
        assert report["blocks/1/moe/w_in"]["tokens"] == 3 * 16 * 16 * cfg.moe.top_k
    # The library's masks: the pruner's view agrees, and pruned weights are zero.
    _, params, masks, _ = masking.split(model)
    flat_p = traverse_util.flatten_dict(params)
    for path, mask_path in masking.kernel_mask_paths(params, masks).items():
        name = sp.path_str(path[:-1])
        keep = np.asarray(traverse_util.flatten_dict(masks)[mask_path])
        assert not np.any(np.asarray(flat_p[path])[~keep])
        if name in report:
            assert report[name]["sparsity"] == pytest.approx(1 - keep.mean())
            assert report[name]["sparsity"] == pytest.approx(
                0.75 if method != "wanda" else 0.5, abs=0.01
            )
    logits, _ = model(tokens[3])
    assert np.all(np.isfinite(np.asarray(logits)))


def test_magnitude_global_matches_one_threshold():
    model = TwoLayer(nnx.Rngs(0))
    kernels = [np.asarray(model.first.kernel[...]), np.asarray(model.second.kernel[...])]
    cfg = oneshot.OneShotConfig(
        method="magnitude",
        structure=sp.Unstructured(0.8),
        allocation="global",
        include=(".*",),
        exclude=(),
    )
    oneshot.prune(model, None, cfg)
    everything = np.concatenate([np.abs(k).ravel() for k in kernels])
    threshold = np.sort(everything)[int(round(0.8 * everything.size))]
    for kernel, layer in zip(kernels, (model.first, model.second), strict=True):
        np.testing.assert_array_equal(np.asarray(layer.mask[...]), np.abs(kernel) >= threshold)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: oneshot.OneShotConfig(structure=sp.Unstructured(1.0)), "sparsity must be"),
        (lambda: oneshot.OneShotConfig(method="sparsegpt", structure=sp.Block(0.5)), "block"),
        (lambda: oneshot.OneShotConfig(method="wanda", allocation="global"), "global"),
        (lambda: oneshot.OneShotConfig(method="obs"), "unknown method"),
        (lambda: oneshot.OneShotConfig(damp=0.0), "damp"),
        (lambda: oneshot.OneShotConfig(structure=sp.NM(2, 4), allocation="erk"), "N:M"),
    ],
)
def test_bad_configs_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def state_of(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize(
    "cfg, calibration, match",
    [
        (oneshot.OneShotConfig(include=(".*",), exclude=()), [jnp.ones((8, 16))], "at least 16"),
        (
            oneshot.OneShotConfig(method="wanda", include=(".*",), exclude=()),
            [],
            "needs calibration",
        ),
        (
            oneshot.OneShotConfig(structure=sp.NM(2, 3), include=(".*",), exclude=()),
            [jnp.ones((64, 16))],
            "divisible",
        ),
        (oneshot.OneShotConfig(include=("nothing",)), [jnp.ones((64, 16))], "no layer matches"),
    ],
)
def test_bad_inputs_fail_before_any_weight_changes(cfg, calibration, match):
    model = TwoLayer(nnx.Rngs(0))
    before = state_of(model)
    with pytest.raises(ValueError, match=match):
        oneshot.prune(model, calibration, cfg)
    assert isinstance(model.first, nnx.Linear)  # nothing converted
    jax.tree.map(np.testing.assert_array_equal, state_of(model), before)


def test_a_layer_the_forward_never_calls_is_an_error():
    model = TwoLayer(nnx.Rngs(0))
    before = copy.deepcopy(state_of(model))
    cfg = oneshot.OneShotConfig(method="wanda", include=(".*",), exclude=())
    with pytest.raises(ValueError, match="never called"):
        oneshot.prune(model, [jnp.ones((64, 16))], cfg, forward=lambda m, x: m.first(x))
    jax.tree.map(np.testing.assert_array_equal, state_of(model)["first"], before["first"])
