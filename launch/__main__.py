"""`python -m launch {run,status,collect,calibrate}`: launch and inspect sweeps.

python -m launch run experiments/fig1.py:quick --root runs/fig1 [--dry-run] [--backend slurm] [--records DIR]
python -m launch status runs/fig1
python -m launch collect runs/fig1 [--records docs/records/fig1/quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

CONFIG_FLAGS = (
    "--config.KEY=VALUE (repeatable, the trainer's syntax) sets a config field of every run, "
    "e.g. --config.data.name=tiny_shakespeare --config.mesh.data=2; it becomes part of each "
    "run's id. Keys the sweep sets per run are refused (use --only)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="launch (or resume) a sweep", epilog=CONFIG_FLAGS)
    run.add_argument("experiment", help="experiment file and argument: path/to/exp.py[:arg]")
    run.add_argument("--root", required=True, type=Path, help="sweep root directory")
    run.add_argument("--dry-run", action="store_true", help="print runs and estimated cost only")
    run.add_argument("--backend", choices=("local", "slurm"), default="local")
    run.add_argument("--max-retries", type=int, default=2, help="retries of a failed run")
    run.add_argument(
        "--records", type=Path, help="committed run records: a run whose record matches is done"
    )
    run.add_argument("--jobs", type=int, help="local: concurrent runs (default: measured)")
    run.add_argument("--threads", type=int, help="local: cores per run (default: measured)")
    run.add_argument(
        "--stack",
        type=int,
        help="local: most runs trained together in one process (default: measured; 1: off)",
    )
    run.add_argument("--refresh", type=float, default=2.0, help="local: table refresh seconds")
    run.add_argument(
        "--gpus-per-job",
        type=int,
        help="local: GPUs each job owns (default 1 where GPUs are visible; 0: CPU only)",
    )
    run.add_argument(
        "--only",
        action="append",
        metavar="KEY=V1[,V2]",
        help="run only the part of the sweep whose overrides match (repeatable), e.g. train.seed=0,1",
    )
    run.add_argument("--partition", help="slurm: partition")
    run.add_argument(
        "--slurm",
        action="append",
        metavar="NAME=VALUE",
        help="slurm: any sbatch/submitit setting, repeatable (gres=gpu:1, account=…, qos=…)",
    )
    run.add_argument("--no-wait", action="store_true", help="slurm: submit and exit")
    run.add_argument("--poll", type=float, default=10.0, help="slurm: seconds between checks")

    cal = sub.add_parser(
        "calibrate",
        help="time each model's step as the planned jobs run it, for --dry-run",
        epilog=CONFIG_FLAGS,
    )
    cal.add_argument("experiment")
    cal.add_argument("--root", required=True, type=Path)
    cal.add_argument("--jobs", type=int, help="concurrent jobs (default: measured)")
    cal.add_argument("--threads", type=int, help="cores per job (default: measured)")
    cal.add_argument("--stack", type=int, help="most runs per job (default: measured)")

    st = sub.add_parser("status", help="print the status table of a sweep root")
    st.add_argument("root", type=Path)
    view = st.add_mutually_exclusive_group()
    view.add_argument(
        "--compact", action="store_true", help="fit the terminal (default on a terminal)"
    )
    view.add_argument("--full", action="store_true", help="one line per run (default otherwise)")

    col = sub.add_parser("collect", help="write results.csv and results.parquet")
    col.add_argument("root", type=Path)
    col.add_argument("--all", action="store_true", help="also rows for unfinished runs")
    col.add_argument("--records", type=Path, help="also write a record per finished run here")
    post = sub.add_parser(
        "posttrain",
        help="prune each finished dense run one-shot: <root>/posttrain.csv",
        epilog=CONFIG_FLAGS,
    )
    post.add_argument("experiment")
    post.add_argument("--root", required=True, type=Path)
    post.add_argument("--methods", nargs="+", help="one-shot methods (default: all)")
    post.add_argument("--structures", nargs="+", help="posttrain.STRUCTURES names (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and (args.command not in ("run", "calibrate", "posttrain") or not all(
        flag.startswith("--config.") for flag in rest
    )):  # fmt: skip
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from launch import signals
    from launch.backends import local
    from launch.sweep import SweepError, parse_config_flags

    if getattr(args, "backend", "local") == "local":  # before JAX loads; its local jobs inherit it
        local.skip_cuda_check_without_gpus(os.environ)
    if args.command != "posttrain":  # posttrain prunes and evaluates in this process
        import jax

        # The launcher only checks and counts configs: it must not take an accelerator (a TPU's
        # lock, a GPU's preallocated memory) from its jobs. This process only, not their env.
        jax.config.update("jax_platforms", "cpu")
    from sparsescale.run_files import RunFileError

    try:
        args.config = parse_config_flags(rest)
        with signals.interrupts():  # SIGTERM takes the Ctrl-C path
            return _dispatch(args)
    except (SweepError, RunFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        cause = getattr(e, "signame", "SIGINT")
        print(
            f"interrupted by {cause}: trainers stopped, their attempts recorded as interrupted; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + getattr(signal, cause, signal.SIGINT).value


def _dispatch(args: argparse.Namespace) -> int:
    from launch import collect, cost, status, sweep
    from launch.backends import local

    if args.command == "status":
        compact = args.compact or (sys.stdout.isatty() and not args.full)
        size = shutil.get_terminal_size()
        print(status.status_text(args.root, compact, size.columns, size.lines))
        return 0
    if args.command == "collect":
        frame = collect.collect(args.root, include_unfinished=args.all)
        print(f"{len(frame)} runs -> {args.root / 'results.csv'}, {args.root / 'results.parquet'}")
        if args.records:
            from launch import records

            print(
                f"{len(records.write_records(args.root, args.records))} records -> {args.records}"
            )
        return 0

    if args.command == "posttrain":
        from launch import posttrain

        try:  # bad names fail here, before anything is restored or written
            post = posttrain.post_config(args.methods, args.structures)
        except ValueError as e:
            raise sweep.SweepError(str(e)) from e
        path, added = posttrain.run(sweep.expand(args.experiment, args.config), args.root, post)
        print(f"{added} dense runs pruned one-shot -> {path}")
        return 0
    expanded = sweep.expand(args.experiment, args.config)
    if getattr(args, "only", None):
        expanded = sweep.select(expanded, args.only)
    jobs, threads, source = local.default_jobs_threads()
    gpus = local.visible_gpus() if args.command == "run" else ()
    gpus_per_job = (
        (1 if gpus else 0) if getattr(args, "gpus_per_job", None) is None else args.gpus_per_job
    )
    if gpus_per_job:  # one job per GPU share; the cores split among them
        jobs = max(1, len(gpus) // gpus_per_job)
        threads = max(1, len(local.available_cpus()) // jobs)
        source = f"{len(gpus)} GPUs, {gpus_per_job} per job"
    if args.jobs or args.threads:
        jobs = args.jobs or max(1, len(local.available_cpus()) // args.threads)
        threads = args.threads or max(1, len(local.available_cpus()) // jobs)
        source = "--jobs/--threads"
    if args.stack is not None and args.stack < 1:
        raise sweep.SweepError(f"--stack must be ≥ 1, got {args.stack}")
    if args.command == "calibrate":
        calibration = cost.calibrate(expanded, args.root, threads, jobs, args.stack)
        for model, m in calibration.items():
            steps = ", ".join(f"K={k}: {s:.3g} s" for k, s in m.get("step_s", {}).items())
            print(f"{model}: step {steps}; start-up {m.get('startup_s', 0):.3g} s")
        return 0
    if args.dry_run:
        print(cost.dry_run_table(expanded, args.root, jobs, threads, args.stack))
        return 0
    if args.max_retries < 0:
        raise sweep.SweepError(f"--max-retries must be ≥ 0, got {args.max_retries}")
    if args.backend == "slurm":
        from launch.backends import slurm

        options = slurm.SlurmOptions(
            max_retries=args.max_retries,
            partition=args.partition,
            wait=not args.no_wait,
            poll_s=args.poll,
            slurm=slurm.parse_slurm_settings(args.slurm),
        )
    else:
        if args.slurm:
            raise sweep.SweepError("--slurm needs --backend slurm")
        options = local.LocalOptions(
            jobs, threads, args.max_retries, args.refresh, max_stack=args.stack, gpus=gpus,
            gpus_per_job=gpus_per_job,
        )  # fmt: skip
    if args.records:  # after every check: this writes into the root
        from launch import records

        for run_id in records.materialise(expanded, args.root, args.records):
            print(f"{run_id}: done, from its record in {args.records}", flush=True)
    if args.backend == "slurm":
        failed = slurm.run_slurm(expanded, args.root, options)
    else:
        print(f"local backend: {jobs} jobs × {threads} threads ({source})", flush=True)
        failed = local.run_local(expanded, args.root, options)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
