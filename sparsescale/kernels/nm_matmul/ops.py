"""`nm_matmul`: y = x @ (N:M-packed kernel), differentiable through the Pallas kernels.

Gradients flow to x and to `packed.values` only (kept positions); the mask (codes) is fixed.
x is permuted into the format's plane order in XLA (one extra pass over x, and over dx in the
backward), which keeps the kernels free of gathers and in-kernel reshapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsescale.kernels.formats import NMPacked, nm_layout
from sparsescale.kernels.nm_matmul import kernel
from sparsescale.kernels.tiles import NMTiles, pick_nm_tiles, resolve_backend, resolve_interpret


def permute_x(x_MxK, n: int, m: int):
    """x [M, K] → planes [H·m, M, S]: plane h·m+i holds column (h·S + b)·m + i."""
    h = nm_layout(n, m)[2]
    rows, k = x_MxK.shape
    s = k // (m * h)
    return x_MxK.reshape(rows, h, s, m).transpose(1, 3, 0, 2).reshape(h * m, rows, s)


def unpermute_x(x_HmxMxS, n: int, m: int):
    hm, rows, s = x_HmxMxS.shape
    h = hm // m
    return x_HmxMxS.reshape(h, m, rows, s).transpose(2, 0, 3, 1).reshape(rows, hm * s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _nm_matmul(x_MxK, values, codes, spec: kernel.NMKernelSpec, interpret):
    return _fwd(x_MxK, values, codes, spec, interpret)[0]


def _fwd(x_MxK, values, codes, spec, interpret):
    x_perm = permute_x(x_MxK, spec.n, spec.m)
    vals3 = values.reshape(spec.per_byte, -1, values.shape[1]).astype(x_MxK.dtype)
    y = kernel.nm_fwd(x_perm, vals3, codes, spec, interpret)
    # A zero-size array carries the values' dtype (residuals must be arrays).
    return y, (x_perm, vals3, codes, jnp.zeros((0,), values.dtype))


def _bwd(spec, interpret, res, dy_MxN):
    x_perm, vals3, codes, values_dtype_carrier = res
    dx_perm = kernel.nm_dx(dy_MxN.astype(x_perm.dtype), vals3, codes, spec, interpret)
    dvals3 = kernel.nm_dvalues(
        x_perm, dy_MxN.astype(x_perm.dtype), codes, spec, values_dtype_carrier.dtype, interpret
    )
    dcodes = np.zeros(codes.shape, jax.dtypes.float0)
    dvals = dvals3.reshape(-1, dvals3.shape[-1])
    return unpermute_x(dx_perm, spec.n, spec.m), dvals, dcodes


_nm_matmul.defvjp(_fwd, _bwd)


def nm_matmul(
    x_MxK: jax.Array,
    packed: NMPacked,
    *,
    tiles: NMTiles | None = None,
    interpret=None,
    backend: str | None = None,
) -> jax.Array:
    """y [..., N] = x [..., K] @ unpack_nm(packed), via the Pallas N:M kernels.

    interpret: None → interpret on CPU, compiled elsewhere; True / `pltpu.InterpretParams()` force
    an interpreter. backend: "tpu" | "gpu" kernel flavour (None → default backend). Leading dims of
    x are flattened into M, which is zero-padded to a multiple of tiles.tm.
    """
    if not isinstance(packed, NMPacked):
        raise ValueError(f"nm_matmul: packed must be an NMPacked (see pack_nm), got {type(packed)}")
    k, cols = packed.shape
    if x_MxK.ndim < 1 or x_MxK.shape[-1] != k:
        raise ValueError(
            f"nm_matmul: x {x_MxK.shape} must end in the kernel's K={k} (kernel [{k}, {cols}])"
        )
    lead = x_MxK.shape[:-1]
    x2 = x_MxK.reshape(-1, k)
    rows = x2.shape[0]
    backend, interpret = resolve_backend(backend), resolve_interpret(interpret)
    if tiles is None:
        tiles = pick_nm_tiles(
            (k, cols), rows, x2.dtype, backend, bool(interpret), packed.n, packed.m
        )
    hm = nm_layout(packed.n, packed.m)[2] * packed.m
    if k % tiles.tk or tiles.tk % hm or cols % tiles.tn:
        raise ValueError(
            f"nm_matmul: tiles {tiles} must divide the kernel [{k}, {cols}] with tk a multiple of "
            f"m·H = {hm}"
        )
    spec = kernel.NMKernelSpec(
        n=packed.n,
        m=packed.m,
        tm=tiles.tm,
        tn=tiles.tn,
        t=tiles.tk // hm,
        backend=backend,
    )
    pad = -rows % tiles.tm
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    y = _nm_matmul(x2, packed.values, packed.codes, spec, interpret)
    return y[:rows].reshape(*lead, cols)
