"""The training system: config checks, run building, objectives, updates, the loop.

``python -m dag_jax.train --config=configs/X.py --workdir=DIR``; from Python,
``dag_jax.train.train_and_evaluate(config, workdir)``. Modules, in the order data flows:
``config`` (checks before anything compiles), ``run`` (model, trainable tree, optimizer),
``phases`` (the compiled functions and the run's ``Context``), ``collect`` (sampling and
scoring), ``objectives/`` (one module per objective: collect, windows, row order, loss),
``update`` (windows of transitions → optimizer updates), ``state`` (``TrainState``),
``loop`` (the run, top to bottom), ``workdir`` (rebuilding a run from its folder),
``__main__`` (the CLI).
"""

from dag_jax.train.config import ConfigError, default_config, validate
from dag_jax.train.loop import PREEMPTED_EXIT_CODE, Preempted, train_and_evaluate
from dag_jax.train.update import NonFiniteLoss

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "ConfigError",
    "NonFiniteLoss",
    "Preempted",
    "default_config",
    "train_and_evaluate",
    "validate",
]
