"""Row orders and windows of transitions: DAG-KL's leave-one-out groups, B²'s release windows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax.algos import dag
from dag_jax.algos.transitions import EMPTY, distinct_group_order, release_windows


def blocks_of(order: np.ndarray, num_steps: int, group: int) -> list[np.ndarray]:
    """Return the trajectories (b of row b·K + k) of each block's rows, empty slots left out."""
    return [block[block != EMPTY] // num_steps for block in order.reshape(-1, group)]


def blocks_hold_distinct_trajectories(order: np.ndarray, num_steps: int, group: int) -> bool:
    return all(np.unique(b).size == b.size for b in blocks_of(order, num_steps, group))


def test_released_sizes_give_groups_of_8_distinct_trajectories_where_a_shuffle_does_not():
    w, k, g = 256, 50, 8  # DAG-KL release: 256 trajectories × 50 steps, groups of 8
    order = distinct_group_order(w, k, g, np.random.default_rng(0))
    assert order.shape == (w * k,) and (order != EMPTY).all()
    assert np.array_equal(np.sort(order), np.arange(w * k))  # every transition exactly once
    assert blocks_hold_distinct_trajectories(order, k, g)
    # the previous order, a plain shuffle of the window's rows, puts two transitions of one
    # trajectory in about 10 % of the groups (1 − Π_{j<8} (1 − 49 j / (12800 − j)) ≈ 0.10)
    shuffled = np.random.default_rng(0).permutation(w * k)
    assert not blocks_hold_distinct_trajectories(shuffled, k, g)
    shared = np.mean([np.unique(b).size < g for b in blocks_of(shuffled, k, g)])
    assert 0.07 < shared < 0.13
    # as released, each group of 8 trajectories trains its K steps in K groups (one step each)
    # at mixed timesteps: each trajectory's steps come in its own random order
    sets = {tuple(np.sort(b)) for b in blocks_of(order, k, g)}
    assert len(sets) == w // g and sorted(t for s in sets for t in s) == list(range(w))
    steps = order.reshape(-1, g) % k
    assert np.mean([np.unique(s).size == 1 for s in steps]) < 0.01


def test_the_order_is_reproducible_from_the_generator():
    a = distinct_group_order(16, 5, 4, np.random.default_rng(7))
    b = distinct_group_order(16, 5, 4, np.random.default_rng(7))
    c = distinct_group_order(16, 5, 4, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.sort(a))  # shuffled


@pytest.mark.parametrize(
    "w, k, g",
    [(5, 3, 4), (6, 7, 4), (9, 1, 8), (3, 5, 4), (1, 4, 4), (7, 2, 2)],
)
def test_ragged_windows_fill_blocks_with_distinct_trajectories_and_empty_slots(w, k, g):
    order = distinct_group_order(w, k, g, np.random.default_rng(w * 100 + k))
    assert order.size % g == 0
    rows = order[order != EMPTY]
    assert np.array_equal(np.sort(rows), np.arange(w * k))  # every transition exactly once
    assert blocks_hold_distinct_trajectories(order, k, g)
    sizes = [b.size for b in blocks_of(order, k, g)]
    if w < g:  # every block holds one step of each of the w trajectories
        assert sizes == [w] * k
    else:  # as full as the rows allow: fewer than g empty slots, spread over the blocks
        assert order.size - rows.size < g
        assert max(sizes) - min(sizes) <= 1


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match=">= 1"):
        distinct_group_order(4, 0, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= 1"):
        distinct_group_order(4, 3, 0, np.random.default_rng(0))


def test_leave_one_out_advantages_leave_absent_rows_out_of_the_baseline():
    b = np.array([1.0, 2.0, 4.0, 7.0, -1.0, 0.0, 3.0, 3.5, 5.0, 9.0, 2.0, 1.0])
    present = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1], bool)
    b_nan = np.where(present, b, np.nan)  # whatever an absent row holds stays out
    out = np.asarray(dag.leave_one_out_advantages(jnp.asarray(b_nan), 4, 5.0, present))
    # group 0: the formulas over its 3 present rows; group 1: one row, no baseline; group 2: all
    g0 = b[:3]
    m = (g0.sum() - g0) / 2
    u = g0 - m
    v = ((u**2).sum() - u**2) / 2
    np.testing.assert_allclose(out[:3], np.clip(u / (np.sqrt(v) + 1e-8), -5, 5), rtol=1e-5)
    assert out[3] == 0.0 and (out[4:8] == 0.0).all()
    full = np.asarray(dag.leave_one_out_advantages(jnp.asarray(b[8:]), 4, 5.0))
    np.testing.assert_array_equal(out[8:], full)
    # all present: bit for bit the unmasked advantages
    every = dag.leave_one_out_advantages(jnp.asarray(b), 4, 5.0, jnp.ones(12, bool))
    np.testing.assert_array_equal(np.asarray(every), dag.leave_one_out_advantages(b, 4, 5.0))


def test_release_windows_cut_full_windows_from_the_stream_of_passes():
    a, b = np.array([10, 11, 12, 13, 14]), np.array([20, 21, 22, 23, 24])
    windows, dropped = release_windows([a, b], 4)
    # each pass drops its odd last sample (14, 24); the first pass's leftover [10..13] is a
    # full window, then 20..23 another; nothing partial remains
    assert [w.tolist() for w in windows] == [[10, 11, 12, 13], [20, 21, 22, 23]]
    assert dropped == 2
    windows, dropped = release_windows([a[:3], b[:3]], 4, pair=1)
    # a window spans the two passes: the first pass's leftover gradient carries into the next
    assert [w.tolist() for w in windows] == [[10, 11, 12, 20]] and dropped == 2
    windows, dropped = release_windows([np.arange(6), np.arange(6)], 5)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3, 4], [5, 0, 1, 2, 3]]
    assert dropped == 2  # [4, 5] of the second pass: the last partial window
    windows, dropped = release_windows([np.arange(3)], 4)
    assert windows == [] and dropped == 3
