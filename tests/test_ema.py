"""EMA of the trainable tree (``train.ema_decay``): its arithmetic, the jitted update step that
keeps it, checkpoints with and without one, and what ``--ema`` restores and exports.

One module-scoped workdir: a 1-epoch tiny DDPO run without EMA, resumed for a second epoch with
``train.ema_decay`` = 0.75 (one optimizer update per epoch), so checkpoint 1 has no EMA and
checkpoint 2 has one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import traverse_util
from safetensors import safe_open

from dag_jax import export, train
from dag_jax.infra import parallel
from dag_jax.infra.checkpoint import Checkpointer, CheckpointMismatchError
from dag_jax.train.phases import build_phases
from dag_jax.train.run import init_trainable, load_model, make_tx
from dag_jax.train.state import TrainState, ema_update, restore_arrays
from dag_jax.train.workdir import restore_run
from tests.test_train import tiny_config

DECAY = 0.75


def flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def one_update_per_epoch(**overrides):
    """Return the random tiny DDPO config with 4 trajectories an epoch, all in one update."""
    return tiny_config(
        algo="ddpo",
        sample__trajectories=4,
        sample__chunk=4,
        train__trajectories_per_step=4,
        **overrides,
    )


def test_the_ema_after_k_updates_is_the_closed_form_and_skips_rejected_ones():
    rng = np.random.default_rng(0)
    tree = lambda: {"a": rng.standard_normal((3, 2)), "b": {"c": rng.standard_normal(4)}}
    theta0 = jax.tree.map(np.float32, tree())
    proposals = [jax.tree.map(np.float32, tree()) for _ in range(6)]
    accepted = [True, False, True, True, False, True]
    step = jax.jit(ema_update, static_argnums=2)
    ema = theta0
    for params, ok in zip(proposals, accepted, strict=True):
        ema = step(ema, params, DECAY, jnp.bool_(ok))
    kept = [p for p, ok in zip(proposals, accepted, strict=True) if ok]
    k = len(kept)
    # d^k θ0 + (1 − d) Σ_i d^(k−i) θ_i over the accepted θ_1 … θ_k, in float64
    want = jax.tree.map(lambda x: DECAY**k * np.float64(x), theta0)
    for i, params in enumerate(kept, start=1):
        weight = (1 - DECAY) * DECAY ** (k - i)
        want = jax.tree.map(lambda w, p, c=weight: w + c * p, want, params)
    for key, value in flat(ema).items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, flat(want)[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_apply_moves_the_ema_with_accepted_updates_only():
    cfg = one_update_per_epoch(train__ema_decay=DECAY)
    model = load_model(cfg, parallel.make_mesh(1, 1))
    trainable = init_trainable(model, cfg, jax.random.key(0))
    tx = make_tx(cfg, trainable)
    apply = build_phases(model, cfg, tx).apply
    opt_state = tx.init(trainable)
    ema = jax.tree.map(lambda x: x + 0.5, trainable)  # an EMA away from the parameters
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), trainable)
    one = jnp.float32(1)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # apply donates its state
    before, ema_before = flat(trainable), flat(ema)

    def step(grad_sum, loss_finite, with_ema=True):
        args = (copy(trainable), copy(opt_state), grad_sum, one, jnp.bool_(loss_finite))
        return apply(*args, copy(ema)) if with_ema else apply(*args)

    new, _, finite, got = step(grads, True)
    assert bool(finite)
    new = flat(new)
    assert any(np.abs(v - before[k]).max() > 0 for k, v in new.items())
    for key, value in flat(got).items():
        want = DECAY * ema_before[key] + (1 - DECAY) * new[key]
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg="/".join(key))

    rejected = [
        (grads, False),  # a non-finite loss
        (jax.tree.map(lambda g: g * jnp.nan, grads), True),  # non-finite new parameters
    ]
    for bad_grads, loss_finite in rejected:
        new, _, finite, got = step(bad_grads, loss_finite)
        assert not bool(finite)
        for a, b in ((flat(new), before), (flat(got), ema_before)):
            for key, value in a.items():
                np.testing.assert_array_equal(value, b[key], err_msg="/".join(key))
    assert step(grads, True, with_ema=False)[3] is None  # no EMA: none comes back


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), "0.9"])
def test_ema_decay_outside_0_1_is_a_config_error(decay):
    cfg = one_update_per_epoch()
    with cfg.ignore_type():
        cfg.train.ema_decay = decay
    with pytest.raises(train.ConfigError, match=r"train.ema_decay=.* in \[0, 1\)"):
        train.validate(cfg, num_devices=1)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """Return (workdir, final state): epoch 1 without EMA, resumed for epoch 2 with one."""
    workdir = tmp_path_factory.mktemp("ema") / "run"
    train.train_and_evaluate(one_update_per_epoch(train__epochs=1), str(workdir))
    cfg = one_update_per_epoch(train__epochs=2, train__ema_decay=DECAY)
    return workdir, train.train_and_evaluate(cfg, str(workdir))


def one_device():
    return parallel.make_mesh(devices=jax.devices()[:1])


def test_a_resumed_checkpoint_without_ema_starts_the_ema_at_its_parameters(ema_run):
    workdir, state = ema_run
    assert state.updates == 2 and state.nonfinite_streak == 0  # one accepted update an epoch
    theta1 = flat(restore_run(workdir, step=1, mesh=one_device()).trainable)
    theta2 = flat(state.trainable)
    for key, value in flat(state.ema).items():
        want = DECAY * theta1[key].astype(np.float64) + (1 - DECAY) * theta2[key]
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-9, err_msg="/".join(key))
    moved = [np.abs(theta2[k] - theta1[k]).max() for k in theta1 if k[-1] == "B"]
    assert max(moved) > 0  # the EMA differs from both parameter sets


def test_checkpoints_round_trip_the_ema_and_restore_run_picks_it(ema_run):
    workdir, state = ema_run
    ema = restore_run(workdir, step=2, mesh=one_device(), ema=True)
    plain = restore_run(workdir, step=2, mesh=one_device())
    assert ema.ema and not plain.ema and ema.step == plain.step == 2
    for restored, want in ((ema.trainable, state.ema), (plain.trainable, state.trainable)):
        got, expected = flat(restored), flat(want)
        assert got.keys() == expected.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key], err_msg="/".join(key))
    with pytest.raises(ValueError, match=r"checkpoint 1 of .* has no EMA"):
        restore_run(workdir, step=1, mesh=one_device(), ema=True)


def test_export_ema_writes_the_ema_lora(ema_run, tmp_path):
    workdir, state = ema_run
    out = tmp_path / "lora"
    fv = flags.FlagValues()
    export.define_flags(fv)
    fv(["export", f"--workdir={workdir}", f"--out={out}", "--format=lora", "--ema"])
    export.main([], fv)
    with safe_open(str(out / export.LORA_WEIGHT_NAME), "np") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    want = export.lora_state_dict(jax.device_get(state.ema["lora"]))
    trained = export.lora_state_dict(jax.device_get(state.trainable["lora"]))
    assert written.keys() == want.keys()
    assert all(np.array_equal(written[k], want[k]) for k in want)
    assert not all(np.array_equal(written[k], trained[k]) for k in want)
    with pytest.raises(ValueError, match="checkpoint 1 .* has no EMA"):
        export.export(workdir, tmp_path / "x", "lora", step=1, ema=True)
    assert not (tmp_path / "x").exists()


def test_checkpoints_with_or_without_an_ema_restore_into_either_state(tmp_path):
    tree = {"w": np.arange(3, dtype=np.float32)}
    plain = {"trainable": tree, "opt_state": {"m": np.zeros(2, np.float32)}}
    ema = {"w": tree["w"] + 1}
    with Checkpointer(tmp_path / "with", async_save=False) as ckpt:
        ckpt.save(1, {**plain, "ema": ema}, {"epoch": 1})
        _, arrays, extra = restore_arrays(ckpt, plain)  # a run resumed with ema_decay 0
        np.testing.assert_array_equal(arrays["ema"]["w"], ema["w"])
        state = TrainState(**plain).with_restored(arrays, extra)
        assert state.ema is None and state.epoch == 1
    with Checkpointer(tmp_path / "without", async_save=False) as ckpt:
        ckpt.save(1, plain, {"epoch": 1})
        _, arrays, extra = restore_arrays(ckpt, {**plain, "ema": tree})  # EMA turned on
        assert "ema" not in arrays
        state = TrainState(**plain, ema=tree).with_restored(arrays, extra)
        np.testing.assert_array_equal(state.ema["w"], arrays["trainable"]["w"])
        with pytest.raises(CheckpointMismatchError, match="trainable/v"):
            restore_arrays(ckpt, {**plain, "trainable": {"v": tree["w"]}})  # another model
