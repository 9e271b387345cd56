"""MoE layer: routing, both dispatch modes, aux losses, gradients, sharding, accounting, errors.

References are independent: numpy per-token loops (float64) and a brute-force dense mixture that
runs every token through every expert.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsescale.layers import Mask
from sparsescale.moe import (
    MoE,
    MoEConfig,
    block_layout,
    capacity,
    capacity_slots,
    route,
    router_stats,
    validate,
)

RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("length", None),
)
D, F = 8, 16


def _kernels(layer):
    names = ("w_gate", "w_up", "w_out") if layer.mlp_kind == "swiglu" else ("w_in", "w_out")
    return {name: getattr(layer, name) for name in names}


def _add_random_masks(layer, seed, density=0.6):
    rng = np.random.default_rng(seed)
    for lin in _kernels(layer).values():
        keep = rng.random(lin.kernel.shape) < density
        lin.mask = Mask(jnp.asarray(keep), out_sharding=lin.kernel.get_metadata()["out_sharding"])


def _np_weights(layer):
    """Effective float64 expert kernels (mask applied) and router kernel."""
    out = {}
    for name, lin in _kernels(layer).items():
        w = np.asarray(lin.kernel[...], np.float64)
        if lin.mask is not None:
            w = w * np.asarray(lin.mask[...])
        out[name] = w
    return out, np.asarray(layer.router_kernel[...], np.float64)


def _np_gelu(x):  # tanh approximation, as jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_expert(x_D, w, e, mlp_kind):
    if mlp_kind == "swiglu":
        gate, up = x_D @ w["w_gate"][e], x_D @ w["w_up"][e]
        hidden = gate / (1 + np.exp(-gate)) * up
    else:
        hidden = _np_gelu(x_D @ w["w_in"][e])
    return hidden @ w["w_out"][e]


def _np_route(logits_E, k, gating):
    """Per-token reference: top-k experts (descending) and their gates."""
    experts = np.argsort(-logits_E, kind="stable")[:k]
    if gating == "topk_softmax":
        z = np.exp(logits_E[experts] - logits_E[experts].max())
        return z / z.sum(), experts
    probs = np.exp(logits_E - logits_E.max())
    probs /= probs.sum()
    return probs[experts], experts


def _np_capacity_kept(experts_TxK, E, C):
    """The capacity rule spelled out: first choices in token order, then second choices, ..."""
    T, K = experts_TxK.shape
    used = [0] * E
    kept = np.zeros((T, K), bool)
    for k in range(K):
        for t in range(T):
            e = experts_TxK[t, k]
            if used[e] < C:
                kept[t, k] = True
                used[e] += 1
    return kept


def _np_moe(layer, x_BxLxD, kept_TxK=None):
    """Naive per-token loop over the layer's parameters (float64)."""
    cfg = layer.cfg
    w, router = _np_weights(layer)
    x_TxD = np.asarray(x_BxLxD, np.float64).reshape(-1, x_BxLxD.shape[-1])
    y_TxD = np.zeros_like(x_TxD)
    for t, x_D in enumerate(x_TxD):
        gates, experts = _np_route(x_D @ router, cfg.top_k, cfg.gating)
        for k, (g, e) in enumerate(zip(gates, experts, strict=True)):
            if kept_TxK is None or kept_TxK[t, k]:
                y_TxD[t] += g * _np_expert(x_D, w, e, layer.mlp_kind)
    return y_TxD.reshape(x_BxLxD.shape)


def _jnp_dense_mixture(layer, x_BxLxD):
    """Brute force in jnp (differentiable): every token through every expert, then mix."""
    cfg = layer.cfg
    x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    k = {name: lin.weight(jnp.float32) for name, lin in _kernels(layer).items()}
    if layer.mlp_kind == "swiglu":
        gate = jnp.einsum("td,edf->tef", x_TxD, k["w_gate"])
        hidden = jax.nn.silu(gate) * jnp.einsum("td,edf->tef", x_TxD, k["w_up"])
    else:
        hidden = jax.nn.gelu(jnp.einsum("td,edf->tef", x_TxD, k["w_in"]))
    out_TxExD = jnp.einsum("tef,efd->ted", hidden, k["w_out"])
    logits = x_TxD @ layer.router_kernel[...]
    gates_TxK, experts_TxK = route(logits, cfg.top_k, cfg.gating)
    weights_TxE = jnp.sum(jax.nn.one_hot(experts_TxK, cfg.num_experts) * gates_TxK[..., None], 1)
    return jnp.einsum("ted,te->td", out_TxExD, weights_TxE).reshape(x_BxLxD.shape)


# One compile per (layer structure, input shape) instead of op-by-op eager dispatch: faster tests.
_apply = nnx.jit(lambda layer, x: layer(x))


def _x(shape=(2, 6, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("gating", ["topk_softmax", "softmax_topk"])
def test_route_matches_per_token_loop(gating):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (32, 8)) * 3)
    gates, experts = jax.jit(route, static_argnums=(1, 2))(logits, 3, gating)
    for t in range(logits.shape[0]):
        ref_gates, ref_experts = _np_route(logits[t].astype(np.float64), 3, gating)
        np.testing.assert_array_equal(experts[t], ref_experts)
        np.testing.assert_allclose(gates[t], ref_gates, rtol=1e-6)
    sums = np.asarray(gates.sum(-1))
    if gating == "topk_softmax":
        np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    else:  # the kept share of the full softmax
        assert np.all(sums < 1.0) and np.all(sums > 3 / 8)


@pytest.mark.parametrize(
    "grouped_matmul,mlp_kind,gating,top_k,masked",
    [
        ("ragged_dot", "gelu", "topk_softmax", 2, False),
        ("ragged_dot", "swiglu", "softmax_topk", 2, True),
        ("blocked", "gelu", "topk_softmax", 2, True),
        ("blocked", "swiglu", "softmax_topk", 1, False),
        ("blocked", "gelu", "topk_softmax", 8, True),  # k = E: every expert used
    ],
)
def test_dropless_equals_per_token_reference(grouped_matmul, mlp_kind, gating, top_k, masked):
    cfg = MoEConfig(
        num_experts=8,
        top_k=top_k,
        gating=gating,
        dispatch="dropless",
        grouped_matmul=grouped_matmul,
    )
    layer = MoE(cfg, D, F, mlp_kind, rngs=nnx.Rngs(0))
    if masked:
        _add_random_masks(layer, seed=3)
    x = _x()
    y, aux = _apply(layer, x)
    np.testing.assert_allclose(y, _np_moe(layer, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, _jnp_dense_mixture(layer, x), rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(float(aux["expert_load"].sum()), 1.0, rtol=1e-6)


def test_capacity_slots_hand_worked():
    # E=2, C=2. First choices: t0->0 (slot 0), t1->0 (slot 1), t2->1 (slot 2).
    # Second choices: t0->1 (slot 3); t1->1 and t2->0 find their expert full: dropped (slot 4).
    experts = jnp.array([[0, 1], [0, 1], [1, 0]])
    slot, kept = jax.jit(capacity_slots, static_argnums=(1, 2))(experts, 2, 2)
    np.testing.assert_array_equal(slot, [[0, 3], [1, 4], [2, 4]])
    np.testing.assert_array_equal(kept, [[True, True], [True, False], [True, False]])
    assert capacity(MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25), 12) == 4  # ceil(3.75)
    assert capacity(MoEConfig(num_experts=4, top_k=1, capacity_factor=0.01), 12) == 1


def test_block_layout_hand_worked():
    # E=3, blocks of 2 rows. Pairs per expert (choice-major): expert 0 gets t0, t1 (first
    # choices), t2, t3 (second) -> 4 rows = 2 blocks; expert 1 gets t2, t0, t1 -> 3 rows padded
    # to 2 blocks; expert 2 gets t3 -> 1 block. N = (8 + 3 * 1) // 2 = 5 blocks.
    experts = jnp.array([[0, 1], [0, 1], [1, 0], [2, 0]])
    rows, block_expert = jax.jit(block_layout, static_argnums=(1, 2))(experts, 3, 2)
    np.testing.assert_array_equal(rows, [[0, 5], [1, 6], [4, 2], [8, 3]])
    np.testing.assert_array_equal(block_expert, [0, 0, 1, 1, 2])


@pytest.mark.parametrize("mlp_kind", ["gelu", "swiglu"])
def test_capacity_drops_exactly_what_the_rule_says(mlp_kind):
    cfg = MoEConfig(num_experts=8, top_k=2, dispatch="capacity", capacity_factor=0.75)
    layer = MoE(cfg, D, F, mlp_kind, rngs=nnx.Rngs(2))
    x = _x(seed=5)
    y, aux = _apply(layer, x)
    x_TxD = np.asarray(x, np.float64).reshape(-1, D)
    _, router = _np_weights(layer)
    experts = np.stack([_np_route(xt @ router, 2, cfg.gating)[1] for xt in x_TxD])
    kept = _np_capacity_kept(experts, 8, math.ceil(0.75 * 12 * 2 / 8))
    assert 0 < (~kept).sum()  # this example does overflow
    np.testing.assert_allclose(float(aux["dropped_fraction"]), (~kept).mean(), rtol=1e-6)
    np.testing.assert_allclose(y, _np_moe(layer, x, kept_TxK=kept), rtol=1e-5, atol=1e-6)


def test_aux_losses_hand_worked():
    # E=2, k=1. One-hot tokens pick rows of the router kernel, so the logits are set by hand.
    cfg = MoEConfig(num_experts=2, top_k=1, load_balance_coef=0.01, router_z_coef=1e-3)
    layer = MoE(cfg, 2, 4, "gelu", rngs=nnx.Rngs(0))
    layer.router_kernel[...] = jnp.array([[math.log(3), 0.0], [0.0, math.log(3)]])
    # Both tokens have logits [ln 3, 0]: probs [3/4, 1/4], both go to expert 0.
    # f = [1, 0], P = [3/4, 1/4] -> load balance = 2 * 3/4 = 1.5; logsumexp = ln 4.
    _, aux = _apply(layer, jnp.array([[[1.0, 0.0], [1.0, 0.0]]]))
    z = math.log(4) ** 2
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    np.testing.assert_allclose(float(aux["load_balance_loss"]), 1.5, rtol=1e-6)
    np.testing.assert_allclose(float(aux["router_z_loss"]), z, rtol=1e-6)
    np.testing.assert_allclose(float(aux["aux_loss"]), 0.01 * 1.5 + 1e-3 * z, rtol=1e-6)
    np.testing.assert_allclose(aux["expert_load"], [1.0, 0.0])
    np.testing.assert_allclose(float(aux["router_entropy"]), entropy, rtol=1e-6)
    # Balanced routing (one token each way): f = P = [1/2, 1/2] -> load balance = 1.
    _, aux = _apply(layer, jnp.array([[[1.0, 0.0], [0.0, 1.0]]]))
    np.testing.assert_allclose(float(aux["load_balance_loss"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["expert_load"], [0.5, 0.5])


@jax.jit(static_argnums=(1, 2))
def _route_and_stats(logits_TxE, cfg, capacity_per_expert):
    _, experts_TxK = route(logits_TxE, cfg.top_k, cfg.gating)
    _, kept_TxK = capacity_slots(experts_TxK, cfg.num_experts, capacity_per_expert)
    return kept_TxK, router_stats(logits_TxE, experts_TxK, kept_TxK, cfg)


def test_load_balance_with_top2_hand_worked():
    # E=3, k=2, two tokens with probs [4/7, 2/7, 1/7]: both pick experts {0, 1}.
    # f = [2/4, 2/4, 0] (fraction of the 4 choices), P = [4/7, 2/7, 1/7] -> 3 * 3/7 = 9/7.
    cfg = MoEConfig(num_experts=3, top_k=2)
    logits = jnp.log(jnp.array([[4.0, 2.0, 1.0]] * 2))
    _, stats = _route_and_stats(logits, cfg, 4)  # room for all
    np.testing.assert_allclose(stats["expert_load"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(float(stats["load_balance_loss"]), 9 / 7, rtol=1e-6)
    np.testing.assert_allclose(float(stats["router_z_loss"]), math.log(7) ** 2, rtol=1e-6)


def test_dropped_fraction_and_load_on_hand_worked_routing():
    # E=2, k=1, 4 tokens all to expert 0, capacity ceil(1.0 * 4 / 2) = 2: half are dropped.
    cfg = MoEConfig(num_experts=2, top_k=1, dispatch="capacity", capacity_factor=1.0)
    logits = jnp.array([[1.0, 0.0]] * 4)
    kept, stats = _route_and_stats(logits, cfg, capacity(cfg, 4))
    np.testing.assert_array_equal(kept[:, 0], [True, True, False, False])
    np.testing.assert_allclose(float(stats["dropped_fraction"]), 0.5)
    np.testing.assert_allclose(stats["expert_load"], [1.0, 0.0])


def test_all_dispatches_match_dense_mixture_in_value_and_gradient():
    # Capacity with room for every pair (factor E/k) drops nothing, so all three paths must give
    # the brute-force mixture and its gradients (router included; pruned weights get none).
    x, target = _x(), _x(seed=9)

    def loss(layer, mixture):
        y = mixture(layer, x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.mean((y - target) ** 2), y

    grad_fn = nnx.jit(
        nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True),
        static_argnums=1,
    )
    ref = None
    for dispatch, grouped_matmul in [
        ("dropless", "ragged_dot"),
        ("dropless", "blocked"),
        ("capacity", "auto"),
    ]:
        cfg = MoEConfig(dispatch=dispatch, grouped_matmul=grouped_matmul, capacity_factor=4.0)
        layer = MoE(cfg, D, F, "swiglu", rngs=nnx.Rngs(1))  # same weights for every cfg
        _add_random_masks(layer, seed=4)
        if ref is None:
            (_, y_ref), ref = grad_fn(layer, _jnp_dense_mixture)
        (_, y), grads = grad_fn(layer, lambda m, x: m(x))
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(grads["router_kernel"][...]).sum()) > 0
        np.testing.assert_allclose(
            grads["router_kernel"][...], ref["router_kernel"][...], rtol=1e-4, atol=1e-7
        )
        for name, lin in _kernels(layer).items():
            g, keep = np.asarray(grads[name]["kernel"][...]), np.asarray(lin.mask[...])
            np.testing.assert_allclose(g, ref[name]["kernel"][...], rtol=1e-4, atol=1e-7)
            assert np.abs(g[keep]).sum() > 0
            assert np.all(g[~keep] == 0)


def test_tree_mode_and_jit_of_split_state_match_graph_mode():
    cfg = MoEConfig(num_experts=8, top_k=2, dispatch="dropless")
    layer = MoE(cfg, D, F, "gelu", rngs=nnx.Rngs(0))
    _add_random_masks(layer, seed=1)
    x = _x()
    outputs = []
    for graph in (True, False):
        graphdef, state = nnx.split(layer, graph=graph)

        @jax.jit
        def forward(state, x, graphdef=graphdef):
            return nnx.merge(graphdef, state)(x)

        outputs.append(forward(state, x)[0])
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outputs[0], _np_moe(layer, x), rtol=1e-5, atol=1e-6)


def _sharded_step(cfg, mesh_shape, rules=RULES):
    """Jitted forward + grad of a fixed loss, on `mesh_shape` (None: one device)."""
    layer = MoE(cfg, D, F, "swiglu", rngs=nnx.Rngs(3))
    _add_random_masks(layer, seed=2)
    graphdef, params, masks = nnx.split(layer, nnx.Param, Mask)
    x = _x((4, 6, D))

    def loss_fn(params, masks, x):
        y, aux = nnx.merge(graphdef, params, masks)(x)
        return jnp.mean(y**2) + aux["aux_loss"], (y, aux)

    step = jax.value_and_grad(loss_fn, has_aux=True)
    if mesh_shape is None:
        return jax.jit(step)(params, masks, x), None
    mesh = jax.make_mesh(
        mesh_shape,
        ("data", "fsdp", "expert", "tensor"),
        axis_types=(jax.sharding.AxisType.Auto,) * 4,
    )
    with nnx.logical_axis_rules(rules):
        shard = lambda tree: jax.tree.map(
            lambda spec: jax.NamedSharding(mesh, spec), nnx.get_partition_spec(tree)
        )
        param_sh, mask_sh = shard(params), shard(masks)
        x_sh = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
        params, masks, x = jax.device_put((params, masks, x), (param_sh, mask_sh, x_sh))
        with jax.set_mesh(mesh):  # activation constraints take effect inside the mesh
            jitted = jax.jit(step, in_shardings=(param_sh, mask_sh, x_sh))
            hlo = jitted.lower(params, masks, x).as_text()
            out = jitted(params, masks, x)
    return out, (params, hlo)


@pytest.mark.parametrize(
    "dispatch,grouped_matmul,mesh_shape",
    [
        # On CPU ragged_dot lowers to a dense dot before partitioning, so the CPU-meaningful
        # sharded paths are the blocked and capacity ones.
        ("dropless", "blocked", (1, 1, 4, 1)),
        ("capacity", "auto", (2, 1, 2, 1)),
    ],
)
def test_expert_parallel_matches_single_device(dispatch, grouped_matmul, mesh_shape):
    cfg = MoEConfig(
        num_experts=8,
        top_k=2,
        dispatch=dispatch,
        capacity_factor=1.0,
        grouped_matmul=grouped_matmul,
    )
    validate(cfg, mesh_expert_size=mesh_shape[2])
    ((loss1, (y1, aux1)), grads1), _ = _sharded_step(cfg, None)
    ((loss4, (y4, aux4)), grads4), (params, hlo) = _sharded_step(cfg, mesh_shape)
    if dispatch == "capacity":  # the [E, C, D] buffer is constrained to the expert axis
        assert re.search(r'sharding_constraint .*\[\{"expert"\}, \{\}, \{\}\]', hlo)
    w_out = params["w_out"]["kernel"][...]
    assert w_out.sharding.spec[0] == "expert"
    assert w_out.addressable_shards[0].data.shape[0] == 8 // mesh_shape[2]
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    np.testing.assert_allclose(y4, y1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux4["dropped_fraction"], aux1["dropped_fraction"])
    for g4, g1 in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(g4, g1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,mesh_expert_size,match",
    [
        ({"top_k": 9}, 1, r"top_k must be .* \[1, num_experts=8\], got 9"),
        ({"top_k": 0}, 1, "top_k"),
        ({"num_experts": 6, "top_k": 2}, 4, r"num_experts=6 .* 'expert' mesh axis \(4\)"),
        ({"gating": "sigmoid"}, 1, "gating must be one of"),
        ({"dispatch": "dense"}, 1, "dispatch must be one of"),
        ({"capacity_factor": 0.0}, 1, "capacity_factor must be > 0"),
        ({"grouped_matmul": "megablocks"}, 1, "grouped_matmul must be one of"),
        ({"every": 0}, 1, "every"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, mesh_expert_size, match):
    with pytest.raises(ValueError, match=match):
        validate(MoEConfig(**kwargs), mesh_expert_size=mesh_expert_size)


def test_layer_rejects_bad_config_and_mlp_kind_before_building():
    with pytest.raises(ValueError, match="top_k"):
        MoE(MoEConfig(num_experts=2, top_k=3), D, F, "gelu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mlp_kind must be one of"):
        MoE(MoEConfig(), D, F, "relu", rngs=nnx.Rngs(0))
