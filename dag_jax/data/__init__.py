"""Data the training loops draw from: prompt sets and their splits (``dag_jax.data.prompts``)."""

from dag_jax.data.prompts import (
    MissingPromptFile,
    PromptError,
    PromptSet,
    load,
    names,
    sample,
)

__all__ = ["MissingPromptFile", "PromptError", "PromptSet", "load", "names", "sample"]
