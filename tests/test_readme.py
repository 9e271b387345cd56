"""The README runs as written: the python blocks of "1. Reuse the sparse layers", extracted
verbatim and executed in order, prune a user's own model gradually to the target sparsity in a
plain `jax.jit` loop while the loss goes down, then prune another one-shot; every command it shows names files and modules
that exist, and the cheap ones (help, dry runs, status) succeed."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "1. Reuse the sparse layers"


def section_code(title: str) -> list[str]:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no section {title!r}"
    blocks = re.findall(r"^```python\n(.*?)^```$", match.group(1), re.M | re.S)
    assert blocks, f"README section {title!r} has no python code block"
    return blocks


def test_reusing_the_sparse_layers_section_runs(capsys):
    namespace = {"__name__": "readme"}
    for block in section_code(SECTION):
        exec(compile(block, f"README.md ({SECTION})", "exec"), namespace)

    masking, prune, masks = namespace["masking"], namespace["prune"], namespace["masks"]
    target = namespace["cfg"].structure.sparsity
    assert prune.paths, "nothing was pruned"
    total = sum(np.prod(prune.shapes[p]) for p in prune.paths)
    assert float(masking.sparsity(prune, masks)) == pytest.approx(target, abs=1 / total)
    losses = namespace["losses"]
    assert len(losses) == namespace["steps"] and np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    # keep_pruned_zero: every pruned weight is exactly zero at the end.
    params = traverse_util.flatten_dict(namespace["params"])
    for path in prune.paths:
        mask = np.asarray(traverse_util.flatten_dict(masks)[(*path[:-1], "mask")])
        assert not np.any(np.asarray(params[path])[~mask])
    assert f"sparsity {target:.3f}" in capsys.readouterr().out

    # One-shot: the trained model's hidden layer is 2:4 by SparseGPT, the excluded one dense.
    trained, report = namespace["trained"], namespace["report"]
    assert list(report) == ["hidden"] and report["hidden"]["sparsity"] == 0.5
    keep = np.asarray(trained.hidden.mask[...])
    assert np.all(keep.reshape(2, 4, -1).sum(axis=1) == 2)
    assert not np.any(np.asarray(trained.hidden.kernel[...])[~keep])
    assert 0 < report["hidden"]["relative_error"] < 1
    assert not hasattr(trained.out, "mask")


def _commands() -> list[list[str]]:
    """Every `python -m ...` line of the README's bash blocks, split into arguments."""
    text = README.read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```$", text, re.M | re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    commands = []
    for line in lines:
        for part in line.split("&&"):
            args = shlex.split(re.sub(r"\[.*?\]", "", part))
            if args[:2] == ["python", "-m"]:
                commands.append(args)
    return commands


def test_readme_commands_name_what_exists():
    import importlib.util

    commands = _commands()
    assert len(commands) >= 8
    for args in commands:
        assert importlib.util.find_spec(args[2]), f"no module {args[2]} ({shlex.join(args)})"
        for arg in args[3:]:
            if arg.startswith("experiments/") or "--config=experiments/" in arg:
                path = arg.split("=")[-1].split(":")[0]
                assert (README.parent / path).exists(), f"{path} ({shlex.join(args)})"


def test_readme_cheap_commands_succeed(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    runs = [
        [sys.executable, "-m", "sparsescale.main", "--help"],
        *(
            [
                sys.executable,
                *a[1:3],
                *(str(tmp_path / x) if x.startswith("runs/") else x for x in a[3:]),
            ]
            for a in _commands()
            if "--dry-run" in a
        ),
    ]
    for args in runs:
        done = subprocess.run(args, cwd=README.parent, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (shlex.join(args), done.stderr[-2000:])


CORE_ONLY = """
import importlib.abc, sys

# (scipy is left importable: jax itself requires it)
EXTRAS = {"orbax", "tensorflow_datasets", "array_record", "grain", "ml_collections",
          "tensorboardX", "threadpoolctl", "submitit", "pandas", "pyarrow", "matplotlib"}

class NotInstalled(importlib.abc.MetaPathFinder):  # what `pip install sparsescale` leaves out
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the core)")

sys.meta_path.insert(0, NotInstalled())
namespace = {"__name__": "readme"}
for block in BLOCKS:
    exec(compile(block, "README.md", "exec"), namespace)
print("losses", namespace["losses"][0], namespace["losses"][-1])
"""


def test_the_sparse_layers_need_only_the_core_dependencies():
    """The reuse section runs with none of the extras' packages importable (pyproject's core:
    jax, flax, optax, numpy)."""
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[]", d)[0] for d in project["dependencies"]}
    assert core == {"jax", "jaxlib", "flax", "optax", "numpy"}
    code = f"BLOCKS = {section_code(SECTION)!r}\n{CORE_ONLY}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, last = map(float, done.stdout.split("losses")[-1].split())
    assert last < 0.7 * first
