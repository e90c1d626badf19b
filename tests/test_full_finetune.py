"""Full fine-tuning (``train.trainable="unet"``): the UNet trains, sharded on the mesh's fsdp axis.

- the key is checked before anything is built (a did-you-mean for a misspelt value);
- one update on the tiny model is the same at fsdp = 4 as at fsdp = 1 (8 virtual CPU devices, in
  a subprocess), and the params and AdamW moments live on the fsdp axis (largest divisible axis);
- a ``:tiny`` run trains, resumes to the same params as a straight run, and exports a diffusers
  folder whose UNet, loaded by diffusers, computes what the trained params compute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from dag_jax import export, train
from dag_jax.train.config import ConfigError, validate
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
MIN_SHARD = 2**10  # the tiny UNet's leaves are all under the released 2^18 elements


def unet_config(**overrides):
    """Return a tiny DDPO run of the random tiny SD with ``train.trainable="unet"``.

    Leaves from 2^10 elements are sharded; 8 trajectories of 2 steps make one update per epoch.
    """
    small = dict(algo="ddpo", train__epochs=1, sample__steps=2, train__trajectories_per_step=8)
    small.update(train__trainable="unet", mesh__min_shard_size=MIN_SHARD)
    return tiny_config(**{**small, **overrides})


def flat(tree) -> dict:
    return {
        "/".join(k): np.asarray(v)
        for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()
    }


# --------------------------------------------------------------------------- the config key


def test_trainable_is_checked_with_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"train\.trainable.*'unte'.*did you mean 'unet'"):
        validate(tiny_config(train__trainable="unte"), 1)
    validate(unet_config(), 1)
    # GRPO's KL reference is the base UNet, which a full fine-tune does not keep
    with pytest.raises(ConfigError, match=r"grpo\.kl.*train\.trainable='unet'"):
        validate(unet_config(algo="grpo", grpo__kl=0.04, grpo__group=4), 1)
    with pytest.raises(ConfigError, match=r"mesh\.min_shard_size=0"):
        validate(unet_config(mesh__min_shard_size=0), 1)


# --------------------------------------------------------------------------- fsdp 4 = fsdp 1

SHARDED = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import traverse_util
    from dag_jax import train
    from dag_jax.train import objectives
    from jax.sharding import NamedSharding
    from dag_jax.infra.parallel import fsdp_spec
    from dag_jax.train import loop
    from dag_jax.train.workdir import restore_run
    from tests.test_full_finetune import unet_config, MIN_SHARD

    def state_mesh(state):
        return jax.tree.leaves(state.trainable)[0].sharding.mesh

    real_get, recorded = objectives.get, {}

    def replaying(config):
        # the first run's sampled epoch (trajectories, rewards, advantages) is every run's: a
        # reward standardised by a spread of 0.004 would amplify the sampler's rounding
        objective = real_get(config)

        def collect(ctx, state, ekey):
            if "data" in recorded:
                data = recorded["data"]
                return dataclasses.replace(data, traj=jax.tree.map(jnp.asarray, data.traj)), state
            data, state = objective.collect(ctx, state, ekey)
            recorded["data"] = dataclasses.replace(data, traj=jax.device_get(data.traj))
            return data, state

        return dataclasses.replace(objective, collect=collect)

    objectives.get = replaying

    def first_update(cfg, workdir):
        # the first update's loss, mean gradient and new params; the run's final layout
        real, seen = loop.build_phases, {}

        def recording(model, config, tx, *args, **kwargs):
            phases = real(model, config, tx, *args, **kwargs)

            def apply(trainable, opt_state, grad_sum, count, finite, *ema):
                first = "grads" not in seen
                if first:
                    seen["grads"] = jax.device_get(jax.tree.map(lambda g: g / count, grad_sum))
                out = phases.apply(trainable, opt_state, grad_sum, count, finite, *ema)
                if first:
                    seen["params"] = jax.device_get(out[0])
                return out

            def step(*args):
                out = phases.grad_step(*args)
                seen.setdefault("loss", float(out[1]["loss"]))
                return out

            return dataclasses.replace(phases, apply=apply, grad_step=step)

        loop.build_phases = recording
        try:
            state = train.train_and_evaluate(cfg, workdir)
        finally:
            loop.build_phases = real
        return seen, state

    out, arrays = {}, {}
    for data, fsdp in ((8, 1), (2, 4)):
        cfg = unet_config(mesh__data=data, mesh__fsdp=fsdp)
        seen, state = first_update(cfg, f"{sys.argv[1]}/{data}x{fsdp}")
        for part in ("grads", "params"):
            for k, v in traverse_util.flatten_dict(seen[part]).items():
                arrays[f"{fsdp}:{part}:" + "/".join(k)] = np.asarray(v)
        layout = {}
        for what in ("trainable", "opt_state"):
            leaves = jax.tree_util.tree_leaves_with_path(getattr(state, what))
            want = lambda x: NamedSharding(x.sharding.mesh, fsdp_spec(x.shape, fsdp, MIN_SHARD))
            layout[what] = [
                [jax.tree_util.keystr(p), list(x.shape), str(x.sharding.spec),
                 x.sharding.is_equivalent_to(want(x), x.ndim)]
                for p, x in leaves
            ]
        # the checkpoint restores onto the same shardings, with the same values
        run = restore_run(f"{sys.argv[1]}/{data}x{fsdp}", mesh=state_mesh(state))
        same = jax.tree.map(
            lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim) and np.array_equal(a, b),
            run.trainable,
            state.trainable,
        )
        out[fsdp] = {"loss": seen["loss"], "layout": layout, "restored": all(jax.tree.leaves(same))}
    np.savez(sys.argv[2] + ".npz", **arrays)
    json.dump(out, open(sys.argv[2], "w"))
    """
)


def test_one_update_at_fsdp_4_equals_fsdp_1_with_params_and_moments_on_fsdp(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    result = tmp_path / "sharded.json"
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path), str(result)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sharded_update(json.loads(result.read_text()), dict(np.load(str(result) + ".npz")))


def check_sharded_update(out: dict, arrays: dict) -> None:
    """Assert the fsdp = 4 run's first update equals fsdp = 1's, and its layout on fsdp.

    Both runs train on the same sampled epoch (the fsdp = 1 run's, replayed). DDPO's gradient
    is a sum over rows whose advantages add up to 0, a difference of much larger terms: the
    sharded forward's rounding (its devices sum in another order) shows in it at ~3e-4 of its
    largest element (1e-5 for the loss), and a wrong reduction (a shard dropped or counted
    twice) at O(1). The new params are compared where the gradient is clearly away from 0:
    Adam's first step is lr·sign(g), which a ~0 gradient may flip.
    """
    np.testing.assert_allclose(out["4"]["loss"], out["1"]["loss"], rtol=1e-5, atol=1e-6)
    grads = {k.split(":", 2)[2]: v for k, v in arrays.items() if k.startswith("1:grads:")}
    assert {k.split("/")[0] for k in grads} == {"unet"}
    scale = max(float(np.abs(v).max()) for v in grads.values())
    assert scale > 0
    squares = [0.0, 0.0]
    for k, g1 in grads.items():
        g4 = arrays[f"4:grads:{k}"]
        np.testing.assert_allclose(g4, g1, atol=2e-3 * scale, err_msg=k)
        squares[0] += float(np.sum((g4 - g1) ** 2))
        squares[1] += float(np.sum(g1**2))
        p1, p4 = arrays[f"1:params:{k}"], arrays[f"4:params:{k}"]
        clear = np.abs(g1) > 2e-3 * scale
        np.testing.assert_allclose(p4[clear], p1[clear], atol=1e-6, err_msg=k)
    assert np.sqrt(squares[0] / squares[1]) < 1e-3  # relative L2 of the whole gradient
    # every leaf of params and AdamW state on the fsdp rule's axis; fsdp = 1: all whole
    for fsdp in ("1", "4"):
        for what, leaves in out[fsdp]["layout"].items():
            for path, shape, spec, on_rule in leaves:
                assert on_rule, (fsdp, what, path, shape, spec)
    sharded = [x for x in out["4"]["layout"]["trainable"] if "fsdp" in x[2]]
    unet = [x for x in out["4"]["layout"]["trainable"] if x[0].startswith("['unet']")]
    assert sum(np.prod(x[1]) for x in sharded) > 0.9 * sum(np.prod(x[1]) for x in unet)
    moments = [x for x in out["4"]["layout"]["opt_state"] if "fsdp" in x[2]]
    assert len(moments) == 2 * len(sharded)  # AdamW's mu and nu of every sharded leaf
    assert not any("fsdp" in x[2] for x in out["1"]["layout"]["trainable"])
    assert out["1"]["restored"] and out["4"]["restored"]  # same values, same shardings


# --------------------------------------------------------------------------- train, resume, export


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Return (straight 2-epoch run's workdir and state, the same run resumed after epoch 1)."""
    root = tmp_path_factory.mktemp("full")
    cfg = unet_config(train__epochs=2)
    straight = train.train_and_evaluate(cfg, str(root / "straight"))
    train.train_and_evaluate(unet_config(), str(root / "resumed"))
    resumed = train.train_and_evaluate(cfg, str(root / "resumed"), ("train.epochs",))
    return root, straight, resumed


def test_a_tiny_unet_run_trains_and_resumes_to_the_same_params(runs):
    _, straight, resumed = runs
    from dag_jax.tinyworld.random_tiny import random_tiny_pipeline

    assert straight.epoch == resumed.epoch == 2 and set(straight.trainable) == {"unet"}
    got, want = flat(resumed.trainable), flat(straight.trainable)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    base = flat({"unet": random_tiny_pipeline(0).params["unet"]})
    assert base.keys() == want.keys()
    assert max(np.abs(want[k] - base[k]).max() for k in base) > 1e-4  # the UNet itself moved
    moments = jax.device_get((resumed.opt_state, straight.opt_state))
    assert jax.tree.structure(moments[0]) == jax.tree.structure(moments[1])
    assert all(np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, moments), strict=True))


def test_the_export_writes_the_trained_unet_that_diffusers_loads(runs, tmp_path):
    from diffusers import UNet2DConditionModel

    root, straight, _ = runs
    out = export.export(str(root / "straight"), tmp_path / "pipe", "pipeline")
    tu = UNet2DConditionModel.from_pretrained(str(out / "unet")).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([5, 901])
    ctx = rng.standard_normal((2, 77, tu.config.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        ref = tu(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    run = export.load_run(root / "straight")
    unet = run.model.pipe.unet
    ours = unet.apply({"params": jax.device_get(straight.trainable["unet"])}, x, t, ctx).sample
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    base = unet.apply({"params": run.initial["unet"]}, x, t, ctx).sample
    assert np.abs(np.asarray(base) - ref).max() > 1e-4  # it is the trained UNet, not the base
    with pytest.raises(ValueError, match=r"trainable='unet'.*no LoRA"):
        export.export(str(root / "straight"), tmp_path / "lora", "lora")
