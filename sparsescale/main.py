"""Train one run: `python -m sparsescale.main --config experiments/train.py:quick --workdir DIR`.

Overrides: `--config.sparsity.sparsity=0.75`. Re-running on the same workdir resumes.
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (path.py:arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints, summary).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (auto-detects Slurm)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port, if not auto-detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count, if not auto-detected.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, if not auto-detected.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    if _MULTIHOST.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from sparsescale import config, train

    cfg = config.run_config(_CONFIG.value)  # validates before anything compiles
    try:
        summary = train.run(cfg, _WORKDIR.value)
    except train.NonFiniteLoss as e:
        logging.getLogger("sparsescale").error("Run failed: %s", e)
        sys.exit(1)
    workdir = _WORKDIR.value
    logging.getLogger("sparsescale").info(
        "Done: eval loss %.4f nats/byte (%.3f bits/byte).\n  metrics: %s/metrics.jsonl\n"
        "  TensorBoard: %s/tb\n  checkpoints: %s/checkpoints\n  summary: %s/summary.json",
        summary["eval_loss"],
        summary["eval_bpb"],
        *[workdir] * 4,
    )


if __name__ == "__main__":
    app.run(main)
