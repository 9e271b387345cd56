"""The library's cost tables that figure 6 draws (computed, not timed): bytes per weight element
of each storage format, and training FLOPs per token against sparsity for the CPU presets.

    python -m benchmarks.cost_tables

Writes benchmarks/results/cost_tables.json (the same on every machine); `analysis.costs` reads it,
so the analysis needs no JAX.
"""

from __future__ import annotations

import argparse

from benchmarks import common
from sparsescale import accounting
from sparsescale import model as model_lib
from sparsescale.kernels import formats

FLOPS_PRESETS = ("cpu_25k", "cpu_100k", "cpu_600k", "cpu_4.7m")
SPARSITIES = (0.0, 0.5, 0.75, 0.875, 0.9375)


def memory_rows() -> list[dict]:
    """Bytes per weight element: dense, masked dense (a bool mask byte), compressed N:M."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        value_bytes = formats.dense_bytes_per_element(dtype)
        rows.append(dict(format="dense", dtype=dtype, density=1.0, bytes=value_bytes))
        rows.append(dict(format="masked dense", dtype=dtype, density=1.0, bytes=value_bytes + 1))
        for n, m in ((2, 4), (1, 4), (2, 8)):
            rows.append(
                dict(
                    format=f"N:M {n}:{m}",
                    dtype=dtype,
                    density=n / m,
                    bytes=formats.nm_bytes_per_element(n, m, dtype),
                )
            )
    return rows


def flops_rows(seq_len: int = 128) -> list[dict]:
    """Training FLOPs per token of each preset at each sparsity (accounting.flops_per_token)."""
    return [
        {
            "model": name,
            "sparsity": s,
            "flops_per_token": accounting.flops_per_token(model_lib.preset(name), seq_len, s),
        }
        for name in FLOPS_PRESETS
        for s in SPARSITIES
    ]


def tables() -> dict:
    return {
        "memory": memory_rows(),
        "flops_per_token": flops_rows(),
        "value_bytes": {d: formats.dense_bytes_per_element(d) for d in ("float32", "bfloat16")},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_tables", description=__doc__)
    parser.add_argument("--out", default=str(common.RESULTS / "cost_tables.json"))
    args = parser.parse_args(argv)
    print(f"wrote {common.write('cost_tables', tables(), args.out)}")


if __name__ == "__main__":
    main()
