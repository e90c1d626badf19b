"""What the loop carries from epoch to epoch, and the host RNG of each epoch and purpose."""

from __future__ import annotations

from typing import Any

import flax.struct
import numpy as np

COUNTERS = ("epoch", "updates", "trajectories_seen", "unique_trajectories", "nonfinite_streak")


@flax.struct.dataclass
class TrainState:
    """The run's state: a pytree of device arrays plus host counters and trackers as data.

    Passed into each phase of the loop and returned by it (``state.replace(...)``), never
    changed in place. ``trackers`` holds the objectives' host-side state as JSON-ready data
    (DDPO's per-prompt reward buffers, B²'s reward history). Everything here is checkpointed:
    the arrays by orbax, ``extra()`` as JSON.
    """

    trainable: dict  # {"lora": …, "flow": …, "log_z": …} fp32
    opt_state: Any
    epoch: int = flax.struct.field(pytree_node=False, default=0)
    updates: int = flax.struct.field(pytree_node=False, default=0)
    trajectories_seen: int = flax.struct.field(pytree_node=False, default=0)
    unique_trajectories: int = flax.struct.field(pytree_node=False, default=0)
    nonfinite_streak: int = flax.struct.field(pytree_node=False, default=0)
    trackers: dict = flax.struct.field(pytree_node=False, default_factory=dict)

    def arrays(self) -> dict:
        """Return the device arrays that orbax saves: {"trainable", "opt_state"}."""
        return {"trainable": self.trainable, "opt_state": self.opt_state}

    def extra(self) -> dict:
        """Return the JSON part of the state (counters and trackers)."""
        return {**{name: getattr(self, name) for name in COUNTERS}, **self.trackers}

    def with_restored(self, arrays: dict, extra: dict) -> TrainState:
        """Return this state with a checkpoint's arrays and JSON part in place."""
        counters = {name: int(extra.get(name, 0)) for name in COUNTERS}
        trackers = {k: extra[k] for k in self.trackers if k in extra}
        return self.replace(
            trainable=arrays["trainable"],
            opt_state=arrays["opt_state"],
            trackers={**self.trackers, **trackers},
            **counters,
        )


def host_rng(config, epoch: int, purpose: int) -> np.random.Generator:
    """Return the host RNG of one epoch and purpose (same on every host and every restart)."""
    return np.random.default_rng([config.seed, epoch, purpose])
