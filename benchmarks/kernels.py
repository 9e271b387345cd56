"""Sparse matmul kernels vs dense XLA, timed in one process; writes JSON.

    python benchmarks/kernels.py [--quick] [--out PATH]

Every backend: XLA paths (masked dense `x @ (w ⊙ mask)` vs gathered block-sparse
`xla_block_matmul`), forward+backward, over block sparsity and block size; bytes per weight
element of each format. On an accelerator also the Pallas kernels (`block_matmul`, `nm_matmul`)
against dense XLA: training shapes (compute-bound, 4096³ bf16) and decode shapes (M ≤ 64,
memory-bound). On CPU Pallas only interprets, so those rows are skipped.

Ratios are dense_time / sparse_time (> 1: sparse is faster), measured in the same process.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from sparsescale.kernels import (
    block_matmul,
    nm_matmul,
    pack_block,
    pack_nm,
    xla_block_matmul,
)
from sparsescale.kernels.formats import nm_bytes_per_element
from sparsescale.kernels.xla_block import choose_strategy


def time_fns(calls, iters: int) -> list[float]:
    """Best-of-`iters` wall seconds of each (jitted fn, args) call, compile excluded. The calls run
    interleaved, so load from other processes hits all of them alike; min is the least noisy."""
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    best = [float("inf")] * len(calls)
    for _ in range(iters):
        for i, (fn, args) in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def balanced_block_mask(rng, k, n, block, sparsity):
    """Every block-column keeps the same number of tiles (round((1-sparsity)·Kb), at least 1)."""
    bh, bw = block
    kb, nb = k // bh, n // bw
    keep_per_col = max(1, round((1 - sparsity) * kb))
    keep = np.zeros((kb, nb), bool)
    for j in range(nb):
        keep[rng.choice(kb, keep_per_col, replace=False), j] = True
    return np.kron(keep, np.ones(block, bool)), 1 - keep_per_col / kb


def nm_mask(rng, k, n, nn, m):
    order = np.argsort(rng.random((k // m, m, n)), axis=1)[:, :nn]
    mask = np.zeros((k // m, m, n), bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(k, n)


def fwd_bwd(matmul):
    """jit(value_and_grad) of sum(y²)/2 w.r.t. x and the weight argument."""

    def loss(x, w, *rest):
        y = matmul(x, w, *rest).astype(jnp.float32)
        return 0.5 * jnp.sum(y * y)

    return jax.jit(jax.value_and_grad(loss, (0, 1)))


def bench_xla_block(rng, shape, dtype, sparsities, blocks, iters):
    m, k, n = shape
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), dtype)
    masked = fwd_bwd(lambda x, w, mask: x @ jnp.where(mask, w, 0))
    rows = []
    for block in blocks:
        for sparsity in sparsities:
            mask, actual = balanced_block_mask(rng, k, n, block, sparsity)
            packed = pack_block(w, mask, block)

            def sparse(x, values, packed=packed, strategy="auto"):
                p = packed
                rebuilt = type(p)(
                    values, p.rows, p.counts, p.rows_t, p.slots_t, p.counts_t, p.shape, p.block
                )
                return xla_block_matmul(x, rebuilt, strategy=strategy)

            strategy = choose_strategy(packed)
            calls = [
                (masked, (x, w, jnp.asarray(mask))),
                (fwd_bwd(functools.partial(sparse, strategy="gather")), (x, packed.values)),
            ]
            if strategy != "gather":
                calls.append((fwd_bwd(sparse), (x, packed.values)))
            t_dense, t_gather, *rest = time_fns(calls, iters)
            t_auto = rest[0] if rest else t_gather
            rows.append(
                dict(
                    shape=list(shape),
                    dtype=jnp.dtype(dtype).name,
                    block=list(block),
                    sparsity=round(actual, 4),
                    auto_strategy=strategy,
                    masked_dense_fwd_bwd_s=t_dense,
                    xla_block_auto_fwd_bwd_s=t_auto,
                    xla_block_gather_fwd_bwd_s=t_gather,
                    speedup_auto=t_dense / t_auto,
                    speedup_gather=t_dense / t_gather,
                    block_bytes_per_element=packed.bytes_per_element,
                )
            )
            print(
                f"xla block {block} sparsity {actual:.4f}: masked dense {t_dense * 1e3:.1f} ms, "
                f"gather {t_gather * 1e3:.1f} ms ({t_dense / t_gather:.2f}x), auto={strategy} "
                f"{t_auto * 1e3:.1f} ms ({t_dense / t_auto:.2f}x)",
                flush=True,
            )
    return rows


def bytes_table(dtype):
    table = {"dense": float(jnp.dtype(dtype).itemsize)}
    for nn, m in ((2, 4), (1, 4), (2, 8)):
        table[f"nm_{nn}:{m}"] = nm_bytes_per_element(nn, m, dtype)
    return table


def bench_pallas(rng, backend, big, iters):
    """Pallas kernels vs dense XLA on an accelerator (bf16); `big` is the large dimension."""
    dtype = jnp.bfloat16
    block = (128, 128)
    rows = []
    dense = jax.jit(lambda x, w: x @ w)

    def record(kind, shape, sparsity, t_dense, t_sparse, **extra):
        rows.append(
            dict(
                kind=kind,
                shape=list(shape),
                sparsity=sparsity,
                dense_s=t_dense,
                sparse_s=t_sparse,
                speedup=t_dense / t_sparse,
                **extra,
            )
        )
        print(f"{kind} {shape} s={sparsity}: speedup {t_dense / t_sparse:.2f}x", flush=True)

    shapes = {"train": (big, big, big), "decode_16": (16, big, big), "decode_64": (64, big, big)}
    for regime, (m, k, n) in shapes.items():
        x = jnp.asarray(rng.normal(size=(m, k)), dtype)
        w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), dtype)
        blk = jax.jit(lambda x, p: block_matmul(x, p, interpret=False, backend=backend))
        for sparsity in (0.0, 0.5, 0.75, 0.9):
            mask, actual = balanced_block_mask(rng, k, n, block, sparsity)
            packed = pack_block(w, mask, block)
            t_dense, t = time_fns([(dense, (x, w)), (blk, (x, packed))], iters)
            record(f"block_fwd_{regime}", (m, k, n), round(actual, 4), t_dense, t, block=block)
        packed = pack_nm(w, nm_mask(rng, k, n, 2, 4), 2, 4)
        nm = jax.jit(lambda x, p: nm_matmul(x, p, interpret=False, backend=backend))
        t_dense, t = time_fns([(dense, (x, w)), (nm, (x, packed))], iters)
        record(f"nm_2:4_fwd_{regime}", (m, k, n), 0.5, t_dense, t)
    # Training step (fwd+bwd) at 75% block sparsity vs dense.
    m = k = n = big
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), dtype)
    mask, actual = balanced_block_mask(rng, k, n, block, 0.75)
    packed = pack_block(w, mask, block)

    def sparse(x, values):
        p = packed
        rebuilt = type(p)(
            values, p.rows, p.counts, p.rows_t, p.slots_t, p.counts_t, p.shape, p.block
        )
        return block_matmul(x, rebuilt, interpret=False, backend=backend)

    dense_step = fwd_bwd(lambda x, w: x @ w)
    t_dense, t = time_fns([(dense_step, (x, w)), (fwd_bwd(sparse), (x, packed.values))], iters)
    record("block_fwd_bwd_train", (m, k, n), round(actual, 4), t_dense, t, block=block)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few iterations")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--size", type=int, default=None, help="large dim of the Pallas shapes (4096; quick 2048)"
    )
    args = parser.parse_args()

    backend = jax.default_backend()
    rng = np.random.default_rng(0)
    iters = 5 if args.quick else 20
    on_cpu = backend == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    shape = (256, 2048, 1024) if args.quick else (1024, 2048, 2048)
    sparsities = (0.0, 0.5, 0.75, 0.875, 0.9375)
    blocks = ((16, 16), (32, 32), (64, 64), (128, 128))

    t0 = time.time()
    result = dict(
        backend=backend,
        device=str(jax.devices()[0].device_kind),
        jax_version=jax.__version__,
        quick=args.quick,
        bytes_per_element={
            "float32": bytes_table(jnp.float32),
            "bfloat16": bytes_table(jnp.bfloat16),
        },
        xla_block=bench_xla_block(rng, shape, dtype, sparsities, blocks, iters),
    )
    if on_cpu:
        result["pallas"] = "skipped: on CPU Pallas kernels only run in interpret mode"
    else:
        size = args.size or (2048 if args.quick else 4096)
        result["pallas"] = bench_pallas(rng, backend, size, iters)
    result["notes"] = [
        "speedup = dense time / sparse time, best of `iters` interleaved runs in this process",
        "xla_block rows: masked dense XLA vs xla_block_matmul fwd+bwd; auto_strategy is what "
        "strategy='auto' picks (gather below the crossover, scatter into a dense kernel above it)",
        "2:4 cannot beat dense when compute-bound: Pallas has no sparse tensor-core / MXU "
        "instruction, so the kernel still multiplies all of K; its gain is bytes (decode)",
        "bf16 2:4 bytes bound for a memory-bound matvec: 2 / 1.125 = 1.78x",
    ]
    result["wall_s"] = time.time() - t0

    print(f"wrote {common.write('kernels', result, args.out)}")


if __name__ == "__main__":
    main()
