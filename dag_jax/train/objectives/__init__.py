"""The objectives: one module each, the same entry points (``base.Objective``).

A new objective is one module with an ``objective(config) -> Objective`` and one line here.
"""

from __future__ import annotations

from dag_jax.train.objectives import b2, dag_db, dag_kl, ddpo, grpo
from dag_jax.train.objectives.base import Objective

OBJECTIVES = {
    "ddpo": ddpo.objective,
    "dag_db": dag_db.objective,
    "dag_kl": dag_kl.objective,
    "b2": b2.objective,
    "grpo": grpo.objective,
}


def get(config) -> Objective:
    """Return the objective ``config.algo`` trains with."""
    return OBJECTIVES[config.algo](config)


__all__ = ["OBJECTIVES", "Objective", "get"]
