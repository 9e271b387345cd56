"""The README's "Reusing the sparse layers" section runs as written: its python code blocks,
extracted verbatim and executed in order, prune a user's own model gradually to the target
sparsity in a plain `jax.jit` loop while the loss goes down."""

import re
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "Reusing the sparse layers"


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
