"""Mesh, shardings and multi-host plumbing for the jitted train programs (DESIGN.md, SPEC §10).

One ``Mesh`` with axes ("data", "fsdp") serves every phase: batches are split over both axes
(every device holds different samples), frozen base weights are sharded over "fsdp" on their
largest divisible axis, and small trees are replicated. A trained tree is laid out by a
``TreeLayout``: replicated (a LoRA), or sharded like the frozen weights (a fully fine-tuned UNet
and its optimizer state). Everything here is a small function of a mesh and array shapes, so
``train.py`` states its layout in a few lines.

Randomness never depends on the mesh: a sample's keys come from its *global* index
(``global_indices`` / ``process_indices``), so any mesh shape and process count draws the same
trajectories.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)
BATCH_AXES = (DATA, FSDP)  # the batch axis is split over both mesh axes
DEFAULT_MIN_SHARD_SIZE = 2**18  # leaves smaller than this (elements) stay replicated

_MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
    "alias": "alias_size_in_bytes",
}


# ----------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Return the (data, fsdp) mesh shape for ``num_devices``; -1 takes all remaining devices."""
    for name, size in ((DATA, data), (FSDP, fsdp)):
        if size != -1 and (not isinstance(size, int | np.integer) or size < 1):
            raise ValueError(f"mesh {name}={size} must be a positive integer or -1")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh data=-1 and fsdp=-1: at most one axis can take the rest (-1)")
    if data == -1 or fsdp == -1:
        given_name, given = (FSDP, fsdp) if data == -1 else (DATA, data)
        if num_devices % given:
            raise ValueError(f"mesh {given_name}={given} does not divide the {num_devices} devices")
        rest = num_devices // given
        data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
    if data * fsdp != num_devices:
        raise ValueError(
            f"mesh data={data} × fsdp={fsdp} = {data * fsdp} does not match the "
            f"{num_devices} devices"
        )
    return int(data), int(fsdp)


def _multislice_mesh(shape: tuple[int, int], devices: Sequence[Any], num_slices: int) -> Mesh:
    """Return a Mesh over several TPU slices: slices talk over DCN, so they split "data"."""
    data, fsdp = shape
    if data % num_slices:
        raise ValueError(
            f"mesh data={data} must be a multiple of the {num_slices} TPU slices "
            "(fsdp stays inside a slice)"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp), (num_slices, 1), devices
    )
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """Return a ("data", "fsdp") Mesh over ``devices`` (default: all); -1 = remaining devices.

    Device order is topology-aware on TPU (``jax.make_mesh``); with several TPU slices the
    slices are laid along "data".
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, len(devices))
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        return _multislice_mesh(shape, devices, num_slices)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_str(mesh: Mesh) -> str:
    """Return 'data=D × fsdp=F' for messages and logs."""
    return f"{DATA}={mesh.shape[DATA]} × {FSDP}={mesh.shape[FSDP]}"


# ----------------------------------------------------------------------------------------------
# Shardings


def batch_spec(ndim: int = 1) -> PartitionSpec:
    """Return the spec that splits the leading (batch) axis over all devices; P() for scalars."""
    if ndim < 0:
        raise ValueError(f"ndim={ndim} must be >= 0")
    return PartitionSpec() if ndim == 0 else PartitionSpec(BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Return the sharding of a batch array of rank ``ndim``: samples split over all devices."""
    return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    """Return the fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _shape(x: Any) -> tuple[int, ...]:
    """Return the shape of an array, ShapeDtypeStruct or Python scalar."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def fsdp_spec(
    shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_MIN_SHARD_SIZE
) -> PartitionSpec:
    """Return P with "fsdp" on the largest axis divisible by ``fsdp_size`` (ties: the last).

    Leaves with fewer than ``min_size`` elements, or no divisible axis, are replicated (P()).
    """
    shape = tuple(int(d) for d in shape)
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    best = None
    for axis, size in enumerate(shape):
        if size % fsdp_size == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*(FSDP if axis == best else None for axis in range(len(shape))))


def fsdp_shardings(mesh: Mesh, tree: Any, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
    """Return a tree of NamedSharding matching ``tree`` (arrays or ShapeDtypeStructs), FSDP rule."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(_shape(x), fsdp_size, min_size)), tree
    )


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """Where a tree of trained arrays lives on a mesh: FSDP-sharded, or replicated.

    ``fsdp=True`` puts every leaf on the "fsdp" axis by ``fsdp_spec`` (its largest axis that
    the fsdp size divides; leaves under ``min_size`` elements stay whole), as the frozen
    weights are; ``fsdp=False`` replicates every leaf. Without a mesh (abstract programs built
    elsewhere) ``constrain`` leaves its tree alone and ``shardings`` raises.
    """

    mesh: Mesh | None = None
    fsdp: bool = False
    min_size: int = DEFAULT_MIN_SHARD_SIZE

    def shardings(self, tree: Any) -> Any:
        """Return the NamedSharding of every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
        if self.mesh is None:
            raise ValueError("TreeLayout without a mesh has no shardings")
        if self.fsdp:
            return fsdp_shardings(self.mesh, tree, self.min_size)
        rep = replicated(self.mesh)
        return jax.tree.map(lambda _: rep, tree)

    def put(self, tree: Any) -> Any:
        """Return ``tree`` as global arrays laid out by ``shardings`` (see ``put``)."""
        return put(tree, self.shardings(tree))

    def constrain(self, tree: Any) -> Any:
        """Return ``tree`` (inside jit) constrained to FSDP shardings; as is when replicated.

        What a jitted step applies to the gradients, parameters and optimizer state it
        returns, so each device keeps only its shard (the gradient sum is reduce-scattered).
        """
        if self.mesh is None or not self.fsdp:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, self.shardings(tree))

    def abstract(self, tree: Any) -> Any:
        """Return ShapeDtypeStructs of ``tree`` carrying this layout's shardings."""
        return abstract(tree, self.shardings(tree))


def put(tree: Any, shardings: Any) -> Any:
    """Return ``tree`` as global arrays with ``shardings``; host values must match on all processes.

    For parameters every process loads identically (weights, a fresh init).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x: Any, sharding: NamedSharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def abstract(tree: Any, shardings: Any) -> Any:
    """Return ShapeDtypeStructs of ``tree`` carrying ``shardings`` (for compile-only analysis)."""

    def one(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
        return jax.ShapeDtypeStruct(_shape(x), dtype, sharding=sharding)

    return jax.tree.map(one, tree, shardings)


# ----------------------------------------------------------------------------------------------
# Batch sizes and host data


def check_batch(global_batch: int, mesh: Mesh, what: str = "batch") -> int:
    """Return the per-device batch; raise ValueError unless the devices split it evenly."""
    n = mesh.size
    if global_batch < 1:
        raise ValueError(f"{what}={global_batch} must be a positive integer")
    if global_batch % n:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {n} devices (mesh {mesh_str(mesh)})"
        )
    return global_batch // n


def per_process_batch(
    global_batch: int, what: str = "batch", process_count: int | None = None
) -> int:
    """Return this process's share of ``global_batch``; raise ValueError if it does not split."""
    p = jax.process_count() if process_count is None else process_count
    if global_batch < 1:
        raise ValueError(f"{what}={global_batch} must be a positive integer")
    if global_batch % p:
        raise ValueError(f"{what}={global_batch} is not divisible by the {p} processes")
    return global_batch // p


def shard_host_batch(tree: Any, mesh: Mesh) -> Any:
    """Return global jax.Arrays split on the batch axis, built from this process's host slice.

    Each leaf is this process's rows (``process_rows`` says which) as a numpy-compatible
    array; scalars are replicated (and must then be equal on every process).
    """
    num_local = len(mesh.local_devices)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(replicated(mesh), x)
        if x.shape[0] % num_local:
            raise ValueError(
                f"host batch of {x.shape[0]} rows is not divisible by this process's "
                f"{num_local} devices (mesh {mesh_str(mesh)})"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, tree)


def _host_value(x: Any) -> np.ndarray:
    """Return one leaf as a full numpy array (all-gathered across processes when sharded)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather(tree: Any) -> Any:
    """Return ``tree`` as host numpy arrays holding the full global values (keys as key data).

    Multi-process: a collective (every process must call it); host arrays are returned as-is.
    """
    return jax.tree.map(_host_value, tree)


# ----------------------------------------------------------------------------------------------
# Global sample indices (SPEC §10)


def global_indices(epoch_offset: int, global_batch: int) -> np.ndarray:
    """Return the (global_batch,) int64 global sample indices epoch_offset + [0, global_batch)."""
    if epoch_offset < 0 or global_batch < 0:
        raise ValueError(
            f"epoch_offset={epoch_offset} and global_batch={global_batch} must be >= 0"
        )
    if epoch_offset + global_batch > 2**32:
        raise ValueError(
            f"sample indices up to {epoch_offset + global_batch} overflow the uint32 that "
            "jax.random.fold_in takes; start a new epoch key instead"
        )
    return epoch_offset + np.arange(global_batch, dtype=np.int64)


def process_rows(global_batch: int, mesh: Mesh | None = None) -> np.ndarray:
    """Return the sorted batch rows this process feeds to ``shard_host_batch`` on ``mesh``.

    Without a mesh: the contiguous block process_index · B/P … (process_index + 1) · B/P.
    """
    if mesh is None:
        per = per_process_batch(global_batch)
        start = jax.process_index() * per
        return np.arange(start, start + per, dtype=np.int64)
    check_batch(global_batch, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    blocks = sorted({idx[0].indices(global_batch)[:2] for idx in index_map.values()})
    if not blocks:  # this process holds no device of the mesh
        return np.zeros((0,), np.int64)
    return np.concatenate([np.arange(start, stop, dtype=np.int64) for start, stop in blocks])


def process_indices(epoch_offset: int, global_batch: int, mesh: Mesh | None = None) -> np.ndarray:
    """Return the global sample indices of the rows this process owns (see ``process_rows``)."""
    return global_indices(epoch_offset, global_batch)[process_rows(global_batch, mesh)]


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return (the batch rows this process scores, their values as host numpy).

    The rows of ``x``'s addressable shards (each device's block of a batch-sharded array);
    when shards hold the whole batch (replicated), an even share per process instead, so no
    two processes do the same rows' host work.
    """
    n = x.shape[0]
    blocks = {}
    for shard in x.addressable_shards:
        start, stop, _ = shard.index[0].indices(n) if shard.index else (0, n, 1)
        blocks.setdefault((start, stop), shard.data)
    if any(stop - start == n for start, stop in blocks) and jax.process_count() > 1:
        rows = np.array_split(np.arange(n), jax.process_count())[jax.process_index()]
        whole = next(data for (start, stop), data in blocks.items() if stop - start == n)
        return rows, np.asarray(whole)[rows]
    order = sorted(blocks)
    rows = np.concatenate([np.arange(a, b) for a, b in order]) if order else np.zeros(0, int)
    values = [np.asarray(blocks[k]) for k in order]
    return rows, np.concatenate(values) if values else np.zeros((0, *x.shape[1:]), x.dtype)


def rows_to_global(rows: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Return the (size,) values of every process's ``rows`` put together (a collective).

    Each process passes the per-row scalars it computed; only those scalars travel. Raises
    ValueError if a row was computed by no process or by two.
    """
    full = np.zeros((2, size), np.float64)
    full[0, rows], full[1, rows] = values, 1.0
    if jax.process_count() > 1:
        full = np.asarray(multihost_utils.process_allgather(full)).sum(0)
    if not np.all(full[1] == 1.0):
        raise ValueError(
            f"rows computed by no or several processes: {np.flatnonzero(full[1] != 1)}"
        )
    return full[0].astype(np.asarray(values).dtype if np.size(values) else np.float32)


def any_process(flag: bool) -> bool:
    """Return whether ``flag`` is true on any process (every process must call this)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


def count_unique(keys_or_noise: Any) -> int:
    """Return how many distinct rows (trajectories) a (B, ...) batch of keys or noise holds."""
    rows = gather(keys_or_noise)
    if rows.ndim == 0:
        raise ValueError("count_unique needs a batch axis, got a scalar")
    rows = np.ascontiguousarray(rows.reshape(rows.shape[0], -1))
    return len({row.tobytes() for row in rows})


# ----------------------------------------------------------------------------------------------
# Compiled-program memory


def memory_per_device(compiled: Any) -> dict[str, int]:
    """Return per-device bytes {argument, output, temp, generated_code, alias, peak} of a program.

    Fields the backend does not report are left out; {} when there is no analysis at all.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # backends without an analysis raise various errors
        return {}
    if isinstance(stats, list | tuple):  # some versions return one entry per device/program
        stats = stats[0] if stats else None
    if stats is None:
        return {}
    out = {}
    for name, attr in _MEMORY_FIELDS.items():
        value = getattr(stats, attr, None)
        if value is not None:
            out[name] = int(value)
    peak = getattr(stats, "peak_memory_in_bytes", None)
    if peak:
        out["peak"] = int(peak)
    elif {"argument", "output", "temp", "alias"} <= out.keys():
        out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


# ----------------------------------------------------------------------------------------------
# Multi-process start-up


def _int_env(env: Mapping[str, str], name: str) -> int:
    """Return env[name] as an int, 0 when unset or not a number."""
    try:
        return int(env.get(name, "0"))
    except ValueError:
        return 0


def should_initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Return whether this process is one of several (explicit args, else cluster environment).

    Without explicit args, ``DAG_JAX_DISTRIBUTED=1|0`` forces the answer (e.g. on TPU pods
    whose worker list lives only in the metadata server).
    """
    if num_processes is not None:
        return num_processes > 1
    if coordinator:
        return True
    env = os.environ if env is None else env
    forced = env.get("DAG_JAX_DISTRIBUTED", "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if _int_env(env, "SLURM_NTASKS") > 1 or _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    if any(key.startswith("MEGASCALE_") for key in env):
        return True
    return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Return whether JAX runs multi-process, calling jax.distributed.initialize() once if so.

    Call before anything touches a device. Idempotent; a no-op for a single process. Missing
    arguments are auto-detected by JAX (Slurm, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS).
    """
    if jax.distributed.is_initialized():
        return True
    if not should_initialize(coordinator, num_processes):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True
