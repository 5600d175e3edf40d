"""Tensor parallelism over a device mesh: the pool is sharded over KV heads, page ids are the
same on every shard, and per-shard kernels run on their local heads (`shard_map`).

Device side: imports JAX. The host manager stays single; only the arrays are sharded.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "TP_AXIS",
    "check_heads",
    "pool_sharding",
    "pool_spec",
    "replicated",
    "shard_params",
    "tensor_parallel_mesh",
]

TP_AXIS = "tp"


def tensor_parallel_mesh(tensor_parallel: int | Mesh) -> Mesh:
    """A one-axis mesh named `TP_AXIS` over the first `tensor_parallel` devices, or the user's
    mesh (which must have a `TP_AXIS` axis)."""
    if isinstance(tensor_parallel, Mesh):
        if TP_AXIS not in tensor_parallel.axis_names:
            raise ValueError(
                f"the mesh's axes {tensor_parallel.axis_names} have no {TP_AXIS!r} axis"
            )
        return tensor_parallel
    devices = jax.devices()
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int):
        raise ValueError(f"tensor_parallel={tensor_parallel!r} must be an int or a Mesh")
    if not 1 <= tensor_parallel <= len(devices):
        raise ValueError(
            f"tensor_parallel={tensor_parallel} must be in [1, {len(devices)}] "
            f"(the {jax.default_backend()} devices of this process)"
        )
    return Mesh(np.array(devices[:tensor_parallel]), (TP_AXIS,))


def check_heads(num_heads: int, num_kv_heads: int, mesh: Mesh) -> None:
    """Raises unless both head counts divide over the mesh's `TP_AXIS` (heads are not
    replicated: every shard holds distinct KV heads)."""
    size = mesh.shape[TP_AXIS]
    for name, heads in (("num_kv_heads", num_kv_heads), ("num_heads", num_heads)):
        if heads % size:
            raise ValueError(
                f"{name}={heads} does not divide over tensor_parallel={size}; choose a "
                f"tensor-parallel size that divides it"
            )


def pool_spec() -> PartitionSpec:
    """Pools and staging arrays `[pages, layers, 2, kv_heads, page, head_dim]`: KV heads split."""
    return PartitionSpec(None, None, None, TP_AXIS, None, None)


def pool_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, pool_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params, specs, mesh: Mesh):
    """`params` (an `nnx.State`) placed on `mesh` by `specs` (the same tree of PartitionSpecs)."""
    shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return jax.device_put(params, shardings)
