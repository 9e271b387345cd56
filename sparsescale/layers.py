"""Sparse NNX layers: `SparseLinear`, its `Mask` variable, and `sparsify()` for users' own models."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from sparsescale import sparsity as sp

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


def lazy_sharding(init):
    """Decorates a module's `__init__` so the variables it creates carry their logical axis names
    (`out_sharding=` metadata) without being sharded on creation, whatever the global
    `flax_always_shard_variable` is: shardings are applied by jit in/out shardings (sharding.py),
    so models can be built outside a mesh context. Changes no global state."""

    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        with nnx.use_eager_sharding(False):
            return init(*args, **kwargs)

    return wrapped


# Calibration (`sparsescale.oneshot`) sees what each layer is called with, at trace time: layers
# call `observe(self, x)` first. Nothing is observed, and nothing is added to a step, unless a
# caller installs an observer with `observing`.
_INPUT_OBSERVER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "sparsescale_input_observer", default=None
)


@contextlib.contextmanager
def observing(observer: Callable[[nnx.Module, jax.Array], None]) -> Iterator[None]:
    """Within the block, every `SparseLinear` (and `moe.MoE`) call runs `observer(module, x)`
    on its input first (under jit: at trace time, on the traced input)."""
    token = _INPUT_OBSERVER.set(observer)
    try:
        yield
    finally:
        _INPUT_OBSERVER.reset(token)


def observe(module: nnx.Module, x: jax.Array) -> None:
    observer = _INPUT_OBSERVER.get()
    if observer is not None:
        observer(module, x)


class Mask(nnx.Variable):
    """Boolean keep-mask of a sparse kernel (True = kept). Not an `nnx.Param`: no gradients, no
    optimizer state. Created with the kernel's logical axis names (`out_sharding=`) so it shards
    like its kernel; not sharded on creation unless `eager_sharding=True` is passed (see
    `lazy_sharding`), so masks can be built outside a mesh context."""

    def __init__(self, value, *, eager_sharding: bool | None = None, **metadata):
        given = isinstance(value, nnx.VariableMetadata) and "eager_sharding" in value.metadata
        if eager_sharding is None and not given:
            eager_sharding = False
        super().__init__(value, eager_sharding=eager_sharding, **metadata)


def masked_kernel(kernel: jax.Array, mask: jax.Array, dense_grad: bool = False) -> jax.Array:
    """kernel ⊙ mask. With `dense_grad` the value is the same but the gradient w.r.t. the kernel is
    the dense gradient (straight-through), which RigL growth and SR-STE need."""
    if dense_grad:
        return kernel - jax.lax.stop_gradient(jnp.where(mask, jnp.zeros_like(kernel), kernel))
    return jnp.where(mask, kernel, jnp.zeros_like(kernel))


# The one vocabulary for how a sparse product runs (`SparseLinear(impl=)`, and, for the subset
# "masked" | "block", `SparsityConfig.impl` and the trainer's block phases):
#   "masked": x @ (kernel ⊙ mask), a dense XLA matmul (any structure; costs dense at any sparsity).
#   "nm":     compressed N:M product (needs an `NM` structure; Pallas).
#   "block":  block-sparse product over the kept tiles (needs a `sparsity.Block` structure).
#   "auto":   per backend (`kernels.auto_impl`): "masked" on CPU, the structure's kernel elsewhere.
# `lowering` picks the code that runs a compressed impl: "xla" (block only: gathered XLA,
# `kernels.xla_block`) or "pallas" (the Pallas kernel); None: "xla" on CPU, "pallas" elsewhere.
IMPLS = ("masked", "nm", "block", "auto")
LOWERINGS = ("xla", "pallas")
# Earlier spellings, accepted with a DeprecationWarning: (impl, lowering).
_OLD_IMPLS = {
    "pallas_nm": ("nm", "pallas"),
    "pallas_block": ("block", "pallas"),
    "xla_block": ("block", "xla"),
}


class SparseLinear(nnx.Module):
    """Drop-in for `nnx.Linear` whose kernel [in, out] is multiplied by a boolean `Mask`.

    y = x @ (kernel ⊙ mask) + bias. The mask starts all-ones (dense); pruning code writes it.
    `kernel_axes` are the kernel's logical axis names; the mask gets the same ones.

    `impl` picks how the product runs (`IMPLS`, see the vocabulary above): "masked" (dense XLA
    matmul of kernel ⊙ mask), "nm" (compressed N:M; needs an `NM` structure), "block"
    (block-sparse; needs a `sparsity.Block` structure) or "auto"; `lowering` ("xla" | "pallas" |
    None = per backend) picks the code of "nm" / "block". The compressed impls pack kernel and mask
    on every call (differentiable), so training with a fixed mask runs through the kernel; a tile
    configuration that cannot compile is rejected here, at construction.

    `block_budget` (block impls): tiles kept per block-column, which fixes the packed shapes, so
    the mask may change under jit without recompiling as long as no block-column keeps more
    (None: all Kb tiles, no saving). The work is ∝ budget / Kb; see `use_block_path`.
    """

    @lazy_sharding
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
        lowering: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.precision, self.dense_grad = dtype, precision, dense_grad
        self.rows_hint = rows_hint
        self.set_impl(impl, structure, block_budget, param_dtype, lowering)
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
        lowering: str | None = None,
    ) -> None:
        """Switches how the product runs (validated as at construction; weights untouched)."""
        shape = (self.in_features, self.out_features)
        self.impl, self.lowering, self.structure = _resolve_impl(
            impl, lowering, structure, shape, self.dtype or param_dtype, self.rows_hint
        )
        if block_budget is not None:
            is_block = self.impl == "block"
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
        observe(self, x)
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
                self.impl, self.lowering, self.structure, x, kernel, self.mask[...],
                self.block_budget,
            )  # fmt: skip
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


def _resolve_impl(impl, lowering, structure, shape, dtype, rows_hint):
    """(impl, lowering, structure) after validation; lowering is None for "masked"."""
    from sparsescale import kernels

    if impl in _OLD_IMPLS:
        new, new_lowering = _OLD_IMPLS[impl]
        warnings.warn(
            f"SparseLinear impl={impl!r} is now impl={new!r}, lowering={new_lowering!r}.",
            DeprecationWarning,
            stacklevel=4,
        )
        impl, lowering = new, lowering or new_lowering
    if impl not in IMPLS:
        raise ValueError(f"SparseLinear: impl must be one of {IMPLS}, got {impl!r}.")
    if lowering not in (None, *LOWERINGS):
        raise ValueError(
            f"SparseLinear: lowering must be one of {LOWERINGS} or None, got {lowering!r}."
        )
    if impl == "auto":
        impl = kernels.auto_impl(structure.name if structure is not None else "dense")
    if impl == "masked":
        return impl, None, structure
    backend = jax.default_backend()
    interpret = backend == "cpu"
    dtype = jnp.dtype(dtype)
    if impl == "nm":
        if not isinstance(structure, sp.NM):
            raise ValueError(f"SparseLinear impl='nm' needs an NM structure, got {structure}.")
        if lowering == "xla":
            raise ValueError(
                "SparseLinear impl='nm' has a Pallas lowering only (lowering='pallas')."
            )
        structure.validate(shape, "SparseLinear kernel")
        tiles = kernels.tiles.pick_nm_tiles(
            shape, rows_hint, dtype, backend, interpret, structure.n, structure.m
        )
        if not interpret:
            kernels.check_config("nm", shape, dtype, tiles, backend, n=structure.n, m=structure.m)
        return impl, "pallas", structure
    if not isinstance(structure, sp.Block):
        raise ValueError(f"SparseLinear impl={impl!r} needs a Block structure, got {structure}.")
    structure.validate(shape, "SparseLinear kernel")
    lowering = lowering or ("xla" if backend == "cpu" else "pallas")
    if lowering == "pallas":
        tiles = kernels.tiles.pick_block_tiles(
            shape, rows_hint, dtype, backend, interpret, structure.block
        )
        if not interpret:
            kernels.check_config("block", shape, dtype, tiles, backend, block=structure.block)
    return impl, lowering, structure


def _compressed_matmul(impl, lowering, structure, x, kernel_KxN, mask_KxN, block_budget=None):
    from sparsescale import kernels
    from sparsescale.kernels import xla_block

    lead, k = x.shape[:-1], x.shape[-1]
    x_MxK = x.reshape(-1, k)
    if impl == "nm":
        y = kernels.nm_matmul(
            x_MxK, kernels.pack_nm(kernel_KxN, mask_KxN, structure.n, structure.m)
        )
    elif lowering == "xla":  # block
        budget = block_budget or k // structure.block[0]
        values, rows, counts = xla_block.pack_columns(kernel_KxN, mask_KxN, structure.block, budget)
        y = xla_block.block_columns_matmul(x_MxK, values, rows, counts)
    else:  # block, Pallas; the row budget (transposed tables for dX) stays worst-case
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
    are set by weight magnitude and pruned weights zeroed (one-shot pruning); without one the masks
    start all-ones (dense), ready for gradual pruning (`masking.make_pruner`).

    All or nothing: every selected layer is validated against `structure` (and converted) before
    any is replaced, so on an error (which names the layer) the model is left unchanged.
    Returns the converted paths ("a/b/0/c"). Raises if nothing matches.
    """
    linears = {
        sp.path_str(path): (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }
    selected = sp.select_paths(list(linears), include, exclude, where=type(model).__name__)
    if structure is not None:  # validate every layer before converting any (all or nothing)
        for name in selected:
            structure.validate(linears[name][1].kernel.shape, where=name)
    converted = {}
    for name in selected:
        path, linear = linears[name]
        kernel = linear.kernel
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
        converted[name] = layer
    for name, layer in converted.items():  # nothing below can fail: swap the layers in
        parent, key = _parent_and_key(model, linears[name][0])
        if isinstance(key, int):
            parent[key] = layer
        else:
            setattr(parent, key, layer)
    return selected


def use_block_path(model: nnx.Module, budgets: dict[str, int], structure: sp.Block) -> None:
    """Runs the named SparseLinear layers ({layer path: tiles per block-column}) through the
    block-sparse path of this backend: gathered XLA on CPU, the Pallas kernel on TPU/GPU. The
    masks must keep no more than the budget in any block-column while this holds."""
    layers = sparse_layers(model)
    for name, budget in budgets.items():
        if name not in layers:
            raise ValueError(
                f"block-sparse execution runs SparseLinear layers only; {name!r} is not one "
                f"(e.g. stacked MoE experts: use sparsity.impl='masked' or exclude it)."
            )
        layers[name].set_impl("block", structure, int(budget))


def sparse_layers(model: nnx.Module) -> dict[str, SparseLinear]:
    """All SparseLinear modules of a model by path string."""
    return {
        sp.path_str(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, SparseLinear)
    }
