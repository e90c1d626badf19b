"""The training system on the random tiny SD: each algorithm runs, resumes exactly, shards alike."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from dag_jax import train
from dag_jax.algos.stats import group_advantages
from dag_jax.infra import parallel
from dag_jax.train import loop, objectives, update
from dag_jax.train.phases import Context, build_phases
from dag_jax.train.run import init_trainable, load_model, make_tx
from dag_jax.train.state import TrainState

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(
    config_file: str = "compressibility.py", arg: str = "tiny", world: bool = False, **overrides
):
    """Return a config file's config with dotted overrides applied (as the CLI would).

    Unless ``world``, the model is the random tiny SD at 8×8 latents with inline prompts (the
    plumbing at its smallest); ``world=True`` keeps the :tiny variant's built-in tiny world.
    """
    cfg = runpy.run_path(str(ROOT / "configs" / config_file))["get_config"](arg)
    cfg.log.grid_every_epochs = 0
    if not world:
        cfg.model, cfg.resolution = "random-tiny", 8
        cfg.prompts.name = "inline"
        cfg.prompts.inline = (
            "a red circle",
            "a blue square",
            "two green triangles",
            "a yellow star",
        )
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def flat_params(state) -> dict:
    return {
        "/".join(k): np.asarray(v)
        for k, v in traverse_util.flatten_dict(jax.device_get(state.trainable)).items()
    }


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "algo, objective",
    [("ddpo", "ddpo"), ("dag_db", "ddpo"), ("dag_kl", "ddpo"), ("b2", "ddpo"), ("b2", "dag_kl")],
)
def test_tiny_run_writes_metrics_checkpoints_and_config(tmp_path, algo, objective):
    cfg = tiny_config(algo=algo, b2__objective=objective, train__epochs=1)
    if algo == "b2":
        cfg.b2.select = False  # the tiny batch may select nothing; selection has its own tests
    if objective.startswith("dag"):  # B²'s branch rollouts keep x̂₀^cond for the FL rewards
        cfg.dag.fl_source = "sampling"
    state = train.train_and_evaluate(cfg, str(tmp_path))
    total = loop.num_epochs(cfg)
    assert state.epoch == total
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, total + 1))
    required = {"step", "epoch", "trajectories_seen", "unique_trajectories", "reward_mean"}
    assert required | {"reward_std", "loss"} <= set(rows[-1])
    assert rows[-1]["unique_trajectories"] == rows[-1]["trajectories_seen"] > 0
    assert np.isfinite(rows[-1]["loss"])
    assert json.loads((tmp_path / "config.json").read_text())["algo"] == algo
    assert (tmp_path / "checkpoints").is_dir()
    lora = flat_params(state)
    assert any(k.endswith("/B") and np.abs(v).max() > 0 for k, v in lora.items())
    if objective.startswith("dag") or algo.startswith("dag"):
        assert any(k.startswith("flow/") for k in lora)


def test_rerunning_the_same_command_resumes_to_the_same_params(tmp_path):
    cfg = tiny_config(algo="dag_kl")
    straight = train.train_and_evaluate(cfg, str(tmp_path / "straight"))
    first = tiny_config(algo="dag_kl", train__epochs=1)
    train.train_and_evaluate(first, str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    assert resumed.epoch == straight.epoch == 2
    a, b = flat_params(straight), flat_params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert read_metrics(tmp_path / "resumed")[-1]["epoch"] == 2


def test_sample_grids_are_written(tmp_path):
    cfg = tiny_config(algo="ddpo", train__epochs=1)
    cfg.log.grid_every_epochs = 1
    train.train_and_evaluate(cfg, str(tmp_path))
    assert list((tmp_path / "samples").glob("*.png"))


def test_flow_warmup_trains_the_flow_alone(tmp_path):
    cfg = tiny_config(algo="dag_db", train__epochs=1, dag__flow_warmup_epochs=1)
    before = init_trainable(
        load_model(cfg, parallel.make_mesh(1, 1), task=False),
        cfg,
        jax.random.fold_in(jax.random.key(cfg.seed), 1 << 31),
    )
    state = train.train_and_evaluate(cfg, str(tmp_path))
    after = jax.device_get(state.trainable)
    for a, b in zip(jax.tree.leaves(before["lora"]), jax.tree.leaves(after["lora"]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-7)
    moved = [
        np.max(np.abs(np.asarray(a) - np.asarray(b)))
        for a, b in zip(
            jax.tree.leaves(before["flow"]), jax.tree.leaves(after["flow"]), strict=True
        )
    ]
    assert max(moved) > 1e-5
    assert read_metrics(tmp_path)[0]["policy_frozen"] == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(algo="ppo"), "config.algo"),
        (dict(reward__name="nope"), "unknown reward 'nope'"),
        (dict(sample__chunk=3), "sample.chunk=3"),
        (dict(sample__trajectories=12), "sample.trajectories=12"),
        (dict(sample__group=3), r"by sample.group \(3\)"),
        (dict(dag__baseline="batch"), "config.dag.baseline"),
        (dict(dag__fl_source="cache"), "config.dag.fl_source"),
        (dict(b2__baseline="batch"), "config.b2.baseline"),
        (dict(ddpo__group_scale="batch"), "config.ddpo.group_scale"),
        (dict(dag__baseline="step", dag__baseline_group=8), r"train.trajectories_per_step=4"),
        (dict(dag__baseline="step", dag__baseline_group=1), "baseline_group must be >= 2"),
    ],
)
def test_bad_configs_fail_before_compiling_with_a_clear_message(tmp_path, override, message):
    cfg = tiny_config(**override)
    with pytest.raises(train.ConfigError, match=message):
        train.validate(cfg, num_devices=2)


def test_unknown_config_keys_are_rejected():
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.train.learnig_rate = 1.0
    with pytest.raises(train.ConfigError, match="train.learnig_rate"):
        train.validate(cfg, num_devices=1)


def test_the_cli_runs_a_tiny_config(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dag_jax.train",
        f"--config={ROOT / 'configs' / 'compressibility.py'}:tiny",
        f"--workdir={tmp_path}",
        "--config.train.epochs=1",
        "--config.log.grid_every_epochs=0",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_metrics(tmp_path)[-1]["epoch"] == 1
    bad = subprocess.run(
        [*cmd[:-2], "--config.train.learnig_rate=1"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode != 0 and "learnig_rate" in bad.stderr


def first_update(cfg, workdir: str, per_state: bool = True) -> dict:
    """Run one tiny epoch; return the first update's loss and mean gradient (flat numpy).

    ``per_state=False`` evaluates F̃ per row (on [x_t; x_s], the release's way) instead of
    once per state where states chain.
    """
    import dataclasses

    real, real_rule = loop.build_phases, update.flow_per_state
    seen = {}

    def recording(model, config, tx):
        phases = real(model, config, tx)

        def apply(trainable, opt_state, grad_sum, count, finite):
            if "grads" not in seen:
                grads = jax.device_get(jax.tree.map(lambda g: g / count, grad_sum))
                flat = traverse_util.flatten_dict(grads)
                seen["grads"] = {"/".join(k): np.asarray(v).tolist() for k, v in flat.items()}
            return phases.apply(trainable, opt_state, grad_sum, count, finite)

        def recorded(step):
            def run(*args):
                out = step(*args)
                seen.setdefault("loss", float(out[1]["loss"]))
                seen.setdefault("step", step.__name__)
                return out

            return run

        return dataclasses.replace(
            phases,
            apply=apply,
            grad_step=recorded(phases.grad_step),
            grad_step_per_state=phases.grad_step_per_state and recorded(phases.grad_step_per_state),
        )

    loop.build_phases = recording
    update.flow_per_state = real_rule if per_state else (lambda *args: False)
    try:
        train.train_and_evaluate(cfg, workdir)
    finally:
        loop.build_phases, update.flow_per_state = real, real_rule
    return seen


SHARDED = textwrap.dedent(
    """
    import json, sys
    from tests.test_train import first_update, tiny_config
    out = {}
    for data, fsdp in ((8, 1), (2, 4)):
        cfg = tiny_config(
            algo="dag_db",
            train__epochs=1,
            mesh__data=data,
            mesh__fsdp=fsdp,
            dag__anchor_initial_flow=True,
        )
        out[f"{data}x{fsdp}"] = first_update(cfg, f"{sys.argv[1]}/{data}x{fsdp}")
    json.dump(out, open(sys.argv[2], "w"))
    """
)


def test_the_first_update_is_the_same_on_every_mesh_and_either_flow_evaluation(tmp_path):
    # Loss and gradients are compared: Adam's first step is lr·sign(g) where |g| ≫ eps, so an
    # element whose gradient is ~0 can flip its update by 2·lr under a different reduction
    # order; parameters after Adam steps are not an elementwise-stable quantity.
    # "1x1 per row": F̃ on [x_t; x_s] with the gradient in every micro-batch, against the
    # default F̃ once per state (values in, per-state cotangents out, one VJP at the end).
    cfg = tiny_config(algo="dag_db", train__epochs=1, dag__anchor_initial_flow=True)
    single = first_update(cfg, str(tmp_path / "1x1"))
    assert single["step"] == "grad_step_per_state"
    per_row = first_update(cfg, str(tmp_path / "per_row"), per_state=False)
    assert per_row["step"] == "grad_step"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    result = tmp_path / "sharded.json"
    out = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path), str(result)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    scale = {}  # per part (lora, flow, log_z): the largest gradient element
    for k, v in single["grads"].items():
        part = k.split("/")[0]
        scale[part] = max(scale.get(part, 0.0), float(np.abs(np.asarray(v)).max()))
    assert set(scale) == {"lora", "flow", "log_z"} and min(scale.values()) > 0, scale
    runs = {"1x1 per row": per_row, **json.loads(result.read_text())}
    for mesh, got in runs.items():
        np.testing.assert_allclose(got["loss"], single["loss"], rtol=1e-5, err_msg=mesh)
        assert got["grads"].keys() == single["grads"].keys()
        for k, v in got["grads"].items():
            # one device: each part to 1e-5 of its own size; meshes also sum in another order
            tol = scale[k.split("/")[0]] if mesh == "1x1 per row" else max(scale.values())
            np.testing.assert_allclose(
                np.asarray(v),
                np.asarray(single["grads"][k]),
                atol=1e-5 * tol,
                err_msg=f"{mesh} {k}",
            )


def nan_reward():
    """A host reward that returns NaN (to exercise the non-finite guard)."""
    from dag_jax import rewards

    return rewards.host_reward("nan", lambda images, prompts: np.full(len(prompts), np.nan))


def test_non_finite_losses_skip_updates_then_stop_the_run(tmp_path):
    from dag_jax import rewards

    rewards.register("nan_for_tests", "tests.test_train:nan_reward")
    cfg = tiny_config(algo="dag_db", train__epochs=1, reward__name="nan_for_tests")
    cfg.train.max_nonfinite = 100
    state = train.train_and_evaluate(cfg, str(tmp_path / "skip"))
    assert state.nonfinite_streak > 0
    assert all(np.abs(v).max() == 0 for k, v in flat_params(state).items() if k.endswith("/B"))
    assert read_metrics(tmp_path / "skip")[-1]["skipped_nonfinite"] == 1.0
    cfg.train.max_nonfinite = 1
    with pytest.raises(train.NonFiniteLoss, match="non-finite"):
        train.train_and_evaluate(cfg, str(tmp_path / "stop"))


def test_sigterm_keeps_the_last_complete_epoch_and_raises_preempted(tmp_path, monkeypatch):
    import signal

    real = update.train_epoch

    def preempted(ctx, state, data, beta, stop, **kwargs):
        epoch = int(state.epoch)  # read before the updates may consume the state's arrays
        out = real(ctx, state, data, beta, stop, **kwargs)
        if epoch == 1:  # after the second epoch's last window: that epoch completes
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_epoch", preempted)
    with pytest.raises(train.Preempted, match="epoch 2"):
        train.train_and_evaluate(tiny_config(algo="ddpo", train__epochs=3), str(tmp_path))
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["1", "2"]


def test_sigterm_stops_at_the_next_update_window(tmp_path, monkeypatch):
    import signal

    real, windows = update.update_window, []

    def signalled(ctx, state, data, window, beta):
        windows.append(state.epoch)
        if len(windows) == 1:  # during the first window of the first epoch (of two)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(ctx, state, data, window, beta)

    monkeypatch.setattr(update, "update_window", signalled)
    with pytest.raises(train.Preempted, match="epoch 0"):
        train.train_and_evaluate(tiny_config(algo="ddpo"), str(tmp_path))
    assert windows == [0]  # the epoch has two windows: the second never ran
    assert not (tmp_path / "metrics.jsonl").exists() or read_metrics(tmp_path) == []


def brightness_reward():
    """A JAX-native reward with weights (mean brightness × a scale held in ``params``)."""
    import jax.numpy as jnp

    from dag_jax import rewards

    def score(params, images, tokens):
        return params["scale"] * jnp.mean(images, axis=(1, 2, 3))

    return rewards.jax_reward("brightness", score, params={"scale": jnp.float32(2.0)})


def test_a_jax_native_reward_runs_jitted_and_fl_source_sampling_scores_the_samplers_x0(
    tmp_path,
):
    # dag.fl_source="sampling": the first update after sampling has θ = θ_old, so the
    # forward-looking rewards of the sampler's kept x̂₀^cond must equal those of a conditional
    # UNet pass on the same states (the "current" source).
    import dataclasses

    from dag_jax import rewards
    from dag_jax.algos import dag

    real, seen = loop.build_phases, []

    def recording(model, config, tx):
        phases = real(model, config, tx)

        def fl_rewards(frozen, trainable, reward_params, traj, prompt_idx):
            out = phases.fl_rewards(frozen, trainable, reward_params, traj, prompt_idx)
            if not seen:  # the "current" source: x̂₀ of a conditional UNet pass
                bound = model.reward.bound_with_params(model.prompts)
                images = lambda x0: model.pipe.decode_images(frozen["vae"], x0)
                k = traj.log_probs.shape[1]
                again = dag.forward_looking_rewards(
                    model.eps_fn,
                    model.policy_of(frozen, trainable),
                    traj.latents,
                    traj.timesteps,
                    model.schedule.alpha_t[traj.start : traj.start + k],
                    traj.context,
                    lambda x0: bound(reward_params, images(x0), prompt_idx),
                    model.schedule.prediction_type,
                )
                seen.append((traj.x0_cond, np.asarray(out), np.asarray(again)))
            return out

        return dataclasses.replace(phases, fl_rewards=fl_rewards)

    rewards.register("brightness_for_tests", "tests.test_train:brightness_reward")
    cfg = tiny_config(algo="dag_db", train__epochs=1, reward__name="brightness_for_tests")
    cfg.dag.fl_source = "sampling"
    loop.build_phases = recording
    try:
        state = train.train_and_evaluate(cfg, str(tmp_path))
    finally:
        loop.build_phases = real
    row = read_metrics(tmp_path)[-1]
    assert 0 < row["reward_mean"] <= 2.0 and np.isfinite(row["loss"])
    assert state.epoch == 1
    x0_cond, sampled, current = seen[0]
    b, k = cfg.train.trajectories_per_step, cfg.sample.steps
    assert x0_cond is not None and x0_cond.shape[:2] == (b, k)
    assert sampled.shape == (b, k + 1) and np.ptp(sampled) > 0
    np.testing.assert_allclose(sampled, current, rtol=1e-5, atol=1e-6)


def test_group_advantages_standardise_within_each_group():
    r = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    adv = group_advantages(r, 3)
    np.testing.assert_allclose(adv[:3], [-1.2247, 0.0, 1.2247], atol=1e-4)
    np.testing.assert_allclose(adv[3:], [-0.7071, -0.7071, 1.4142], atol=1e-4)
    np.testing.assert_allclose(group_advantages(np.full(4, 5.0), 2), 0.0)


def test_pooled_group_advantages_keep_the_groups_relative_spread():
    r = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 10.003])
    adv = group_advantages(r, 3, "pooled")
    d = r.reshape(2, 3) - r.reshape(2, 3).mean(1, keepdims=True)
    np.testing.assert_allclose(adv, (d / np.sqrt(np.mean(d**2))).reshape(-1), rtol=1e-5)
    assert np.abs(adv[3:]).max() < 0.01  # a near-tie stays near zero
    assert np.abs(group_advantages(r, 3)[3:]).max() > 0.7  # per group: unit-size noise
    assert np.mean(adv**2) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(r, 3, "batch")


def _first_epoch(cfg):
    """Return (the run's context, its state at epoch 0) on one device."""
    mesh = parallel.make_mesh(1, 1)
    model = load_model(cfg, mesh)
    trainable = init_trainable(model, cfg, jax.random.key(0))
    objective = objectives.get(cfg)
    phases = build_phases(model, cfg, make_tx(cfg, trainable))
    state = TrainState(trainable=trainable, opt_state=None, trackers=objective.trackers(cfg))
    return Context(model, cfg, mesh, objective, phases), state


@pytest.mark.parametrize("group", [1, 4])
def test_sample_groups_share_prompt_and_initial_noise_only(group):
    cfg = tiny_config(algo="ddpo", sample__group=group)
    ctx, state = _first_epoch(cfg)
    data, _ = ctx.objective.collect(ctx, state, jax.random.key(3))
    x_t = np.asarray(data.traj.latents[:, 0]).reshape(-1, group, *ctx.model.latent_shape)
    final = np.asarray(data.traj.latents[:, -1]).reshape(x_t.shape)
    prompts = data.prompt_idx.reshape(-1, group)
    assert (prompts == prompts[:, :1]).all()
    assert np.array_equal(x_t, np.broadcast_to(x_t[:, :1], x_t.shape))
    # every trajectory keeps its own step noise; groups (and group 1 samples) differ in x_T
    for row in final:
        assert len({r.tobytes() for r in row}) == group
    firsts = x_t[:, 0].reshape(x_t.shape[0], -1)
    assert len({r.tobytes() for r in firsts}) == x_t.shape[0]
    if group > 1:
        np.testing.assert_allclose(data.advantage, group_advantages(data.rewards, group), rtol=1e-6)


def test_b2_prefix_baseline_selects_each_prefix_best_and_worst_branch():
    cfg = tiny_config(algo="b2", b2__baseline="prefix", b2__branches=4, b2__threshold=0.5)
    ctx, state = _first_epoch(cfg)
    data, _ = ctx.objective.collect(ctx, state, jax.random.key(3))
    r = data.rewards.reshape(-1, 4)
    z = group_advantages(data.rewards, 4).reshape(r.shape)  # z within each prefix
    kept = data.weight.reshape(r.shape) > 0
    for row in range(r.shape[0]):  # the max of 4 standardised values is >= 0.5: best kept
        assert kept[row, np.argmax(r[row])] and kept[row, np.argmin(r[row])]
        assert kept[row].sum() == 2
    np.testing.assert_allclose(data.advantage.reshape(r.shape)[kept], z[kept], rtol=1e-5)
