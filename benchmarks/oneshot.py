"""Time and peak memory of one-shot pruning (`sparsescale.oneshot.prune`) of a CPU preset.

    python -m benchmarks.oneshot [--preset cpu_4.7m] [--batches 8] [--batch-size 16]

Each (method, structure) runs in a fresh process, so its peak resident memory (ru_maxrss) is its
own; the model is the preset at initialisation (pruning cost does not depend on the weights), and
the calibration is `batches` × `batch-size` random byte windows of the preset's length. Reports
the whole call (compiles included, as a user sees it) and, for the data methods, a second call on
a fresh model in the same process (the layer solvers compiled; the calibration forward is traced
again per call). Writes benchmarks/results/oneshot_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = [
    ("magnitude", "unstructured"),
    ("wanda", "unstructured"),
    ("wanda", "2:4"),
    ("sparsegpt", "unstructured"),
    ("sparsegpt", "2:4"),
]


def one_case(preset: str, method: str, structure: str, batches: int, batch_size: int) -> dict:
    import jax
    from flax import nnx

    from sparsescale import model as model_lib
    from sparsescale import oneshot
    from sparsescale import sparsity as sp

    cfg = model_lib.preset(preset)
    calibration = [
        jax.random.randint(jax.random.key(i), (batch_size, cfg.max_len), 0, cfg.vocab_size)
        for i in range(batches)
    ]
    shape = sp.NM(2, 4) if structure == "2:4" else sp.Unstructured(0.5)
    prune_cfg = oneshot.OneShotConfig(method=method, structure=shape)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for repeat in range(1 if method == "magnitude" else 2):
        model = model_lib.Transformer(cfg, rngs=nnx.Rngs(repeat))
        start = time.perf_counter()
        report = oneshot.prune(model, calibration, prune_cfg)
        jax.block_until_ready(nnx.state(model))
        seconds.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    errors = [r["relative_error"] for r in report.values() if r["relative_error"] is not None]
    return {
        "method": method,
        "structure": structure,
        "layers": len(report),
        "calibration_tokens": batches * batch_size * cfg.max_len,
        "seconds_first_call": seconds[0],
        "seconds_second_call": seconds[-1] if len(seconds) > 1 else None,
        "peak_rss_mb": peak_rss / 1024,
        "rss_growth_mb": (peak_rss - base_rss) / 1024,
        "mean_relative_error": sum(errors) / len(errors) if errors else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.oneshot", description=__doc__)
    parser.add_argument("--preset", default="cpu_4.7m")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.case:
        method, structure = args.case.split(",")
        print(json.dumps(one_case(args.preset, method, structure, args.batches, args.batch_size)))
        return
    from benchmarks import common
    from sparsescale import accounting
    from sparsescale import model as model_lib

    rows = []
    for i, (method, structure) in enumerate(CASES):
        print(f"[{i + 1}/{len(CASES)}] {method} {structure} …", flush=True)
        cmd = [sys.executable, "-m", "benchmarks.oneshot", "--preset", args.preset]
        cmd += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
        done = subprocess.run(
            [*cmd, "--case", f"{method},{structure}"], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"    {rows[-1]}", flush=True)
    params = accounting.param_counts(model_lib.preset(args.preset))["non_embedding"]
    path = common.write(
        "oneshot",
        {"preset": args.preset, "non_embedding_params": params, "cases": rows},
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
