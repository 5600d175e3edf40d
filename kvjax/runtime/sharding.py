"""Tensor parallelism over a device mesh: the pool is sharded over KV heads, page ids are the
same on every shard, and per-shard kernels run on their local heads (`shard_map`).

Several hosts (`jax.distributed.initialize()`, one process per host): the mesh spans every
process's devices; each process runs the same host manager and scheduler on the same requests,
so all agree on page ids without exchanging them. Host-side values that every process computes
alike are placed with `place` (no cross-process check per call); colder tiers keep only the KV
heads of this process's devices (`LocalHeads`).

Device side: imports JAX. The host manager stays single; only the arrays are sharded.
"""

from __future__ import annotations

import blake3
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

__all__ = [
    "TP_AXIS",
    "LocalHeads",
    "agreed_host_pages",
    "check_heads",
    "check_same_on_every_process",
    "place",
    "pool_sharding",
    "pool_spec",
    "replicated",
    "shard_params",
    "spans_processes",
    "tensor_parallel_mesh",
    "zeros",
]

TP_AXIS = "tp"


def tensor_parallel_mesh(tensor_parallel: int | Mesh) -> Mesh:
    """A one-axis mesh named `TP_AXIS`, or the user's mesh (which must have a `TP_AXIS` axis).

    An int takes the first `tensor_parallel` devices; across several processes, the same number
    of devices from each (every process holds a share of the KV heads and serves its host tier).
    """
    processes = jax.process_count()
    if isinstance(tensor_parallel, Mesh):
        if TP_AXIS not in tensor_parallel.axis_names:
            raise ValueError(
                f"the mesh's axes {tensor_parallel.axis_names} have no {TP_AXIS!r} axis"
            )
        used = {device.process_index for device in tensor_parallel.devices.flat}
        missing = sorted(set(range(processes)) - used)
        if missing:
            raise ValueError(
                f"the mesh has no device of processes {missing}; every process must hold a "
                "share of the KV heads"
            )
        return tensor_parallel
    devices = jax.devices()
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int):
        raise ValueError(f"tensor_parallel={tensor_parallel!r} must be an int or a Mesh")
    if not 1 <= tensor_parallel <= len(devices):
        raise ValueError(
            f"tensor_parallel={tensor_parallel} must be in [1, {len(devices)}] "
            f"(the {jax.default_backend()} devices of {_processes()})"
        )
    if tensor_parallel % processes:
        raise ValueError(
            f"tensor_parallel={tensor_parallel} must be a multiple of the {processes} "
            "processes: each holds the same share of the KV heads"
        )
    per_process = tensor_parallel // processes
    chosen = [
        device
        for process in range(processes)
        for device in [d for d in devices if d.process_index == process][:per_process]
    ]
    if len(chosen) < tensor_parallel:
        local = len(jax.local_devices())
        raise ValueError(
            f"tensor_parallel={tensor_parallel} needs {per_process} devices on each of the "
            f"{processes} processes; some have fewer (this one has {local})"
        )
    return Mesh(np.array(chosen), (TP_AXIS,))


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
    """Pools and staging arrays `[pages, layers, 2, kv_heads, page, head_dim]`, and fp8 pools'
    scales `[pages, layers, 2, kv_heads, page]`: KV heads split."""
    return PartitionSpec(None, None, None, TP_AXIS)


def pool_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, pool_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params, specs, mesh: Mesh):
    """`params` (an `nnx.State`) placed on `mesh` by `specs` (the same tree of PartitionSpecs).

    Raises:
        ValueError: a dimension split over the mesh does not divide by its size (named).
    """
    size = mesh.shape[TP_AXIS]
    leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_spec)
    for (path, spec), (_, value) in zip(
        leaves, jax.tree_util.tree_leaves_with_path(params), strict=True
    ):
        for dim, axis in enumerate(spec):
            if axis == TP_AXIS and value.shape[dim] % size:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} of shape {list(value.shape)}: dimension {dim} "
                    f"({value.shape[dim]}) does not divide over tensor_parallel={size}"
                )
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)
    # A sharding stands for a whole variable (e.g. an `nnx.Param` around one array).
    return jax.tree.map(
        lambda sharding, variable: jax.tree.map(lambda x: place(x, sharding), variable),
        shardings,
        params,
    )


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def place(value, sharding: Sharding | None) -> jax.Array:
    """`value` (the whole array, the same on every process) laid out by `sharding` (None: the
    default device).

    Across processes `jax.device_put` checks that every process passed the same host value,
    with a collective and a compile per shape; the engine's processes compute the same inputs
    by construction (`Engine(check_agreement=True)` verifies it per step), so each process only
    transfers the slices its own devices hold. An array already spread over processes is
    resharded by `jax.device_put` (nothing moves when it is laid out so already).
    """
    spread = isinstance(value, jax.Array) and not value.is_fully_addressable
    if sharding is None or sharding.is_fully_addressable or spread:
        return jax.device_put(value, sharding)
    if not isinstance(value, jax.Array):
        value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def zeros(shape, dtype, sharding: Sharding | None) -> jax.Array:
    """Zeros created in place by `sharding` (a pool never exists whole on one device)."""
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


class LocalHeads:
    """The KV heads of pool-sharded arrays (`pool_spec`) that this process's devices hold.

    Host and disk tiers keep pages of these heads only, in head order: all of them on one host,
    this host's share across several. Arrays are `[pages, layers, 2, kv_heads, ...]`.
    """

    def __init__(self, mesh: Mesh, num_kv_heads: int) -> None:
        self.sharding = pool_sharding(mesh)
        self.num_kv_heads = num_kv_heads
        indices = self.sharding.addressable_devices_indices_map((1, 1, 1, num_kv_heads, 1, 1))
        ranges = sorted({index[3].indices(num_kv_heads)[:2] for index in indices.values()})
        self._offsets: dict[int, int] = {}  # first global head of a shard -> its local head
        self.count = 0
        for start, stop in ranges:
            self._offsets[start] = self.count
            self.count += stop - start

    def local_shape(self, shape) -> tuple[int, ...]:
        """The shape of this process's heads of an array of `shape` (heads on axis 3)."""
        return (*shape[:3], self.count, *shape[4:])

    def _local(self, heads: slice) -> slice:
        start, stop, _ = heads.indices(self.num_kv_heads)
        offset = self._offsets[start]
        return slice(offset, offset + stop - start)

    def to_host(self, array: jax.Array) -> np.ndarray:
        """This process's heads of a pool-sharded `array`, as one host array."""
        local = np.empty(self.local_shape(array.shape), array.dtype)
        for shard in array.addressable_shards:  # replicas over other mesh axes repeat a slice
            local[:, :, :, self._local(shard.index[3])] = np.asarray(shard.data)
        return local

    def to_device(self, local: np.ndarray) -> jax.Array:
        """The pool-sharded array whose heads here are `local` (every process passes its own)."""
        shape = (*local.shape[:3], self.num_kv_heads, *local.shape[4:])
        return jax.make_array_from_callback(
            shape, self.sharding, lambda index: local[:, :, :, self._local(index[3])]
        )


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether `mesh` has devices of several processes (which then run in lockstep)."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def agreed_host_pages(config, mesh: Mesh, available_bytes: int) -> int:
    """`config.auto_host_pages` (a `CacheConfig`) of this host's `available_bytes`, knowing a
    host keeps only its devices' KV heads of each page; over a mesh of several processes the
    smallest of their counts, as tiers and page ids must agree."""
    local_heads = LocalHeads(mesh, config.num_kv_heads).count
    pages = config.auto_host_pages(available_bytes * config.num_kv_heads // local_heads)
    if not spans_processes(mesh):
        return pages
    return int(np.min(multihost_utils.process_allgather(np.int64(pages))))


def check_same_on_every_process(what: str, *parts) -> None:
    """Raises `RuntimeError` on every process unless all passed equal `parts` (numpy arrays, or
    values compared by `repr`). A collective: every process must call it at the same point.

    Compares a 128-bit blake3 digest, so every call gathers one fixed shape (compiled once).
    """
    if jax.process_count() == 1:
        return
    digest = blake3.blake3()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(repr(part).encode())
        digest.update(b"|")
    mine = np.frombuffer(digest.digest(16), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    differing = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
    if differing:
        raise RuntimeError(
            f"{what} differs between processes: processes {differing} disagree with process 0 "
            "(every process must add the same requests in the same order, with the same "
            "configuration and seed)"
        )


def _processes() -> str:
    count = jax.process_count()
    return "this process" if count == 1 else f"all {count} processes"
