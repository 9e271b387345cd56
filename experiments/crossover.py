"""The crossover — does the loss cost of sparsity turn with size between 332K and 1.8M parameters?

Command:  python -m experiments.reproduce crossover --preset lr   (the learning-rate grid, first)
          python -m experiments.reproduce crossover --preset lr_800k   (then lr_1.8m: the two
          largest sizes at 6e-3 / 1.2e-2 / 2.4e-2, placed by the lr preset's optima)
Runtime:  smoke ≈ 1 min. lr: 35 dense runs, one process each (learning rates do not stack), on
          1 job × 1 thread: measured ≈ 1.5 h beside other work (the 332K runs 19 min each under
          load). lr_800k / lr_1.8m: 3 runs each, estimated ≈ 21 / 76 min a run.
Design:   matched in steps: every run, at every size, takes STEPS = 850 optimizer steps, and the
          batch (sequences of 128 bytes) grows with size so each sees ≈ 21 tokens per
          non-embedding parameter (`batch_for`; whole sequences give 17.5 at 6K and 23.4 at 12K, with
          batches of 1 and 3, and 20.9–22.0 at the other sizes). One shape rule
          (`shape_rule`): d_ff = 4·d_model and n_layers = clip(d_model / 32, 2, 4), so depth is 2
          up to 100K, 3 at 332K and 4 from 800K on. Eval on the same 256 validation windows (32K
          bytes) for every run. `lr`: dense, seed 0, each size on a factor-2 grid of peak
          learning rates (AdamW, 5% warmup, cosine) wide enough that its best point is interior.
Expected: the dense optimum moves with size (measured before this sweep, at 852 steps: 99K bottoms
          near 1.2e-2, 14K still falls at 2.4e-2, 332K prefers 1.2e-2 to 6e-3); `analyze` reports
          each size's best grid point, a parabola in log lr through it and its neighbours, and the
          trend of the optimum in N (used to place the 800K and 1.8M grids).
"""

from __future__ import annotations

from experiments import common
from sparsescale import accounting
from sparsescale import model as model_lib

STEPS = 850
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
    "lr": dict(
        sizes=tuple(LR_GRID),
        steps=STEPS,
        tokens_per_param=TOKENS_PER_PARAM,
        seq_len=SEQ_LEN,
        eval_sequences=EVAL_SEQUENCES,
        lrs=LR_GRID,
    ),
    **{
        f"lr_{size.removeprefix('cpu_')}": dict(
            sizes=(size,),
            steps=STEPS,
            tokens_per_param=TOKENS_PER_PARAM,
            seq_len=SEQ_LEN,
            eval_sequences=EVAL_SEQUENCES,
            lrs=LR_GRID_LARGE,
        )
        for size in LR_GRID_LARGE
    },
}


def shape_rule(d_model: int) -> dict:
    """The one shape rule of the sweep's sizes: F = 4D, depth clip(D / 32, 2, 4)."""
    return {"d_ff": 4 * d_model, "n_layers": min(4, max(2, d_model // 32))}


def batch_for(size: str, tokens_per_param: float, steps: int, seq_len: int) -> int:
    """Sequences per step that give `tokens_per_param` tokens per non-embedding parameter in
    `steps` steps (at least 1)."""
    params = accounting.param_counts(model_lib.preset(size))["non_embedding"]
    return max(1, round(tokens_per_param * params / (steps * seq_len)))


def get_config(arg: str = "lr"):
    p = common.preset_of(PRESETS, arg, "crossover")
    c = common.base_config()
    c.experiment = "crossover"
    if arg == "smoke":
        c = common.smoke(c)
    c.data.seq_len = c.model.max_len = p["seq_len"]
    c.train.steps = p["steps"]
    c.sparsity.structure = "unstructured"
    c.sparsity.schedule.updates = 16 if arg != "smoke" else 2
    c.train.log_every = 10 if arg != "smoke" else 2
    c.train.ckpt_every = 100 if arg != "smoke" else 4
    return c


def get_sweep(arg: str = "lr"):
    """The learning-rate grid: dense, seed 0, every size at each of its learning rates."""
    p = common.preset_of(PRESETS, arg, "crossover")
    runs = []
    for size in p["sizes"]:
        batch = p.get("batches", {}).get(size) or batch_for(
            size, p["tokens_per_param"], p["steps"], p["seq_len"]
        )
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


def analyze(results, out_dir):
    """The learning-rate report: per size, eval loss against the peak learning rate."""
    from analysis import lr_tuning

    if not len(results):
        return {}
    return {"lr": lr_tuning.write_report(results, out_dir / "lr", "Crossover: learning rates")}
