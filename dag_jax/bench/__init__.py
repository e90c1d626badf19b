"""Benchmarks (``python -m dag_jax.bench WHAT``); PyTorch references and research probes live here,
off the runtime import path: nothing under ``dag_jax`` outside this package imports it."""
