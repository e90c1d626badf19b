"""Data the training loops draw from: prompt sets and their splits (``dag_jax.data.prompts``),
also read from TensorFlow Datasets (``dag_jax.data.tfds``, imported only for ``tfds:`` names)."""

from dag_jax.data.prompts import (
    MissingPromptFile,
    PromptError,
    PromptSet,
    from_config,
    load,
    names,
    sample,
)

__all__ = [
    "MissingPromptFile",
    "PromptError",
    "PromptSet",
    "from_config",
    "load",
    "names",
    "sample",
]
