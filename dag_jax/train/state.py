"""What the loop carries from epoch to epoch, and the host RNG of each epoch and purpose."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from dag_jax.algos import b2
from dag_jax.algos.stats import PerPromptStatTracker

log = logging.getLogger("dag_jax.train")


@dataclasses.dataclass
class LoopState:
    """What the loop carries from epoch to epoch (all of it is checkpointed)."""

    epoch: int
    trainable: dict
    opt_state: Any
    updates: int = 0
    trajectories_seen: int = 0
    unique_trajectories: int = 0
    nonfinite_streak: int = 0
    tracker: PerPromptStatTracker = dataclasses.field(default_factory=PerPromptStatTracker)
    history: b2.RewardHistory = dataclasses.field(default_factory=b2.RewardHistory)

    def extra(self) -> dict:
        """Return the JSON-serialisable part of the state."""
        return {
            "epoch": self.epoch,
            "updates": self.updates,
            "trajectories_seen": self.trajectories_seen,
            "unique_trajectories": self.unique_trajectories,
            "nonfinite_streak": self.nonfinite_streak,
            "tracker": self.tracker.state_dict(),
            "history": self.history.state_dict(),
        }

    def load_extra(self, extra: dict) -> None:
        """Restore the JSON-serialisable part of the state."""
        for name in ("epoch", "updates", "trajectories_seen", "unique_trajectories"):
            setattr(self, name, int(extra[name]))
        self.nonfinite_streak = int(extra.get("nonfinite_streak", 0))
        self.tracker.load_state_dict(extra["tracker"])
        self.history.load_state_dict(extra["history"])


def host_rng(config, epoch: int, purpose: int) -> np.random.Generator:
    """Return the host RNG of one epoch and purpose (same on every host and every restart)."""
    return np.random.default_rng([config.seed, epoch, purpose])
