"""Sweep expansion: experiment file -> runs with stable ids, matched schedules, and `sweep.json`.

An experiment file defines `get_config(arg) -> ConfigDict` and `get_sweep(arg) -> list[dict]`
(dotted config key -> value); `product` and `chain` build such lists from axes. Optionally it
declares `SCHEDULE_AXES = ("sparsity.schedule.start", ...)`: schedule fields its runs may vary.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from launch import state
from sparsescale import run_files

SWEEP_FILE = "sweep.json"
SCHEDULE_FIELDS = ("kind", "start", "end", "every", "updates", "power")
TRAINER_MODULE = "sparsescale.main"
MAX_RUN_ID_LEN = 96


class SweepError(ValueError):
    """A sweep that cannot be launched as written."""


def product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of the axes, the first axis varying slowest.

    >>> product({"model.name": ["s", "m"], "sparsity.target": [0.0, 0.5]})[1]
    {'model.name': 's', 'sparsity.target': 0.5}
    """
    for key, values in axes.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise SweepError(f"axis {key!r}: expected a non-empty list of values, got {values!r}")
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


def chain(*sweeps: Iterable[Mapping[str, Any]], **common: Any) -> list[dict[str, Any]]:
    """Concatenate override lists; `common` (dotted keys as `a__b=value`) is added to every run."""
    extra = {k.replace("__", "."): v for k, v in common.items()}
    return [dict(run) | extra for sweep in sweeps for run in sweep]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        short = f"{value:.6g}"
        return short if float(short) == value and len(short) < len(repr(value)) else repr(value)
    if isinstance(value, list | tuple):
        return "x".join(_format_value(v) for v in value)
    return str(value)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among `keys`."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                short[key] = suffix
                break
    return short


def overrides_hash(overrides: Mapping[str, Any]) -> str:
    canonical = json.dumps(dict(sorted(overrides.items())), sort_keys=True, default=repr)
    return hashlib.sha1(canonical.encode()).hexdigest()[:8]


def make_run_id(overrides: Mapping[str, Any]) -> str:
    """Readable id derived from a run's own overrides only, e.g. `name-s_target-0.5_seed-0`."""
    if not overrides:
        return "base"
    short = _short_keys(list(overrides))
    parts = [f"{short[k]}-{_format_value(v)}" for k, v in overrides.items()]
    run_id = re.sub(r"[^A-Za-z0-9._+=-]+", "-", "_".join(parts)).strip(".-")
    if len(run_id) > MAX_RUN_ID_LEN:
        run_id = f"{run_id[: MAX_RUN_ID_LEN - 9]}_{overrides_hash(overrides)}"
    return run_id


@dataclasses.dataclass(frozen=True)
class Resources:
    """Slurm resources of one run (from `config.launch`, defaults below)."""

    cpus_per_task: int = 2
    mem_gb: float = 8.0
    timeout_min: int = 60
    tasks: int = 1
    nodes: int = 1
    gpus_per_node: int = 0


@dataclasses.dataclass(frozen=True)
class Run:
    run_id: str
    overrides: Mapping[str, Any]
    steps: int
    tokens_per_step: int
    resources: Resources


@dataclasses.dataclass(frozen=True)
class Sweep:
    experiment: str
    experiment_file: str
    arg: str | None
    schedule_axes: tuple[str, ...]
    runs: tuple[Run, ...]
    configs: tuple[ml_collections.ConfigDict, ...] = dataclasses.field(compare=False, repr=False)

    def run(self, run_id: str) -> Run:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise KeyError(f"run {run_id!r} is not in sweep {self.experiment!r}")


def spec_name(experiment: str, arg: str | None) -> str:
    return experiment if arg is None else f"{experiment}:{arg}"


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """`path/to/experiment.py[:arg]` -> (absolute path, arg or None), as ml_collections reads it."""
    path, colon, arg = spec.partition(":")
    file = Path(path).expanduser().resolve()
    if file.suffix != ".py" or not file.is_file():
        raise SweepError(f"experiment {spec!r}: expected an existing `<file>.py[:arg]`, got {file}")
    return file, arg if colon else None


def load_experiment(file: Path):
    name = f"_sparsescale_experiment_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for fn in ("get_config", "get_sweep"):
        if not callable(getattr(module, fn, None)):
            raise SweepError(f"experiment {file}: must define {fn}(arg)")
    return module


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str
) -> ml_collections.ConfigDict:
    """Copy of `config` with dotted overrides applied; unknown keys and bad types raise SweepError."""
    config = ml_collections.ConfigDict(config.to_dict())  # deep copy, unlocked
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(node, ml_collections.ConfigDict):
                prefix = ".".join(parents[: i + 1])
                raise SweepError(f"{where}: override {key!r}: config has no section {prefix!r}")
        if leaf not in node:
            known = ", ".join(sorted(node.keys()))
            raise SweepError(f"{where}: override {key!r}: unknown field {leaf!r} (known: {known})")
        try:
            setattr(node, leaf, value)
        except (TypeError, ValueError) as e:
            raise SweepError(f"{where}: override {key!r}={value!r}: {e}") from e
    return config


def _trainer_validate(config: ml_collections.ConfigDict, where: str) -> None:
    """The trainer's own config validation (sparsescale.config.run_config), run before launching."""
    try:
        from sparsescale.config import run_config
    except ImportError:  # trainer not importable here (e.g. a submit-only host): it validates later
        return
    try:
        run_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise SweepError(f"{where}: {e}") from e


def _get(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return default
        node = node[part]
    return node


def check_matched_schedules(
    run_ids: Sequence[str],
    configs: Sequence[ml_collections.ConfigDict],
    schedule_axes: Sequence[str] = (),
) -> None:
    """Refuse runs whose sparsity schedule shapes differ, except along declared schedule axes.

    Dense runs (sparsity 0) have no schedule to match and are not compared.
    """
    allowed = {axis.removeprefix("sparsity.schedule.") for axis in schedule_axes}
    reference: dict[str, tuple[str, Any]] = {}
    for run_id, config in zip(run_ids, configs, strict=True):
        if not _get(config, "sparsity.target", 0.0):
            continue
        for field in SCHEDULE_FIELDS:
            if field in allowed:
                continue
            value = _get(config, f"sparsity.schedule.{field}")
            first = reference.setdefault(field, (run_id, value))
            if first[1] != value:
                raise SweepError(
                    f"unmatched schedules: sparsity.schedule.{field} is {first[1]!r} in run "
                    f"{first[0]!r} but {value!r} in run {run_id!r}; a sweep compares runs under one "
                    f"schedule shape. If this axis is intended, declare it in the experiment: "
                    f'SCHEDULE_AXES = ("sparsity.schedule.{field}",)'
                )


def _resources(config: ml_collections.ConfigDict, where: str) -> Resources:
    launch = _get(config, "launch")
    given = launch.to_dict() if isinstance(launch, ml_collections.ConfigDict) else {}
    names = {f.name for f in dataclasses.fields(Resources)}
    unknown = set(given) - names
    if unknown:
        raise SweepError(
            f"{where}: config.launch has unknown keys {sorted(unknown)}; known {names}"
        )
    resources = Resources(**given)
    if resources.tasks < 1 or resources.nodes < 1 or resources.tasks % resources.nodes:
        raise SweepError(
            f"{where}: config.launch.tasks={resources.tasks} must be a positive multiple of "
            f"config.launch.nodes={resources.nodes}"
        )
    return resources


def parse_config_flags(flags: Sequence[str]) -> dict[str, Any]:
    """`--config.KEY=VALUE` flags (the trainer's syntax) as overrides {KEY: VALUE}; a VALUE is a
    Python literal where it parses as one (16, 0.5, True, (4, 4)), else the text."""
    overrides = {}
    for flag in flags:
        key, sep, text = flag.removeprefix("--config.").partition("=")
        if not flag.startswith("--config.") or not sep or not key:
            raise SweepError(
                f"unrecognized argument {flag!r}; config fields are --config.KEY=VALUE"
            )
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def expand(spec: str, config: Mapping[str, Any] | None = None) -> Sweep:
    """Load an experiment (`file.py[:arg]`) and expand its sweep into validated runs; `config`:
    overrides for every run (`--config.KEY=VALUE`), part of each run's overrides and id."""
    file, arg = parse_spec(spec)
    module = load_experiment(file)
    args = () if arg is None else (arg,)  # get_config() without ':arg', like config_flags
    base = module.get_config(*args)
    for key in ("run_id", "experiment"):
        if key not in base:
            raise SweepError(
                f"experiment {file}: get_config({arg!r}) has no field {key!r}; the launcher sets "
                f"--config.run_id and --config.experiment (see experiments/common.py base_config)"
            )
    overrides_list = list(module.get_sweep(*args))
    if not overrides_list:
        raise SweepError(f"experiment {file}: get_sweep({arg!r}) returned no runs")
    if config:
        per_run = sorted({key for o in overrides_list for key in o} & set(config))
        if per_run:
            raise SweepError(
                f"--config.{per_run[0]}: {spec_name(file.stem, arg)} sets it per run; "
                f"select runs with --only {per_run[0]}=VALUE instead"
            )
        overrides_list = [{**o, **config} for o in overrides_list]
    schedule_axes = tuple(getattr(module, "SCHEDULE_AXES", ()))
    bad_axes = [
        a for a in schedule_axes if a.removeprefix("sparsity.schedule.") not in SCHEDULE_FIELDS
    ]
    if bad_axes:
        raise SweepError(f"experiment {file}: SCHEDULE_AXES {bad_axes} not in {SCHEDULE_FIELDS}")

    run_ids, configs = [], []
    for i, overrides in enumerate(overrides_list):
        where = f"{spec_name(file.stem, arg)} get_sweep run #{i} {dict(overrides)}"
        if not isinstance(overrides, Mapping):
            raise SweepError(f"{where}: expected a dict of dotted overrides")
        configs.append(apply_overrides(base, overrides, where))
        _trainer_validate(configs[-1], where)
        run_ids.append(make_run_id(overrides))
    seen: dict[str, int] = {}
    for i, run_id in enumerate(run_ids):
        if run_id in seen:
            j = seen[run_id]
            if dict(overrides_list[i]) == dict(overrides_list[j]):
                raise SweepError(f"experiment {file}: runs #{j} and #{i} have identical overrides")
        seen.setdefault(run_id, i)
    collisions = {r for r in run_ids if run_ids.count(r) > 1}
    run_ids = [
        f"{r}_{overrides_hash(o)}" if r in collisions else r
        for r, o in zip(run_ids, overrides_list, strict=True)
    ]
    check_matched_schedules(run_ids, configs, schedule_axes)

    runs = []
    for run_id, overrides, config in zip(run_ids, overrides_list, configs, strict=True):
        where = f"{spec_name(file.stem, arg)} run {run_id}"
        steps = int(_get(config, "train.steps", 0))
        if steps <= 0:
            raise SweepError(f"{where}: config.train.steps must be positive, got {steps}")
        tokens_per_step = int(_get(config, "data.batch_size", 0)) * int(
            _get(config, "data.seq_len", 0)
        )
        runs.append(Run(run_id, dict(overrides), steps, tokens_per_step, _resources(config, where)))
    name = str(base.experiment or file.stem)
    return Sweep(name, str(file), arg, schedule_axes, tuple(runs), tuple(configs))


def select(sweep: Sweep, only: Sequence[str]) -> Sweep:
    """The runs of `sweep` whose overrides match every `KEY=V1[,V2…]` of `only` (a part of the
    sweep, e.g. `train.seed=0,1`; values as they would be written on the command line)."""
    keys = sorted({k for r in sweep.runs for k in r.overrides})
    pairs = tuple(zip(sweep.runs, sweep.configs, strict=True))
    for item in only:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SweepError(f"--only {item!r}: expected KEY=V1[,V2…], e.g. --only train.seed=0,1")
        if key not in keys:
            raise SweepError(f"--only {item!r}: no run overrides {key}; the sweep varies {keys}")
        wanted = set(values.split(","))
        pairs = tuple((r, c) for r, c in pairs if _flag_value(r.overrides.get(key)) in wanted)
    if not pairs:
        raise SweepError(f"--only {' '.join(only)}: no run of the sweep matches")
    runs, configs = zip(*pairs, strict=True)
    return dataclasses.replace(sweep, runs=runs, configs=configs)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _step_flops(config: ml_collections.ConfigDict, steps: int) -> float:
    from sparsescale.accounting import estimate_cost

    return estimate_cost(config)["dense_train_flops"] / steps


def sweep_record(sweep: Sweep) -> dict[str, Any]:
    return {
        "experiment": sweep.experiment,
        "experiment_file": sweep.experiment_file,
        "arg": sweep.arg,
        "schedule_axes": list(sweep.schedule_axes),
        "runs": [
            {
                "run_id": run.run_id,
                "model": None if (m := _get(config, "model.name")) is None else str(m),
                "overrides": {k: _jsonable(v) for k, v in run.overrides.items()},
                "steps": run.steps,
                "tokens_per_step": run.tokens_per_step,
                # what one step computes (masked sparsity runs dense): the ETA's cost model
                "step_flops": _step_flops(config, run.steps),
                "resources": dataclasses.asdict(run.resources),
            }
            for run, config in zip(sweep.runs, sweep.configs, strict=True)
        ],
    }


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
RESERVED_NAMES = {"slurm"}  # directories the launcher itself keeps at the sweep root


def _load_sweep_file(path: Path) -> dict[str, Any] | None:
    """The validated record in `path`; None if missing; SweepError naming the cause if damaged."""
    try:
        record = run_files.load_json(path)
    except FileNotFoundError:
        return None
    except run_files.RunFileError as e:
        raise SweepError(
            f"{e} It records which runs belong to the sweep; restore it, or move it away to "
            "start a new record (the runs' directories are kept)"
        ) from e
    validate_sweep_record(record, path)
    return record


def validate_sweep_record(record: Any, path: Path | str) -> None:
    """Refuse a crafted or damaged sweep record: every run id must name a plain directory
    directly under the root (no `..`, `/`, hidden or reserved names), once, and every run must
    carry the fields the launcher reads. Raises SweepError naming the file, the run and the field."""

    def bad(what: str) -> SweepError:
        return SweepError(f"{path}: {what}; the file is damaged or was not written by the launcher")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("experiment"), str):
        raise bad(f"'experiment' must be a string, got {record.get('experiment')!r}")
    if not isinstance(record.get("arg"), str | None):
        raise bad(f"'arg' must be a string or null, got {record.get('arg')!r}")
    runs = record.get("runs")
    if not isinstance(runs, list):
        raise bad(f"'runs' must be a list, got {type(runs).__name__}")
    seen = set()
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise bad(f"runs[{i}] must be an object, got {run!r:.80}")
        run_id = run.get("run_id")
        if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
            raise bad(
                f"runs[{i}].run_id {run_id!r:.120} is not a plain directory name (letters, digits, "
                "._+=-; it must not point outside the sweep root)"
            )
        if len(run_id) > 2 * MAX_RUN_ID_LEN or run_id in RESERVED_NAMES:
            raise bad(f"runs[{i}].run_id {run_id[:120]!r} is too long or reserved")
        if run_id in seen:
            raise bad(f"run id {run_id!r} appears twice")
        seen.add(run_id)
        for key, minimum in (("steps", 1), ("tokens_per_step", 0)):
            value = run.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise bad(f"run {run_id!r}: {key!r} must be an integer ≥ {minimum}, got {value!r}")
        if not isinstance(run.get("model"), str | None):
            raise bad(f"run {run_id!r}: 'model' must be a string or null")
        if not isinstance(run.get("overrides", {}), dict):
            raise bad(f"run {run_id!r}: 'overrides' must be an object")


def read_sweep_json(root: Path) -> dict[str, Any]:
    path = Path(root) / SWEEP_FILE
    record = _load_sweep_file(path)
    if record is None:
        raise SweepError(f"{path}: not a sweep root (no {SWEEP_FILE})")
    return record


def save_sweep(root: Path, sweep: Sweep) -> dict[str, Any]:
    """Write `<root>/sweep.json`, keeping runs recorded by earlier launches of the same experiment."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    record = sweep_record(sweep)
    old = _load_sweep_file(root / SWEEP_FILE)  # damaged: refused, never overwritten
    if old is not None:
        if (old["experiment"], old["arg"]) != (sweep.experiment, sweep.arg):
            raise SweepError(
                f"{root} holds sweep {spec_name(old['experiment'], old['arg'])}, not "
                f"{spec_name(sweep.experiment, sweep.arg)}; use another --root"
            )
        new_ids = {r["run_id"]: r for r in record["runs"]}
        for old_run in old["runs"]:
            new_run = new_ids.get(old_run["run_id"])
            if new_run is not None and new_run["overrides"] != old_run["overrides"]:
                raise SweepError(
                    f"{root}: run {old_run['run_id']!r} was launched with overrides "
                    f"{old_run['overrides']} but the experiment now gives {new_run['overrides']}"
                )
        record["runs"] += [r for r in old["runs"] if r["run_id"] not in new_ids]
        record["created"] = old.get("created")
    record.setdefault("created", None)
    record["created"] = record["created"] or state.now_iso()
    record["updated"] = state.now_iso()
    run_files.write_json_atomic(root / SWEEP_FILE, record)
    return record


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return repr(tuple(value))
    return str(value)


def trainer_command(
    sweep: Sweep, run: Run, workdir: Path, python: str, multihost: bool = False
) -> list[str]:
    """The `python -m sparsescale.main ...` command line of one run."""
    command = [
        python,
        "-m",
        TRAINER_MODULE,
        f"--config={sweep.experiment_file}" + ("" if sweep.arg is None else f":{sweep.arg}"),
        f"--workdir={workdir}",
    ]
    command += [f"--config.{k}={_flag_value(v)}" for k, v in run.overrides.items()]
    command += [f"--config.run_id={run.run_id}", f"--config.experiment={sweep.experiment}"]
    if multihost:
        command.append("--multihost")
    return command
