"""Pallas N:M sparse × dense matmul: one tile body per product, thin TPU and Triton wrappers.

All three products work in the permuted space of the format (see formats.py): x as H·m planes
[H·m, M, S], values as [P, S, N], codes [S, N] uint8 with S = K/(m·H). A weight tile is rebuilt
from its kept values with elementwise selects (plane h·m+i = values whose index is i), so the MXU /
tensor cores still do all of K: 2:4 saves bytes (memory-bound decode), not FLOPs.

TPU: grid with the reduction axis last ("arbitrary") and an f32 VMEM accumulator.
Triton: grid over output tiles only; the reduction runs as a loop inside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from sparsescale.kernels.formats import nm_layout


@dataclasses.dataclass(frozen=True)
class NMKernelSpec:
    """Static description of one N:M kernel launch."""

    n: int
    m: int
    tm: int
    tn: int
    t: int  # rows of the S axis per tile (= tk / (m·H))
    backend: str  # "tpu" | "gpu"

    @property
    def bits(self) -> int:
        return nm_layout(self.n, self.m)[0]

    @property
    def per_byte(self) -> int:
        return nm_layout(self.n, self.m)[1]

    @property
    def groups_per_byte(self) -> int:
        return nm_layout(self.n, self.m)[2]


def _indices(codes_i32, spec: NMKernelSpec):
    """P index planes [T, tn] int32 from a codes tile."""
    mask = (1 << spec.bits) - 1
    return [(codes_i32 >> (spec.bits * s)) & mask for s in range(spec.per_byte)]


def _weight_planes(vals, codes_i32, spec: NMKernelSpec):
    """H·m dense weight planes [T, tn] f32: plane h·m+i holds in-group position i of groups h·S+b."""
    idx = _indices(codes_i32, spec)
    planes = []
    for h in range(spec.groups_per_byte):
        for i in range(spec.m):
            w = jnp.zeros(vals[0].shape, jnp.float32)
            for j in range(spec.n):
                s = j * spec.groups_per_byte + h
                w = jnp.where(idx[s] == i, vals[s].astype(jnp.float32), w)
            planes.append(w)
    return planes


def fwd_tile(xs, vals, codes_i32, spec: NMKernelSpec):
    """Σ_q x_q [tm, T] @ W_q [T, tn] in f32."""
    planes = _weight_planes(vals, codes_i32, spec)
    acc = None
    for xq, wq in zip(xs, planes, strict=True):
        d = jnp.dot(xq, wq.astype(xq.dtype), preferred_element_type=jnp.float32)
        acc = d if acc is None else acc + d
    return acc


def dx_tile(dy, vals, codes_i32, spec: NMKernelSpec):
    """[dY [tm, tn] @ W_qᵀ for each plane q] in f32 (each [tm, T])."""
    planes = _weight_planes(vals, codes_i32, spec)
    dims = (((1,), (1,)), ((), ()))
    return [
        jax.lax.dot_general(dy, wq.astype(dy.dtype), dims, preferred_element_type=jnp.float32)
        for wq in planes
    ]


def dvalues_tile(xs, dy, codes_i32, spec: NMKernelSpec):
    """Gradient of the P value planes [T, tn] in f32: x_qᵀ @ dY read at the kept positions."""
    idx = _indices(codes_i32, spec)
    dims = (((0,), (0,)), ((), ()))
    dw = [jax.lax.dot_general(xq, dy, dims, preferred_element_type=jnp.float32) for xq in xs]
    out = []
    for s in range(spec.per_byte):
        h = s % spec.groups_per_byte
        g = jnp.zeros(dw[0].shape, jnp.float32)
        for i in range(spec.m):
            g = jnp.where(idx[s] == i, dw[h * spec.m + i], g)
        out.append(g)
    return out


# ----------------------------------------------------------------------------- TPU wrappers


def _tpu_params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _fwd_tpu(x_ref, v_ref, c_ref, o_ref, acc_ref, *, spec):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    xs = [x_ref[q] for q in range(x_ref.shape[0])]
    vals = [v_ref[s] for s in range(v_ref.shape[0])]
    acc_ref[...] += fwd_tile(xs, vals, c_ref[...].astype(jnp.int32), spec)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dx_tpu(dy_ref, v_ref, c_ref, o_ref, acc_ref, *, spec):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    vals = [v_ref[s] for s in range(v_ref.shape[0])]
    for q, d in enumerate(dx_tile(dy_ref[...], vals, c_ref[...].astype(jnp.int32), spec)):
        acc_ref[q] += d

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dv_tpu(x_ref, dy_ref, c_ref, o_ref, acc_ref, *, spec):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    xs = [x_ref[q] for q in range(x_ref.shape[0])]
    for s, d in enumerate(dvalues_tile(xs, dy_ref[...], c_ref[...].astype(jnp.int32), spec)):
        acc_ref[s] += d

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


# ----------------------------------------------------------------------------- Triton wrappers


def _loop(steps, body, init):
    return jax.lax.fori_loop(0, steps, body, init)


def _fwd_gpu(x_ref, v_ref, c_ref, o_ref, *, spec, steps):
    hm, p = x_ref.shape[0], v_ref.shape[0]

    def body(k, acc):
        sl = pl.ds(pl.multiple_of(k * spec.t, spec.t), spec.t)
        xs = [x_ref[q, :, sl] for q in range(hm)]
        vals = [v_ref[s, sl, :] for s in range(p)]
        return acc + fwd_tile(xs, vals, c_ref[sl, :].astype(jnp.int32), spec)

    acc = _loop(steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dx_gpu(dy_ref, v_ref, c_ref, o_ref, *, spec, steps):
    hm, p = o_ref.shape[0], v_ref.shape[0]

    def body(k, accs):
        sl = pl.ds(pl.multiple_of(k * spec.tn, spec.tn), spec.tn)
        vals = [v_ref[s, :, sl] for s in range(p)]
        d = dx_tile(dy_ref[:, sl], vals, c_ref[:, sl].astype(jnp.int32), spec)
        return tuple(a + b for a, b in zip(accs, d, strict=True))

    init = tuple(jnp.zeros(o_ref.shape[1:], jnp.float32) for _ in range(hm))
    for q, a in enumerate(_loop(steps, body, init)):
        o_ref[q] = a.astype(o_ref.dtype)


def _dv_gpu(x_ref, dy_ref, c_ref, o_ref, *, spec, steps):
    hm, p = x_ref.shape[0], o_ref.shape[0]

    def body(k, accs):
        sl = pl.ds(pl.multiple_of(k * spec.tm, spec.tm), spec.tm)
        xs = [x_ref[q, sl, :] for q in range(hm)]
        d = dvalues_tile(xs, dy_ref[sl, :], c_ref[...].astype(jnp.int32), spec)
        return tuple(a + b for a, b in zip(accs, d, strict=True))

    init = tuple(jnp.zeros(o_ref.shape[1:], jnp.float32) for _ in range(p))
    for s, a in enumerate(_loop(steps, body, init)):
        o_ref[s] = a.astype(o_ref.dtype)


_GPU_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- launches


def nm_fwd(x_HmxMxS, vals_PxSxN, codes_SxN, spec: NMKernelSpec, interpret):
    """y [M, N] = x_perm @ W_perm; M must be a multiple of spec.tm."""
    hm, mrows, s_len = x_HmxMxS.shape
    p, _, cols = vals_PxSxN.shape
    out = jax.ShapeDtypeStruct((mrows, cols), x_HmxMxS.dtype)
    if spec.backend == "tpu":
        return pl.pallas_call(
            functools.partial(_fwd_tpu, spec=spec),
            out_shape=out,
            grid=(mrows // spec.tm, cols // spec.tn, s_len // spec.t),
            in_specs=[
                pl.BlockSpec((hm, spec.tm, spec.t), lambda i, j, k: (0, i, k)),
                pl.BlockSpec((p, spec.t, spec.tn), lambda i, j, k: (0, k, j)),
                pl.BlockSpec((spec.t, spec.tn), lambda i, j, k: (k, j)),
            ],
            out_specs=pl.BlockSpec((spec.tm, spec.tn), lambda i, j, k: (i, j)),
            scratch_shapes=[pltpu.VMEM((spec.tm, spec.tn), jnp.float32)],
            compiler_params=_tpu_params("parallel", "parallel", "arbitrary"),
            interpret=interpret,
            name="nm_matmul_fwd",
        )(x_HmxMxS, vals_PxSxN, codes_SxN)
    return pl.pallas_call(
        functools.partial(_fwd_gpu, spec=spec, steps=s_len // spec.t),
        out_shape=out,
        grid=(mrows // spec.tm, cols // spec.tn),
        in_specs=[
            pl.BlockSpec((hm, spec.tm, s_len), lambda i, j: (0, i, 0)),
            pl.BlockSpec((p, s_len, spec.tn), lambda i, j: (0, 0, j)),
            pl.BlockSpec((s_len, spec.tn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((spec.tm, spec.tn), lambda i, j: (i, j)),
        compiler_params=_GPU_PARAMS,
        interpret=interpret,
        name="nm_matmul_fwd",
    )(x_HmxMxS, vals_PxSxN, codes_SxN)


def nm_dx(dy_MxN, vals_PxSxN, codes_SxN, spec: NMKernelSpec, interpret):
    """dx_perm [H·m, M, S] = dY @ W_permᵀ."""
    mrows, cols = dy_MxN.shape
    p, s_len, _ = vals_PxSxN.shape
    hm = spec.groups_per_byte * spec.m
    out = jax.ShapeDtypeStruct((hm, mrows, s_len), dy_MxN.dtype)
    if spec.backend == "tpu":
        return pl.pallas_call(
            functools.partial(_dx_tpu, spec=spec),
            out_shape=out,
            grid=(mrows // spec.tm, s_len // spec.t, cols // spec.tn),
            in_specs=[
                pl.BlockSpec((spec.tm, spec.tn), lambda i, k, j: (i, j)),
                pl.BlockSpec((p, spec.t, spec.tn), lambda i, k, j: (0, k, j)),
                pl.BlockSpec((spec.t, spec.tn), lambda i, k, j: (k, j)),
            ],
            out_specs=pl.BlockSpec((hm, spec.tm, spec.t), lambda i, k, j: (0, i, k)),
            scratch_shapes=[pltpu.VMEM((hm, spec.tm, spec.t), jnp.float32)],
            compiler_params=_tpu_params("parallel", "parallel", "arbitrary"),
            interpret=interpret,
            name="nm_matmul_dx",
        )(dy_MxN, vals_PxSxN, codes_SxN)
    return pl.pallas_call(
        functools.partial(_dx_gpu, spec=spec, steps=cols // spec.tn),
        out_shape=out,
        grid=(mrows // spec.tm, s_len // spec.t),
        in_specs=[
            pl.BlockSpec((spec.tm, cols), lambda i, k: (i, 0)),
            pl.BlockSpec((p, spec.t, cols), lambda i, k: (0, k, 0)),
            pl.BlockSpec((spec.t, cols), lambda i, k: (k, 0)),
        ],
        out_specs=pl.BlockSpec((hm, spec.tm, spec.t), lambda i, k: (0, i, k)),
        compiler_params=_GPU_PARAMS,
        interpret=interpret,
        name="nm_matmul_dx",
    )(dy_MxN, vals_PxSxN, codes_SxN)


def nm_dvalues(x_HmxMxS, dy_MxN, codes_SxN, spec: NMKernelSpec, out_dtype, interpret):
    """dvalues [P, S, N]: x_permᵀ @ dY at the kept positions only."""
    hm, mrows, s_len = x_HmxMxS.shape
    cols = dy_MxN.shape[1]
    p = spec.per_byte
    out = jax.ShapeDtypeStruct((p, s_len, cols), out_dtype)
    if spec.backend == "tpu":
        return pl.pallas_call(
            functools.partial(_dv_tpu, spec=spec),
            out_shape=out,
            grid=(s_len // spec.t, cols // spec.tn, mrows // spec.tm),
            in_specs=[
                pl.BlockSpec((hm, spec.tm, spec.t), lambda k, j, i: (0, i, k)),
                pl.BlockSpec((spec.tm, spec.tn), lambda k, j, i: (i, j)),
                pl.BlockSpec((spec.t, spec.tn), lambda k, j, i: (k, j)),
            ],
            out_specs=pl.BlockSpec((p, spec.t, spec.tn), lambda k, j, i: (0, k, j)),
            scratch_shapes=[pltpu.VMEM((p, spec.t, spec.tn), jnp.float32)],
            compiler_params=_tpu_params("parallel", "parallel", "arbitrary"),
            interpret=interpret,
            name="nm_matmul_dvalues",
        )(x_HmxMxS, dy_MxN, codes_SxN)
    return pl.pallas_call(
        functools.partial(_dv_gpu, spec=spec, steps=mrows // spec.tm),
        out_shape=out,
        grid=(s_len // spec.t, cols // spec.tn),
        in_specs=[
            pl.BlockSpec((hm, mrows, spec.t), lambda k, j: (0, 0, k)),
            pl.BlockSpec((mrows, spec.tn), lambda k, j: (0, j)),
            pl.BlockSpec((spec.t, spec.tn), lambda k, j: (k, j)),
        ],
        out_specs=pl.BlockSpec((p, spec.t, spec.tn), lambda k, j: (0, k, j)),
        compiler_params=_GPU_PARAMS,
        interpret=interpret,
        name="nm_matmul_dvalues",
    )(x_HmxMxS, dy_MxN, codes_SxN)
