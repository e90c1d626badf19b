"""DDPO's per-prompt reward standardisation (SPEC §6), host-side numpy.

Each prompt keeps a deque of its last ``buffer_size`` rewards. A batch's rewards for a prompt are
appended first; they are then standardised with that buffer's mean and std when it holds at least
``min_count`` values, else with the whole batch's mean and std. Std is the population std
(``np.std``, ddof=0) plus 1e-6, as in ddpo-pytorch. Advantages are not clipped here: the loss
clips them. Rewards are kept as Python floats (float64) so the state survives JSON unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

STD_EPS = 1e-6


def prompt_key(prompt: Any) -> str | int:
    """Return ``prompt`` as a plain ``str`` or ``int`` key (numpy scalars unwrapped)."""
    if isinstance(prompt, (bool, np.bool_)):
        raise TypeError(f"prompt keys must be str or int, got bool {prompt!r}")
    if isinstance(prompt, (int, np.integer)):
        return int(prompt)
    if isinstance(prompt, (str, np.str_)):
        return str(prompt)
    raise TypeError(f"prompt keys must be str or int, got {type(prompt).__name__}")


def prompt_keys(prompts: Sequence) -> list[str | int]:
    """Return the prompts as plain ``str``/``int`` keys (from a list, numpy or JAX array)."""
    items = prompts.tolist() if hasattr(prompts, "tolist") else list(prompts)
    return [prompt_key(p) for p in items]


def standardise(values: np.ndarray, pool: np.ndarray, eps: float = STD_EPS) -> np.ndarray:
    """Return ``(values - mean(pool)) / (std(pool) + eps)`` with the population std."""
    return (values - np.mean(pool)) / (np.std(pool) + eps)


class PerPromptStatTracker:
    """Per-prompt reward buffers that turn rewards into DDPO advantages."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 0:
            raise ValueError(f"min_count must be >= 0, got {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers: dict[Hashable, deque[float]] = {}

    def update(self, prompts: Sequence[str | int], rewards: np.ndarray) -> np.ndarray:
        """Return the (B,) float32 advantages of ``rewards`` after adding them to the buffers."""
        rewards = np.asarray(rewards, np.float64)
        if rewards.ndim != 1:
            raise ValueError(f"rewards must be 1-D (B,), got shape {rewards.shape}")
        keys = prompt_keys(prompts)
        if len(keys) != rewards.shape[0]:
            raise ValueError(f"got {len(keys)} prompts for {rewards.shape[0]} rewards")
        advantages = np.empty_like(rewards)
        for key in dict.fromkeys(keys):  # unique, in order of first appearance
            rows = np.array([k == key for k in keys])
            buffer = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(float(r) for r in rewards[rows])
            pool = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[rows] = standardise(rewards[rows], pool)
        return advantages.astype(np.float32)

    def stats(self) -> dict[str, int | float]:
        """Return the number of prompts tracked and their mean buffer length."""
        lengths = [len(b) for b in self.buffers.values()]
        return {
            "num_prompts": len(lengths),
            "mean_buffer_length": float(np.mean(lengths)) if lengths else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the tracker's state as JSON-serialisable lists (prompt keys keep their type)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": [[key, list(buffer)] for key, buffer in self.buffers.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the buffers with those in ``state`` (kept to this tracker's ``buffer_size``)."""
        self.buffers = {
            prompt_key(key): deque((float(r) for r in values), maxlen=self.buffer_size)
            for key, values in state["buffers"]
        }


GROUP_SCALES = ("group", "pooled")


def group_advantages(rewards: np.ndarray, group: int, scale: str = "group") -> np.ndarray:
    """Return (N,) rewards standardised within consecutive groups of ``group``.

    The groups of ``sample.group`` share their prompt and initial noise x_T, so the baseline
    removes what x_T decides (most of a short sampler's reward variance) without bias: x_T is
    not an action of the policy. Each group's mean is subtracted; ``scale`` "group" divides by
    each group's own std (+ 1e-6), "pooled" by one std over every group's deviations (the
    root mean square of the groups' stds, + 1e-6), which keeps the groups' relative spreads.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {GROUP_SCALES}, got {scale!r}")
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    d = r - r.mean(1, keepdims=True)
    std = d.std(1, keepdims=True) if scale == "group" else np.sqrt(np.mean(d**2))
    return (d / (std + 1e-6)).reshape(-1).astype(np.float32)
