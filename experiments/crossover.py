"""The crossover — does the loss cost of sparsity turn with size between 332K and 1.8M parameters?

Command:  python -m experiments.reproduce crossover --preset main   (the answer: every size ×
          sparsity × seed at each size's tuned learning rate; records under
          docs/records/crossover/main/). On a small machine run it one arm at a time, smallest
          first: `--preset main_6k_330k`, then `main_800k`, then `main_1.8m` (the same runs as
          `main`, and `RECORDS_OF` files their records under docs/records/crossover/main/, where
          `main` reuses them; an arm's --analyze-only reports every main record committed).
          Before it: `--preset lr` (the learning-rate grid), then `lr_800k` and `lr_1.8m`
          (6e-3 / 1.2e-2 / 2.4e-2 at the two largest sizes); after it, `lr_sparse` (does the
          dense optimum hold at 87.5%?). On a GPU: `bash benchmarks/crossover_acc.sh` trains
          `--preset acc` (1.8M–20M, see ACC_SIZES) and packs its records.
Runtime:  smoke ≈ 1 min. lr: 35 dense runs, one process each (learning rates do not stack), on
          1 job × 1 thread: measured ≈ 1.5 h beside other work (the 332K runs 19 min each under
          load). lr_800k: 3 runs, measured ≈ 28 min each (2 jobs × 1 thread); lr_1.8m: 3 runs,
          measured 1 h 45 min – 1 h 58 min each (2 jobs × 1 thread). main_6k_330k: 144 runs in 21 stacked jobs, measured 58 min on
          2 jobs × 1 thread (a 332K job of 8 variants ≈ 16 min). main_800k: every level of 3 seeds done
          (seed 2's dense and 87.5% runs: 2.6–2.9 s a step, ≈ 45 min as a pair on 2 jobs ×
          1 thread; 2.2–5 s a step at other times on this VM). main_1.8m:
          not run. acc (one H200, not yet run): estimated 5–8 min, from 1.2e17 FLOPs of dense
          steps (masked sparsity costs a dense step) at 40% of the bf16 peak plus start-ups.
Design:   matched in steps: every run, at every size, takes STEPS = 850 optimizer steps, and the
          batch (sequences of 128 bytes) grows with size so each sees ≈ 21 tokens per
          non-embedding parameter (`batch_for`; whole sequences give 17.5 at 6K and 23.4 at 12K, with
          batches of 1 and 3, and 20.9–22.0 at the other sizes). One shape rule
          (`shape_rule`): d_ff = 4·d_model and n_layers = clip(d_model / 32, 2, 4), so depth is 2
          up to 100K, 3 at 332K and 4 from 800K on. `lr`: dense, seed 0, each size on a factor-2
          grid of peak learning rates (AdamW, 5% warmup, cosine) wide enough that its best point
          is interior. `main`: dense and 7 unstructured sparsities (25–93.75%) up to 332K, dense
          and 50 / 75 / 87.5 / 93.75% at 800K and 1.8M; gradual magnitude pruning on one matched
          schedule (cubic, 25% → 75% of training, 16 mask updates); 3 paired seeds (a seed's
          variants share initialisation and data order, and train as one stacked job); each size
          at its own dense optimum (`LR_TUNED`). `main` evaluates every run on the same 256
          validation windows (32K bytes; `data.eval_batch_size`); the lr presets evaluated on
          ⌊256 / batch⌋ batches of their own batch size (152–256 windows, by size), which is
          enough to rank learning rates within a size.
Expected: lr (measured, docs/figures/crossover/lr/): every size's optimum is interior, lr* 0.0150
          … 0.0117 from 6.2K to 332K and 0.0113 at 800K, curved in N (local slopes +0.10 … −0.29).
          lr_1.8m (measured, docs/figures/crossover/lr_1.8m/): interior, eval loss 1.0386 /
          0.9897 / 1.1101 at 6e-3 / 1.2e-2 / 2.4e-2, lr* 0.0104 (the 0.0110 main_1.8m trains
          at is 0.0006 nats above it on the same parabola).
          main_6k_330k (measured, docs/figures/crossover/main_6k_330k/main/): the local β of the
          paired gap is negative (the gap grows with N) in 20 of 21 cells below 56K; it
          shrinks from 99K to 332K at 37.5–87.5% (local β +0.43 / +0.32 / +0.17 / +0.05 at 37.5 / 50 / 75 / 87.5%, seed intervals above 0) and is
          flat at 93.75%. main_800k (measured, same report, 3 seeds): from 332K to 788K the gap
          shrinks at 93.75% (β +0.19 [+0.06, +0.32]); at 50 / 75 / 87.5% it is inconclusive.
"""

from __future__ import annotations

from pathlib import Path

from analysis.load import SIZE as SIZE_COLUMN
from experiments import common

STEPS = 850
# `python -m launch posttrain experiments/crossover.py:<main arm> --root <root>` on the dense runs
# of `main`, committed: every size's dense model pruned one-shot (magnitude / Wanda / SparseGPT).
POSTTRAIN_TABLE = (
    Path(__file__).resolve().parents[1] / "docs/records/crossover/main_posttrain/posttrain.csv"
)
TOKENS_PER_PARAM = 21
SEQ_LEN = 128
EVAL_SEQUENCES = 256
SIZES = (
    "cpu_6k",
    "cpu_12k",
    "cpu_25k",
    "cpu_50k",
    "cpu_100k",
    "cpu_330k",
    "cpu_800k",
    "cpu_1.8m",
)
# Factor-2 grids of peak learning rates: the small models want larger steps.
_GRID = [3e-3 * 2**i for i in range(7)]  # 3e-3 … 1.92e-1
LR_GRID = {
    "cpu_6k": _GRID[1:],
    "cpu_12k": _GRID[1:],
    "cpu_25k": _GRID[:6],
    "cpu_50k": _GRID[:6],
    "cpu_100k": _GRID[:6],
    "cpu_330k": _GRID[:5],
}
# The two largest sizes, placed by the small sizes' optima (analysis/lr_tuning: lr* 0.012–0.018,
# local slopes -0.29 and -0.17 above 56K): the predicted optimum ≈ 0.01 and a point either side.
LR_GRID_LARGE = {"cpu_800k": _GRID[1:4], "cpu_1.8m": _GRID[1:4]}
# Each size's dense optimum: the parabola vertex of its lr grid (lr / lr_800k presets, code b9a1c59
# and 5646c47; common.LR_MEASURED). 1.8M was EXTRAPOLATED before main_1.8m was planned: the power
# law over the seven measured sizes gives 0.0111, the last local slope (-0.05) 0.0108. lr_1.8m
# (code 0672323) then measured lr* = 0.0104, 6% lower; on its parabola 0.0110 costs 0.0006 nats,
# far below the gaps studied, so the pre-registered 0.0110 is kept.
LR_TUNED = {**common.LR_MEASURED, "cpu_1.8m": 0.0110}
# The accelerator arm (`acc`): the same design on one GPU from 1.8M (its overlap with the CPU
# arms) to 20M, dense and 87.5%, seed 0, bf16 compute (float32 parameters and optimizer). Its
# learning rates above 1.8M are EXTRAPOLATED: the last measured local slope of lr* in N (−0.05)
# continued from 1.8M's, lr* = 0.011 · (N / 1.77M)^−0.05.
ACC_SIZES = ("cpu_1.8m", "acc_3.1m", "acc_7.1m", "acc_20m")
ACC_LR = {"cpu_1.8m": 0.0110, "acc_3.1m": 0.0107, "acc_7.1m": 0.0103, "acc_20m": 0.0098}
ACC_LEVELS = (0.0, 0.875)
ALL_LEVELS = (0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.9375)
LARGE_LEVELS = (0.0, 0.5, 0.75, 0.875, 0.9375)
SEEDS = (0, 1, 2)
# The matched design every full-size preset shares.
_MATCHED = dict(
    steps=STEPS, tokens_per_param=TOKENS_PER_PARAM, seq_len=SEQ_LEN, eval_sequences=EVAL_SEQUENCES
)
_MAIN = dict(**_MATCHED, lr=LR_TUNED, seeds=SEEDS)
ARMS = ("main_6k_330k", "main_800k", "main_1.8m")
RECORDS_OF = dict.fromkeys(ARMS, "main")  # reproduce: the arms read and write main's records
MAIN_LEVELS = {size: ALL_LEVELS for size in SIZES[:6]} | {s: LARGE_LEVELS for s in SIZES[6:]}

# The main design at seconds' scale (tests): two sizes, fixed batches, one LR.
_MAIN_SMOKE = dict(
    steps=8,
    tokens_per_param=0.3,
    batches={"cpu_6k": 4, "cpu_12k": 8},  # fixed: divisible by the tests' 4 devices
    seq_len=32,
    eval_sequences=8,
    lr={"cpu_6k": 1.2e-2, "cpu_12k": 1.2e-2},
)

PRESETS = {
    "smoke": dict(
        sizes=("cpu_6k", "cpu_12k"),
        steps=8,
        tokens_per_param=0.3,
        batches={"cpu_6k": 4, "cpu_12k": 8},  # fixed: divisible by the tests' 4 devices
        seq_len=32,
        eval_sequences=8,
        lrs={"cpu_6k": (3e-3, 1.2e-2), "cpu_12k": (3e-3, 1.2e-2)},
    ),
    "lr": dict(sizes=tuple(LR_GRID), **_MATCHED, lrs=LR_GRID),
    **{
        f"lr_{size.removeprefix('cpu_')}": dict(sizes=(size,), **_MATCHED, lrs=LR_GRID_LARGE)
        for size in LR_GRID_LARGE
    },
    # `main` and its arms: the same runs, so records of the arms are records of `main`.
    "main": dict(**_MAIN, levels=MAIN_LEVELS),
    "main_6k_330k": dict(**_MAIN, levels={s: MAIN_LEVELS[s] for s in SIZES[:6]}),
    **{
        f"main_{size.removeprefix('cpu_')}": dict(**_MAIN, levels={size: MAIN_LEVELS[size]})
        for size in SIZES[6:]
    },
    # The dense optimum at 87.5% sparsity (seed 0): half and twice the tuned LR at 99K (the tuned
    # LR itself is a run of `main`).
    "lr_sparse": dict(
        **{**_MAIN, "seeds": (0,)},
        levels={"cpu_100k": (0.875,)},
        lr_factors=(0.5, 2.0),
    ),
    "acc": dict(
        **{**_MATCHED, "seeds": (0,)},
        lr=ACC_LR,
        levels=dict.fromkeys(ACC_SIZES, ACC_LEVELS),
        dtype="bfloat16",
        tag="acc",
    ),
    # the accelerator arm's script end to end on a CPU, in seconds
    "acc_smoke": dict(
        **_MAIN_SMOKE,
        seeds=(0,),
        levels={"cpu_6k": ACC_LEVELS, "cpu_12k": ACC_LEVELS},
        dtype="bfloat16",
        tag="acc",
    ),
    "main_smoke": dict(
        **_MAIN_SMOKE,
        seeds=(0, 1),
        levels={"cpu_6k": (0.0, 0.5, 0.875), "cpu_12k": (0.0, 0.875)},
    ),
}


def shape_rule(d_model: int) -> dict:
    """The one shape rule of the sweep's sizes: F = 4D, depth clip(D / 32, 2, 4)."""
    return {"d_ff": 4 * d_model, "n_layers": min(4, max(2, d_model // 32))}


def batch_for(size: str, tokens_per_param: float, steps: int, seq_len: int) -> int:
    """Sequences per step that give `tokens_per_param` tokens per non-embedding parameter in
    `steps` steps (at least 1)."""
    params = common.non_embedding_params(size)
    return max(1, round(tokens_per_param * params / (steps * seq_len)))


def get_config(arg: str = "lr"):
    p = common.preset_of(PRESETS, arg, "crossover")
    c = common.base_config()
    c.experiment = "crossover"
    smoke = arg.endswith("smoke")
    if smoke:
        c = common.smoke(c)
    c.data.seq_len = c.model.max_len = p["seq_len"]
    c.train.steps = p["steps"]
    c.sparsity.structure = "unstructured"
    c.sparsity.schedule.updates = 2 if smoke else 16
    c.train.log_every = 2 if smoke else 10
    c.train.ckpt_every = 4 if smoke else 100
    c.model.dtype = p.get("dtype", "float32")
    return c


def _batch(p: dict, size: str) -> int:
    return p.get("batches", {}).get(size) or batch_for(
        size, p["tokens_per_param"], p["steps"], p["seq_len"]
    )


def get_sweep(arg: str = "lr"):
    """lr presets: dense, seed 0, every size at each of its learning rates. main presets: every
    size × level × seed at the size's tuned LR, seed-major so that one stacked job holds one
    seed's variants and trains their shared dense prefix once."""
    p = common.preset_of(PRESETS, arg, "crossover")
    if "levels" in p:
        return _main_sweep(p)
    runs = []
    for size in p["sizes"]:
        batch = _batch(p, size)
        for lr in p["lrs"][size]:
            runs.append(
                {
                    "tag": "lr",
                    "model.name": size,
                    "data.batch_size": batch,
                    "train.lr": float(lr),
                    "train.eval_batches": max(1, p["eval_sequences"] // batch),
                    **common.sparsity_overrides("dense"),
                    **common.seed_overrides(0),
                }
            )
    return runs


def _main_sweep(p: dict) -> list[dict]:
    runs = []
    for size, levels in p["levels"].items():
        batch = _batch(p, size)
        for factor in p.get("lr_factors", (1.0,)):
            for seed in p["seeds"]:
                for target in levels:
                    runs.append(
                        {
                            "tag": p.get("tag", "main") if factor == 1.0 else f"lr_x{factor:g}",
                            "model.name": size,
                            "data.batch_size": batch,
                            "data.eval_batch_size": p["eval_sequences"],
                            "train.eval_batches": 1,
                            "train.lr": float(p["lr"][size] * factor),
                            **common.sparsity_overrides("unstructured", target),
                            **common.seed_overrides(seed),
                        }
                    )
    return runs


def analyze(results, out_dir):
    """lr presets: the learning-rate report (per size, eval loss against the peak LR). main
    presets: the headline's report (β(S), S*(N), fits) and where the gap turns with size
    (`turning.md`: β between adjacent sizes, within seeds, with intervals over seeds)."""
    from analysis import lr_tuning

    if not len(results):
        return {}
    reports = {}
    lr_rows = results[results["tag"] == "lr"]
    if len(lr_rows):
        reports["lr"] = lr_tuning.write_report(lr_rows, out_dir / "lr", "Crossover: learning rates")
    main = results[results["tag"] == "main"]
    if len(main):
        reports["main"] = common.report(main, out_dir / "main", "Crossover: the gap against size")
        reports["turning"] = write_turning(main, out_dir / "main" / "turning.md")
        if POSTTRAIN_TABLE.exists():  # the one-shot regime of the same dense runs (#27)
            import pandas as pd

            from analysis import regimes

            table = pd.read_csv(POSTTRAIN_TABLE)
            reports["regimes"] = regimes.write_report(main, table, out_dir / "main")
    acc = results[results["tag"] == "acc"]  # the accelerator arm (bf16): reported on its own
    if len(acc):
        reports["acc"] = common.report(acc, out_dir / "acc", "Crossover on one GPU (bf16)")
        reports["acc_turning"] = write_turning(acc, out_dir / "acc" / "turning.md")
    return reports


def write_turning(results, path):
    """Local slopes of the paired gap between adjacent sizes, one row per (level, size pair)."""
    from analysis import figures, gap
    from analysis import report as report_lib

    pairs = gap.paired_gaps(results)
    local = gap.local_slopes(pairs)
    table = local.drop(columns=["task", "regime"])
    figures.plot_local_slopes(table, path.parent / "figures" / "local_slopes")
    sizes = gap.effective_sizes(pairs)
    below = sizes.groupby(SIZE_COLUMN)["n_below"].max()
    within = sizes[sizes[SIZE_COLUMN].isin(below[below == 0].index)]
    text = [
        "# Crossover: where the cost of sparsity turns with size",
        "",
        f"{results['run_id'].nunique()} runs. N = non-embedding parameters. β between adjacent "
        "sizes: −Δlog ΔL / Δlog N within each seed (ΔL = L_sparse − L_dense of the same seed), "
        "mean and 95% t-interval over seeds; β > 0: the gap shrinks with size. `gap_with_size` "
        "is 'shrinks' / 'grows' only where the interval excludes 0.",
        "",
        report_lib.markdown_table(table),
        "",
        "![local slope of the gap against size](figures/local_slopes.png)",
        "",
        "## N_eff / N: the dense size a sparse run is worth",
        "",
        "N_eff: the size at which the same seed's dense curve reaches the sparse run's loss "
        "(log N interpolated linearly in the loss between measured dense sizes; never "
        "extrapolated: sizes where a seed's sparse loss lies above the smallest dense loss "
        f"are left out: {', '.join(f'{n:g}' for n in below[below > 0].index) or 'none'}). "
        "Mean [95% t-interval over seeds]. Flat in N: sparsity costs a fixed fraction of size; "
        "falling: a growing fraction, even where the absolute gap shrinks.",
        "",
        report_lib.markdown_table(
            report_lib.by_size_table(within, ["sparsity"], "ratio", SIZE_COLUMN)
        ),
        "",
        *_turning_sections(results, pairs, local),
        *_comparison_section(results, pairs, sizes, path.parent / "figures" / "comparison"),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    return path


def _comparison_section(results, pairs, sizes, figure) -> list[str]:
    """Ours beside Frantar et al.'s ViT/JFT runs (their longest budget) on shared, unitless
    axes: ΔL / L_dense and N_eff / N against N (`figures.plot_comparison`)."""
    from analysis import figures, gap, load

    vit = gap.paired_gaps(load.load_frantar(dataset="vit"))
    longest = vit["tokens"].max()
    vit = vit[vit["tokens"] == longest]
    levels = sorted(set(vit["sparsity"]) & set(pairs["sparsity"]))
    if not levels:
        return []
    series = []
    for label, frame, neff in (
        (f"ours: {_design_text(results)}", pairs, sizes),
        (f"Frantar et al. (2024): ViT/JFT-4B, D = {longest:.3g} images, one seed", vit, None),
    ):
        frame = frame[frame["sparsity"].isin(levels)]
        relative = gap.gap_cells(frame.assign(gap=frame["gap"] / frame["dense_loss"]))
        neff = gap.effective_sizes(frame) if neff is None else neff
        series.append((label, relative, neff[neff["sparsity"].isin(levels)] if len(neff) else neff))
    figures.plot_comparison(series, figure)
    return [
        "## Beside the published runs",
        "",
        "Ours and Frantar et al.'s ViT/JFT-4B runs (their longest budget, "
        f"{longest:.3g} images at every size; one seed) at the sparsities both have, on unitless "
        "axes: the relative paired gap ΔL / L_dense and N_eff / N (each read off its own dense "
        "curve). The tasks' loss scales differ, so compare trends in N, not levels. Their D is "
        "fixed while ours grows with N.",
        "",
        f"![ours and published on shared axes](figures/{figure.name}.png)",
        "",
    ]


def _design_text(results) -> str:
    """What our runs were, for a legend: task, steps and peak LRs."""
    steps = "/".join(f"{s:g}" for s in sorted(results["steps"].unique()))
    lrs = results["lr"].dropna()
    lr = f"LR {lrs.min():.3g}–{lrs.max():.3g}" if len(lrs) else "LR unknown"
    return f"{', '.join(sorted(results['task'].unique()))}, {steps} steps, {lr}"


def _turning_sections(results, pairs, local) -> list[str]:
    """turning.md's curvature, turning size, per-range verdict, N_eff trend and average-parameter
    sections (analysis/turning.py)."""
    import pandas as pd

    from analysis import report as report_lib
    from analysis import turning

    cfg = get_config("main")
    schedule = cfg.sparsity.schedule
    share = turning.schedule_mean_share(schedule.start, schedule.end, schedule.power)
    turns = turning.turning_sizes(pairs, local)
    curv = turning.curvature(pairs).set_index("sparsity")
    shape_rows = [
        {
            "sparsity": r.sparsity,
            "curvature": report_lib.interval_text(
                *curv.loc[r.sparsity, ["curvature", "lo", "hi"]], ".3g"
            ),
            "shape": r.shape,
            "N*": report_lib.interval_text(r.n_star, r.lo, r.hi, ".3g"),
            "local slopes change sign between": r.bracket or "–",
            "status": r.status,
        }
        for r in turns.itertuples()
    ]
    ranges = turning.size_ranges(local).drop(columns=["task", "regime"])
    trend = turning.neff_trend(pairs)
    trend_rows = [
        {"sparsity": r.sparsity, "slope of log(N_eff/N) in log N": report_lib.interval_text(r.slope, r.lo, r.hi, ".3g"),
         "mean N_eff/N": f"{r.mean_ratio:.3f}", "trend": r.trend, "n_seeds": r.n_seeds,
         "n_sizes": r.n_sizes}
        for r in trend.itertuples()
    ]  # fmt: skip
    avg = turning.average_parameters(pairs, results, share)
    predicted = avg.groupby("sparsity")["predicted"].agg(["min", "max"])
    return [
        "## Curvature and the turning size",
        "",
        "A quadratic in log N fitted to log ΔL within each seed (≥ 3 sizes); curvature: mean "
        "[95% t-interval over seeds]; 'hump' (the gap rises, then falls) or 'valley' only where "
        "it excludes 0. N*: the vertex of the quadratic through the seed-mean gaps, with a "
        "bootstrap interval over seeds (2000 resamples; with 3 seeds only 10 resamples differ, "
        "so the interval is coarse); reported only inside the measured sizes. The last column "
        "but one: the measured sizes between which the local slopes (above) change from one "
        "verdict to the opposite.",
        "",
        report_lib.markdown_table(pd.DataFrame(shape_rows)),
        "",
        "## Verdict per size range",
        "",
        "The adjacent-size verdicts above merged into ranges; a claim only where the ranges at "
        "the ends of the measured sizes support it.",
        "",
        report_lib.markdown_table(ranges),
        "",
        "## Is N_eff / N constant in N?",
        "",
        "Frantar et al.'s law has N_eff = k(S)·N: a slope of 0. Slope of log(N_eff/N) against log "
        "N within each seed (sizes with an N_eff), mean [95% t-interval over seeds]; 'falling' / "
        "'rising' only where the interval excludes 0.",
        "",
        report_lib.markdown_table(pd.DataFrame(trend_rows)),
        "",
        "## The average-parameter check (Jin et al., ICLR 2025)",
        "",
        "Jin et al. find that a gradually pruned model's loss follows its parameter count "
        f"averaged over training: under this schedule N_avg / N = 1 − {share:g}·S·f (f: the "
        "prunable share of N, "
        + ", ".join(
            f"S = {s:g}: {p['min']:.3f}"
            + (f"–{p['max']:.3f}" if p["max"] - p["min"] > 5e-4 else "")
            for s, p in predicted.iterrows()
        )
        + "). Measured N_eff / N over that prediction, mean [95% interval over seeds] (1: the "
        "rule holds; > 1: the run is worth more than its average count):",
        "",
        report_lib.markdown_table(
            report_lib.by_size_table(
                avg.assign(
                    ratio=avg["measured_over_predicted"],
                    lo=avg["lo"] / avg["predicted"],
                    hi=avg["hi"] / avg["predicted"],
                ),
                ["sparsity"],
                "ratio",
                SIZE_COLUMN,
            )
        ),  # fmt: skip
        "",
    ]
