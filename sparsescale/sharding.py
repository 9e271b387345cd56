"""Device mesh and shardings from logical axis rules."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Parameters: embed over fsdp (ZeRO-3 style), mlp/heads/vocab over tensor, experts over expert.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("kv", None),
    ("length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape per axis; one axis may be -1 (takes the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: tuple = DEFAULT_RULES

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.expert, self.tensor]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(
                f"mesh: sizes must be positive with at most one -1, got "
                f"{dict(zip(MESH_AXES, sizes, strict=True))}."
            )
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh: {num_devices} devices are not divisible by the fixed axes "
                    f"{dict(zip(MESH_AXES, sizes, strict=True))}."
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh: shape {dict(zip(MESH_AXES, sizes, strict=True))} needs "
                f"{math.prod(sizes)} devices, but {num_devices} are available."
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = cfg.shape(len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def logical_to_spec(names, rules) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", None), rules))


def state_shardings(state, mesh: jax.sharding.Mesh, rules):
    """NamedShardings for an nnx.State (or a tree containing one) from its logical axis names."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec) else PartitionSpec()),
        nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None,
    )


def check_divisible(shapes_and_specs, mesh: jax.sharding.Mesh) -> None:
    """Clear error when a sharded dimension does not divide by its mesh axes."""
    for path, (shape, spec) in shapes_and_specs.items():
        for dim, axes in zip(shape, spec, strict=False):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if dim % size:
                raise ValueError(
                    f"mesh: {path} dimension {dim} is sharded over {axes} (size {size}) but is "
                    f"not divisible by it; change the mesh or the logical rules."
                )
