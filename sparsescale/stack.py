"""Train several runs as one stacked (vmapped) job: `python -m sparsescale.stack JOB.json`.

JOB.json: {"runs": [{"workdir": "...", "config": {...full experiment config...}}, ...]}, written
by the launcher (`launch/backends/local.py`). Each run keeps its own workdir, exactly as if it had
been trained alone by `python -m sparsescale.main`. Exits 1 if any run failed, and
`preemption.PREEMPTED_EXIT` if a signal stopped the job after a checkpoint.
"""

import json
import logging
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)
    import ml_collections

    from sparsescale import config, preemption, train

    train.use_compilation_cache()

    job = json.loads(open(argv[1]).read())
    cfgs = [config.run_config(ml_collections.ConfigDict(r["config"])) for r in job["runs"]]
    try:
        summaries = train.run_stack(cfgs, [r["workdir"] for r in job["runs"]])
    except preemption.Preempted as e:
        logging.getLogger("sparsescale").warning("Preempted: %s.", e)
        return preemption.PREEMPTED_EXIT
    for r, s in zip(job["runs"], summaries, strict=True):
        outcome = "failed" if s is None else f"eval loss {s['eval_loss']:.4f} nats/byte"
        logging.getLogger("sparsescale").info("%s: %s", r["workdir"], outcome)
    return int(any(s is None for s in summaries))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
