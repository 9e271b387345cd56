"""Figure 3 — MoE is sparsity too: dense vs top-k-of-E MoE at matched active parameters.

Command:  python -m experiments.reproduce fig3_moe --preset quick
Runtime:  smoke ≈ 1 min; quick ≈ 4 min on 2 CPU cores (14 runs; 3 min 57 s measured with warm
          data and compilation caches, code cf99a04); medium ≈ 4 h; full: accelerators.
Design:   every MLP becomes an MoE layer with E ∈ {4, 8, 16} experts, top-k ∈ {1, 2}; each expert's
          d_ff is the dense d_ff / k, so active parameters per token match the dense model while
          total parameters grow ~E/k×. Loss vs active and vs total parameters, with the Clark et al.
          (2022) fit where the data allow (≥ 2 sizes and ≥ 2 expert counts). Every variant of a
          size trains at the dense size's tuned LR (`common.tuned_lr`).
Expected: MoE below dense at equal active parameters, gains growing with E; as measured (quick,
          tuned LRs): cpu_100k dense 1.828, top-2 with E = 4 / 8 / 16 1.797 / 1.789 / 1.780,
          top-1 1.945–2.063 (worse than dense).
"""

from experiments import common
from sparsescale import model as model_lib

PRESETS = {
    "smoke": dict(sizes=("cpu_25k",), experts=(4,), top_k=(1,), steps=6, batch_size=8, seq_len=32),
    "quick": dict(
        sizes=("cpu_25k", "cpu_100k"),
        experts=(4, 8, 16),
        top_k=(1, 2),
        steps=400,
        batch_size=16,
        seq_len=128,
    ),
    "medium": dict(
        sizes=("cpu_25k", "cpu_100k", "cpu_330k"),
        experts=(4, 8, 16),
        top_k=(1, 2),
        steps=2000,
        batch_size=32,
        seq_len=128,
    ),
    "full": dict(
        sizes=("acc_19m", "acc_85m"),
        experts=(4, 8, 16),
        top_k=(1, 2),
        steps=20000,
        batch_size=256,
        seq_len=512,
    ),
}


def get_config(arg: str = "quick"):
    c = common.experiment_config("fig3_moe", PRESETS, arg)
    c.model.moe.every = 1
    return c


def get_sweep(arg: str = "quick"):
    p = common.preset_of(PRESETS, arg, __name__)
    runs = []
    for size in p["sizes"]:
        d_ff = model_lib.PRESETS[size]["d_ff"]
        lr = common.lr_overrides(size)  # the dense size's LR for its MoE variants too
        runs.append({"model.name": size, **lr, "model.moe.num_experts": 0})
        for experts in p["experts"]:
            for k in p["top_k"]:
                runs.append(
                    {
                        "model.name": size,
                        **lr,
                        "model.moe.num_experts": experts,
                        "model.moe.top_k": k,
                        "model.d_ff": d_ff // k,
                    }
                )
    return runs


def analyze(results, out_dir):
    return {"moe": common.report(results, out_dir, "Figure 3, MoE at matched active parameters")}
