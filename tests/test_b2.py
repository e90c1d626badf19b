"""B²-DiffuRL schedule, reward history and selection match SPEC §7 and §10."""

import json

import numpy as np
import pytest

from dag_jax.algos.b2 import (
    RewardHistory,
    group_zscores,
    interval_length,
    interval_start,
    interval_table,
    select,
    select_all,
)


def test_interval_table_matches_spec_blocks():
    assert interval_table(100, 14, 20) == [
        (14, 0, 14, 15),
        (15, 15, 28, 14),
        (16, 29, 42, 14),
        (17, 43, 57, 15),
        (18, 58, 71, 14),
        (19, 72, 85, 14),
        (20, 86, 99, 14),
    ]


def test_interval_length_follows_the_formula():
    for stage in range(100):
        assert interval_length(stage) == 14 + (stage * 7) // 100
    assert interval_length(0) == 14 and interval_length(99) == 20


def test_interval_start_trains_the_last_steps():
    assert interval_start(0, num_steps=20) == 6
    assert interval_start(15, num_steps=20) == 5
    assert interval_start(99, num_steps=20) == 0
    assert [interval_start(i, 20) for i in (14, 28, 42, 57, 71, 85)] == [6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stage": -1},
        {"stage": 100},
        {"stage": 0, "low": 21},
        {"stage": 0, "low": 0},
        {"stage": 0, "num_stages": 0},
        {"stage": 1.5},
    ],
)
def test_interval_length_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        interval_length(**kwargs)


def test_interval_start_rejects_interval_longer_than_the_trajectory():
    with pytest.raises(ValueError, match="num_steps"):
        interval_start(0, num_steps=19)


def test_zscores_by_hand_with_unbiased_std():
    history = RewardHistory()
    prompts = np.array([0, 1])
    rewards = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]])
    history.add_stage(prompts, rewards)
    z = group_zscores(prompts, rewards, history)
    # prompt 0: mean 2, unbiased std 1; prompt 1: mean 6, unbiased std sqrt(3).
    np.testing.assert_allclose(z[0], [-1.0, 0.0, 1.0], rtol=1e-7)
    np.testing.assert_allclose(z[1], np.array([-1.0, -1.0, 2.0]) / np.sqrt(3.0), rtol=1e-7)


def test_zscores_pool_the_prompts_scores_from_previous_stages():
    history = RewardHistory(max_stages=8)
    history.add_stage([0, 1], np.array([[0.0, 4.0], [100.0, 100.0]]))
    history.add_stage([1], np.array([[7.0, 9.0]]))  # a stage without prompt 0
    rewards = np.array([[2.0, 6.0]])
    history.add_stage([0], rewards)
    z = group_zscores([0], rewards, history)
    pool = np.array([0.0, 4.0, 2.0, 6.0])  # mean 3, unbiased std sqrt(20/3)
    np.testing.assert_allclose(z, (rewards - 3.0) / np.sqrt(20.0 / 3.0), rtol=1e-7)
    np.testing.assert_allclose(history.pool(0), pool)


def test_history_drops_stages_older_than_eight_back():
    history = RewardHistory(max_stages=8)
    for stage in range(10):  # stage k scores [k, k]
        history.add_stage([0], np.full((1, 2), float(stage)))
    # current stage 9 plus stages 1..8; stage 0 is dropped.
    np.testing.assert_array_equal(history.pool(0), np.repeat(np.arange(1.0, 10.0), 2))
    z = group_zscores([0], np.full((1, 2), 9.0), history)
    pool = np.repeat(np.arange(1.0, 10.0), 2)
    np.testing.assert_allclose(z, (9.0 - pool.mean()) / pool.std(ddof=1) * np.ones((1, 2)))


def test_repeated_prompt_rows_share_one_pool():
    history = RewardHistory()
    prompts, rewards = [4, 4], np.array([[1.0, 2.0], [3.0, 4.0]])
    history.add_stage(prompts, rewards)
    z = group_zscores(prompts, rewards, history)
    pool = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(z, (rewards - pool.mean()) / pool.std(ddof=1), rtol=1e-7)


def test_single_score_pool_uses_zero_std():
    history = RewardHistory()
    history.add_stage(["solo"], np.array([[0.3]]))
    np.testing.assert_array_equal(group_zscores(["solo"], np.array([[0.3]]), history), [[0.0]])


def test_zscores_require_the_current_stage_in_history():
    history = RewardHistory()
    history.add_stage([0], np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="add_stage"):
        group_zscores([0], np.array([[1.0, 3.0]]), history)


def test_history_state_round_trips_through_json():
    history = RewardHistory(max_stages=2)
    for stage in range(4):
        history.add_stage(["a", 3], np.array([[stage, 1.0], [2.0 * stage, 0.5]]))
    restored = RewardHistory(max_stages=2)
    restored.load_state_dict(json.loads(json.dumps(history.state_dict())))
    assert restored.state_dict() == history.state_dict()
    rewards = np.array([[0.1, 0.9], [0.4, 0.2]])
    for h in (history, restored):
        h.add_stage(["a", 3], rewards)
    np.testing.assert_array_equal(
        group_zscores(["a", 3], rewards, restored), group_zscores(["a", 3], rewards, history)
    )


def test_select_keeps_z_exactly_half_as_positive_but_not_minus_half_as_negative():
    sel = select(np.array([[0.5, 0.0, -0.5]]))
    np.testing.assert_array_equal(sel.mask, [[True, False, False]])
    np.testing.assert_array_equal(sel.advantages, np.array([[0.5, 0.0, 0.0]], np.float32))
    assert (sel.num_selected, sel.num_positive, sel.num_negative) == (1, 1, 0)


def test_select_keeps_at_most_one_positive_and_one_negative_per_group():
    z = np.array(
        [
            [1.0, 2.0, 0.7, -0.9, -1.5],
            [3.0, 3.0, -2.0, -2.0, 0.0],  # ties: lowest index wins
        ]
    )
    sel = select(z)
    np.testing.assert_array_equal(
        sel.mask,
        [[False, True, False, False, True], [True, False, True, False, False]],
    )
    np.testing.assert_array_equal(sel.mask.sum(axis=1), [2, 2])
    assert (sel.num_selected, sel.num_positive, sel.num_negative) == (4, 2, 2)
    np.testing.assert_allclose(sel.advantages[sel.mask], [2.0, -1.5, 3.0, -2.0])


def test_select_is_empty_when_all_z_are_small():
    sel = select(np.array([[0.4, -0.5, 0.0], [0.49, 0.1, -0.2]]))
    assert not sel.mask.any()
    assert (sel.num_selected, sel.num_positive, sel.num_negative) == (0, 0, 0)
    np.testing.assert_array_equal(sel.advantages, np.zeros((2, 3), np.float32))


def test_select_clips_advantages_at_five_and_applies_betas():
    sel = select(np.array([[9.0, 0.0, -7.0], [5.0, 0.0, -4.0]]), beta_pos=2.0, beta_neg=0.5)
    np.testing.assert_allclose(sel.advantages, [[10.0, 0.0, -2.5], [10.0, 0.0, -2.0]])
    assert sel.advantages.dtype == np.float32


def test_select_all_keeps_every_branch_with_zero_advantages():
    sel = select_all(np.array([[0.1, -3.0], [0.0, 2.0]]))
    assert sel.mask.all() and sel.mask.shape == (2, 2)
    np.testing.assert_array_equal(sel.advantages, np.zeros((2, 2), np.float32))
    assert (sel.num_selected, sel.num_positive, sel.num_negative) == (4, 0, 0)


def test_select_rejects_non_finite_z():
    with pytest.raises(ValueError, match="non-finite"):
        select(np.array([[np.nan, 1.0]]))
