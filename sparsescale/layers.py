"""Sparse NNX layers: `SparseLinear`, its `Mask` variable, and `sparsify()` for users' own models."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from sparsescale import sparsity as sp

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class Mask(nnx.Variable):
    """Boolean keep-mask of a sparse kernel (True = kept). Not an `nnx.Param`: no gradients, no
    optimizer state. Created with the kernel's logical axis names (`out_sharding=`) so it shards
    like its kernel."""


def masked_kernel(kernel: jax.Array, mask: jax.Array, dense_grad: bool = False) -> jax.Array:
    """kernel ⊙ mask. With `dense_grad` the value is the same but the gradient w.r.t. the kernel is
    the dense gradient (straight-through), which RigL growth and SR-STE need."""
    if dense_grad:
        return kernel - jax.lax.stop_gradient(jnp.where(mask, jnp.zeros_like(kernel), kernel))
    return jnp.where(mask, kernel, jnp.zeros_like(kernel))


IMPLS = ("masked", "pallas_nm", "pallas_block", "xla_block", "auto")


class SparseLinear(nnx.Module):
    """Drop-in for `nnx.Linear` whose kernel [in, out] is multiplied by a boolean `Mask`.

    y = x @ (kernel ⊙ mask) + bias. The mask starts all-ones (dense); pruning code writes it.
    `kernel_axes` are the kernel's logical axis names; the mask gets the same ones.

    `impl` picks how the product runs: "masked" (dense XLA matmul of kernel ⊙ mask), "pallas_nm"
    (compressed N:M kernel; needs an `NM` structure), "pallas_block" / "xla_block" (block-sparse
    Pallas kernel / gathered XLA path; need a `Block` structure), or "auto" (per backend: masked on
    CPU, the structure's Pallas kernel on TPU/GPU). The compressed impls pack kernel and mask on
    every call (differentiable), so training with a fixed mask runs through the kernel; a tile
    configuration that cannot compile is rejected here, at construction.

    `block_budget` (block impls): tiles kept per block-column, which fixes the packed shapes, so
    the mask may change under jit without recompiling as long as no block-column keeps more
    (None: all Kb tiles, no saving). The work is ∝ budget / Kb; see `use_block_path`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        kernel_axes: Sequence[str | None] | None = None,
        dense_grad: bool = False,
        impl: str = "masked",
        structure: sp.Structure | None = None,
        rows_hint: int = 1024,
        block_budget: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.precision, self.dense_grad = dtype, precision, dense_grad
        self.rows_hint = rows_hint
        self.set_impl(impl, structure, block_budget, param_dtype)
        axes = {} if kernel_axes is None else {"out_sharding": tuple(kernel_axes)}
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        self.kernel = nnx.Param(kernel, **axes)
        self.mask = Mask(jnp.ones((in_features, out_features), jnp.bool_), **axes)
        bias_axes = {} if kernel_axes is None else {"out_sharding": (tuple(kernel_axes)[-1],)}
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **bias_axes)
            if use_bias
            else None
        )

    def set_impl(
        self,
        impl: str,
        structure: sp.Structure | None = None,
        block_budget: int | None = None,
        param_dtype=jnp.float32,
    ) -> None:
        """Switches how the product runs (validated as at construction; weights untouched)."""
        shape = (self.in_features, self.out_features)
        self.impl, self.structure = _resolve_impl(
            impl, structure, shape, self.dtype or param_dtype, self.rows_hint
        )
        if block_budget is not None:
            is_block = self.impl in ("xla_block", "pallas_block")
            kb = shape[0] // self.structure.block[0] if is_block else 0
            if not 1 <= block_budget <= kb:
                raise ValueError(
                    f"SparseLinear: block_budget={block_budget} needs a block impl and must be "
                    f"in [1, {kb}] (block-rows of the kernel), got impl={self.impl!r}."
                )
        self.block_budget = block_budget

    def effective_kernel(self) -> jax.Array:
        return masked_kernel(self.kernel[...], self.mask[...], self.dense_grad)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        if self.impl == "masked":
            kernel = self.effective_kernel()
            x, kernel, bias = nnx_dtypes.promote_dtype((x, kernel, bias), dtype=self.dtype)
            y = jnp.dot(x, kernel, precision=self.precision)
        else:
            x, kernel, bias = nnx_dtypes.promote_dtype(
                (x, self.kernel[...], bias), dtype=self.dtype
            )
            y = _compressed_matmul(
                self.impl, self.structure, x, kernel, self.mask[...], self.block_budget
            )
        return y if bias is None else y + bias

    def to_dense(self) -> jax.Array:
        """The effective dense kernel [in, out] (pruned entries are zero)."""
        return jnp.where(self.mask[...], self.kernel[...], 0)

    def to_nm(self, n: int, m: int):
        """Compressed N:M view (kept values + packed indices; `kernels.unpack_nm` round-trips to
        `to_dense()` exactly). The mask must be n:m along the input axis."""
        from sparsescale import kernels

        return kernels.pack_nm(self.kernel[...], self.mask[...], n, m)

    def to_block(self, block: tuple[int, int]):
        """Compressed block view (BCSR-like tiles + block indices; exact round trip)."""
        from sparsescale import kernels

        return kernels.pack_block(self.kernel[...], self.mask[...], tuple(block))

    def density(self) -> jax.Array:
        return jnp.mean(self.mask[...].astype(jnp.float32))


def _resolve_impl(impl, structure, shape, dtype, rows_hint):
    from sparsescale import kernels

    if impl not in IMPLS:
        raise ValueError(f"SparseLinear: impl must be one of {IMPLS}, got {impl!r}.")
    if impl == "auto":
        impl = kernels.auto_impl(structure.name if structure is not None else "dense")
    if impl == "masked":
        return impl, structure
    backend = jax.default_backend()
    interpret = backend == "cpu"
    dtype = jnp.dtype(dtype)
    if impl == "pallas_nm":
        if not isinstance(structure, sp.NM):
            raise ValueError(
                f"SparseLinear impl='pallas_nm' needs an NM structure, got {structure}."
            )
        structure.validate(shape, "SparseLinear kernel")
        tiles = kernels.tiles.pick_nm_tiles(
            shape, rows_hint, dtype, backend, interpret, structure.n, structure.m
        )
        if not interpret:
            kernels.check_config("nm", shape, dtype, tiles, backend, n=structure.n, m=structure.m)
        return impl, structure
    if not isinstance(structure, sp.Block):
        raise ValueError(f"SparseLinear impl={impl!r} needs a Block structure, got {structure}.")
    structure.validate(shape, "SparseLinear kernel")
    if impl == "pallas_block":
        tiles = kernels.tiles.pick_block_tiles(
            shape, rows_hint, dtype, backend, interpret, structure.block
        )
        if not interpret:
            kernels.check_config("block", shape, dtype, tiles, backend, block=structure.block)
    return impl, structure


def _compressed_matmul(impl, structure, x, kernel_KxN, mask_KxN, block_budget=None):
    from sparsescale import kernels
    from sparsescale.kernels import xla_block

    lead, k = x.shape[:-1], x.shape[-1]
    x_MxK = x.reshape(-1, k)
    if impl == "pallas_nm":
        y = kernels.nm_matmul(
            x_MxK, kernels.pack_nm(kernel_KxN, mask_KxN, structure.n, structure.m)
        )
    elif impl == "xla_block":
        budget = block_budget or k // structure.block[0]
        values, rows, counts = xla_block.pack_columns(kernel_KxN, mask_KxN, structure.block, budget)
        y = xla_block.block_columns_matmul(x_MxK, values, rows, counts)
    else:  # pallas_block; the row budget (transposed tables for dX) stays worst-case
        bh, bw = structure.block
        budget = block_budget or k // bh
        packed = kernels.pack_block(
            kernel_KxN, mask_KxN, structure.block, budget, kernel_KxN.shape[1] // bw
        )
        y = kernels.block_matmul(x_MxK, packed)
    return y.reshape(*lead, -1)


def _parent_and_key(model: nnx.Module, path: tuple):
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    return parent, path[-1]


def sparsify(
    model: nnx.Module,
    structure: sp.Structure | None = None,
    *,
    include: Sequence[str] = (r".*",),
    exclude: Sequence[str] = sp.DEFAULT_EXCLUDE,
    dense_grad: bool = False,
) -> list[str]:
    """Replaces, in place, every `nnx.Linear` of `model` whose path matches `include` and no
    `exclude` pattern by a `SparseLinear` holding the same weights. With a `structure`, the masks
    are set by weight magnitude and pruned weights zeroed (one-shot pruning).

    Returns the converted paths ("a/b/0/c"). Raises if nothing matches.
    """
    linears = {
        sp.path_str(path): (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }
    selected = sp.select_paths(list(linears), include, exclude, where=type(model).__name__)
    for name in selected:
        path, linear = linears[name]
        kernel = linear.kernel
        if structure is not None:
            structure.validate(kernel.shape, where=name)
        axes = kernel.get_metadata().get("out_sharding")
        layer = SparseLinear(
            linear.in_features,
            linear.out_features,
            use_bias=linear.bias is not None,
            dtype=linear.dtype,
            param_dtype=kernel[...].dtype,
            precision=linear.precision,
            kernel_axes=axes,
            dense_grad=dense_grad,
            rngs=nnx.Rngs(0),
        )
        layer.kernel[...] = kernel[...]
        if linear.bias is not None:
            layer.bias[...] = linear.bias[...]
        if structure is not None:
            keep = structure.mask(jnp.abs(kernel[...]))
            layer.mask[...] = keep
            layer.kernel[...] = jnp.where(keep, kernel[...], 0)
        parent, key = _parent_and_key(model, path)
        if isinstance(key, int):
            parent[key] = layer
        else:
            setattr(parent, key, layer)
    return selected


def use_block_path(model: nnx.Module, budgets: dict[str, int], structure: sp.Block) -> None:
    """Runs the named SparseLinear layers ({layer path: tiles per block-column}) through the
    block-sparse path of this backend: gathered XLA on CPU, the Pallas kernel on TPU/GPU. The
    masks must keep no more than the budget in any block-column while this holds."""
    impl = "xla_block" if jax.default_backend() == "cpu" else "pallas_block"
    layers = sparse_layers(model)
    for name, budget in budgets.items():
        if name not in layers:
            raise ValueError(
                f"block-sparse execution runs SparseLinear layers only; {name!r} is not one "
                f"(e.g. stacked MoE experts: use sparsity.impl='masked' or exclude it)."
            )
        layers[name].set_impl(impl, structure, int(budget))


def sparse_layers(model: nnx.Module) -> dict[str, SparseLinear]:
    """All SparseLinear modules of a model by path string."""
    return {
        sp.path_str(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, SparseLinear)
    }
