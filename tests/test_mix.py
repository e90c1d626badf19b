"""Weighted reward mixes: arithmetic in and out of jit, option checks, a tiny DAG-DB run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import dag_jax.rewards as R
from dag_jax import train
from dag_jax.configs import base
from dag_jax.rewards import mix
from dag_jax.rewards.base import RewardError
from dag_jax.train import config as train_config
from tests.test_train import read_metrics, tiny_config

PROMPTS = ["a red circle", "a blue square", "two green triangles"]


def brightness(scale: float = 2.0):
    """A JAX-native test reward with weights: scale · mean pixel."""

    def score(params, images, tokens):
        return params["scale"] * jnp.mean(images, axis=(1, 2, 3))

    return R.jax_reward("brightness", score, params={"scale": jnp.float32(scale)})


def prompt_length():
    """A JAX-native test reward that reads the prompt: its length in characters."""

    def tokenize(prompts):
        return np.asarray([[len(p)] for p in prompts], np.float32)

    return R.jax_reward("prompt_length", lambda x, tokens: tokens[:, 0], tokenize=tokenize)


R.register("brightness_for_tests", "tests.test_mix:brightness")
R.register("prompt_length_for_tests", "tests.test_mix:prompt_length")


def _images(b: int = 6, side: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, side, side, 3)).astype(np.float32)


def _prompts(b: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(b)]


def test_an_in_graph_mix_is_one_jitted_weighted_sum_of_its_parts():
    reward = R.get(
        "mix",
        parts={
            "bright": {"reward": "brightness_for_tests", "weight": 0.5, "options": {"scale": 3}},
            "prompt_length_for_tests": {"weight": -0.25},
        },
    )
    assert reward.jittable and reward.part_names == ("bright", "prompt_length_for_tests")
    assert set(reward.params) == {"bright", "prompt_length_for_tests"}
    x, prompts = _images(), _prompts(6)
    bright = 3 * np.round(x * 255).mean(axis=(1, 2, 3)) / 255
    length = np.asarray([len(p) for p in prompts], np.float32)
    want = 0.5 * bright - 0.25 * length
    np.testing.assert_allclose(reward(x, prompts), want, rtol=1e-6)
    parts = reward.part_scores(x, prompts)
    np.testing.assert_allclose(parts["bright"], bright, rtol=1e-6)
    np.testing.assert_array_equal(parts["prompt_length_for_tests"], length)
    fn = jax.jit(reward.bound_with_params(PROMPTS))
    idx = jnp.asarray([i % 3 for i in range(6)], jnp.int32)
    np.testing.assert_allclose(fn(reward.params, jnp.asarray(x), idx), want, rtol=1e-6)
    table = reward.parts_scorer(PROMPTS)(jnp.asarray(x), idx)
    np.testing.assert_allclose(reward.combine(table), want, rtol=1e-6)
    assert reward.parts_scorer(PROMPTS) is reward.parts_scorer(PROMPTS)  # compiled once
    named = mix.named_parts("mix", reward)  # what evaluation scores beside the total
    assert list(named) == ["mix/bright", "mix/prompt_length_for_tests"]
    np.testing.assert_allclose(named["mix/bright"](x, prompts), bright, rtol=1e-6)
    assert mix.named_parts("brightness", R.get("brightness_for_tests")) == {}


def test_a_host_part_makes_a_host_mix_that_still_runs_inside_jit():
    reward = R.get("mix", weights={"brightness_for_tests": 1.0, "jpeg_compressibility": 0.01})
    assert not reward.jittable and reward.host is not None
    x, prompts = _images(4, 32), _prompts(4)
    jpeg = np.asarray(R.get("jpeg_compressibility")(x, prompts))
    bright = 2 * np.round(x * 255).mean(axis=(1, 2, 3)) / 255
    want = bright + 0.01 * jpeg
    np.testing.assert_allclose(reward(x, prompts), want, rtol=1e-6)
    idx = jnp.asarray([0, 1, 2, 0], jnp.int32)
    fn = jax.jit(reward.bound_with_params(PROMPTS))  # brightness traced, JPEG by callback
    np.testing.assert_allclose(fn(reward.params, jnp.asarray(x), idx), want, rtol=1e-6)
    images = jnp.asarray(x).reshape(2, 2, 32, 32, 3)
    vm = jax.jit(jax.vmap(reward.bind(PROMPTS)))(images, idx.reshape(2, 2))
    np.testing.assert_allclose(np.asarray(vm).reshape(-1), want, rtol=1e-6)
    assert reward.config["parts"]["jpeg_compressibility"] == {
        "reward": "jpeg_compressibility",
        "weight": 0.01,
        "options": {"quality": 95},
    }


def test_a_zero_weight_part_is_scored_but_adds_nothing():
    reward = R.get("mix", weights={"brightness_for_tests": 0.0, "prompt_length_for_tests": 1})
    x, prompts = _images(3), _prompts(3)
    np.testing.assert_array_equal(reward(x, prompts), [len(p) for p in prompts])
    assert np.all(reward.part_scores(x, prompts)["brightness_for_tests"] > 0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "needs at least one part"),
        ({"weights": {}}, "needs at least one part"),
        ({"weights": {"aesthetik": 1.0}}, "unknown reward 'aesthetik' \\(did you mean 'aesthetic'"),
        ({"weights": {"jpeg_compressibility": float("nan")}}, "must be finite"),
        ({"weights": {"jpeg_compressibility": float("-inf")}}, "must be finite"),
        ({"weights": {"jpeg_compressibility": "1.0"}}, "must be a number"),
        ({"weights": {"jpeg_compressibility": True}}, "must be a number"),
        ({"weights": {"mix": 1.0}}, "cannot contain a mix"),
        ({"parts": {"a": {"reward": "mix", "weight": 1}}}, "cannot contain a mix"),
        ({"parts": {"jpeg_compressibility": {"wieght": 1}}}, "did you mean 'weight'"),
        ({"parts": {"jpeg_compressibility": {"options": {}}}}, "has no weight"),
        ({"parts": {"jpeg_compressibility": 1.0}}, "expected \\{'weight'"),
        ({"parts": {"jpeg_compressibility": {"weight": 1, "options": 3}}}, "must be a mapping"),
        ({"parts": {"a/b": {"reward": "jpeg_compressibility", "weight": 1}}}, "part name is"),
        (
            {"parts": {"a": {"weight": 1}}, "weights": {"b": 1}},
            "either parts= .* or weights=",
        ),
        ({"wieghts": {"jpeg_compressibility": 1}}, "no option\\(s\\) wieghts \\(did you mean"),
    ],
)
def test_bad_mix_options_are_refused_before_anything_is_built(options, message):
    with pytest.raises(RewardError, match=message):
        mix.check_options(options)
    if "wieghts" not in options:
        with pytest.raises(RewardError, match=message):
            R.get("mix", **options)


def test_a_parts_loading_error_names_the_part():
    parts = {"small": {"reward": "jpeg_compressibility", "weight": 1, "options": {"quality": 0}}}
    with pytest.raises(RewardError, match="part 'small': JPEG quality must be in"):
        R.get("mix", parts=parts)
    parts = {"jpeg_compressibility": {"weight": 1, "options": {"qualty": 90}}}
    with pytest.raises(RewardError, match="part 'jpeg_compressibility'.*no option\\(s\\) qualty"):
        R.get("mix", parts=parts)


def test_the_config_check_refuses_a_bad_mix_and_tiny_keeps_names_and_weights():
    cfg = tiny_config(algo="dag_db", reward__name="mix")
    cfg.reward.options = ml_collections.ConfigDict({"weights": {"tiny_clipscor": 1.0}})
    with pytest.raises(train_config.ConfigError, match="did you mean 'tiny_clipscore'"):
        train_config.validate(cfg, num_devices=1)
    c = base.get_config()
    c.reward.name = "mix"
    c.reward.options = ml_collections.ConfigDict(
        {"weights": {"imagereward": 1.0, "jpeg_compressibility": 0.1}}
    )
    c = base.tiny(c)
    assert c.reward.options.parts.to_dict() == {
        "imagereward": {"reward": "tiny_clipscore", "weight": 1.0, "options": {}},
        "jpeg_compressibility": {"weight": 0.1},
    }
    assert [s.reward for s in mix.check_options(c.reward.options)] == [
        "tiny_clipscore",
        "jpeg_compressibility",
    ]


def test_a_tiny_dag_db_run_on_a_mix_trains_and_logs_each_part(tmp_path):
    cfg = tiny_config(algo="dag_db", train__epochs=1, reward__name="mix")
    cfg.reward.options = ml_collections.ConfigDict(
        {
            "parts": {
                "tiny_clipscore": {"weight": 1.0},
                "jpeg_compressibility": {"weight": 0.01},
            }
        }
    )
    train_config.validate(cfg, num_devices=1)
    state = train.train_and_evaluate(cfg, str(tmp_path))
    assert state.epoch == 1
    row = read_metrics(tmp_path)[-1]
    clip, jpeg = row["reward/tiny_clipscore"], row["reward/jpeg_compressibility"]
    assert -1 <= clip <= 1 and jpeg < 0 and np.isfinite(row["loss"])
    assert row["reward_mean"] == pytest.approx(clip + 0.01 * jpeg, rel=1e-5, abs=1e-6)
