"""What the loop carries from epoch to epoch, and the host RNG of each epoch and purpose."""

from __future__ import annotations

import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.infra.checkpoint import Checkpointer, CheckpointMismatchError

log = logging.getLogger("dag_jax.train")

COUNTERS = ("epoch", "updates", "trajectories_seen", "unique_trajectories", "nonfinite_streak")


@flax.struct.dataclass
class TrainState:
    """The run's state: a pytree of device arrays plus host counters and trackers as data.

    Passed into each phase of the loop and returned by it (``state.replace(...)``), never
    changed in place. ``trackers`` holds the objectives' host-side state as JSON-ready data
    (DDPO's per-prompt reward buffers, B²'s reward history). ``ema`` is the exponential moving
    average of ``trainable`` (``train.ema_decay`` > 0), None without one. Everything here is
    checkpointed: the arrays by orbax, ``extra()`` as JSON.
    """

    trainable: dict  # {"lora": …, "flow": …, "log_z": …} fp32
    opt_state: Any
    ema: dict | None = None  # like trainable; None: no EMA (the releases)
    epoch: int = flax.struct.field(pytree_node=False, default=0)
    updates: int = flax.struct.field(pytree_node=False, default=0)
    trajectories_seen: int = flax.struct.field(pytree_node=False, default=0)
    unique_trajectories: int = flax.struct.field(pytree_node=False, default=0)
    nonfinite_streak: int = flax.struct.field(pytree_node=False, default=0)
    trackers: dict = flax.struct.field(pytree_node=False, default_factory=dict)

    def arrays(self) -> dict:
        """Return the device arrays that orbax saves: {"trainable", "opt_state"[, "ema"]}."""
        out = {"trainable": self.trainable, "opt_state": self.opt_state}
        return out if self.ema is None else {**out, "ema": self.ema}

    def extra(self) -> dict:
        """Return the JSON part of the state (counters and trackers)."""
        return {**{name: getattr(self, name) for name in COUNTERS}, **self.trackers}

    def with_restored(self, arrays: dict, extra: dict) -> TrainState:
        """Return this state with a checkpoint's arrays and JSON part in place.

        A state with an EMA restored from a checkpoint without one (saved while
        ``train.ema_decay`` was 0) starts its EMA at the restored parameters; a checkpoint's
        EMA is dropped by a state without one.
        """
        counters = {name: int(extra.get(name, 0)) for name in COUNTERS}
        trackers = {k: extra[k] for k in self.trackers if k in extra}
        ema = None
        if self.ema is not None:
            ema = arrays.get("ema")
            if ema is None:
                log.warning(
                    "the checkpoint of epoch %s has no EMA: the EMA starts at its parameters",
                    counters["epoch"],
                )
                ema = jax.tree.map(jnp.copy, arrays["trainable"])  # own buffers (donation)
        return self.replace(
            trainable=arrays["trainable"],
            opt_state=arrays["opt_state"],
            ema=ema,
            trackers={**self.trackers, **trackers},
            **counters,
        )


def ema_update(ema: Any, params: Any, decay: float, accept: Any = True) -> Any:
    """Return ``decay · ema + (1 − decay) · params`` where ``accept``, else ``ema`` (jittable).

    After k accepted updates θ_1 … θ_k from ``ema`` = θ_0 it is
    d^k θ_0 + (1 − d) Σ_i d^(k−i) θ_i; a rejected (non-finite) update leaves it as it was.
    """
    return jax.tree.map(
        lambda e, p: jnp.where(accept, decay * e + (1.0 - decay) * p, e).astype(e.dtype),
        ema,
        params,
    )


def restore_arrays(
    ckpt: Checkpointer, template: dict, epoch: int | None = None
) -> tuple[int, dict, dict] | None:
    """Return ``ckpt.restore(template, epoch)``, with or without the checkpoint's EMA.

    ``template`` is a {"trainable", "opt_state"[, "ema"]} tree. A checkpoint that differs from
    it only by having or lacking "ema" (a run resumed after ``train.ema_decay`` changed, or
    one saved before EMA existed) is restored as it is: the arrays then lack or hold "ema",
    for the caller to decide (``TrainState.with_restored``). Any other mismatch raises the
    CheckpointMismatchError of ``template``.
    """
    try:
        return ckpt.restore(template, epoch=epoch)
    except CheckpointMismatchError as err:
        if "ema" in template:
            other = {k: v for k, v in template.items() if k != "ema"}
        else:
            other = {**template, "ema": template["trainable"]}
        try:
            return ckpt.restore(other, epoch=epoch)
        except CheckpointMismatchError:
            raise err from None


def host_rng(config, epoch: int, purpose: int) -> np.random.Generator:
    """Return the host RNG of one epoch and purpose (same on every host and every restart)."""
    return np.random.default_rng([config.seed, epoch, purpose])
