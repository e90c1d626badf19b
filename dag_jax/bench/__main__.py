"""``python -m dag_jax.bench WHAT``: see ``dag_jax.bench.common``."""

from dag_jax.bench.common import cli

if __name__ == "__main__":
    cli()
