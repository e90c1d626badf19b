"""dag_jax: align Stable Diffusion to a reward with DAG-DB, DAG-KL, DDPO and B²-DiffuRL in JAX."""

from dag_jax.pipeline import Pipeline, load_pipeline, save_pipeline

__all__ = ["Pipeline", "load_pipeline", "save_pipeline"]
__version__ = "0.1.0"
