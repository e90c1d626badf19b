"""Evaluation inside the training loop (``config.eval``): what it logs, and that it is
``python -m dag_jax.eval``'s evaluation of the same checkpoint.

One module-scoped run: 3 epochs of the random tiny SD (DDPO, one update an epoch, EMA on),
evaluated every 2 epochs (so at epochs 2 and 3, the last) on 2 prompts of each split × 2 seeds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dag_jax import train
from dag_jax.eval import evaluate as ev
from dag_jax.infra.metrics import read_metrics
from dag_jax.train import loop
from tests.test_train import tiny_config

K, SEED, PROMPTS = 2, 3, 2
METRICS = (
    "reward_mean",
    "reward_std",
    "base_reward_mean",
    "reward_change",
    "reward_change_se",
    "pairwise",
    "vendi",
    "frechet_to_base",
)


def eval_config(**overrides):
    """Return the random tiny DDPO config (4 trajectories an epoch, one update) with eval on."""
    settings = dict(
        algo="ddpo",
        sample__trajectories=4,
        sample__chunk=4,
        train__trajectories_per_step=4,
        train__epochs=3,
        train__ema_decay=0.5,
    )
    cfg = tiny_config(**{**settings, **overrides})
    cfg.eval.every_epochs = 2
    cfg.eval.prompts = "both"
    cfg.eval.max_prompts = PROMPTS
    cfg.eval.num_per_prompt = K
    cfg.eval.seed = SEED
    cfg.eval.grid_prompts = cfg.eval.grid_seeds = 2
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Return (workdir, its metrics records)."""
    workdir = tmp_path_factory.mktemp("loop") / "run"
    train.train_and_evaluate(eval_config(), str(workdir))
    return workdir, read_metrics(workdir)


def evaluated(workdir, out, **kw) -> dict:
    """Return ``evaluate``'s eval.json of the last checkpoint with the loop's protocol."""
    return ev.evaluate(
        workdir,
        step=3,
        prompts="both",
        num_per_prompt=K,
        seed=SEED,
        max_prompts=PROMPTS,
        out=out,
        progress=False,
        **kw,
    )


def test_eval_keys_are_logged_every_n_epochs_and_after_the_last(run):
    workdir, rows = run
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    want = {f"eval/{s}/{m}" for s in ("train", "test") for m in METRICS} | {"eval/seconds"}
    assert not any(k.startswith("eval/") for k in rows[0])
    for row in rows[1:]:
        assert want <= set(row), want - set(row)
        assert all(np.isfinite(row[k]) for k in want)
        assert row["eval/test/reward_change_se"] > 0
        lines = loop.eval_lines(row)
        assert [line.split(" |")[0] for line in lines] == ["eval train", "eval test"]
    for epoch in (2, 3):  # compare grids: 2 prompts × (base row, current row), 2 seeds
        for split in ("train", "test"):
            assert (workdir / "samples" / f"eval_compare_{split}_{epoch:06d}.png").is_file()
    from PIL import Image

    grid = Image.open(workdir / "samples" / "eval_compare_test_000003.png")
    assert grid.size[1] > grid.size[0]  # 4 rows of 2 images
    base = json.loads((workdir / "eval" / "base" / "eval.json").read_text())
    assert base["base"] and base["settings"]["seed"] == SEED  # written once, for evaluate too
    assert base["splits"]["test"]["rewards"]["jpeg_compressibility"]["mean"] == pytest.approx(
        rows[2]["eval/test/base_reward_mean"], rel=1e-6
    )


@pytest.fixture(scope="module")
def plain(run, tmp_path_factory):
    """Return (out folder, eval.json) of ``evaluate`` on the last checkpoint in its own folder:
    it samples the base model again instead of reusing the loop's, so both sides are computed
    independently."""
    out = tmp_path_factory.mktemp("evaluate")
    return out, evaluated(run[0], out)


def test_the_logged_evaluation_equals_evaluate_on_the_same_checkpoint(run, plain):
    result, logged = plain[1], run[1][2]
    assert not result["ema"] and result["tag"] == "3"
    for split, m in result["splits"].items():
        r, d = m["rewards"]["jpeg_compressibility"], m["diversity"]
        got = {
            "reward_mean": r["mean"],
            "reward_std": r["std"],
            "base_reward_mean": r["mean"] - r["change"],
            "reward_change": r["change"],
            "reward_change_se": r["change_se"],
            "pairwise": d["pairwise"],
            "vendi": d["vendi"],
            "frechet_to_base": m["frechet_to_base"],
        }
        # The same programs on the same arrays: equal up to float rounding (1e-6 relative;
        # the Fréchet distance's matrix square root 1e-4), on any CPU.
        for name, value in got.items():
            tol = 1e-4 if name == "frechet_to_base" else 1e-6
            assert logged[f"eval/{split}/{name}"] == pytest.approx(value, rel=tol, abs=1e-7), name


def test_evaluate_ema_evaluates_the_ema_weights(run, plain):
    out = plain[0]
    result = evaluated(run[0], out, ema=True)  # reuses the base samples evaluate wrote there
    assert result["ema"] and result["tag"] == "3-ema" and (out / "3-ema" / "eval.json").is_file()
    ema = ev.load_samples(out / "3-ema" / "samples.npz")["test"]
    trained = ev.load_samples(out / "3" / "samples.npz")["test"]
    assert ema.features.shape == trained.features.shape
    assert not np.allclose(ema.features, trained.features, rtol=0, atol=1e-7)


def test_paired_change_is_the_mean_difference_with_the_standard_error_over_prompts():
    base = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
    new = base + np.array([[1.0, 3.0], [0.0, 2.0], [-1.0, 1.0]])  # per prompt: 2, 1, 0
    change, se = ev.paired_change(new, base)
    assert change == pytest.approx(1.0) and se == pytest.approx(1.0 / np.sqrt(3))
    assert np.isnan(ev.paired_change(new[:1], base[:1])[1])  # one prompt: no spread


def test_a_split_without_prompts_is_a_config_error_before_training(tmp_path):
    cfg = eval_config(prompts__inline=ev.TINY_TEST_PROMPTS)  # the held-out prompts, trained
    cfg.eval.prompts = "test"
    with pytest.raises(train.ConfigError, match="eval.test_prompts"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("every_epochs", -1, "eval.every_epochs=-1"),
        ("prompts", "held_out", "eval.prompts must be one of"),
        ("num_per_prompt", 0, "eval.num_per_prompt=0"),
        ("grid_seeds", 0, "eval.grid_seeds=0"),
        ("test_prompts", "a cat", "eval.test_prompts must be a tuple"),
        ("ema", True, "set train.ema_decay > 0"),
    ],
)
def test_bad_eval_settings_are_config_errors(key, value, message):
    cfg = eval_config(train__ema_decay=0.0)
    with cfg.ignore_type():
        cfg.eval[key] = value
    with pytest.raises(train.ConfigError, match=message):
        train.validate(cfg, num_devices=1)
