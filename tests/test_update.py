"""The epoch's windows and a window's row order, as the objectives give them to the train step."""

from __future__ import annotations

import types

import numpy as np
import pytest

from dag_jax.train import objectives, update
from dag_jax.train.collect import Collected
from dag_jax.train.config import default_config
from dag_jax.train.state import TrainState, host_rng


def config(algo: str, objective: str = "ddpo", **train):
    """Return the default config for ``algo`` with small windows, groups and micro-batches."""
    c = default_config()
    c.algo, c.b2.objective, c.b2.passes = algo, objective, 2
    c.train.trajectories_per_step, c.train.micro_batch = 4, 8
    c.dag.baseline, c.dag.baseline_group = "rows", 4
    c.train.update(train)
    return c


def context(c) -> types.SimpleNamespace:
    """Return the parts of the loop's context the windows and row orders use."""
    return types.SimpleNamespace(config=c, objective=objectives.get(c))


def collected(weight) -> Collected:
    """Return host data of len(weight) trajectories (the windows read only the weights)."""
    n = len(weight)
    zeros = np.zeros(n, np.float32)
    return Collected(None, np.zeros(n, np.int32), zeros, zeros, np.asarray(weight, np.float32), n)


@pytest.mark.parametrize("algo, objective", [("dag_kl", "ddpo"), ("b2", "dag_kl")])
@pytest.mark.parametrize("n, k", [(8, 5), (5, 3), (3, 5)])
def test_dag_kl_groups_hold_rows_of_distinct_trajectories(algo, objective, n, k):
    c = config(algo, objective, trajectories_per_step=8)
    state = TrainState(trainable={}, opt_state=None, epoch=2, updates=5)
    rows, weight = update.window_rows(context(c), state, n, k)
    assert rows.size % c.train.micro_batch == 0 and set(np.unique(weight)) <= {0.0, 1.0}
    kept = weight > 0
    # every transition of the window once at weight 1; empty slots and padding at weight 0
    assert np.array_equal(np.sort(rows[kept]), np.arange(n * k))
    for group_rows, group_w in zip(rows.reshape(-1, 4), weight.reshape(-1, 4)):  # groups of 4
        trajectories = group_rows[group_w > 0] // k  # row b·K + k
        assert np.unique(trajectories).size == trajectories.size, group_rows


@pytest.mark.parametrize("algo", ["dag_db", "ddpo"])
def test_dag_db_and_ddpo_keep_the_plain_shuffle(algo):
    c = config(algo)
    state = TrainState(trainable={}, opt_state=None, epoch=2, updates=5)
    rows, weight = update.window_rows(context(c), state, 4, 4)
    np.testing.assert_array_equal(rows, host_rng(c, 2, 1005).permutation(16))
    assert (weight == 1).all()


def test_b2_ddpo_updates_only_full_windows_of_the_stream_of_passes():
    weight = [1, 0, 1, 1, 0, 1, 1, 0]  # 5 kept: each pass drops its odd last one
    c = config("b2", "ddpo")
    windows, dropped = context(c).objective.windows(c, 3, collected(weight))
    kept = np.array([0, 2, 3, 5, 6])
    passes = [kept[host_rng(c, 3, 10 + p).permutation(5)][:4] for p in range(2)]
    assert [w.tolist() for w in windows] == [p.tolist() for p in passes] and dropped == 2
    c.train.trajectories_per_step = 3  # 8 → two windows, the second spanning both passes
    windows, dropped = context(c).objective.windows(c, 3, collected(weight))
    stream = np.concatenate(passes)
    assert [w.tolist() for w in windows] == [stream[:3].tolist(), stream[3:6].tolist()]
    assert dropped == 4  # the 2 odd ones, then 2 of a partial window
    c.train.trajectories_per_step = 16  # no full window: no update
    assert context(c).objective.windows(c, 3, collected(weight)) == ([], 10)


def test_b2_dag_objectives_train_every_branch_in_windows_within_each_pass():
    for objective in ("dag_db", "dag_kl"):
        c = config("b2", objective)
        windows, dropped = context(c).objective.windows(c, 3, collected(np.ones(6)))
        assert [w.size for w in windows] == [4, 2, 4, 2] and dropped == 0  # full, partial
        for p in (0, 1):
            assert sorted(np.concatenate(windows[2 * p : 2 * p + 2]).tolist()) == list(range(6))


def test_dropped_trajectories_reach_every_update_of_the_epoch(monkeypatch):
    c = config("b2", "ddpo", trajectories_per_step=3)
    seen = []

    def fake_update(ctx, state, data, window, beta):
        seen.append(window.tolist())
        return state.replace(updates=state.updates + 1), {"loss": 0.0}

    monkeypatch.setattr(update, "update_window", fake_update)
    state = TrainState(trainable={}, opt_state=None, epoch=3)
    data = collected([1, 0, 1, 1, 0, 1, 1, 0])
    state, metrics, finished = update.train_epoch(context(c), state, data, 0.0)
    assert finished and state.updates == len(seen) == 2
    assert [m["dropped_trajectories"] for m in metrics] == [4.0, 4.0]
