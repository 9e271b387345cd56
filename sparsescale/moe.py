"""Mixture-of-experts MLP layer (top-k routing, dropless or capacity dispatch, aux losses).

Shape legend: B batch, L length, D d_model, F d_ff, E experts, K top_k, T = B*L tokens,
C capacity (token slots per expert in capacity dispatch).

Two dispatch modes compute the same mixture y_t = sum_k gate_tk * expert_{e_tk}(x_t):
- "dropless": no pair is dropped. The T*K (token, choice) pairs are grouped by expert and run
  through grouped matmuls: `jax.lax.ragged_dot` on sorted pairs, or ("blocked") each expert's pairs
  padded to whole row blocks and one batched matmul over blocks. XLA:CPU lowers ragged_dot to a
  dense matmul over all E experts (E times the work), so "auto" picks "blocked" on CPU.
- "capacity": each expert gets C = ceil(capacity_factor * T * K / E) slots, filled first by every
  token's first choice (in token order), then second choices, and so on (GShard priority);
  pairs that find their expert full are dropped (they contribute zero; the model's residual
  carries the token). The [E, C, D] buffer is sharded over the `expert` mesh axis.

Expert kernels are stacked `[E, in, out]` (`ExpertLinear`) and may carry a `Mask` (weight
sparsity inside experts); forward uses `kernel * mask` when a mask is present.
"""

from __future__ import annotations

import dataclasses
import math

import flax.core.spmd
import jax
import jax.numpy as jnp
from flax import nnx

from sparsescale.layers import Mask, lazy_sharding, masked_kernel, observe

GATINGS = ("topk_softmax", "softmax_topk")
DISPATCHES = ("dropless", "capacity")
GROUPED_MATMULS = ("auto", "ragged_dot", "blocked")
MLP_KINDS = ("gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    every: int = 2  # used by the model: MoE replaces the MLP in every `every`-th layer
    # "topk_softmax": softmax over the top-k logits (gates sum to 1).
    # "softmax_topk": softmax over all E logits, then keep the top-k probabilities as they are
    # (Switch / ST-MoE style; gates sum to <= 1, and with k=1 the router still gets gradients).
    gating: str = "topk_softmax"
    dispatch: str = "dropless"  # "dropless" (grouped matmuls, see below) | "capacity"
    # Dropless grouped matmul: "ragged_dot" (jax.lax.ragged_dot), "blocked" (each expert's rows
    # padded to whole blocks, one batched matmul over blocks), or "auto": "blocked" on CPU, where
    # XLA lowers ragged_dot to a dense matmul over every expert (E times the work), else ragged_dot.
    grouped_matmul: str = "auto"
    capacity_factor: float = 1.25
    load_balance_coef: float = 0.01
    router_z_coef: float = 1e-3


def validate(cfg: MoEConfig, mesh_expert_size: int = 1) -> None:
    """Raises ValueError naming the offending `MoEConfig` field when `cfg` cannot work."""
    if not isinstance(cfg.num_experts, int) or cfg.num_experts < 1:
        raise ValueError(f"MoEConfig.num_experts must be an int >= 1, got {cfg.num_experts!r}.")
    if not isinstance(cfg.top_k, int) or not 1 <= cfg.top_k <= cfg.num_experts:
        raise ValueError(
            f"MoEConfig.top_k must be an int in [1, num_experts={cfg.num_experts}], "
            f"got {cfg.top_k!r}."
        )
    if not isinstance(cfg.every, int) or cfg.every < 1:
        raise ValueError(f"MoEConfig.every must be an int >= 1, got {cfg.every!r}.")
    if cfg.gating not in GATINGS:
        raise ValueError(f"MoEConfig.gating must be one of {GATINGS}, got {cfg.gating!r}.")
    if cfg.dispatch not in DISPATCHES:
        raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCHES}, got {cfg.dispatch!r}.")
    if cfg.grouped_matmul not in GROUPED_MATMULS:
        raise ValueError(
            f"MoEConfig.grouped_matmul must be one of {GROUPED_MATMULS}, got {cfg.grouped_matmul!r}."
        )
    if not cfg.capacity_factor > 0:
        raise ValueError(f"MoEConfig.capacity_factor must be > 0, got {cfg.capacity_factor!r}.")
    for name in ("load_balance_coef", "router_z_coef"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(cfg, name)!r}.")
    if mesh_expert_size < 1 or cfg.num_experts % mesh_expert_size:
        raise ValueError(
            f"MoEConfig.num_experts={cfg.num_experts} must be divisible by the size of the "
            f"'expert' mesh axis ({mesh_expert_size}) so that experts shard evenly."
        )


def _check_mlp(d_model: int, d_ff: int, mlp_kind: str) -> None:
    if mlp_kind not in MLP_KINDS:
        raise ValueError(f"MoE mlp_kind must be one of {MLP_KINDS}, got {mlp_kind!r}.")
    if d_model < 1 or d_ff < 1:
        raise ValueError(f"MoE needs d_model >= 1 and d_ff >= 1, got {d_model=}, {d_ff=}.")


def capacity(cfg: MoEConfig, num_tokens: int) -> int:
    """Slots per expert in capacity dispatch: ceil(capacity_factor * T * K / E), at least 1."""
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


def route(logits_TxE: jax.Array, top_k: int, gating: str) -> tuple[jax.Array, jax.Array]:
    """Returns (gates_TxK, experts_TxK): chosen experts in descending logit order and weights."""
    if gating == "topk_softmax":
        top_logits_TxK, experts_TxK = jax.lax.top_k(logits_TxE, top_k)
        gates_TxK = jax.nn.softmax(top_logits_TxK, axis=-1)
    elif gating == "softmax_topk":
        gates_TxK, experts_TxK = jax.lax.top_k(jax.nn.softmax(logits_TxE, axis=-1), top_k)
    else:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}.")
    return gates_TxK, experts_TxK


def expert_positions(experts_TxK: jax.Array, num_experts: int) -> jax.Array:
    """Position of every (token, choice) pair among the pairs sent to its expert, counting
    choice-major: all first choices in token order, then all second choices, and so on."""
    T, K = experts_TxK.shape
    onehot_KTxE = jax.nn.one_hot(experts_TxK.T.reshape(-1), num_experts, dtype=jnp.int32)
    position_KTxE = jnp.cumsum(onehot_KTxE, axis=0) - 1
    return jnp.sum(position_KTxE * onehot_KTxE, axis=-1).reshape(K, T).T


def capacity_slots(
    experts_TxK: jax.Array, num_experts: int, capacity_per_expert: int
) -> tuple[jax.Array, jax.Array]:
    """Buffer slot of every (token, choice) pair under the capacity rule.

    A pair is kept when fewer than `capacity_per_expert` earlier pairs (see `expert_positions`)
    went to its expert. Returns (slot_TxK, kept_TxK); slot = expert * C + position, or E * C
    (out of range) if dropped.
    """
    position_TxK = expert_positions(experts_TxK, num_experts)
    kept_TxK = position_TxK < capacity_per_expert
    slot_TxK = jnp.where(
        kept_TxK,
        experts_TxK * capacity_per_expert + position_TxK,
        num_experts * capacity_per_expert,
    )
    return slot_TxK, kept_TxK


def block_layout(
    experts_TxK: jax.Array, num_experts: int, block_rows: int
) -> tuple[jax.Array, jax.Array]:
    """Layout for the blocked dropless matmul: each expert's pairs fill whole blocks of
    `block_rows` rows (the last one zero-padded), experts one after another.

    Returns (row_TxK, block_expert_N): the padded row of every pair, and the expert of each of the
    N = (T*K + E*(block_rows-1)) // block_rows blocks (an upper bound; spare blocks are all padding).
    """
    T, K = experts_TxK.shape
    sizes_E = jnp.bincount(experts_TxK.reshape(-1), length=num_experts)
    padded_ends_E = jnp.cumsum(-(-sizes_E // block_rows) * block_rows)
    padded_starts_E = padded_ends_E - (-(-sizes_E // block_rows) * block_rows)
    row_TxK = padded_starts_E[experts_TxK] + expert_positions(experts_TxK, num_experts)
    num_blocks = (T * K + num_experts * (block_rows - 1)) // block_rows
    block_starts_N = jnp.arange(num_blocks) * block_rows
    block_expert_N = jnp.searchsorted(padded_ends_E, block_starts_N, side="right")
    return row_TxK, jnp.minimum(block_expert_N, num_experts - 1)


def router_stats(
    logits_TxE: jax.Array, experts_TxK: jax.Array, kept_TxK: jax.Array, cfg: MoEConfig
) -> dict:
    """Aux losses and router statistics (see `MoE.__call__`)."""
    E = cfg.num_experts
    log_probs_TxE = jax.nn.log_softmax(logits_TxE, axis=-1)
    probs_TxE = jnp.exp(log_probs_TxE)
    # f_i: fraction of the T*K routing choices that picked expert i (before any dropping).
    expert_load_E = jnp.mean(jax.nn.one_hot(experts_TxK, E, dtype=jnp.float32), axis=(0, 1))
    mean_prob_E = jnp.mean(probs_TxE, axis=0)
    load_balance = E * jnp.sum(expert_load_E * mean_prob_E)
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)))
    return {
        "load_balance_loss": load_balance,
        "router_z_loss": z_loss,
        "aux_loss": cfg.load_balance_coef * load_balance + cfg.router_z_coef * z_loss,
        "expert_load": expert_load_E,
        "dropped_fraction": jnp.mean(jnp.logical_not(kept_TxK).astype(jnp.float32)),
        "router_entropy": jnp.mean(-jnp.sum(probs_TxE * log_probs_TxE, axis=-1)),
    }


def _constrain(x: jax.Array, logical_names: tuple) -> jax.Array:
    """Sharding constraint from logical axis names; a no-op without an Auto mesh and rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = dict(flax.core.spmd.get_logical_axis_rules())
    if mesh.empty or not rules or not mesh.are_all_axes_auto:
        return x

    def mesh_axes(name):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes if a in mesh.axis_names)
        return kept or None

    spec = jax.P(*(mesh_axes(name) for name in logical_names))
    return jax.lax.with_sharding_constraint(x, spec)


class ExpertLinear(nnx.Module):
    """E stacked bias-free linear maps: `kernel` [E, in, out] and an optional `mask` (a `Mask` of
    the kernel's shape, None = dense). `dense_grad` as in `layers.masked_kernel`."""

    @lazy_sharding
    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        kernel_axes: tuple,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dense_grad: bool = False,
    ):
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        shape = (num_experts, in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=kernel_axes)
        # Filled by the sparsity code for weight-sparse experts (`layer.mask = Mask(...)`).
        self.mask: Mask | None = nnx.data(None)
        self.dense_grad = dense_grad

    def weight(self, dtype) -> jax.Array:
        """The effective kernel [E, in, out] (pruned entries zero) in `dtype`."""
        kernel_ExIxO = self.kernel[...]
        if self.mask is not None:
            kernel_ExIxO = masked_kernel(kernel_ExIxO, self.mask[...], self.dense_grad)
        return kernel_ExIxO.astype(dtype)


class MoE(nnx.Module):
    """Top-k mixture of E expert MLPs ("gelu" or "swiglu", no biases, like the dense MLP)."""

    @lazy_sharding
    def __init__(
        self,
        cfg: MoEConfig,
        d_model: int,
        d_ff: int,
        mlp_kind: str,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        validate(cfg)
        _check_mlp(d_model, d_ff, mlp_kind)
        self.cfg = cfg
        self.mlp_kind = mlp_kind
        self.dtype = dtype
        E, D, F = cfg.num_experts, d_model, d_ff
        router_init = nnx.initializers.lecun_normal()
        self.router_kernel = nnx.Param(
            router_init(rngs.params(), (D, E), param_dtype), out_sharding=("embed", None)
        )
        expert = lambda i, o, names: ExpertLinear(
            E, i, o, names, rngs=rngs, param_dtype=param_dtype
        )
        if mlp_kind == "swiglu":
            self.w_gate = expert(D, F, ("expert", "embed", "mlp"))
            self.w_up = expert(D, F, ("expert", "embed", "mlp"))
        else:
            self.w_in = expert(D, F, ("expert", "embed", "mlp"))
        self.w_out = expert(F, D, ("expert", "mlp", "embed"))

    def _expert_mlp(self, x, matmul):
        """The dense model's MLP with each kernel applied by `matmul(x, ExpertLinear)`."""
        if self.mlp_kind == "swiglu":
            hidden = jax.nn.silu(matmul(x, self.w_gate)) * matmul(x, self.w_up)
        else:
            hidden = jax.nn.gelu(matmul(x, self.w_in))
        return matmul(hidden, self.w_out)

    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict]:
        """Returns (y_BxLxD, aux).

        aux: "load_balance_loss" E * sum_i f_i P_i (f_i fraction of routing choices to expert i,
        P_i mean router probability; 1 when balanced), "router_z_loss" mean logsumexp(logits)^2,
        "aux_loss" = load_balance_coef * load_balance_loss + router_z_coef * router_z_loss (add it
        to the LM loss), "expert_load" [E] f_i, "dropped_fraction" of (token, choice) pairs,
        "router_entropy" mean entropy (nats) of the full router softmax.
        """
        observe(self, x_BxLxD)
        cfg = self.cfg
        B, L, D = x_BxLxD.shape
        T, K = B * L, cfg.top_k
        x_TxD = x_BxLxD.reshape(T, D).astype(self.dtype)
        logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), self.router_kernel[...].astype(jnp.float32))
        gates_TxK, experts_TxK = route(logits_TxE, K, cfg.gating)

        if cfg.dispatch == "capacity":
            y_TxKxD, kept_TxK = self._capacity(x_TxD, experts_TxK)
        else:
            impl = cfg.grouped_matmul
            if impl == "auto":
                impl = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
            dropless = self._ragged_dot if impl == "ragged_dot" else self._blocked
            y_TxKxD, kept_TxK = dropless(x_TxD, experts_TxK), jnp.ones((T, K), dtype=bool)

        y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(self.dtype))
        aux = router_stats(logits_TxE, experts_TxK, kept_TxK, cfg)
        return y_TxD.reshape(B, L, D).astype(x_BxLxD.dtype), aux

    def expert_input_grams(self, x_BxLxD: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{expert kernel name: (gram_ExIxI, tokens_E)}: Σ x xᵀ over the tokens routed to each
        expert, of the input of every expert kernel (w_in / w_gate / w_up see the layer input,
        w_out the hidden activations), as dropless dispatch routes them (capacity drops are not
        modelled). What one-shot pruning (`sparsescale.oneshot`) calibrates experts with."""
        B, L, D = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(B * L, D).astype(self.dtype)
        logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), self.router_kernel[...].astype(jnp.float32))
        _, experts_TxK = route(logits_TxE, self.cfg.top_k, self.cfg.gating)
        routed_ExT = jnp.any(
            jax.nn.one_hot(experts_TxK, self.cfg.num_experts, dtype=jnp.bool_), axis=1
        ).T
        # Rows of tokens not routed to an expert are zero and stay zero through the MLP
        # (gelu(0) = silu(0)·0 = 0), so they add nothing to that expert's gram.
        x_ExTxD = jnp.where(routed_ExT[..., None], x_TxD[None], 0)
        names = {id(lin): name for name, lin in vars(self).items() if isinstance(lin, ExpertLinear)}
        tokens_E = jnp.sum(routed_ExT, axis=1, dtype=jnp.int32)
        grams = {}

        def matmul(h_ExTxI, lin):
            h32 = h_ExTxI.astype(jnp.float32)
            grams[names[id(lin)]] = (jnp.einsum("eti,etj->eij", h32, h32), tokens_E)
            return jnp.einsum("eti,eio->eto", h_ExTxI, lin.weight(self.dtype))

        self._expert_mlp(x_ExTxD, matmul)
        return grams

    def _ragged_dot(self, x_TxD, experts_TxK):
        """Dropless: sort the T*K pairs by expert, grouped matmuls with `jax.lax.ragged_dot`."""
        (T, K), D = experts_TxK.shape, x_TxD.shape[-1]
        expert_of_pair = experts_TxK.reshape(T * K)
        order = jnp.argsort(expert_of_pair, stable=True)
        group_sizes_E = jnp.bincount(expert_of_pair, length=self.cfg.num_experts)
        ragged = lambda h, lin: jax.lax.ragged_dot(
            h, lin.weight(self.dtype), group_sizes_E.astype(jnp.int32)
        )
        y_sorted = self._expert_mlp(x_TxD[order // K], ragged)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(T * K, dtype=order.dtype))
        return y_sorted[inverse].reshape(T, K, D)

    def _blocked(self, x_TxD, experts_TxK):
        """Dropless: pairs laid out in per-expert blocks (`block_layout`), one batched matmul."""
        (T, K), D, E = experts_TxK.shape, x_TxD.shape[-1], self.cfg.num_experts
        # Blocks of a quarter of a balanced expert's share (rounded up to 8 rows): expected
        # padding ~1/8 of the rows, and at most 5E blocks, so the per-block gather of expert
        # kernels costs at most ~5 copies of them whatever T is.
        block_rows = 8 * -(-T * K // (32 * E))
        row_TxK, block_expert_N = block_layout(experts_TxK, E, block_rows)
        rows = row_TxK.reshape(T * K)
        num_blocks = block_expert_N.shape[0]
        x_padded = jnp.zeros((num_blocks * block_rows, D), self.dtype)
        x_padded = x_padded.at[rows].set(jnp.repeat(x_TxD, K, axis=0), unique_indices=True)
        blocked = lambda h, lin: jnp.einsum(
            "nbx,nxy->nby", h, lin.weight(self.dtype)[block_expert_N]
        )
        y_NxBxD = self._expert_mlp(x_padded.reshape(num_blocks, block_rows, D), blocked)
        return y_NxBxD.reshape(num_blocks * block_rows, D)[rows].reshape(T, K, D)

    def _capacity(self, x_TxD, experts_TxK):
        """Capacity dispatch into an [E, C, D] buffer; overflowing pairs are dropped."""
        (T, K), D, E = experts_TxK.shape, x_TxD.shape[-1], self.cfg.num_experts
        C = capacity(self.cfg, T)
        slot_TxK, kept_TxK = capacity_slots(experts_TxK, E, C)
        slot = slot_TxK.reshape(T * K)
        x_pairs = jnp.repeat(x_TxD, K, axis=0)
        buffer_ExCxD = jnp.zeros((E * C, D), self.dtype).at[slot].add(x_pairs, mode="drop")
        buffer_ExCxD = _constrain(buffer_ExCxD.reshape(E, C, D), ("expert", None, None))
        batched = lambda h, lin: jnp.einsum("ecx,exy->ecy", h, lin.weight(self.dtype))
        out_ExCxD = _constrain(self._expert_mlp(buffer_ExCxD, batched), ("expert", None, None))
        y_pairs = out_ExCxD.reshape(E * C, D).at[slot].get(mode="fill", fill_value=0)
        return y_pairs.reshape(T, K, D), kept_TxK
