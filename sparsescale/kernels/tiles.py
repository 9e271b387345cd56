"""Tile configurations of the Pallas kernels and the static rules that decide whether they compile.

`check_config` is called at layer construction: a configuration the Mosaic (TPU) or Triton (GPU)
compiler would reject raises a ValueError there, naming the rule, instead of failing at run time.
The rules below are the ones deviceless AOT compilation (tests/test_kernels_aot.py) confirmed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparsescale.kernels.formats import nm_layout

BACKENDS = ("tpu", "gpu")
# Scoped VMEM the kernels may use (v5e default scoped limit 16 MiB; keep headroom).
_TPU_VMEM_BUDGET = 12 * 2**20
# H100 shared memory per block (opt-in, 227 KiB) minus headroom for Triton's own buffers.
_GPU_SMEM_BUDGET = 220 * 2**10


@dataclasses.dataclass(frozen=True)
class NMTiles:
    """Tiles of the N:M kernels: tm rows of x, tn output columns, tk rows of the dense K axis."""

    tm: int = 128
    tn: int = 128
    tk: int = 1024


@dataclasses.dataclass(frozen=True)
class BlockTiles:
    """Tiles of the block-sparse kernels: tm rows of x (the weight tile is the format's block)."""

    tm: int = 128


def resolve_backend(backend: str | None) -> str:
    """'tpu' or 'gpu' (Triton) kernel flavour; None → from jax.default_backend() (CPU → 'tpu',
    whose kernels also run in interpret mode)."""
    if backend is None:
        backend = jax.default_backend()
    backend = {"cuda": "gpu", "rocm": "gpu", "cpu": "tpu"}.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS} (or None), got {backend!r}")
    return backend


def resolve_interpret(interpret):
    """None → interpret exactly when running on CPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return interpret


def _sublanes(dtype) -> int:
    return {4: 8, 2: 16, 1: 32}[jnp.dtype(dtype).itemsize]


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _fail(kind, shape, dtype, tiles, backend, why: str):
    raise ValueError(
        f"{kind} kernel config cannot compile for {backend}: {why} "
        f"(kernel shape {tuple(shape)}, dtype {jnp.dtype(dtype).name}, tiles {tiles})"
    )


def _check_nm(shape, dtype, tiles: NMTiles, backend: str, n: int, m: int) -> None:
    k, cols = shape
    _, per_byte, groups_per_byte = nm_layout(n, m)
    hm = groups_per_byte * m
    fail = lambda why: _fail(f"N:M {n}:{m}", shape, dtype, tiles, backend, why)
    if k % tiles.tk or cols % tiles.tn:
        fail(f"tk={tiles.tk} must divide K={k} and tn={tiles.tn} must divide N={cols}")
    if tiles.tk % hm:
        fail(f"tk={tiles.tk} must be a multiple of m·H = {hm} (groups sharing an index byte)")
    t = tiles.tk // hm  # rows of the [P, K/(m·H), N] value planes per tile
    item = jnp.dtype(dtype).itemsize
    if backend == "tpu":
        if t % 128:
            fail(f"tk/(m·H) = {t} must be a multiple of 128 (lane dim of the x planes)")
        if tiles.tn % 128:
            fail(f"tn={tiles.tn} must be a multiple of 128 (lane dim)")
        if tiles.tm % _sublanes(dtype):
            fail(f"tm={tiles.tm} must be a multiple of {_sublanes(dtype)} for {jnp.dtype(dtype)}")
        # Double-buffered inputs + f32 accumulators + f32 planes (largest of fwd / dx / dvalues).
        x_b, v_b, c_b = hm * tiles.tm * t * item, per_byte * t * tiles.tn * item, t * tiles.tn
        planes = hm * t * tiles.tn * 4
        vmem = 2 * (x_b + v_b + c_b + tiles.tm * tiles.tn * item) + planes
        vmem += max(tiles.tm * tiles.tn, hm * tiles.tm * t, per_byte * t * tiles.tn) * 4
        if vmem > _TPU_VMEM_BUDGET:
            fail(
                f"needs ≈{vmem / 2**20:.1f} MiB VMEM, over the {_TPU_VMEM_BUDGET >> 20} MiB budget"
            )
    else:
        for name, v in (("tm", tiles.tm), ("tn", tiles.tn), ("tk/(m·H)", t)):
            if not _pow2(v) or v < 16:
                fail(f"{name}={v} must be a power of two ≥ 16 (Triton block and tl.dot rules)")
        # Triton pipelines the loads of each loop step over num_stages=2 buffers.
        x_b, v_b = hm * tiles.tm * t * item, per_byte * t * tiles.tn * item
        smem = 2 * (x_b + v_b + t * tiles.tn + tiles.tm * tiles.tn * item)
        if smem > _GPU_SMEM_BUDGET:
            fail(f"needs ≈{smem >> 10} KiB shared memory, over {_GPU_SMEM_BUDGET >> 10} KiB")


def _check_block(shape, dtype, tiles: BlockTiles, backend: str, block) -> None:
    k, cols = shape
    bh, bw = block
    fail = lambda why: _fail(f"block {bh}x{bw}", shape, dtype, tiles, backend, why)
    if k % bh or cols % bw:
        fail(f"block must divide the kernel shape (K % {bh}, N % {bw})")
    item = jnp.dtype(dtype).itemsize
    if backend == "tpu":
        if bh % 128 or bw % 128:
            fail("bh and bw must be multiples of 128 on TPU (x tiles are (tm, bh), lanes are 128)")
        if tiles.tm % _sublanes(dtype):
            fail(f"tm={tiles.tm} must be a multiple of {_sublanes(dtype)} for {jnp.dtype(dtype)}")
        vmem = 2 * (tiles.tm * bh + bh * bw + tiles.tm * bw) * item + 4 * max(bh, bw) ** 2
        vmem += 4 * tiles.tm * max(bh, bw)
        if vmem > _TPU_VMEM_BUDGET:
            fail(
                f"needs ≈{vmem / 2**20:.1f} MiB VMEM, over the {_TPU_VMEM_BUDGET >> 20} MiB budget"
            )
    else:
        for name, v in (("bh", bh), ("bw", bw), ("tm", tiles.tm)):
            if not _pow2(v) or v < 16:
                fail(f"{name}={v} must be a power of two ≥ 16 (Triton block and tl.dot rules)")
        smem = 2 * (tiles.tm * bh + bh * bw + tiles.tm * bw) * item
        if smem > _GPU_SMEM_BUDGET:
            fail(f"needs ≈{smem >> 10} KiB shared memory, over {_GPU_SMEM_BUDGET >> 10} KiB")


def check_config(kind: str, shape, dtype, tiles, backend: str | None, **structure) -> None:
    """Raise ValueError if a kernel configuration cannot compile.

    kind: "nm" (structure: n=, m=) or "block" (structure: block=(bh, bw)); shape: the dense kernel
    (K, N); dtype: compute dtype of x and the weights; tiles: NMTiles / BlockTiles; backend: "tpu",
    "gpu"/"cuda" or None (default backend).
    """
    backend = resolve_backend(backend)
    if len(tuple(shape)) != 2:
        raise ValueError(f"check_config: shape must be the kernel's (K, N), got {shape}")
    if kind == "nm":
        if not isinstance(tiles, NMTiles):
            raise ValueError(f"check_config('nm'): tiles must be NMTiles, got {tiles!r}")
        _check_nm(shape, dtype, tiles, backend, structure["n"], structure["m"])
    elif kind == "block":
        if not isinstance(tiles, BlockTiles):
            raise ValueError(f"check_config('block'): tiles must be BlockTiles, got {tiles!r}")
        _check_block(shape, dtype, tiles, backend, tuple(structure["block"]))
    else:
        raise ValueError(f"check_config: kind must be 'nm' or 'block', got {kind!r}")


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _tm_candidates(rows: int, backend: str, largest: int) -> list[int]:
    """Row tiles to try, largest first; small M (decode) gets a tile just covering it."""
    if backend == "tpu":
        return [min(2 * largest, _round_up(rows, 16))]
    cover = max(16, 1 << (max(rows, 1) - 1).bit_length())
    return [t for t in (128, 64, 32, 16) if t <= min(largest, cover)]


def pick_nm_tiles(
    shape, rows: int, dtype, backend: str, interpret: bool, n: int, m: int
) -> NMTiles:
    """Largest standard N:M tiles that pass `check_config`; in interpret mode any divisor will do."""
    k, cols = shape
    hm = nm_layout(n, m)[2] * m
    if backend == "tpu":
        tns, tks = (512, 256, 128), (hm * 256, hm * 128)
    else:
        tns, tks = (128, 64, 32, 16), (hm * 32, hm * 16)
    first_error = None
    for tm in _tm_candidates(rows, backend, largest=128 if backend == "tpu" else 64):
        for tk in tks:
            for tn in tns:
                tiles = NMTiles(tm=tm, tn=tn, tk=tk)
                try:
                    check_config("nm", shape, dtype, tiles, backend, n=n, m=m)
                    return tiles
                except ValueError as e:
                    first_error = first_error or e
    if not interpret:
        raise first_error
    tn = next((t for t in (128, 64, 32, 16, 8) if cols % t == 0), cols)
    tk = next((t for t in (hm * 16, hm * 8, hm * 4, hm * 2, hm) if k % t == 0), k)
    return NMTiles(tm=min(128, _round_up(rows, 16)), tn=tn, tk=tk)


def pick_block_tiles(shape, rows: int, dtype, backend: str, interpret: bool, block) -> BlockTiles:
    """Largest standard block tiles that pass `check_config`; in interpret mode any tm will do."""
    first_error = None
    for tm in _tm_candidates(rows, backend, largest=128):
        tiles = BlockTiles(tm=tm)
        try:
            check_config("block", shape, dtype, tiles, backend, block=block)
            return tiles
        except ValueError as e:
            first_error = first_error or e
    if not interpret:
        raise first_error
    return BlockTiles(tm=min(128, _round_up(rows, 16)))


def auto_impl(structure: str, backend: str | None = None) -> str:
    """Default SparseLinear impl (`layers.IMPLS`) for a mask structure ("nm", "block",
    "unstructured", ...): "masked" dense XLA on CPU (Pallas only interprets there) and for
    unstructured masks, else the structure's compressed impl ("nm" / "block", which lower to
    Pallas off CPU)."""
    platform = backend or jax.default_backend()
    if platform == "cpu":
        return "masked"
    return {"nm": "nm", "block": "block"}.get(structure, "masked")
