"""Evaluate runs: reward and diversity on fixed noise, features, plots (python -m dag_jax.eval)."""
