"""Train one run: `python -m sparsescale.main --config experiments/single_run.py:quick --workdir DIR`.

Overrides: `--config.sparsity.target=0.75`. Re-running on the same workdir resumes; re-running a
finished run leaves it as it is. `--config` files are Python that is executed: use only files
you trust.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (path.py:arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints, summary).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume even if the config differs from the workdir's config.json in fields that change the "
    "result (they are listed when refused).",
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (auto-detects Slurm)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port, if not auto-detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count, if not auto-detected.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, if not auto-detected.")


def _known_keys(argv: list[str], bad: str) -> str:
    """The keys a bad `--config.a.b.c` override could have meant: those of config.a.b."""
    config = flags.FLAGS["config"].value
    if config is None:  # the failing override stopped parsing before --config was loaded
        args = iter(argv)
        spec = next((a.split("=", 1)[1] if "=" in a else next(args, "") for a in args
                     if a.split("=")[0] == "--config"), "")  # fmt: skip
        try:
            from ml_collections.config_flags.config_flags import ConfigFileFlagParser

            config = ConfigFileFlagParser("config").parse(spec)
        except Exception:  # noqa: BLE001 (only a hint)
            return ""
    *parents, _ = bad.split(".")
    for part in parents:
        config = getattr(config, part, None) if config is not None else None
    keys = sorted(config.keys()) if hasattr(config, "keys") else []
    return f"; known keys of config{''.join('.' + p for p in parents)}: {keys}" if keys else ""


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one clear line (no traceback) for a bad flag or config key."""
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (absl raises several kinds; all are bad input)
        overrides = [a.split("=")[0][len("--config.") :] for a in argv if a.startswith("--config.")]
        cause = str(e.__cause__ or e).replace("\\n", " ").replace("\n", " ")
        if len(cause) > 1 and cause[0] == cause[-1] and cause[0] in "'\"":
            cause = cause[1:-1].replace("\\'", "'")
        bad = next((o for o in overrides if o.rsplit(".", 1)[-1] in cause), None)
        where = f"bad override --config.{bad}: " if bad else ""
        print(f"error: {where}{cause}{_known_keys(argv, bad) if bad else ''}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    if not _CONFIG.value or not _WORKDIR.value:
        print("error: --config and --workdir are required (see --help).", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    import jax

    if _MULTIHOST.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from sparsescale import config, preemption, train

    train.use_compilation_cache()
    log = logging.getLogger("sparsescale")
    try:
        cfg = config.run_config(_CONFIG.value)  # validates before anything compiles
        summary = train.run(cfg, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except (ValueError, train.RunDirError) as e:
        log.error("error: %s", e)
        sys.exit(2)
    except train.NonFiniteLoss as e:
        log.error("Run failed: %s", e)
        sys.exit(1)
    except preemption.Preempted as e:
        log.warning("Preempted: %s (exit %d: resume me).", e, preemption.PREEMPTED_EXIT)
        sys.exit(preemption.PREEMPTED_EXIT)
    workdir = _WORKDIR.value
    log.info(
        "Done: eval loss %.4f nats/byte (%.3f bits/byte).\n  metrics: %s/metrics.jsonl\n"
        "  TensorBoard: %s/tb\n  checkpoints: %s/checkpoints\n  summary: %s/summary.json",
        summary["eval_loss"],
        summary["eval_bpb"],
        *[workdir] * 4,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
