"""The training system: config checks, run building, sampling and collection, updates, the loop.

``python -m dag_jax.train --config=configs/X.py --workdir=DIR``; from Python,
``dag_jax.train.train_and_evaluate(config, workdir)``. Modules, in the order data flows:
``config`` (checks), ``run`` (model, trainable tree, optimizer), ``phases`` (compiled
functions), ``collect`` (sampling and rewards), ``update`` (windows of transitions),
``state`` (what an epoch carries), ``loop`` (the run), ``__main__`` (the CLI).
"""

from dag_jax.train.collect import Collected, collect, collect_b2, group_advantages, sample_scored
from dag_jax.train.config import (
    ConfigError,
    default_config,
    fl_from_sampling,
    flow_per_state,
    objective_of,
    validate,
)
from dag_jax.train.loop import num_epochs, train_and_evaluate
from dag_jax.train.phases import Phases, build_phases
from dag_jax.train.run import (
    Model,
    checkpoint_template,
    init_trainable,
    load_model,
    load_prompts,
    make_flow,
    make_tx,
    put_batch,
)
from dag_jax.train.state import LoopState, host_rng
from dag_jax.train.update import NonFiniteLoss, micro_batch_shardings, train_on, update_window

__all__ = [
    "Collected",
    "ConfigError",
    "LoopState",
    "Model",
    "NonFiniteLoss",
    "Phases",
    "build_phases",
    "checkpoint_template",
    "collect",
    "collect_b2",
    "default_config",
    "fl_from_sampling",
    "flow_per_state",
    "group_advantages",
    "host_rng",
    "init_trainable",
    "load_model",
    "load_prompts",
    "make_flow",
    "make_tx",
    "micro_batch_shardings",
    "num_epochs",
    "objective_of",
    "put_batch",
    "sample_scored",
    "train_and_evaluate",
    "train_on",
    "update_window",
    "validate",
]
