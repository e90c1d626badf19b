"""Evaluation and plots on a short :tiny run: eval.json, grids, fixed seeds, the plot CLI.

One module-scoped fixture trains ``configs/compressibility.py:tiny`` (DDPO, 2 epochs of 4
two-step trajectories: two checkpoints) and one runs the evaluate CLI on it with a random
tiny CLIP as the feature model; the other tests read what they wrote.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from dag_jax import rewards, train
from dag_jax.eval import evaluate as ev
from dag_jax.eval import plot
from dag_jax.infra import parallel
from dag_jax.rewards.base import scorer
from dag_jax.train.workdir import restore_run

ROOT = Path(__file__).resolve().parents[1]
SHARED_PROMPTS = ROOT.parent / "shared" / "data" / "prompts"
K = 2  # images per prompt
PROJECTION = 24
TINY_CLIP = {
    "projection_dim": PROJECTION,
    "text_config": dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        vocab_size=64,
    ),
    "vision_config": dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    ),
}


def tiny_config(**overrides):
    """Return compressibility.py:tiny scaled down further, with dotted-path overrides."""
    cfg = runpy.run_path(str(ROOT / "configs" / "compressibility.py"))["get_config"]("tiny")
    settings = {  # the random tiny SD and inline prompts: plumbing at the smallest size
        "model": "random-tiny",
        "resolution": 8,
        "prompts.name": "inline",
        "prompts.inline": ("a red circle", "a blue square", "two green triangles", "a yellow star"),
        "algo": "ddpo",
        "train.epochs": 2,
        "sample.steps": 2,
        "sample.trajectories": 4,
        "sample.chunk": 4,
        "train.micro_batch": 4,
        "log.grid_every_epochs": 0,
        **overrides,
    }
    for dotted, value in settings.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Return the workdir of a 2-epoch tiny DDPO run (checkpoints of epochs 1 and 2)."""
    workdir = tmp_path_factory.mktemp("run") / "ddpo"
    train.train_and_evaluate(tiny_config(), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """Return a folder with a random tiny transformers-layout CLIPModel (16 px, 24-d)."""
    from dag_jax.bench.reward import random_clip
    from dag_jax.weights.clip_loader import save_clip

    path = tmp_path_factory.mktemp("clip") / "clip"
    _, params = random_clip(TINY_CLIP, "float32", seed=0)
    save_clip(path, jax.device_get(params), TINY_CLIP)
    return path


@pytest.fixture(scope="module")
def evaluated(run_dir, clip_dir) -> dict:
    """Run the evaluate CLI on the run's latest checkpoint; return its eval.json."""
    cmd = [
        sys.executable,
        "-m",
        "dag_jax.eval",
        f"--workdir={run_dir}",
        "--prompts=both",
        f"--num_per_prompt={K}",
        "--seed=3",
        "--extra_rewards=jpeg_incompressibility",
        f"--feature_model={clip_dir}",
        "--grid_seeds=2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Fréchet to base" in done.stdout
    return json.loads((run_dir / "eval" / "2" / "eval.json").read_text())


def test_the_cli_writes_eval_json_with_rewards_and_diversity(evaluated, clip_dir):
    assert evaluated["step"] == 2 and not evaluated["base"] and evaluated["label"] == "ddpo"
    assert evaluated["unique_trajectories"] == 8
    assert evaluated["feature_model"] == f"clip:{clip_dir}"
    assert set(evaluated["splits"]) == {"train", "test"} and not evaluated["skipped"]
    for split, n_prompts in (("train", 4), ("test", len(ev.TINY_TEST_PROMPTS))):
        m = evaluated["splits"][split]
        assert m["num_images"] == n_prompts * K
        rewards = m["rewards"]
        assert set(rewards) == {"jpeg_compressibility", "jpeg_incompressibility"}
        comp, incomp = rewards["jpeg_compressibility"], rewards["jpeg_incompressibility"]
        assert comp["mean"] == pytest.approx(-incomp["mean"], rel=1e-6)
        assert len(comp["per_prompt_mean"]) == n_prompts
        d = m["diversity"]
        assert 0.0 <= d["pairwise"] <= 2.0 and 1.0 <= d["vendi"] <= K + 1e-9
        assert len(d["vendi_per_prompt"]) == n_prompts
        assert m["frechet_to_base"] >= 0.0


def test_the_cli_writes_grids_samples_and_the_base_evaluation(evaluated, run_dir):
    step, base = run_dir / "eval" / "2", run_dir / "eval" / "base"
    for name in ("grid_train.png", "grid_test.png", "compare_train.png", "compare_test.png"):
        assert (step / name).stat().st_size > 0, name
    assert (base / "grid_test.png").is_file() and not (base / "compare_test.png").exists()
    base_json = json.loads((base / "eval.json").read_text())
    assert base_json["base"] and base_json["step"] is None
    assert base_json["splits"]["test"]["frechet_to_base"] is None
    samples = ev.load_samples(step / "samples.npz")
    assert samples["test"].features.shape == (len(ev.TINY_TEST_PROMPTS), K, PROJECTION)
    assert samples["train"].grid.shape[:2] == (4, 2)  # (grid prompts, grid seeds)
    from PIL import Image

    compare = Image.open(step / "compare_train.png")
    grid = Image.open(step / "grid_train.png")
    assert compare.size[0] == grid.size[0] and compare.size[1] > grid.size[1]


def test_base_and_checkpoints_share_seeds_whatever_the_batch(
    evaluated, run_dir, clip_dir, tmp_path
):
    out = tmp_path / "eval"
    result = ev.evaluate(
        run_dir,
        step=1,
        prompts="test",
        num_per_prompt=K,
        seed=3,
        feature_model=str(clip_dir),
        batch_size=3,  # another batching than the CLI's (sample.chunk = 4)
        out=out,
        progress=False,
    )
    assert result["step"] == 1 and set(result["splits"]) == {"test"}
    cli_base = ev.load_samples(run_dir / "eval" / "base" / "samples.npz")["test"]
    new_base = ev.load_samples(out / "base" / "samples.npz")["test"]
    # The same noise, so the same images up to the CPU's batch-shape-dependent fp32 rounding:
    # on an AMD EPYC one pixel channel in 6144 lands one uint8 level off, and the embeddings
    # move by up to 3e-4 (unit-size features). Different noise would change most pixels.
    off = np.abs(new_base.grid.astype(np.int16) - cli_base.grid.astype(np.int16))
    assert off.max() <= 1 and np.mean(off > 0) < 1e-3, (off.max(), np.mean(off > 0))
    np.testing.assert_allclose(new_base.features, cli_base.features, atol=2e-3)
    step1 = ev.load_samples(out / "1" / "samples.npz")["test"]
    assert step1.features.shape == cli_base.features.shape
    assert not (run_dir / "eval" / "1").exists()  # out= keeps the run's folder untouched


def test_restoring_a_missing_step_names_the_available_ones(run_dir):
    with pytest.raises(FileNotFoundError, match=r"step 7 .*available steps: \[1, 2\]"):
        restore_run(run_dir, step=7)


def test_restore_run_rebuilds_the_task_and_the_checkpoint(run_dir):
    run = restore_run(run_dir, step=1, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    assert run.step == 1 and run.extra["epoch"] == 1
    assert run.model.prompts == list(tiny_config().prompts.inline) and run.model.reward
    assert run.trainable.keys() == run.initial.keys() == {"lora"}
    flat = lambda tree: traverse_util.flatten_dict(jax.device_get(tree))
    trained, initial = flat(run.trainable["lora"]), flat(run.initial["lora"])
    assert not any(initial[k].any() for k in initial if k[-1] == "B")  # the base model
    assert any(trained[k].any() for k in trained if k[-1] == "B")  # it trained
    assert run.tx.init(run.trainable) is not None


def test_plot_cli_writes_both_pngs_for_two_runs(evaluated, run_dir, tmp_path, capsys):
    other = tmp_path / "b2run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((other / "config.json").read_text())
    config["algo"], config["b2"]["objective"] = "b2", "dag_kl"
    (other / "config.json").write_text(json.dumps(config))
    assert plot.labels_of([run_dir, other]) == ["ddpo", "b2/dag_kl"]
    assert plot.main([str(run_dir), str(other), f"--out={tmp_path / 'plots'}"]) == 0
    for name in ("reward_vs_trajectories.png", "reward_vs_diversity.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000, name
    assert "wrote" in capsys.readouterr().out
    assert plot.main([str(run_dir), "--out", str(tmp_path / "p2"), "--diversity=frechet"]) == 0


def test_prompt_splits_hold_out_prompts():
    cfg = tiny_config()
    splits, skipped = ev.prompt_splits(cfg)
    assert splits["train"] == list(cfg.prompts.inline) and not skipped
    assert splits["test"] == list(ev.TINY_TEST_PROMPTS)
    assert not set(splits["test"]) & set(splits["train"])
    splits, _ = ev.prompt_splits(cfg, test_prompts=["a cat"], max_prompts=2)
    assert splits == {"train": list(cfg.prompts.inline[:2]), "test": ["a cat"]}
    if not SHARED_PROMPTS.is_dir():
        pytest.skip(f"no prompt files at {SHARED_PROMPTS}")
    cfg.prompts.root = str(SHARED_PROMPTS)
    cfg.prompts.name = "drawbench"
    splits, skipped = ev.prompt_splits(cfg)
    assert (len(splits["train"]), len(splits["test"])) == (165, 18) and not skipped
    cfg.prompts.name = "simple_animals"
    splits, skipped = ev.prompt_splits(cfg)
    assert splits["test"] == [] and "no held-out prompts" in skipped["test"]


def test_sample_indices_fix_each_prompts_seeds_whatever_k():
    few, many = ev.sample_indices(3, 2).reshape(3, 2), ev.sample_indices(3, 5).reshape(3, 5)
    np.testing.assert_array_equal(many[:, :2], few)
    assert len(set(ev.sample_indices(4, 3).tolist())) == 12


def test_feature_extractors_plug_in_by_name():
    from dag_jax.eval import features
    from dag_jax.tinyworld import assets

    images = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    pixels = features.load_feature_extractor("pixels:4")
    assert pixels.name == "pixels:4" and pixels(images).shape == (3, 48)
    plugged = features.load_feature_extractor("dag_jax.eval.features:PixelFeatures")
    assert plugged.name == "pixels:16" and plugged(images).shape == (3, 768)
    with pytest.raises(ValueError, match="cannot import"):
        features.load_feature_extractor("dag_jax.eval.features:NoSuchFactory")
    assert features.default_feature_model("runwayml/stable-diffusion-v1-5") == (
        "openai/clip-vit-large-patch14"
    )
    tiny_default = features.default_feature_model("random-tiny")
    assert tiny_default in (str(assets.TINY_CLIP), "pixels")


def test_checkpointer_restores_a_chosen_epoch_without_abandoning_newer_ones(tmp_path):
    from dag_jax.infra.checkpoint import Checkpointer

    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for epoch in (1, 2):
            ckpt.save(epoch, {"w": np.full(3, float(epoch), np.float32)}, {"epoch": epoch})
        template = {"w": np.zeros(3, np.float32)}
        epoch, state, extra = ckpt.restore(template, epoch=1)
        assert epoch == extra["epoch"] == 1 and float(state["w"][0]) == 1.0
        with pytest.raises(ValueError, match="already has"):
            ckpt.save(2, template, {})  # epoch 2 was not abandoned by the explicit restore
        assert ckpt.restore(template)[0] == 2


def test_scorer_jits_jax_rewards_and_gives_host_rewards_the_prompt_strings():
    prompts = ["a", "bbb", "cc"]
    images = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    idx = np.array([2, 0, 0, 1])
    length = rewards.jax_reward(
        "mean_plus_length",
        lambda w, x, tokens: w * x.mean(axis=(1, 2, 3)) + tokens,
        tokenize=lambda ps: np.array([len(p) for p in ps], np.float32),
        params=np.float32(2.0),
    )
    got = scorer(length, prompts)(images, idx)
    want = 2 * rewards.quantize(images).mean(axis=(1, 2, 3)) + np.array([2, 1, 1, 3])
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(scorer(length, prompts)(images, jax.numpy.asarray(idx)), got)
    calls = []
    jitted = jax.jit(length.bound_with_params(prompts))
    counted = lambda *args: calls.append(len(args)) or jitted(*args)
    to_host = lambda x: calls.append("host") or np.asarray(x)
    np.testing.assert_allclose(
        scorer(length, prompts, jitted=counted, to_host=to_host)(images, idx), got
    )
    assert calls == [3, "host"]  # (params, images, idx), then the scores to the host

    seen = []
    host = rewards.host_reward("n_chars", lambda x, ps: seen.extend(ps) or [len(p) for p in ps])
    got = scorer(host, prompts, to_host=to_host)(jax.numpy.asarray(images), idx)
    assert seen == ["cc", "a", "a", "bbb"] and got.dtype == np.float32
    np.testing.assert_array_equal(got, [2, 1, 1, 3])
    assert calls[2:] == ["host", "host"]  # the indices and the images
