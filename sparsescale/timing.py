"""Time a run's compiled train step at K stacked variants: what `launch calibrate` measures.

    python -m sparsescale.timing CONFIG.json K [K ...]

CONFIG.json holds a run's full experiment config (as the launcher writes it). Prints one JSON
line: {"startup_s": seconds outside steady stepping (imports, data, each K's compile),
"step_s": {K: seconds per step}, "save_s": seconds per checkpoint of one variant, "device": what
JAX ran it on}.
Batches are random tokens; the step is the real one (step.py), pruning included.
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()


def time_steps(cfg, ks: list[int], steps: int = 4) -> dict:
    """{"startup_s": seconds outside steady stepping (start-up, each K's build and compile),
    "step_s": {K: seconds per step of K stacked variants}, "save_s": seconds per checkpoint of
    one variant}."""
    import tempfile

    import jax
    import numpy as np

    from sparsescale import checkpoint as ckpt
    from sparsescale import data as data_lib
    from sparsescale import stacking
    from sparsescale import step as step_lib

    data_lib.prepare(cfg.data)
    data_lib.fingerprint(cfg.data)
    step_s, stepping = {}, 0.0
    rng = np.random.default_rng(0)
    shape = (cfg.data.batch_size, cfg.data.seq_len + 1)
    for k in ks:
        trainer = step_lib.build(cfg, num_variants=k)
        variants = stacking.variant_inputs([cfg] * k, trainer.pruner)
        state = trainer.init(variants)
        batch = trainer.batch([rng.integers(0, 256, shape, dtype=np.int32) for _ in range(k)])
        state, metrics = trainer.step(state, batch, variants)
        jax.block_until_ready(metrics)
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.step(state, batch, variants)
        jax.block_until_ready(metrics)
        stepping += time.perf_counter() - t
        step_s[k] = (time.perf_counter() - t) / steps
    startup = time.perf_counter() - T0 - stepping
    with tempfile.TemporaryDirectory() as tmp:
        saver = ckpt.Checkpointer(tmp, keep=2)
        t = time.perf_counter()
        for i in range(3):
            saver.save(i + 1, trainer.variant_state(state, 0), None, {})
        saver.close()
        save_s = (time.perf_counter() - t) / 3
    from sparsescale.provenance import device_name

    return {"startup_s": startup, "step_s": step_s, "save_s": save_s, "device": device_name()}


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    import ml_collections

    from sparsescale import config as config_lib
    from sparsescale import train

    train.use_compilation_cache()
    cfg = config_lib.run_config(ml_collections.ConfigDict(json.loads(open(argv[1]).read())))
    print(json.dumps(time_steps(cfg, [int(k) for k in argv[2:]])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
