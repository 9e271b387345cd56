"""Sparsity structures, allocation across layers, pruning schedules and `SparsityConfig`, which
combines them with a method.

A *structure* turns scores (by default |w|) into a boolean keep-mask with an exact count. Kernels
have shape `[..., K, N]` (input/reduction axis K, output axis N, like `nnx.Linear`); leading axes
(e.g. stacked experts) are independent groups for N:M and blocks. Every mask function accepts a
traced `sparsity`, so a schedule evaluated inside `jit` never recompiles the step.

Schedules are defined in fractions of total training steps: the same schedule object means the same
thing at every model size ("matched schedules").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------
# Exact-count selection.


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values (−0.0 taken as +0.0, as `==` does)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def topk_mask(scores: jax.Array, num_keep: jax.Array | int) -> jax.Array:
    """Keeps exactly `num_keep` largest entries of `scores` (any shape; num_keep may be traced).

    The threshold (the num_keep-th largest score) is found bit by bit on order-preserving integer
    keys: 32 counting passes, much cheaper than a sort on CPU. Ties at the threshold go to the
    lower flat index, so the result is deterministic.
    """
    keys = _order_keys(scores.reshape(-1))
    size = keys.size
    num_keep = jnp.clip(jnp.asarray(num_keep, jnp.int32), 0, size)

    def next_bit(i, threshold):  # the largest key t with count(keys >= t) >= num_keep
        candidate = threshold | (jnp.uint32(1 << 31) >> i.astype(jnp.uint32))
        enough = jnp.sum(keys >= candidate, dtype=jnp.int32) >= num_keep
        return jnp.where(enough, candidate, threshold)

    threshold = jax.lax.fori_loop(0, 32, next_bit, jnp.uint32(0))
    above = keys > threshold
    at = keys == threshold
    room = num_keep - jnp.sum(above, dtype=jnp.int32)
    keep = above | (at & (jnp.cumsum(at, dtype=jnp.int32) <= room))
    return (keep & (num_keep > 0)).reshape(scores.shape)


def num_removed(sparsity: jax.Array | float, size: int) -> jax.Array:
    """round(sparsity · size), half away from zero (matches Python's intent of "exact count")."""
    return jnp.floor(jnp.asarray(sparsity, jnp.float32) * size + 0.5).astype(jnp.int32)


def _check_sparsity(sparsity: float, where: str) -> None:
    if not (isinstance(sparsity, int | float) and 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"{where}: sparsity must be a fraction in [0, 1), got {sparsity!r}.")


def _check_kernel_shape(shape: Sequence[int], where: str) -> None:
    if len(shape) < 2:
        raise ValueError(
            f"{where}: expected a kernel of shape [..., K, N], got shape {tuple(shape)}."
        )


# ----------------------------------------------------------------------------------------------
# Structures.


@dataclasses.dataclass(frozen=True)
class Unstructured:
    """Remove exactly round(sparsity · n) entries of the whole tensor."""

    sparsity: float

    def __post_init__(self):
        _check_sparsity(self.sparsity, "Unstructured")

    @property
    def name(self) -> str:
        return "unstructured"

    def validate(self, shape: Sequence[int], where: str = "kernel") -> None:
        _check_kernel_shape(shape, where)

    def mask(self, scores: jax.Array, sparsity: jax.Array | float | None = None) -> jax.Array:
        sparsity = self.sparsity if sparsity is None else sparsity
        return topk_mask(scores, scores.size - num_removed(sparsity, scores.size))


@dataclasses.dataclass(frozen=True)
class NM:
    """Keep exactly n of every m consecutive weights along the input (reduction) axis K."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"NM: need integers 0 < n < m, got n={self.n!r}, m={self.m!r}.")

    @property
    def name(self) -> str:
        return "nm"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def validate(self, shape: Sequence[int], where: str = "kernel") -> None:
        _check_kernel_shape(shape, where)
        if shape[-2] % self.m:
            raise ValueError(
                f"{where}: N:M {self.n}:{self.m} needs the input dimension K={shape[-2]} "
                f"(shape {tuple(shape)}) to be divisible by m={self.m}."
            )

    def group_mask(self, scores: jax.Array) -> jax.Array:
        """Exact n:m mask: the n largest scores in each group of m along K (ties: lower index)."""
        *lead, k, n_out = scores.shape
        groups = scores.reshape(*lead, k // self.m, self.m, n_out)
        order = jnp.argsort(-groups, axis=-2, stable=True)
        rank = jnp.argsort(order, axis=-2, stable=True)
        return (rank < self.n).reshape(scores.shape)

    def mask(self, scores: jax.Array, sparsity: jax.Array | float | None = None) -> jax.Array:
        """At `sparsity` below 1 − n/m: an unstructured magnitude ramp that never removes weights of
        the current n:m pattern, so it ends exactly n:m when the schedule reaches 1 − n/m."""
        nm_keep = self.group_mask(scores)
        if sparsity is None:
            return nm_keep
        sparsity = jnp.minimum(jnp.asarray(sparsity, jnp.float32), self.sparsity)
        boosted = jnp.where(nm_keep, jnp.inf, scores.astype(jnp.float32))
        return topk_mask(boosted, scores.size - num_removed(sparsity, scores.size))


@dataclasses.dataclass(frozen=True)
class Block:
    """Keep or remove whole (bh, bw) blocks of the [K, N] kernel by block L2 norm of the scores.

    `balanced=True` keeps the same number of blocks in every block-column (the top
    Kb − round(sparsity·Kb) of each column), so a block-sparse kernel has a fixed tile budget per
    column: what the block execution path (`SparseLinear(impl="block")`) runs at full speed.
    """

    sparsity: float
    block: tuple[int, int] = (16, 16)
    balanced: bool = False

    def __post_init__(self):
        _check_sparsity(self.sparsity, "Block")
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"Block: block must be (bh, bw) positive ints, got {self.block!r}.")
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))

    @property
    def name(self) -> str:
        return "block"

    def validate(self, shape: Sequence[int], where: str = "kernel") -> None:
        _check_kernel_shape(shape, where)
        bh, bw = self.block
        if shape[-2] % bh or shape[-1] % bw:
            raise ValueError(
                f"{where}: block {self.block} does not divide the kernel shape {tuple(shape)} "
                f"(need K % {bh} == 0 and N % {bw} == 0)."
            )
        kb = shape[-2] // bh
        if self.balanced and kb - int(np.floor(self.sparsity * kb + 0.5)) < 1:
            raise ValueError(
                f"{where}: balanced block sparsity {self.sparsity} of {kb} block-rows per column "
                f"(K={shape[-2]}, bh={bh}) keeps no block; use a lower sparsity or smaller bh."
            )

    def block_scores(self, scores: jax.Array) -> jax.Array:
        *lead, k, n = scores.shape
        bh, bw = self.block
        tiles = scores.reshape(*lead, k // bh, bh, n // bw, bw).astype(jnp.float32)
        return jnp.sqrt(jnp.sum(jnp.square(tiles), axis=(-3, -1)))

    def expand(self, block_mask: jax.Array) -> jax.Array:
        bh, bw = self.block
        return jnp.repeat(jnp.repeat(block_mask, bh, axis=-2), bw, axis=-1)

    def mask(self, scores: jax.Array, sparsity: jax.Array | float | None = None) -> jax.Array:
        sparsity = self.sparsity if sparsity is None else sparsity
        blocks = self.block_scores(scores)
        if not self.balanced:
            return self.expand(topk_mask(blocks, blocks.size - num_removed(sparsity, blocks.size)))
        kb = blocks.shape[-2]
        order = jnp.argsort(-blocks, axis=-2, stable=True)  # ties: lower block-row first
        rank = jnp.argsort(order, axis=-2, stable=True)
        return self.expand(rank < kb - num_removed(sparsity, kb))


Structure = Unstructured | NM | Block


def structure_from_config(
    kind: str,
    sparsity: float = 0.0,
    n: int = 2,
    m: int = 4,
    block: Sequence[int] = (16, 16),
    balanced: bool = False,
) -> Structure | None:
    """Builds a structure from flat config values; `kind="dense"` gives None."""
    if kind == "dense":
        return None
    if kind == "unstructured":
        return Unstructured(float(sparsity))
    if kind == "nm":
        return NM(int(n), int(m))
    if kind == "block":
        return Block(float(sparsity), tuple(block), bool(balanced))
    raise ValueError(
        f"Unknown sparsity structure {kind!r}; expected 'dense', 'unstructured', 'nm' or 'block'."
    )


def random_scores(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Scores for the seeded random-mask baseline (same exact counts as the magnitude masks)."""
    return jax.random.uniform(key, shape)


# ----------------------------------------------------------------------------------------------
# Which layers are pruned, and how sparsity is allocated across them.

DEFAULT_INCLUDE = (r"(^|/)(attn|attention|mlp|ffn|moe)(/|$).*kernel$",)
DEFAULT_EXCLUDE = (r"embed", r"unembed", r"lm_head", r"norm", r"bias", r"router")


def path_str(path: Sequence) -> str:
    return "/".join(str(p) for p in path)


def is_included(path: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """A path is pruned when it matches an include pattern and no exclude pattern (re.search)."""
    return any(re.search(p, path) for p in include) and not any(re.search(p, path) for p in exclude)


def select_paths(
    paths: Sequence[str], include: Sequence[str], exclude: Sequence[str], where: str = "model"
) -> list[str]:
    selected = [p for p in paths if is_included(p, include, exclude)]
    if not selected:
        raise ValueError(
            f"{where}: no layer matches include={list(include)} minus exclude={list(exclude)}; "
            f"candidate paths were {list(paths)[:8]}{'...' if len(paths) > 8 else ''}."
        )
    return selected


def erk_densities(
    shapes: Mapping[str, Sequence[int]], sparsity: float, power: float = 1.0
) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020): density ∝ (Σ dims / Π dims)^power, scaled so
    the kept count equals (1 − sparsity)·total; layers that would exceed density 1 are made dense and
    the rest re-scaled."""
    _check_sparsity(sparsity, "ERK allocation")
    sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
    raw = {p: (sum(s) / np.prod(s)) ** power for p, s in shapes.items()}
    budget = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [p for p in shapes if p not in dense]
        remaining = budget - sum(sizes[p] for p in dense)
        eps = remaining / sum(raw[p] * sizes[p] for p in free)
        over = [p for p in free if eps * raw[p] > 1.0]
        if not over:
            break
        dense.update(over)
    return {p: 1.0 if p in dense else float(eps * raw[p]) for p in shapes}


def layer_sparsities(
    shapes: Mapping[str, Sequence[int]], sparsity: float, allocation: str
) -> dict[str, float]:
    """Final per-layer sparsity for `uniform` and `erk`; `global` shares one threshold (see
    `global_masks`) and reports the overall target for every layer."""
    if allocation in ("uniform", "global"):
        return {p: float(sparsity) for p in shapes}
    if allocation == "erk":
        return {p: 1.0 - d for p, d in erk_densities(shapes, sparsity).items()}
    raise ValueError(f"Unknown allocation {allocation!r}; expected 'uniform', 'erk' or 'global'.")


def global_masks(scores: Mapping[str, jax.Array], sparsity: jax.Array | float) -> dict:
    """One magnitude threshold across all layers: exactly round(sparsity · Σ n) entries removed."""
    names = list(scores)
    flat = jnp.concatenate([scores[p].reshape(-1).astype(jnp.float32) for p in names])
    keep = topk_mask(flat, flat.size - num_removed(sparsity, flat.size))
    out, offset = {}, 0
    for p in names:
        size = scores[p].size
        out[p] = keep[offset : offset + size].reshape(scores[p].shape)
        offset += size
    return out


# ----------------------------------------------------------------------------------------------
# Schedules, in fractions of training.


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When masks change. `kind`:

    - "constant": sparse from initialisation (final sparsity at step 0, masks fixed).
    - "one_shot": dense until `start`·T, then final sparsity.
    - "gradual": Zhu & Gupta polynomial s_t = s_f + (s_i − s_f)(1 − p)^power with
      p = (t − start·T)/((end − start)·T) clipped to [0, 1], s_i = 0, updated every
      `interval(T)` steps (and exactly at start·T and end·T).
    - "dynamic": sparse from init; SET/RigL drop-and-grow every `interval(T)` steps in
      [start·T, end·T) with update fraction `drop_fraction`·(1 + cos(π p))/2.

    The update interval is `every` steps, or, when `updates` is set, (end − start)·T / `updates`
    rounded (at least 1): then every run length T gets the same number of updates at the same
    fractions of training, and `every` is ignored.
    """

    kind: str = "gradual"
    start: float = 0.25
    end: float = 0.75
    every: int = 10
    power: float = 3.0
    drop_fraction: float = 0.3
    updates: int | None = None  # intervals over [start·T, end·T]; set: replaces `every`

    def __post_init__(self):
        if self.kind not in ("constant", "one_shot", "gradual", "dynamic"):
            raise ValueError(
                f"Schedule.kind must be 'constant', 'one_shot', 'gradual' or 'dynamic', "
                f"got {self.kind!r}."
            )
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(
                f"Schedule needs 0 <= start <= end <= 1 (fractions of training), got "
                f"start={self.start}, end={self.end}."
            )
        if self.every < 1:
            raise ValueError(f"Schedule.every must be >= 1 step, got {self.every}.")
        if self.updates is not None and not (
            isinstance(self.updates, int)
            and not isinstance(self.updates, bool)
            and self.updates >= 1
        ):
            raise ValueError(
                f"Schedule.updates must be None (update every `every` steps) or an int >= 1 "
                f"(that many update intervals over [start·T, end·T]; `every` is then ignored), "
                f"got {self.updates!r}."
            )
        if self.power <= 0:
            raise ValueError(f"Schedule.power must be > 0, got {self.power}.")

    def steps(self, total_steps: int) -> tuple[int, int]:
        return int(round(self.start * total_steps)), int(round(self.end * total_steps))

    def interval(self, total_steps: int) -> int:
        """Steps between mask updates: `every`, or max(1, round((t1 − t0) / updates))."""
        if self.updates is None:
            return self.every
        t0, t1 = self.steps(total_steps)
        return max(1, int(round((t1 - t0) / self.updates)))

    def progress(self, step: jax.Array, total_steps: int) -> jax.Array:
        """Fraction g(t) ∈ [0, 1] of the final sparsity in force after an update at `step`."""
        step = jnp.asarray(step, jnp.float32)
        t0, t1 = self.steps(total_steps)
        if self.kind in ("constant", "dynamic"):
            return jnp.ones((), jnp.float32)
        if self.kind == "one_shot":
            return (step >= t0).astype(jnp.float32)
        p = jnp.clip((step - t0) / max(t1 - t0, 1), 0.0, 1.0)
        return 1.0 - (1.0 - p) ** self.power

    def is_update(self, step: jax.Array, total_steps: int) -> jax.Array:
        """Whether masks are recomputed at `step` (traced bool)."""
        step = jnp.asarray(step, jnp.int32)
        t0, t1 = self.steps(total_steps)
        if self.kind == "constant":
            return step == 0
        if self.kind == "one_shot":
            return step == t0
        on_grid = (step >= t0) & (step <= t1) & ((step - t0) % self.interval(total_steps) == 0)
        if self.kind == "dynamic":
            return on_grid & (step < t1) & (step > 0)
        return on_grid | (step == t1)

    def drop_fraction_at(self, step: jax.Array, total_steps: int) -> jax.Array:
        """Cosine-decayed SET/RigL update fraction."""
        t0, t1 = self.steps(total_steps)
        p = jnp.clip((jnp.asarray(step, jnp.float32) - t0) / max(t1 - t0, 1), 0.0, 1.0)
        return self.drop_fraction * 0.5 * (1.0 + jnp.cos(jnp.pi * p))

    def num_updates(self, total_steps: int) -> int:
        return int(jnp.sum(self.is_update(jnp.arange(total_steps), total_steps)))


# ----------------------------------------------------------------------------------------------
# Dynamic sparse training (SET / RigL) for one layer.


def drop_and_grow(
    mask: jax.Array,
    weights: jax.Array,
    grow_scores: jax.Array,
    fraction: jax.Array,
) -> jax.Array:
    """Drops the `fraction` of kept weights with the smallest |w| and grows as many connections with
    the largest `grow_scores` among the rest (SET: random scores; RigL: |dense gradient|).

    The kept count is unchanged exactly. Growth may re-select a just-dropped connection; its value is
    reset to zero by the caller either way.
    """
    num_kept = jnp.sum(mask, dtype=jnp.int32)
    num_swap = jnp.floor(fraction * num_kept.astype(jnp.float32)).astype(jnp.int32)
    survive_scores = jnp.where(mask, jnp.abs(weights).astype(jnp.float32), -jnp.inf)
    survivors = topk_mask(survive_scores, num_kept - num_swap)
    grow_scores = jnp.where(survivors, -jnp.inf, grow_scores.astype(jnp.float32))
    grown = topk_mask(grow_scores, num_swap)
    return survivors | grown


def srste_decay(kernel: jax.Array, mask: jax.Array, strength: float) -> jax.Array:
    """SR-STE (Zhou et al. 2021) sparse-refined term added to the dense-weight gradient:
    λ · (1 − mask) ⊙ w, pulling pruned weights towards zero so the N:M pattern settles."""
    return strength * jnp.where(mask, 0.0, kernel)


def target_sparsity(structure: Structure | None) -> float:
    return 0.0 if structure is None else float(structure.sparsity)


# ----------------------------------------------------------------------------------------------
# The sparsity config: structure, allocation, schedule and method together.

METHODS = ("magnitude", "random", "set", "rigl", "srste")
IMPLS = ("masked", "block")  # `SparseLinear` impls the trainer runs pruned layers with


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How a model is sparsified over training.

    method: "magnitude" (prune by |w|), "random" (seeded random scores: static random sparsity
    with a constant schedule), "set" / "rigl" (dynamic sparse training; schedule kind "dynamic"),
    "srste" (N:M with sparse-refined straight-through estimator; dense weights keep training).

    impl (`IMPLS`, a subset of the layers' vocabulary `layers.IMPLS`): how pruned layers execute.
    "masked": dense matmul of kernel ⊙ mask throughout. "block" (block structures): the trainer
    switches them to the block-sparse path once every pruned layer is at most `switch_density`
    dense (None: the break-even density measured for the block size by benchmarks/block_sparse.py),
    and again at the final sparsity (two recompiles at most). Same results as "masked" up to float
    rounding; balanced blocks (`Block(balanced=True)`) give the tightest tile budget and so the
    most speed.
    """

    structure: Structure | None = None
    allocation: str = "uniform"
    schedule: Schedule = Schedule()
    method: str = "magnitude"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    srste_decay: float = 2e-4
    seed: int = 0
    impl: str = "masked"
    switch_density: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown pruning method {self.method!r}; expected one of {METHODS}.")
        if self.method in ("set", "rigl"):
            if not isinstance(self.structure, Unstructured):
                raise ValueError(f"{self.method} needs an unstructured structure.")
            if self.schedule.kind != "dynamic":
                raise ValueError(f"{self.method} needs schedule kind 'dynamic'.")
        if self.method == "srste" and not isinstance(self.structure, NM):
            raise ValueError("srste needs an N:M structure.")
        if self.allocation == "global" and isinstance(self.structure, NM):
            raise ValueError("N:M sparsity is per group; use allocation 'uniform' with N:M.")
        if self.impl not in IMPLS:
            raise ValueError(f"Unknown sparsity impl {self.impl!r}; expected one of {IMPLS}.")
        if self.impl == "block" and not isinstance(self.structure, Block):
            raise ValueError(f"impl 'block' needs a block structure, got {self.structure}.")
        if self.switch_density is not None and not 0.0 < self.switch_density <= 1.0:
            raise ValueError(f"switch_density must be in (0, 1], got {self.switch_density}.")
        balanced = isinstance(self.structure, Block) and self.structure.balanced
        if balanced and self.allocation == "global":
            raise ValueError(
                "balanced blocks are per block-column; use allocation 'uniform'/'erk'."
            )
        if self.allocation not in ("uniform", "erk", "global"):
            raise ValueError(
                f"Unknown allocation {self.allocation!r}; expected 'uniform', 'erk' or 'global'."
            )

    @property
    def dense_grad(self) -> bool:
        """Whether layers must expose the dense gradient (straight-through) to the pruner."""
        return self.method in ("rigl", "srste")

    @property
    def keeps_pruned_zero(self) -> bool:
        return self.method != "srste"
