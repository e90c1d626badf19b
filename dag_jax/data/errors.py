"""The errors of prompt loading (``dag_jax.data.prompts`` and ``dag_jax.data.tfds``)."""

from __future__ import annotations


class PromptError(ValueError):
    """An unknown prompt set, a malformed prompt file, or a bad sampler argument."""


class MissingPromptFile(PromptError, FileNotFoundError):
    """A prompt file is neither under the prompt root nor downloadable."""
