"""The single-run config (one run, no sweep) on the offline default corpus (Python stdlib
source, byte-level).

Command:  python -m sparsescale.main --config experiments/single_run.py:quick --workdir runs/quick
Runtime:  quick ≈ 40 s on 2 CPU cores with warm data and compilation caches (38 s measured,
          code 55e0eb6; 84 s from empty caches at an earlier version); smoke ≈ 30 s.
Expected: eval loss ≈ 1.9 nats/byte for the 25K-parameter model at 75% gradual magnitude sparsity
          after 600 steps at its tuned LR 0.0178 (measured 1.919 here; 2.197 at 3e-3; the pilot's
          linen harness on a 4 MB corpus: 2.36).

Accelerator presets (sized, not yet run: nothing here has trained on a GPU), 20 tokens per
non-embedding parameter, sequences of 512, bf16 compute with float32 parameters and AdamW state:
- `gpu`: acc_85m on one GPU (batch 64: ≈ 1.4 GB of state, ≈ 12 GB of activations).
- `gpu_host`: acc_1b on one host of 8 GPUs, mesh data × fsdp × tensor = 2 × 2 × 2 (the logical
  rules of sparsescale/sharding.py): parameters, gradients, masks and AdamW state split 4 ways
  (3.3 GB of the 13.1 GB a GPU, tests/test_step.py), the batch 2 ways. On fewer GPUs, `--config.mesh.data` takes what is left.
"""

from experiments import common

ACCELERATOR = {
    "gpu": dict(model="acc_85m", batch_size=64, seq_len=512, mesh=dict(data=-1, fsdp=1, tensor=1)),
    "gpu_host": dict(
        model="acc_1b", batch_size=64, seq_len=512, mesh=dict(data=-1, fsdp=2, tensor=2)
    ),
}


def get_config(arg: str = "quick"):
    c = common.base_config()
    c.experiment = "single_run"
    c.sparsity.structure = "unstructured"
    c.sparsity.target = 0.75
    if arg == "smoke":
        return common.smoke(c)
    if arg in ACCELERATOR:
        p = ACCELERATOR[arg]
        c.model.name, c.model.dtype = p["model"], "bfloat16"
        c.data.batch_size, c.data.seq_len = p["batch_size"], p["seq_len"]
        c.model.max_len = p["seq_len"]
        c.train.steps = common.steps_for_budget(p["model"], 20, p["batch_size"], p["seq_len"], 1)
        c.train.lr = common.lr_overrides(p["model"])["train.lr"]  # extrapolated: see tuned_lr
        c.train.log_every, c.train.ckpt_every, c.train.eval_every = 100, 1000, 1000
        for axis, size in p["mesh"].items():
            c.mesh[axis] = size
        return c
    if arg != "quick":
        raise ValueError(
            f"experiments/single_run.py: unknown preset {arg!r}; use one of "
            f"{['quick', 'smoke', *ACCELERATOR]}."
        )
    c.train.lr = common.lr_overrides(c.model.name)["train.lr"]
    return c


def get_sweep(arg: str = "quick"):
    del arg
    return [{}]
