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
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if _MULTIHOST.value:
        jax.distributed.initialize()
    from sparsescale import config, train

    cfg = config.run_config(_CONFIG.value)  # validates before anything compiles
    try:
        summary = train.run(cfg, _WORKDIR.value)
    except train.NonFiniteLoss as e:
        logging.error("Run failed: %s", e)
        sys.exit(1)
    logging.info(
        "Done: eval loss %.4f nats/byte; results in %s", summary["eval_loss"], _WORKDIR.value
    )


if __name__ == "__main__":
    app.run(main)
