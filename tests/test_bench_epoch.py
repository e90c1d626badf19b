"""The full-epoch bench, the steps' donated buffers and the phases' mesh context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax.bench import epoch
from dag_jax.bench.common import Settings
from dag_jax.infra import parallel
from dag_jax.train import update
from dag_jax.train.phases import OnMesh
from dag_jax.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # compiles every program of an epoch (about a minute on 2 cores)
def test_tiny_epoch_times_its_phases_without_donation_warnings():
    settings = Settings(size="tiny", batch=2, steps=1, repeats=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = epoch.bench_epoch(settings)
    assert not [w for w in caught if "donat" in str(w.message).lower()], caught
    got = {r["metric"]: r["value"] for r in records}
    assert "mfu" not in got  # CPU: n/a
    for name in ("sample", "reward", "fl_rewards", "update"):
        assert got[f"{name}_s"] > 0, name
    assert got["host_s"] >= 0  # the phases are parts of the epoch's wall time
    assert got["transitions_per_s"] == pytest.approx(2 * 1 / got["epoch_s"])
    assert got["achieved_tflops"] == pytest.approx(got["epoch_tflop"] / got["epoch_s"])
    cfg = records[0]["config"]
    assert cfg["timed_epochs"] == 1 and cfg["windows"] == 2 and cfg["remat"] is False
    # the FLOP count's calls are the ones the epoch made (the bench checks them itself)
    config = epoch.epoch_config(settings)
    assert cfg["phase_calls"] == dict(epoch.epoch_calls(config, per_state=True))


def test_epoch_calls_follow_chunks_windows_and_micro_batches():
    config = epoch.epoch_config(Settings(size="tiny", batch=8, steps=3, micro_batch=4))
    # 8 trajectories: one chunk, two windows of 4 × 3 = 12 rows, 3 micro-batches of 4 and
    # 2 flow chunks of 8 (the last one padded) each
    assert (config.sample.chunk, config.train.trajectories_per_step) == (8, 4)
    assert epoch.epoch_calls(config, per_state=True) == dict(
        sample=1, reward=1, fl_rewards=2, apply=2, state_flows=2, grad_step_per_state=6,
        flow_grad=4,
    )  # fmt: skip
    assert epoch.epoch_calls(config, per_state=False)["grad_step"] == 6


@pytest.mark.parametrize(
    "change, flag",
    [(dict(size="xl"), "--size"), (dict(batch=3), "--batch"), (dict(timeout=0), "--timeout")],
)
def test_bad_flags_fail_before_any_work(change, flag):
    with pytest.raises(ValueError, match=flag):
        epoch.bench_epoch(Settings(**{"size": "tiny", **change}))


def test_timeout_guard():
    epoch.check_estimate(500.0, 540.0)
    with pytest.raises(ValueError, match="--timeout=540"):
        epoch.check_estimate(600.0, 540.0)
    assert epoch.another_fits(400.0, 100.0, 540.0)
    assert not epoch.another_fits(450.0, 100.0, 540.0)


def _state() -> TrainState:
    trainable = {"lora": jnp.arange(4.0), "flow": jnp.ones(3)}
    return TrainState(trainable=trainable, opt_state={"mu": jnp.zeros(4)})


@pytest.mark.parametrize("keep_input", [True, False])
def test_train_epoch_keeps_the_callers_state_unless_told(monkeypatch, keep_input):
    step = jax.jit(lambda t, o: (jax.tree.map(lambda a: a + 1, t), o), donate_argnums=(0, 1))

    def donating_update(ctx, state, data, window, beta):  # as update_window: apply donates
        trainable, opt_state = step(state.trainable, state.opt_state)
        return state.replace(trainable=trainable, opt_state=opt_state), {"loss": 0.0}

    monkeypatch.setattr(update, "update_window", donating_update)
    objective = types.SimpleNamespace(windows=lambda c, e, d: ([np.arange(2)] * 2, 0))
    ctx = types.SimpleNamespace(config=None, objective=objective)
    state = _state()
    new, _, finished = update.train_epoch(ctx, state, None, 0.0, keep_input=keep_input)
    assert finished
    np.testing.assert_array_equal(new.trainable["lora"], np.arange(4.0) + 2)
    leaves = jax.tree.leaves(state.arrays())
    if keep_input:  # the preemption path's last complete epoch is still there
        assert not any(a.is_deleted() for a in leaves)
        np.testing.assert_array_equal(state.trainable["lora"], np.arange(4.0))
    else:
        assert all(a.is_deleted() for a in leaves)


def test_on_mesh_sets_the_mesh_around_calls_only():
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    seen = []

    def probe(x):
        seen.append(dict(jax.sharding.get_abstract_mesh().shape))
        return x * 2

    wrapped = OnMesh(jax.jit(probe), mesh)
    assert wrapped.__name__ == "probe"
    x = jnp.ones(3)
    np.testing.assert_array_equal(wrapped(x), 2 * np.ones(3))
    wrapped.lower(jnp.ones(4))
    assert seen == [{"data": 1, "fsdp": 1}] * 2
    assert jax.sharding.get_abstract_mesh().empty  # restored after each call
    jax.make_jaxpr(wrapped)(jnp.ones(5))  # under a trace: the caller's context, no error
    assert seen[-1] == {}
    assert OnMesh(wrapped.fn, None)(x).shape == (3,)


_AUTO_SCRIPT = """
import json
import jax
import numpy as np
from dag_jax.bench import epoch
from dag_jax.bench.common import Settings
from dag_jax.infra import parallel
from dag_jax.models import attention
from dag_jax.train.run import put_batch

real, seen = attention.auto_impl, []


def recording(batch, lq, lk):
    # the mesh-dependent part of "auto", what it would pick on a TPU for long sequences,
    # and what it picks here
    axes = attention.batch_mesh_axes(batch)
    backend, jax.default_backend = jax.default_backend, lambda: "tpu"
    try:
        on_tpu = real(batch, 4096, 4096)
    finally:
        jax.default_backend = backend
    seen.append([batch, list(axes), on_tpu, real(batch, lq, lk)])
    return seen[-1][-1]


attention.auto_impl = recording
settings = Settings(size="tiny", batch=16, steps=1, attention="auto")
mesh = parallel.make_mesh(-1, 1)
config = epoch.epoch_config(settings, mesh.size)
ctx, state = epoch.build_context(settings, config, mesh)
model, chunk = ctx.model, config.sample.chunk
ids = put_batch(mesh, model.prompt_ids[np.arange(chunk) % len(model.prompts)])
idx = put_batch(mesh, np.arange(chunk, dtype=np.int32))
args = (model.frozen, state.trainable, ids, idx, jax.random.key(0))
out = {"devices": jax.device_count()}
ctx.phases.sample.fn.lower(*args)  # the bare jitted function: no mesh in context
out["bare"], seen[:] = list(seen), []
ctx.phases.sample.lower(*args)  # the phase as the loop calls it
out["phase"] = seen
print(json.dumps(out))
"""


def test_attention_auto_sees_the_runs_mesh_inside_the_phases():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_AUTO_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["bare"] and out["phase"]
    for _batch, axes, on_tpu, here in out["bare"]:  # no mesh: on a TPU XLA would gather
        assert (axes, on_tpu, here) == ([], "xla", "xla")
    for batch, axes, on_tpu, here in out["phase"]:  # the run's mesh splits the batch
        assert batch % 8 == 0
        assert (axes, on_tpu, here) == (["data", "fsdp"], "pallas_tpu", "xla")  # CPU: xla
