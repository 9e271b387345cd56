"""Pallas block-sparse × dense matmul: one tile body per product, thin TPU and Triton wrappers.

Format (formats.BlockPacked): per block-column j, `counts[j]` kept (bh, bw) tiles at block-rows
`rows[j, :]`; the transpose tables drive dX. Absent tiles are never loaded or multiplied.

TPU: the block tables are scalar-prefetched into SMEM and feed the BlockSpec index maps, so the
pipeline DMAs only kept tiles; padding steps (b ≥ count) repeat the previous block index (no new
DMA) and skip the matmul. Triton: one program per output tile loops over its kept tiles only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class BlockKernelSpec:
    tm: int
    bh: int
    bw: int
    backend: str  # "tpu" | "gpu"


def fwd_tile(x, w):
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def dx_tile(dy, w):
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(dy, w.astype(dy.dtype), dims, preferred_element_type=jnp.float32)


def dw_tile(x, dy):
    dims = (((0,), (0,)), ((), ()))
    return jax.lax.dot_general(x, dy, dims, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- TPU wrappers


def _accumulate(acc_ref, o_ref, step_axis: int, active, compute):
    step = pl.program_id(step_axis)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _():
        acc_ref[...] += compute()

    @pl.when(step == pl.num_programs(step_axis) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _fwd_tpu(rows_ref, counts_ref, x_ref, v_ref, o_ref, acc_ref):
    j, b = pl.program_id(1), pl.program_id(2)
    _accumulate(acc_ref, o_ref, 2, b < counts_ref[j], lambda: fwd_tile(x_ref[...], v_ref[...]))


def _dx_tpu(rows_t_ref, slots_t_ref, counts_t_ref, dy_ref, v_ref, o_ref, acc_ref):
    kb, t = pl.program_id(1), pl.program_id(2)
    active = t < counts_t_ref[kb]
    _accumulate(acc_ref, o_ref, 2, active, lambda: dx_tile(dy_ref[...], v_ref[...]))


def _dw_tpu(rows_ref, counts_ref, x_ref, dy_ref, o_ref, acc_ref):
    j, b = pl.program_id(0), pl.program_id(1)
    active = b < counts_ref[j]
    _accumulate(acc_ref, o_ref, 2, active, lambda: dw_tile(x_ref[...], dy_ref[...]))


def _tpu_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _clamp_slot(b, count):
    """Padding steps re-use the last real slot so the pipeline skips the DMA."""
    return jnp.minimum(b, jnp.maximum(count - 1, 0))


# ----------------------------------------------------------------------------- Triton wrappers


def _dynamic_loop(trips, body, init):
    """fori_loop over a traced trip count, as a while loop (Triton's scf.for wants bounds of one
    type, which a count loaded from memory does not give)."""

    def step(carry):
        i, n, acc = carry
        return i + 1, n, body(i, acc)

    # The trip count rides in the carry: Triton's while lowering mis-types closed-over values.
    init = (jnp.int32(0), jnp.asarray(trips, jnp.int32), init)
    return jax.lax.while_loop(lambda c: c[0] < c[1], step, init)[2]


def _fwd_gpu(rows_ref, counts_ref, x_ref, v_ref, o_ref, *, spec):
    j = pl.program_id(1)

    def body(b, acc):
        row = rows_ref[j, b]
        x = x_ref[:, pl.ds(pl.multiple_of(row * spec.bh, spec.bh), spec.bh)]
        return acc + fwd_tile(x, v_ref[b])

    acc = _dynamic_loop(counts_ref[j], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dx_gpu(rows_t_ref, slots_t_ref, counts_t_ref, dy_ref, v_ref, o_ref, *, spec):
    kb = pl.program_id(1)

    def body(t, acc):
        col, slot = rows_t_ref[kb, t], slots_t_ref[kb, t]
        dy = dy_ref[:, pl.ds(pl.multiple_of(col * spec.bw, spec.bw), spec.bw)]
        return acc + dx_tile(dy, v_ref[col, slot])

    acc = _dynamic_loop(counts_t_ref[kb], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dw_gpu(rows_ref, counts_ref, x_ref, dy_ref, o_ref, *, spec, steps):
    j, b = pl.program_id(0), pl.program_id(1)
    row = rows_ref[j, b]
    x_cols = pl.ds(pl.multiple_of(row * spec.bh, spec.bh), spec.bh)
    dy_cols = pl.ds(pl.multiple_of(j * spec.bw, spec.bw), spec.bw)

    def body(i, acc):
        r = pl.ds(pl.multiple_of(i * spec.tm, spec.tm), spec.tm)
        return acc + dw_tile(x_ref[r, x_cols], dy_ref[r, dy_cols])

    active = b < counts_ref[j]

    @pl.when(active)
    def _():
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(jnp.logical_not(active))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


_GPU_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- launches


def block_fwd(x_MxK, values, rows, counts, spec: BlockKernelSpec, interpret):
    """y [M, N]; M must be a multiple of spec.tm."""
    mrows, k = x_MxK.shape
    nb, budget, bh, bw = values.shape
    out = jax.ShapeDtypeStruct((mrows, nb * bw), x_MxK.dtype)
    if spec.backend == "tpu":
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(mrows // spec.tm, nb, budget),
            in_specs=[
                pl.BlockSpec((spec.tm, bh), lambda i, j, b, rows, cnt: (i, rows[j * budget + b])),
                pl.BlockSpec(
                    (None, None, bh, bw),
                    lambda i, j, b, rows, cnt: (j, _clamp_slot(b, cnt[j]), 0, 0),
                ),
            ],
            out_specs=pl.BlockSpec((spec.tm, bw), lambda i, j, b, rows, cnt: (i, j)),
            scratch_shapes=[pltpu.VMEM((spec.tm, bw), jnp.float32)],
        )
        return pl.pallas_call(
            _fwd_tpu,
            out_shape=out,
            grid_spec=grid_spec,
            compiler_params=_tpu_params(),
            interpret=interpret,
            name="block_matmul_fwd",
        )(rows.reshape(-1), counts, x_MxK, values)
    return pl.pallas_call(
        functools.partial(_fwd_gpu, spec=spec),
        out_shape=out,
        grid=(mrows // spec.tm, nb),
        in_specs=[
            pl.BlockSpec((nb, budget), lambda i, j: (0, 0)),
            pl.BlockSpec((nb,), lambda i, j: (0,)),
            pl.BlockSpec((spec.tm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((None, budget, bh, bw), lambda i, j: (j, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((spec.tm, bw), lambda i, j: (i, j)),
        compiler_params=_GPU_PARAMS,
        interpret=interpret,
        name="block_matmul_fwd",
    )(rows, counts, x_MxK, values)


def block_dx(dy_MxN, values, rows_t, slots_t, counts_t, spec: BlockKernelSpec, interpret):
    """dx [M, K] = dY @ Wᵀ over the kept tiles of each block-row."""
    mrows, n = dy_MxN.shape
    nb, budget, bh, bw = values.shape
    kb, budget_t = rows_t.shape
    out = jax.ShapeDtypeStruct((mrows, kb * bh), dy_MxN.dtype)
    if spec.backend == "tpu":
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(mrows // spec.tm, kb, budget_t),
            in_specs=[
                pl.BlockSpec(
                    (spec.tm, bw), lambda i, r, t, cols, slots, cnt: (i, cols[r * budget_t + t])
                ),
                pl.BlockSpec(
                    (None, None, bh, bw),
                    lambda i, r, t, cols, slots, cnt: (
                        cols[r * budget_t + t],
                        slots[r * budget_t + t],
                        0,
                        0,
                    ),
                ),
            ],
            out_specs=pl.BlockSpec((spec.tm, bh), lambda i, r, t, *_: (i, r)),
            scratch_shapes=[pltpu.VMEM((spec.tm, bh), jnp.float32)],
        )
        return pl.pallas_call(
            _dx_tpu,
            out_shape=out,
            grid_spec=grid_spec,
            compiler_params=_tpu_params(),
            interpret=interpret,
            name="block_matmul_dx",
        )(rows_t.reshape(-1), slots_t.reshape(-1), counts_t, dy_MxN, values)
    return pl.pallas_call(
        functools.partial(_dx_gpu, spec=spec),
        out_shape=out,
        grid=(mrows // spec.tm, kb),
        in_specs=[
            pl.BlockSpec((kb, budget_t), lambda i, r: (0, 0)),
            pl.BlockSpec((kb, budget_t), lambda i, r: (0, 0)),
            pl.BlockSpec((kb,), lambda i, r: (0,)),
            pl.BlockSpec((spec.tm, n), lambda i, r: (i, 0)),
            pl.BlockSpec((nb, budget, bh, bw), lambda i, r: (0, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((spec.tm, bh), lambda i, r: (i, r)),
        compiler_params=_GPU_PARAMS,
        interpret=interpret,
        name="block_matmul_dx",
    )(rows_t, slots_t, counts_t, dy_MxN, values)


def block_dw(x_MxK, dy_MxN, rows, counts, spec: BlockKernelSpec, out_dtype, budget, interpret):
    """dvalues [Nb, B, bh, bw] = x[:, tile rows]ᵀ @ dY[:, tile cols] for kept tiles, 0 for padding."""
    mrows, k = x_MxK.shape
    n = dy_MxN.shape[1]
    bh, bw = spec.bh, spec.bw
    nb = n // bw
    out = jax.ShapeDtypeStruct((nb, budget, bh, bw), out_dtype)
    if spec.backend == "tpu":

        def m_block(i, b, cnt_j):  # padding slots pin one block: no DMA per step
            return jnp.where(b < cnt_j, i, 0)

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(nb, budget, mrows // spec.tm),
            in_specs=[
                pl.BlockSpec(
                    (spec.tm, bh),
                    lambda j, b, i, rows, cnt: (m_block(i, b, cnt[j]), rows[j * budget + b]),
                ),
                pl.BlockSpec((spec.tm, bw), lambda j, b, i, rows, cnt: (m_block(i, b, cnt[j]), j)),
            ],
            out_specs=pl.BlockSpec((None, None, bh, bw), lambda j, b, i, *_: (j, b, 0, 0)),
            scratch_shapes=[pltpu.VMEM((bh, bw), jnp.float32)],
        )
        return pl.pallas_call(
            _dw_tpu,
            out_shape=out,
            grid_spec=grid_spec,
            compiler_params=_tpu_params(),
            interpret=interpret,
            name="block_matmul_dw",
        )(rows.reshape(-1), counts, x_MxK, dy_MxN)
    return pl.pallas_call(
        functools.partial(_dw_gpu, spec=spec, steps=mrows // spec.tm),
        out_shape=out,
        grid=(nb, budget),
        in_specs=[
            pl.BlockSpec((nb, budget), lambda j, b: (0, 0)),
            pl.BlockSpec((nb,), lambda j, b: (0,)),
            pl.BlockSpec((mrows, k), lambda j, b: (0, 0)),
            pl.BlockSpec((mrows, n), lambda j, b: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bh, bw), lambda j, b: (j, b, 0, 0)),
        compiler_params=_GPU_PARAMS,
        interpret=interpret,
        name="block_matmul_dw",
    )(rows, counts, x_MxK, dy_MxN)
