"""Host-side B²-DiffuRL logic (SPEC §7, §10): interval schedule, reward history, selection.

Pure numpy; no model code. A stage's flow on the host is::

    history.add_stage(prompt_ids, rewards)           # rewards (P, Nb): Nb branches per prefix
    z = group_zscores(prompt_ids, rewards, history)  # pooled over this stage + <= 8 previous
    sel = select(z)                                  # or select_all(z) for DAG objectives
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from dag_jax.algos.stats import prompt_key, prompt_keys

Z_EPS = 1e-8


def _check_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise ValueError if it is not an integer."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def interval_length(stage: int, num_stages: int = 100, low: int = 14, high: int = 20) -> int:
    """Return s_i = low + floor(stage·(high−low+1)/num_stages), the trained steps at a stage."""
    stage, num_stages = _check_int("stage", stage), _check_int("num_stages", num_stages)
    low, high = _check_int("low", low), _check_int("high", high)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
    return low + stage * (high - low + 1) // num_stages


def interval_start(
    stage: int, num_steps: int, num_stages: int = 100, low: int = 14, high: int = 20
) -> int:
    """Return the index of the first trained DDIM step: num_steps − s_i (the last s_i train)."""
    length = interval_length(stage, num_stages, low, high)
    num_steps = _check_int("num_steps", num_steps)
    if high > num_steps:
        raise ValueError(f"need high <= num_steps, got high={high}, num_steps={num_steps}")
    return num_steps - length


def interval_table(
    num_stages: int = 100, low: int = 14, high: int = 20
) -> list[tuple[int, int, int, int]]:
    """Return the schedule's blocks as (s, first_stage, last_stage, count), in stage order."""
    table: list[tuple[int, int, int, int]] = []
    for stage in range(num_stages):
        s = interval_length(stage, num_stages, low, high)
        if table and table[-1][0] == s:
            _, first, _, count = table[-1]
            table[-1] = (s, first, stage, count + 1)
        else:
            table.append((s, stage, stage, 1))
    return table


def _group_scores(prompt_ids: Sequence, rewards: np.ndarray) -> dict[str | int, list[float]]:
    """Return prompt → its rows' scores (row-major order), checking the shapes agree."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be 2-D (P, Nb), got shape {rewards.shape}")
    keys = prompt_keys(prompt_ids)
    if len(keys) != rewards.shape[0]:
        raise ValueError(f"got {len(keys)} prompt ids for {rewards.shape[0]} reward rows")
    scores: dict[str | int, list[float]] = {}
    for key, row in zip(keys, rewards.tolist()):
        scores.setdefault(key, []).extend(float(r) for r in row)
    return scores


class RewardHistory:
    """Per-stage reward scores per prompt: the current stage plus the ``max_stages`` before it."""

    def __init__(self, max_stages: int = 8):
        if _check_int("max_stages", max_stages) < 0:
            raise ValueError(f"max_stages must be >= 0, got {max_stages}")
        self.max_stages = int(max_stages)
        self.stages: deque[dict[str | int, list[float]]] = deque(maxlen=self.max_stages + 1)

    def add_stage(self, prompt_ids: Sequence[str | int], rewards: np.ndarray) -> None:
        """Record a stage's (P, Nb) scores, dropping stages older than ``max_stages`` back."""
        self.stages.append(_group_scores(prompt_ids, rewards))

    def latest(self, prompt: str | int) -> list[float]:
        """Return the newest stage's scores for ``prompt`` (empty if it has none)."""
        return list(self.stages[-1].get(prompt_key(prompt), [])) if self.stages else []

    def pool(self, prompt: str | int) -> np.ndarray:
        """Return the float64 scores for ``prompt`` over every stored stage, oldest first."""
        key = prompt_key(prompt)
        return np.array([r for stage in self.stages for r in stage.get(key, [])], np.float64)

    def state_dict(self) -> dict[str, Any]:
        """Return the history as JSON-serialisable lists (prompt keys keep their type)."""
        return {
            "max_stages": self.max_stages,
            "stages": [[[key, list(v)] for key, v in stage.items()] for stage in self.stages],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the stored stages with those in ``state`` (kept to this ``max_stages``)."""
        self.stages = deque(
            (
                {prompt_key(key): [float(r) for r in v] for key, v in stage}
                for stage in state["stages"]
            ),
            maxlen=self.max_stages + 1,
        )


def group_zscores(
    prompt_ids: Sequence[str | int], rewards: np.ndarray, history: RewardHistory
) -> np.ndarray:
    """Return (P, Nb) float64 z = (r − mean)/(std + 1e-8), pooled per prompt over ``history``.

    ``history`` must already hold this stage (``history.add_stage(prompt_ids, rewards)`` first);
    the std is unbiased (ddof=1), and 0 when a prompt's pool holds a single score.
    """
    current = _group_scores(prompt_ids, rewards)
    for key, scores in current.items():
        if history.latest(key) != scores:
            raise ValueError(
                f"history's latest stage does not hold these rewards for prompt {key!r}; "
                "call history.add_stage(prompt_ids, rewards) before group_zscores"
            )
    rewards = np.asarray(rewards, np.float64)
    z = np.empty_like(rewards)
    stats = {}
    for key in current:
        pool = history.pool(key)
        stats[key] = (pool.mean(), pool.std(ddof=1) if pool.size > 1 else 0.0)
    for row, key in enumerate(prompt_keys(prompt_ids)):
        mean, std = stats[key]
        z[row] = (rewards[row] - mean) / (std + Z_EPS)
    return z


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which branches train and with what advantage (host-side numpy arrays)."""

    mask: np.ndarray  # (P, Nb) bool
    advantages: np.ndarray  # (P, Nb) float32, 0 where not kept
    num_selected: int
    num_positive: int
    num_negative: int


def _check_z(z: np.ndarray) -> np.ndarray:
    """Return ``z`` as a 2-D float64 array, or raise ValueError if it is not (P, Nb≥1)."""
    z = np.asarray(z, np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"z must be 2-D (P, Nb) with Nb >= 1, got shape {z.shape}")
    return z


def select(
    z: np.ndarray,
    threshold: float = 0.5,
    adv_clip: float = 5.0,
    beta_pos: float = 1.0,
    beta_neg: float = 1.0,
) -> Selection:
    """Return each group's kept branches: the best if z ≥ +threshold, the worst if z < −threshold.

    Ties go to the lowest index. A kept branch's advantage is clip(z, ±adv_clip) × beta_pos
    (positive) or × beta_neg (negative). An empty selection is a normal result.
    """
    z = _check_z(z)
    if not np.all(np.isfinite(z)):
        raise ValueError("z holds non-finite values (a NaN or inf reward?)")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
    rows = np.arange(z.shape[0])
    best, worst = np.argmax(z, axis=1), np.argmin(z, axis=1)  # first index on ties
    positive = z[rows, best] >= threshold
    negative = z[rows, worst] < -threshold
    kept_pos = (rows[positive], best[positive])
    kept_neg = (rows[negative], worst[negative])
    clipped = np.clip(z, -adv_clip, adv_clip)
    mask = np.zeros(z.shape, bool)
    advantages = np.zeros(z.shape, np.float32)
    mask[kept_pos] = mask[kept_neg] = True
    advantages[kept_pos] = beta_pos * clipped[kept_pos]
    advantages[kept_neg] = beta_neg * clipped[kept_neg]
    return Selection(
        mask=mask,
        advantages=advantages,
        num_selected=int(mask.sum()),
        num_positive=int(positive.sum()),
        num_negative=int(negative.sum()),
    )


def select_all(z: np.ndarray) -> Selection:
    """Return a selection keeping every branch with zero advantages (B² with a DAG objective)."""
    z = _check_z(z)
    return Selection(
        mask=np.ones(z.shape, bool),
        advantages=np.zeros(z.shape, np.float32),
        num_selected=int(z.size),
        num_positive=0,
        num_negative=0,
    )
