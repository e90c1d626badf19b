"""Mesh, shardings, host batches, global sample indices and memory analysis (infra.parallel).

Three kinds of tests:
- pure ones (shapes, messages, env detection) run on any device count, using ``AbstractMesh``;
- ``eight_devices`` ones need 8 devices: they run directly when this process has them
  (XLA_FLAGS=--xla_force_host_platform_device_count=8) and otherwise in one pytest subprocess
  started by ``test_eight_device_tests_pass_in_a_subprocess``, so a plain ``pytest tests`` whose
  JAX already started with 1 device still runs them;
- ``test_two_processes_...`` starts two JAX processes (4 CPU devices each, gloo) and checks the
  multi-host path: process rows, host batches, gather, and the same train step numbers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dag_jax.diffusion.sampler import sample_keys
from dag_jax.infra import parallel as par

ROOT = Path(__file__).resolve().parents[1]
MESH_SHAPES = [(1, 1), (8, 1), (2, 4), (1, 8)]


def abstract_mesh(data: int, fsdp: int) -> AbstractMesh:
    """Return a device-free ("data", "fsdp") mesh for shape-only checks."""
    return AbstractMesh((data, fsdp), par.AXES, axis_types=(AxisType.Auto,) * 2)


def cpu_env(num_devices: int) -> dict[str, str]:
    """Return os.environ for a child JAX on ``num_devices`` host CPU devices."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key in list(env):  # never let the children think they are part of a cluster
        if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "DAG_JAX_DISTRIBUTED")):
            del env[key]
    return env


def cpu_devices() -> list:
    """Return this process's CPU devices (fp32 references without TF32), else its devices."""
    try:
        return jax.devices("cpu")
    except RuntimeError:
        return jax.devices()


@pytest.fixture
def eight_devices() -> list:
    """Return 8 devices, or skip (the subprocess test runs these with 8 forced CPU devices)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices; run by test_eight_device_tests_pass_in_a_subprocess")
    return jax.devices()[:8]


# ----------------------------------------------------------------------------------------------
# A toy "train step": MLP regression on inputs perturbed by per-sample noise from global indices


def toy_problem(batch: int = 16) -> tuple[dict, dict]:
    """Return (params, host batch) of a small MLP regression; the batch carries global indices."""
    rng = np.random.default_rng(0)
    params = {
        "w1": (0.3 * rng.normal(size=(8, 32))).astype(np.float32),  # 256 elements: sharded
        "b1": np.zeros((32,), np.float32),  # small: replicated
        "w2": (0.3 * rng.normal(size=(32, 4))).astype(np.float32),  # 128 elements: sharded
    }
    data = {
        "x": rng.normal(size=(batch, 8)).astype(np.float32),
        "y": rng.normal(size=(batch, 4)).astype(np.float32),
        "index": par.global_indices(1000, batch),
    }
    return params, data


def toy_loss(params: dict, batch: dict) -> jax.Array:
    """Return the mean squared error of the MLP on noise-perturbed inputs."""
    keys = sample_keys(jax.random.key(7), batch["index"])
    noise = jax.vmap(lambda k: jax.random.normal(k, (8,)))(keys)
    h = jnp.tanh((batch["x"] + 0.1 * noise) @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def sgd_step(params: dict, batch: dict) -> tuple[dict, jax.Array]:
    """Return (params after one SGD step, loss before it)."""
    loss, grads = jax.value_and_grad(toy_loss)(params, batch)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss


def run_toy_step(mesh, rows: np.ndarray | None = None) -> tuple[dict, float, dict]:
    """Return (new params, loss, param specs) of one jitted step on ``mesh``, params FSDP."""
    params, data = toy_problem()
    if rows is not None:  # this process's slice of the host batch
        data = jax.tree.map(lambda x: x[rows], data)
    shardings = par.fsdp_shardings(mesh, params, min_size=64)
    step = jax.jit(sgd_step, out_shardings=(shardings, par.replicated(mesh)))
    new, loss = step(par.put(params, shardings), par.shard_host_batch(data, mesh))
    specs = {k: tuple(v.sharding.spec) for k, v in new.items()}
    return par.gather(new), float(par.gather(loss)), specs


# ----------------------------------------------------------------------------------------------
# Mesh shape validation


def test_mesh_shape_fills_the_remaining_devices():
    assert par.resolve_mesh_shape(-1, 1, 8) == (8, 1)
    assert par.resolve_mesh_shape(-1, 4, 8) == (2, 4)
    assert par.resolve_mesh_shape(2, -1, 8) == (2, 4)
    assert par.resolve_mesh_shape(1, 8, 8) == (1, 8)


@pytest.mark.parametrize(
    "data, fsdp, message",
    [
        (3, 2, "mesh data=3 × fsdp=2 = 6 does not match the 8 devices"),
        (-1, 3, "mesh fsdp=3 does not divide the 8 devices"),
        (3, -1, "mesh data=3 does not divide the 8 devices"),
        (-1, -1, "at most one axis"),
        (0, 8, "mesh data=0 must be a positive integer or -1"),
        (8, -2, "mesh fsdp=-2 must be a positive integer or -1"),
    ],
)
def test_mesh_shape_errors_name_the_numbers(data, fsdp, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        par.resolve_mesh_shape(data, fsdp, 8)


def test_make_mesh_rejects_a_shape_that_does_not_cover_the_devices():
    with pytest.raises(ValueError, match=re.escape("= 2 does not match the 1 devices")):
        par.make_mesh(data=2, devices=jax.devices()[:1])


def test_make_mesh_on_one_device_has_auto_axes():
    mesh = par.make_mesh(devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


# ----------------------------------------------------------------------------------------------
# Shardings


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((1024, 4096), P(None, "fsdp")),  # largest axis
        ((4096, 1024), P("fsdp", None)),
        ((512, 512), P(None, "fsdp")),  # tie: the last axis
        ((3, 3, 320, 320), P(None, None, None, "fsdp")),  # conv kernel HWIO
        ((1001, 520), P(None, "fsdp")),  # largest axis indivisible: the largest divisible one
        ((1001, 1003), P()),  # nothing divisible: replicated
        ((320,), P()),  # small: replicated
        ((), P()),
    ],
)
def test_fsdp_spec_shards_the_largest_divisible_axis(shape, spec):
    assert par.fsdp_spec(shape, 8) == spec


def test_fsdp_spec_replicates_below_min_size_and_without_fsdp():
    assert par.fsdp_spec((511, 512), 8) == P()  # 261632 < 2**18 elements
    assert par.fsdp_spec((512, 512), 8) == P(None, "fsdp")  # exactly 2**18
    assert par.fsdp_spec((4096, 4096), 1) == P()
    assert par.fsdp_spec((64, 64), 4, min_size=64) == P(None, "fsdp")


def test_fsdp_shardings_follow_a_shape_dtype_struct_tree():
    mesh = abstract_mesh(2, 4)
    tree = {
        "kernel": jax.ShapeDtypeStruct((768, 3072), jnp.float32),
        "bias": jax.ShapeDtypeStruct((3072,), jnp.float32),
        "odd": jax.ShapeDtypeStruct((1023, 1023), jnp.bfloat16),
        "count": 0,
    }
    shardings = par.fsdp_shardings(mesh, tree)
    assert {k: s.spec for k, s in shardings.items()} == {
        "kernel": P(None, "fsdp"),
        "bias": P(),
        "odd": P(),
        "count": P(),
    }
    assert all(isinstance(s, NamedSharding) for s in shardings.values())
    shaped = par.abstract(tree, shardings)
    assert shaped["odd"].dtype == jnp.bfloat16 and shaped["kernel"].sharding == shardings["kernel"]


def test_batch_spec_splits_the_leading_axis_over_both_mesh_axes():
    assert par.batch_spec(3) == P(("data", "fsdp"))
    assert par.batch_spec(0) == P()
    assert par.batch_sharding(abstract_mesh(2, 4), 2).spec == P(("data", "fsdp"))
    assert par.replicated(abstract_mesh(2, 4)).spec == P()


# ----------------------------------------------------------------------------------------------
# Batch sizes and sample indices


def test_check_batch_returns_the_per_device_batch():
    assert par.check_batch(16, abstract_mesh(2, 4)) == 2


def test_check_batch_message_names_the_config_key_and_mesh():
    message = "train.batch_size=12 is not divisible by the 8 devices (mesh data=8 × fsdp=1)"
    with pytest.raises(ValueError, match=re.escape(message)):
        par.check_batch(12, abstract_mesh(8, 1), what="train.batch_size")
    with pytest.raises(ValueError, match="must be a positive integer"):
        par.check_batch(0, abstract_mesh(8, 1))


def test_per_process_batch_splits_over_processes():
    assert par.per_process_batch(16) == 16 // jax.process_count()
    assert par.per_process_batch(16, process_count=4) == 4
    with pytest.raises(ValueError, match=re.escape("sample.batch=10 is not divisible by the 4 pr")):
        par.per_process_batch(10, what="sample.batch", process_count=4)


def test_global_indices_continue_from_the_epoch_offset():
    np.testing.assert_array_equal(par.global_indices(512, 4), [512, 513, 514, 515])
    with pytest.raises(ValueError, match="overflow"):
        par.global_indices(2**32 - 2, 4)


def test_one_process_owns_every_global_index():
    np.testing.assert_array_equal(par.process_indices(8, 4), [8, 9, 10, 11])
    mesh = par.make_mesh(devices=jax.devices()[:1])
    np.testing.assert_array_equal(par.process_indices(8, 4, mesh), [8, 9, 10, 11])


def test_count_unique_counts_distinct_trajectories():
    keys = sample_keys(jax.random.key(0), jnp.arange(6))
    assert par.count_unique(keys) == 6
    assert par.count_unique(sample_keys(jax.random.key(0), jnp.array([0, 1, 1, 2]))) == 3
    assert par.count_unique(jax.random.key_data(keys)) == 6  # raw (B, 2) uint32
    noise = np.zeros((5, 4, 4), np.float32)
    noise[1, 2, 3] = 1.0
    assert par.count_unique(noise) == 2
    with pytest.raises(ValueError, match="batch axis"):
        par.count_unique(np.float32(1.0))


# ----------------------------------------------------------------------------------------------
# Host batches, gather and memory analysis on one device


def test_shard_host_batch_round_trips_on_one_device():
    mesh = par.make_mesh(devices=jax.devices()[:1])
    host = {"x": np.arange(12.0).reshape(4, 3), "i": np.arange(4), "step": np.int32(3)}
    placed = par.shard_host_batch(host, mesh)
    assert placed["x"].sharding.spec == P(("data", "fsdp")) and placed["step"].ndim == 0
    back = par.gather(placed)
    for name in host:
        np.testing.assert_array_equal(back[name], host[name])


class _Stats:
    argument_size_in_bytes = 100
    output_size_in_bytes = 10
    temp_size_in_bytes = 5
    alias_size_in_bytes = 1


class _Compiled:
    def __init__(self, result):
        self.result = result

    def memory_analysis(self):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_memory_per_device_tolerates_missing_analysis():
    assert par.memory_per_device(_Compiled(None)) == {}
    assert par.memory_per_device(_Compiled(NotImplementedError("no"))) == {}
    assert par.memory_per_device(object()) == {}
    stats = par.memory_per_device(_Compiled([_Stats()]))
    assert stats == {"argument": 100, "output": 10, "temp": 5, "alias": 1, "peak": 114}


def test_memory_per_device_reads_a_compiled_program():
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    stats = par.memory_per_device(jax.jit(lambda a: a @ a).lower(x).compile())
    assert stats["argument"] == 256 * 256 * 4 and stats["output"] == 256 * 256 * 4


# ----------------------------------------------------------------------------------------------
# Multi-process detection


def test_should_initialize_detects_clusters():
    assert not par.should_initialize(env={})
    assert not par.should_initialize(env={"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    assert par.should_initialize(env={"SLURM_NTASKS": "4"})
    assert par.should_initialize(env={"TPU_WORKER_HOSTNAMES": "t-0,t-1"})
    assert par.should_initialize(env={"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"})
    assert par.should_initialize(env={"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert not par.should_initialize(env={"SLURM_NTASKS": "4", "DAG_JAX_DISTRIBUTED": "0"})
    assert par.should_initialize(env={"DAG_JAX_DISTRIBUTED": "1"})
    assert par.should_initialize("10.0.0.2:1234", env={})
    assert not par.should_initialize(num_processes=1, env={"SLURM_NTASKS": "4"})
    assert par.should_initialize(num_processes=2, env={})


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORD", "DAG_JAX_DIS")):
            monkeypatch.delenv(key)
    assert par.initialize_distributed() is False
    assert par.initialize_distributed() is False
    assert jax.process_count() == 1


# ----------------------------------------------------------------------------------------------
# 8 devices


def test_eight_device_tests_pass_in_a_subprocess():
    if jax.device_count() >= 8:
        pytest.skip("this process has 8 devices: the eight_devices tests ran here")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    command += ["-k", "not two_processes"]  # that one starts its own processes; it ran here
    result = subprocess.run(
        command, cwd=ROOT, env=cpu_env(8), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_make_mesh_shapes_on_eight_devices(eight_devices):
    assert dict(par.make_mesh(devices=eight_devices).shape) == {"data": 8, "fsdp": 1}
    assert dict(par.make_mesh(fsdp=4, devices=eight_devices).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match=re.escape("= 6 does not match the 8 devices")):
        par.make_mesh(3, 2, devices=eight_devices)


def test_train_step_gives_the_same_numbers_on_every_mesh(eight_devices):
    results = {}
    for data, fsdp in MESH_SHAPES:
        mesh = par.make_mesh(data, fsdp, devices=eight_devices[: data * fsdp])
        results[data, fsdp] = run_toy_step(mesh)
    ref_params, ref_loss, ref_specs = results[1, 1]
    assert ref_specs == {"w1": (), "b1": (), "w2": ()}
    for shape, (params, loss, _) in results.items():
        assert abs(loss - ref_loss) <= 1e-5, shape
        for name in ref_params:
            np.testing.assert_allclose(
                params[name], ref_params[name], atol=1e-5, err_msg=str(shape)
            )
    assert results[1, 8][2] == {"w1": (None, "fsdp"), "b1": (), "w2": ("fsdp", None)}
    assert results[8, 1][2] == {"w1": (), "b1": (), "w2": ()}


def test_per_sample_noise_is_unique_and_mesh_independent(eight_devices):
    @jax.jit
    def noise(index):  # (B,) global indices -> (B, 4, 4) first-step noise
        keys = sample_keys(jax.random.key(3), index)
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (4, 4)))(keys)

    draws = []
    for data, fsdp in [(1, 1), (2, 4)]:  # the train step test covers all four meshes
        mesh = par.make_mesh(data, fsdp, devices=eight_devices[: data * fsdp])
        index = par.shard_host_batch(par.process_indices(64, 32, mesh), mesh)
        draws.append(par.gather(noise(index)))
    np.testing.assert_array_equal(draws[1], draws[0])
    assert par.count_unique(draws[0]) == 32


def test_shard_host_batch_splits_rows_over_all_devices(eight_devices):
    mesh = par.make_mesh(2, 4, devices=eight_devices)
    host = {"img": np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3), "n": np.arange(16)}
    placed = par.shard_host_batch(host, mesh)
    assert placed["img"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in placed["img"].addressable_shards} == {(2, 2, 3)}
    assert len({s.index[0].start for s in placed["img"].addressable_shards}) == 8  # all differ
    np.testing.assert_array_equal(par.gather(placed)["img"], host["img"])
    np.testing.assert_array_equal(par.process_rows(16, mesh), np.arange(16))
    with pytest.raises(ValueError, match="12 rows is not divisible by this process's 8 devices"):
        par.shard_host_batch(np.zeros((12, 3)), mesh)


def test_fsdp_cuts_per_device_argument_memory(eight_devices):
    weights = {f"layer{i}": jax.ShapeDtypeStruct((1024, 1024), jnp.float32) for i in range(4)}
    x = jax.ShapeDtypeStruct((8, 1024), jnp.float32)

    def forward(params, batch):
        return sum(jnp.sum(jnp.tanh(batch @ w)) for w in params.values())

    argument_bytes = {}
    for data, fsdp in [(8, 1), (1, 8)]:
        mesh = par.make_mesh(data, fsdp, devices=eight_devices)
        params = par.abstract(weights, par.fsdp_shardings(mesh, weights))
        batch = par.abstract(x, par.batch_sharding(mesh, 2))
        compiled = jax.jit(forward).lower(params, batch).compile()
        argument_bytes[fsdp] = par.memory_per_device(compiled)["argument"]
    assert argument_bytes[1] >= 4 * 1024 * 1024 * 4
    assert argument_bytes[8] <= 0.2 * argument_bytes[1]


# ----------------------------------------------------------------------------------------------
# 2 processes × 4 devices

WORKER = """
import json, sys
import jax
from dag_jax.infra import parallel as par
from tests.test_parallel import run_toy_step, toy_problem

assert par.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
assert par.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))  # idempotent
local = [jax.local_devices(process_index=p) for p in range(2)]
devices = [d for pair in zip(*local) for d in pair]  # interleave the two processes
mesh = par.make_mesh(2, 4, devices=devices)
rows = par.process_rows(16, mesh)
params, loss, specs = run_toy_step(mesh, rows)
index = par.shard_host_batch(par.process_indices(1000, 16, mesh), mesh)
print("RESULT " + json.dumps({
    "processes": jax.process_count(), "rows": rows.tolist(), "loss": loss,
    "w2": params["w2"].tolist(), "index": par.gather(index).tolist(),
    "unique": par.count_unique(index), "specs": {k: list(v) for k, v in specs.items()},
}))
"""


def free_port() -> int:
    """Return a TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_batch_and_match_one_device():
    address = f"localhost:{free_port()}"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, address, str(pid)],
            cwd=ROOT,
            env=cpu_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
        assert worker.returncode == 0, out[-3000:] + err[-3000:]
        outputs.append(json.loads(out.split("RESULT ", 1)[1]))

    rows = [set(o["rows"]) for o in outputs]
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(16))
    assert sorted(rows[0]) != list(range(8))  # interleaved devices: rows are not one block
    ref_params, ref_loss, _ = run_toy_step(par.make_mesh(devices=cpu_devices()[:1]))
    for out in outputs:
        assert out["processes"] == 2 and out["unique"] == 16
        assert out["index"] == list(range(1000, 1016))
        assert out["specs"] == {"w1": [None, "fsdp"], "b1": [], "w2": ["fsdp", None]}
        assert abs(out["loss"] - ref_loss) <= 1e-5
        np.testing.assert_allclose(np.array(out["w2"]), ref_params["w2"], atol=1e-5)
