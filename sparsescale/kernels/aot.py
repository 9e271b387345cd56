"""Deviceless ahead-of-time compilation for real chips (TPU v5e / v6e via libtpu, H100 via the CUDA
plugin), used by the tests to prove kernels compile without the hardware.

Needs `pip install "jax[tpu]==<jax version>"` (TPU) and `jax-cuda12-plugin==<v> jax-cuda12-pjrt==<v>`
(H100); run with JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path

import jax
from jax.experimental import topologies

# Shipped as package data beside this module (a GPU target description for deviceless compiles).
H100_TARGET_CONFIG = "h100_target_config.txtpb"
# target name → (platform, topology name, kernel backend flavour)
TARGETS = {
    "tpu_v5e": ("tpu", "v5e:2x2", "tpu"),
    "tpu_v6e": ("tpu", "v6e:2x2", "tpu"),
    "h100": ("cuda", "h100", "gpu"),
}


def h100_target_config_path() -> Path:
    """The H100 target config: $SPARSESCALE_H100_TARGET_CONFIG, else the copy shipped with the
    package (`sparsescale/kernels/h100_target_config.txtpb`)."""
    if "SPARSESCALE_H100_TARGET_CONFIG" in os.environ:
        return Path(os.environ["SPARSESCALE_H100_TARGET_CONFIG"])
    return Path(str(importlib.resources.files("sparsescale.kernels") / H100_TARGET_CONFIG))


@functools.cache
def target_device(target: str):
    """First device of a deviceless topology for `target` (raises if its plugin is missing)."""
    platform, name, _ = TARGETS[target]
    if platform == "tpu":
        topo = topologies.get_topology_desc(name, "tpu")
    else:
        config = h100_target_config_path().read_text()
        topo = topologies.get_topology_desc(name, "cuda", target_config=config, topology="1x1x1")
    return topo.devices[0]


def target_available(target: str) -> str | None:
    """None if `target` can be compiled for here, else the reason it cannot."""
    try:
        target_device(target)
    except Exception as e:  # a missing plugin / libtpu shows up as many error types
        return f"{target} deviceless compile unavailable: {type(e).__name__}: {e}"[:300]
    return None


def compile_for(target: str, fn, *avals: jax.ShapeDtypeStruct):
    """jit(fn).lower(...).compile() for `target` from shapes only; returns the Compiled object."""
    device = target_device(target)
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in avals]
    return jax.jit(fn).lower(*args).compile()
