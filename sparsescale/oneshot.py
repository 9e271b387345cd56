"""One-shot pruning of a trained model: magnitude, Wanda and SparseGPT, layer by layer.

`prune(model, calibration, cfg)` prunes, in place, every selected `SparseLinear` (an `nnx.Linear`
that the patterns select is converted first, `layers.sparsify`) and every masked MoE expert
kernel, in forward order: each layer is calibrated on the inputs it gets from the already-pruned
layers before it, as SparseGPT does. The result is an ordinary sparse model of the library (masks
in `Mask` variables, pruned weights exactly zero): it evaluates, fine-tunes under
`pruner.keep_pruned_zero`, and exports (`SparseLinear.to_nm` / `to_block`) like any other.

Kernels are [..., K, N] (input K, output N; a leading axis stacks experts). A layer's calibration
statistic is the gram of its inputs, H = Σ_t x_t x_tᵀ [K, K] in float32, over the calibration
tokens (for an expert: the tokens routed to it).
- magnitude: scores |W| (no data), with the library's allocations (uniform / ERK / global).
- wanda (Sun et al. 2023): scores |W_kn|·‖X_k‖ with ‖X_k‖ = sqrt(H_kk), compared within each
  output n (unstructured: every output keeps the same count), or per N:M group / block.
- sparsegpt (Frantar & Alistarh 2023): the columns of Wᵀ in blocks of `block_size`; in each block
  the mask is chosen by w² / [H⁻¹]_kk² (N:M: per group of m), and each pruned weight's error is
  spread over the later inputs through the Cholesky row of the damped H⁻¹ (the OBS update). With
  `refit` each output's weights are then solved exactly for the chosen mask (the constrained least
  squares with the same damped H): the sequential update leaves the kept weights before a pruned
  one uncompensated, so the refit's reconstruction error is never higher.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparsescale import layers
from sparsescale import pruner as pruner_lib
from sparsescale import sparsity as sp
from sparsescale.moe import ExpertLinear, MoE

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "erk", "global")


@dataclasses.dataclass(frozen=True)
class OneShotConfig:
    """method: `METHODS`. structure: `sparsity.Unstructured` / `NM` / `Block` (block: magnitude and
    wanda). allocation (unstructured and block): "uniform", "erk", or "global" (magnitude only:
    one threshold across layers). include / exclude: regular expressions on kernel paths, as in
    `sparsity.SparsityConfig`. damp: λ = damp · mean diag(H) added to H's diagonal (sparsegpt).
    block_size: columns per SparseGPT block. refit: solve the kept weights exactly (sparsegpt)."""

    method: str = "sparsegpt"
    structure: sp.Structure = sp.Unstructured(0.5)
    allocation: str = "uniform"
    include: tuple[str, ...] = sp.DEFAULT_INCLUDE
    exclude: tuple[str, ...] = sp.DEFAULT_EXCLUDE
    damp: float = 0.01
    block_size: int = 128
    refit: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"oneshot: unknown method {self.method!r}; expected one of {METHODS}.")
        if not isinstance(self.structure, sp.Unstructured | sp.NM | sp.Block):
            raise ValueError(
                f"oneshot: structure must be sparsity.Unstructured, NM or Block, got "
                f"{self.structure!r}."
            )
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"oneshot: unknown allocation {self.allocation!r}; expected one of {ALLOCATIONS}."
            )
        if isinstance(self.structure, sp.NM) and self.allocation != "uniform":
            raise ValueError("oneshot: N:M sparsity is per group; use allocation 'uniform'.")
        if self.allocation == "global" and self.method != "magnitude":
            raise ValueError(
                f"oneshot: allocation 'global' (one threshold across layers) needs scores that "
                f"compare across layers: method 'magnitude' only, got {self.method!r}."
            )
        if isinstance(self.structure, sp.Block) and self.method == "sparsegpt":
            raise ValueError(
                "oneshot: sparsegpt prunes single weights (unstructured or N:M); for block "
                "sparsity use method 'wanda' or 'magnitude'."
            )
        balanced = isinstance(self.structure, sp.Block) and self.structure.balanced
        if balanced and self.allocation == "global":
            raise ValueError("oneshot: balanced blocks are per block-column; use 'uniform'/'erk'.")
        if not (isinstance(self.damp, int | float) and self.damp > 0):
            raise ValueError(
                f"oneshot: damp must be > 0 (H must be invertible), got {self.damp!r}."
            )
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"oneshot: block_size must be an int >= 1, got {self.block_size!r}.")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"


# ------------------------------------------------------------------------------------------------
# One layer: masks and weights from (kernel, gram). Kernels [K, N]; grams [K, K].


def wanda_mask(
    kernel_KxN: jax.Array, gram_KxK: jax.Array, structure: sp.Structure, sparsity: float
) -> jax.Array:
    """Wanda's keep-mask: scores |W|·‖X‖, compared within each output (unstructured), N:M group
    or block structure."""
    norm_K = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_KxK), 0.0))
    scores_KxN = jnp.abs(kernel_KxN).astype(jnp.float32) * norm_K[:, None]
    if isinstance(structure, sp.NM):
        return structure.group_mask(scores_KxN)
    if isinstance(structure, sp.Block):
        return structure.mask(scores_KxN, sparsity)
    k = kernel_KxN.shape[0]
    keep = k - sp.num_removed(sparsity, k)
    return jax.vmap(sp.topk_mask, in_axes=(1, None), out_axes=1)(scores_KxN, keep)


def damped(gram_KxK: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
    """(H + λI, dead): inputs never seen (H_kk = 0) get H_kk = 1 and are marked dead (their
    weights can go at no cost); λ = damp · mean diag(H)."""
    diag_K = jnp.diagonal(gram_KxK)
    dead_K = diag_K == 0
    h = gram_KxK + jnp.diag(dead_K.astype(gram_KxK.dtype))
    lam = damp * jnp.mean(jnp.diagonal(h))
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype), dead_K


@functools.partial(jax.jit, static_argnames=("structure", "block_size", "refit"))
def sparsegpt(
    kernel_KxN: jax.Array,
    gram_KxK: jax.Array,
    sparsity: jax.Array | float,
    *,
    structure: sp.Structure,
    damp: float = 0.01,
    block_size: int = 128,
    refit: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(pruned kernel [K, N], keep-mask [K, N]) by SparseGPT, in float32."""
    h, dead_K = damped(gram_KxK.astype(jnp.float32), damp)
    w0_NxK = jnp.where(dead_K[None], 0.0, kernel_KxN.T.astype(jnp.float32))  # a row per output
    n_out, k = w0_NxK.shape
    chol = jax.scipy.linalg.cho_factor(h, lower=True)
    h_inv = jax.scipy.linalg.cho_solve(chol, jnp.eye(k, dtype=jnp.float32))
    u_KxK = jnp.linalg.cholesky(h_inv).T  # upper, uᵀu = H⁻¹: row i updates inputs ≥ i
    nm = structure if isinstance(structure, sp.NM) else None
    bs = min(k, block_size if nm is None else max(nm.m, block_size // nm.m * nm.m))
    w, keep = w0_NxK, jnp.zeros((n_out, k), jnp.bool_)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1, u1 = w[:, i1:i2], u_KxK[i1:i2, i1:i2]
        d_B = jnp.diagonal(u1)
        if nm is None:  # the block's share of the exact total, chosen by w² / [H⁻¹]_kk²
            removed = sp.num_removed(sparsity, n_out * i2) - sp.num_removed(sparsity, n_out * i1)
            keep1 = sp.topk_mask(jnp.square(w1 / d_B), n_out * (i2 - i1) - removed)
        else:
            keep1 = jnp.zeros(w1.shape, jnp.bool_)

        def column(i, carry, u1=u1, d_B=d_B):
            w1, keep1, err1 = carry
            if nm is not None:  # at a group's first input: keep its n best by the current w

                def choose(keep1):
                    group = jax.lax.dynamic_slice_in_dim(w1, i, nm.m, axis=1)
                    d = jax.lax.dynamic_slice_in_dim(d_B, i, nm.m)
                    best = nm.group_mask(jnp.square(group / d).T).T  # groups along K
                    return jax.lax.dynamic_update_slice_in_dim(keep1, best, i, axis=1)

                keep1 = jax.lax.cond(i % nm.m == 0, choose, lambda m: m, keep1)
            col = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
            q = jnp.where(jax.lax.dynamic_index_in_dim(keep1, i, axis=1, keepdims=False), col, 0.0)
            err = (col - q) / d_B[i]
            w1 = w1 - err[:, None] * u1[i][None, :]  # u1[i, :i] = 0: only inputs ≥ i move
            err1 = jax.lax.dynamic_update_index_in_dim(err1, err, i, axis=1)
            return w1, keep1, err1

        w1, keep1, err1 = jax.lax.fori_loop(0, i2 - i1, column, (w1, keep1, jnp.zeros_like(w1)))
        w = w.at[:, i1:i2].set(w1)
        keep = keep.at[:, i1:i2].set(keep1)
        if i2 < k:
            w = w.at[:, i2:].add(-err1 @ u_KxK[i1:i2, i2:])
    if refit:
        w = refit_rows(w0_NxK, keep, h)
    w = jnp.where(keep, w, 0.0)
    return w.T.astype(kernel_KxN.dtype), keep.T


def refit_rows(w0_NxK: jax.Array, keep_NxK: jax.Array, h_KxK: jax.Array) -> jax.Array:
    """Each row's exact constrained least squares: argmin (w − w0)ᵀH(w − w0) with w = 0 off the
    mask, i.e. w_kept = w0_kept + H_kk⁻¹ H_kp w0_p (k kept, p pruned); pruned entries zero."""
    eye = jnp.eye(h_KxK.shape[0], dtype=h_KxK.dtype)

    def row(args):
        w0, keep = args
        both = keep[:, None] & keep[None, :]
        system = jnp.where(both, h_KxK, 0.0) + jnp.where(keep, 0.0, 1.0) * eye
        rhs = jnp.where(keep, h_KxK @ jnp.where(keep, 0.0, w0), 0.0)
        delta = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(system), rhs)
        return jnp.where(keep, w0 + delta, 0.0)

    return jax.lax.map(row, (w0_NxK, keep_NxK), batch_size=16)


@jax.jit
def reconstruction_error(kernel_KxN: jax.Array, pruned_KxN: jax.Array, gram_KxK: jax.Array):
    """‖X W − X Ŵ‖² / ‖X W‖² from the gram (X the calibration inputs)."""
    delta = (pruned_KxN - kernel_KxN).astype(jnp.float32)
    w = kernel_KxN.astype(jnp.float32)
    return jnp.sum((gram_KxK @ delta) * delta) / jnp.sum((gram_KxK @ w) * w)


@functools.partial(jax.jit, static_argnames="cfg")
def prune_layer(
    kernel: jax.Array, gram: jax.Array, cfg: OneShotConfig, sparsity: float
) -> tuple[jax.Array, jax.Array]:
    """(pruned kernel, keep-mask) of one kernel [..., K, N] (leading axes: experts, each with its
    own gram [..., K, K]) by `cfg.method` (wanda or sparsegpt)."""
    if cfg.method == "wanda":

        def one(w, g):
            keep = wanda_mask(w, g, cfg.structure, sparsity)
            return jnp.where(keep, w, 0).astype(w.dtype), keep

    else:
        one = functools.partial(
            sparsegpt,
            sparsity=sparsity,
            structure=cfg.structure,
            damp=cfg.damp,
            block_size=cfg.block_size,
            refit=cfg.refit,
        )
    for _ in range(kernel.ndim - 2):
        one = jax.vmap(one)
    return one(kernel, gram)


# ------------------------------------------------------------------------------------------------
# The model: find the layers, calibrate them in forward order, write masks.

_MOE_ORDER = ("w_gate", "w_up", "w_in", "w_out")  # inputs before outputs


def _forward(model, batch):
    return model(batch)


def _prunable(model: nnx.Module) -> dict[str, nnx.Module]:
    """{layer path: SparseLinear, nnx.Linear or masked ExpertLinear} of the model."""
    out = {}
    for path, node in nnx.iter_graph(model):
        masked_expert = isinstance(node, ExpertLinear) and node.mask is not None
        if isinstance(node, layers.SparseLinear | nnx.Linear) or masked_expert:
            out[sp.path_str(path)] = node
    return out


def _selected(model: nnx.Module, cfg: OneShotConfig) -> dict[str, nnx.Module]:
    candidates = _prunable(model)
    kernel_paths = [f"{name}/kernel" for name in candidates]
    chosen = sp.select_paths(kernel_paths, cfg.include, cfg.exclude, where=type(model).__name__)
    return {p.removesuffix("/kernel"): candidates[p.removesuffix("/kernel")] for p in chosen}


def _stats_fn(graphdef, targets: dict[str, int], forward: Callable, trace_log: list):
    """stats(state, batch, active) -> {layer: (gram, tokens)}: the input grams of the layers
    whose index is active (the others' zeros), from one forward pass with the observer installed.
    While tracing, appends (layer, rows per call, (input, is expert hidden)) to `trace_log` in
    call order; layers that read the same traced input (q, k, v) are calibrated by one pass."""

    def stats(state, batch, active):
        model = nnx.merge(graphdef, state)
        names = {
            id(node): sp.path_str(path)
            for path, node in nnx.iter_graph(model)
            if isinstance(node, layers.SparseLinear | MoE)
        }
        out: dict = {}

        def add(name, value):
            out[name] = jax.tree.map(jnp.add, out[name], value) if name in out else value

        def observer(module, x):
            name = names.get(id(module))
            rows = math.prod(x.shape[:-1])
            if isinstance(module, layers.SparseLinear):
                if name not in targets:
                    return
                trace_log.append((name, rows, (x, False)))
                x2 = x.reshape(rows, x.shape[-1]).astype(jnp.float32)
                gram = lambda: (x2.T @ x2, jnp.int32(rows))
                zeros = lambda: (jnp.zeros((x2.shape[1],) * 2, jnp.float32), jnp.int32(0))
                add(name, jax.lax.cond(active[targets[name]], gram, zeros))
                return
            children = [c for c in _MOE_ORDER if f"{name}/{c}" in targets]
            if not children:
                return
            trace_log.extend(
                (f"{name}/{c}", rows, (x, c == "w_out")) for c in children
            )  # the expert MLP's inputs, then its hidden activations

            def grams():
                every = module.expert_input_grams(x)
                return {f"{name}/{c}": every[c] for c in children}

            shapes = jax.eval_shape(grams)
            zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            hit = jnp.any(active[jnp.array([targets[f"{name}/{c}"] for c in children])])
            for child, value in jax.lax.cond(hit, grams, zeros).items():
                add(child, value)

        with layers.observing(observer):
            forward(model, batch)
        return out

    return stats


def prune(
    model: nnx.Module,
    calibration: Sequence,
    cfg: OneShotConfig,
    *,
    forward: Callable = _forward,
) -> dict[str, dict]:
    """Prunes `model` in place by `cfg` from `calibration` (a sequence of batches, each passed as
    `forward(model, batch)`; default `model(batch)`; unused by magnitude). Returns {layer path:
    {"sparsity", "tokens", "relative_error"}} with the layer's ‖XW − XŴ‖²/‖XW‖² on its calibration
    inputs (None for magnitude). Every input is checked, and every selected layer validated
    against the structure, before any weight changes."""
    chosen = _selected(model, cfg)
    shapes = {name: tuple(node.kernel.shape) for name, node in chosen.items()}
    for name, shape in shapes.items():
        cfg.structure.validate(shape, where=f"{name}/kernel")
    calibration = list(calibration or ())
    if cfg.needs_data and not calibration:
        raise ValueError(f"oneshot: method {cfg.method!r} needs calibration batches, got none.")

    linears = [name for name, node in chosen.items() if isinstance(node, nnx.Linear)]
    if not cfg.needs_data:
        _to_sparse_linear(model, linears)
        return _prune_magnitude(model, {name: _prunable(model)[name] for name in chosen}, cfg)

    # The checks trace a converted copy: on an error the model is left as it was.
    probe = nnx.clone(model)
    _to_sparse_linear(probe, linears)
    targets = {name: i for i, name in enumerate(chosen)}
    trace_log: list = []
    graphdef, state = nnx.split(probe)
    stats = _stats_fn(graphdef, targets, forward, trace_log)
    none_active = jnp.zeros(len(targets), jnp.bool_)
    jax.eval_shape(stats, state, calibration[0], none_active)
    del probe, state
    order = list(dict.fromkeys(name for name, _, _ in trace_log))
    missing = [name for name in chosen if name not in order]
    if missing:
        raise ValueError(
            f"oneshot: {missing} are selected but never called by forward(model, batch), so they "
            f"cannot be calibrated; exclude them or pass the forward that uses them."
        )
    rows, groups, inputs = {}, [], {}
    for name, r, key in trace_log:
        rows[name] = rows.get(name, 0) + r
        inputs.setdefault(name, key)
    for name in order:  # consecutive layers reading one tensor are calibrated by one pass
        last = groups[-1][-1] if groups else None
        if last and inputs[last][0] is inputs[name][0] and inputs[last][1] == inputs[name][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    del trace_log, inputs
    for name in order:
        node, k = chosen[name], shapes[name][-2]
        tokens = rows[name] * len(calibration)
        if isinstance(node, ExpertLinear):  # expected tokens per expert under even routing
            moe = _prunable_parent(model, name)
            tokens = tokens * moe.cfg.top_k // moe.cfg.num_experts
        if cfg.method == "sparsegpt" and tokens < k:
            raise ValueError(
                f"oneshot: {name} has {k} inputs but sees {tokens} calibration tokens; the "
                f"Hessian H = XᵀX needs at least {k}: pass more or longer calibration batches."
            )

    sparsities = _layer_sparsities(shapes, cfg)
    _to_sparse_linear(model, linears)
    chosen = {name: _prunable(model)[name] for name in chosen}
    stats = jax.jit(stats)
    report = {}
    for group in groups:
        state = nnx.state(model)
        active = none_active.at[jnp.array([targets[name] for name in group])].set(True)
        totals = None
        for batch in calibration:
            out = stats(state, batch, active)
            value = {name: out[name] for name in group}
            totals = value if totals is None else jax.tree.map(jnp.add, totals, value)
        for name in group:
            report[name] = _prune_into(chosen[name], *totals[name], cfg, sparsities[name])
    return report


def _prune_into(node, gram, tokens, cfg: OneShotConfig, sparsity: float) -> dict:
    """Prunes one layer's kernel in place from its input gram; its report row."""
    kernel = node.kernel[...]
    pruned, keep = prune_layer(kernel, gram, cfg, sparsity)
    node.kernel[...] = pruned
    node.mask[...] = keep
    error = jax.vmap(reconstruction_error) if kernel.ndim == 3 else reconstruction_error
    return {
        "sparsity": float(1.0 - jnp.mean(keep)),
        "tokens": int(jnp.sum(tokens)),
        "relative_error": float(jnp.mean(error(kernel, pruned, gram))),
    }


def _to_sparse_linear(model: nnx.Module, names: list[str]) -> None:
    """The named nnx.Linear layers become SparseLinear (dense masks); validated before."""
    if names:
        layers.sparsify(model, include=tuple(f"^{re.escape(n)}$" for n in names), exclude=())


def _prunable_parent(model: nnx.Module, name: str) -> MoE:
    parent = name.rsplit("/", 1)[0]
    return {sp.path_str(p): n for p, n in nnx.iter_graph(model) if isinstance(n, MoE)}[parent]


def _layer_sparsities(shapes: dict[str, tuple], cfg: OneShotConfig) -> dict[str, float]:
    if isinstance(cfg.structure, sp.NM):
        return {name: cfg.structure.sparsity for name in shapes}
    return sp.layer_sparsities(shapes, cfg.structure.sparsity, cfg.allocation)


def _prune_magnitude(model, chosen: dict[str, nnx.Module], cfg: OneShotConfig) -> dict:
    """Magnitude scores through the library's own pruner (all allocations), at final sparsity."""
    paths = {name: (*name.split("/"), "kernel") for name in chosen}
    sparsity_cfg = sp.SparsityConfig(
        structure=cfg.structure,
        allocation=cfg.allocation,
        schedule=sp.Schedule(kind="constant"),
        include=(".*",),
        exclude=(),
    )
    kernels = {paths[name]: node.kernel[...] for name, node in chosen.items()}
    masks = pruner_lib.Pruner(
        sparsity_cfg, {p: k.shape for p, k in kernels.items()}, total_steps=1
    ).initial_masks(kernels)
    report = {}
    for name, node in chosen.items():
        keep = masks[paths[name]]
        node.kernel[...] = jnp.where(keep, node.kernel[...], 0)
        node.mask[...] = keep
        report[name] = {
            "sparsity": float(1.0 - jnp.mean(keep)),
            "tokens": 0,
            "relative_error": None,
        }
    return report
