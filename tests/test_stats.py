"""DDPO per-prompt reward standardisation matches SPEC §6 (buffer 32, min_count 16)."""

import json

import numpy as np
import pytest

from dag_jax.algos.stats import PerPromptStatTracker


def test_below_min_count_uses_batch_statistics():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
    prompts = ["a", "a", "b", "b", "b"]
    rewards = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    adv = tracker.update(prompts, rewards)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    assert adv.dtype == np.float32


def test_at_min_count_uses_the_prompts_buffer_statistics():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=4)
    tracker.update(["a", "a", "b"], np.array([0.0, 1.0, 100.0]))
    # "a" now reaches 4 values (at min_count): its own buffer; "b" has 2: batch statistics.
    prompts = ["a", "b", "a"]
    rewards = np.array([2.0, 50.0, 5.0])
    adv = tracker.update(prompts, rewards)
    buffer_a = np.array([0.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(
        adv[[0, 2]], (np.array([2.0, 5.0]) - buffer_a.mean()) / (buffer_a.std() + 1e-6), rtol=1e-6
    )
    np.testing.assert_allclose(adv[1], (50.0 - rewards.mean()) / (rewards.std() + 1e-6), rtol=1e-6)


def test_std_is_population_std_plus_eps():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=2)
    adv = tracker.update([0, 0], np.array([1.0, 3.0]))
    # population std of {1, 3} is 1 (the unbiased one would be sqrt(2)).
    np.testing.assert_allclose(adv, [-1.0 / (1 + 1e-6), 1.0 / (1 + 1e-6)], rtol=1e-7)


def test_buffer_keeps_only_the_last_32_rewards():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
    for start in range(0, 40, 10):
        tracker.update(["p"] * 10, np.arange(start, start + 10, dtype=np.float64))
    assert list(tracker.buffers["p"]) == [float(r) for r in range(8, 40)]
    adv = tracker.update(["p"], np.array([100.0]))
    window = np.arange(9, 40, dtype=np.float64).tolist() + [100.0]
    np.testing.assert_allclose(adv, (100.0 - np.mean(window)) / (np.std(window) + 1e-6), rtol=1e-6)


def test_identical_rewards_give_zero_advantages_not_nan():
    adv = PerPromptStatTracker().update(["x"] * 3, np.full(3, 0.7))
    assert np.all(np.isfinite(adv))
    np.testing.assert_allclose(adv, np.zeros(3), atol=1e-6)


def test_numpy_and_int_prompts_share_keys():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    tracker.update(np.array([3, 3]), np.array([1.0, 2.0]))
    tracker.update([3], np.array([4.0]))
    assert list(tracker.buffers) == [3]
    assert list(tracker.buffers[3]) == [1.0, 2.0, 4.0]


def test_stats_report_prompts_and_mean_buffer_length():
    tracker = PerPromptStatTracker()
    assert tracker.stats() == {"num_prompts": 0, "mean_buffer_length": 0.0}
    tracker.update(["a", "a", "a", "b"], np.ones(4))
    assert tracker.stats() == {"num_prompts": 2, "mean_buffer_length": 2.0}


def test_state_round_trip_through_json_gives_identical_behaviour():
    rng = np.random.default_rng(0)
    prompts = ["cat", 7, "dog", 7, "cat", "cat"]
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    for _ in range(3):
        tracker.update(prompts, rng.normal(size=6).astype(np.float32))
    restored = PerPromptStatTracker(buffer_size=8, min_count=4)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.state_dict() == tracker.state_dict()
    for _ in range(3):
        rewards = rng.normal(size=6).astype(np.float32)
        np.testing.assert_array_equal(
            restored.update(prompts, rewards), tracker.update(prompts, rewards)
        )


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="prompts"):
        PerPromptStatTracker().update(["a"], np.ones(2))
