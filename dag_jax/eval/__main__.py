"""``python -m dag_jax.eval``: reward and diversity of a run's checkpoint (see ``evaluate``)."""

from dag_jax.eval.evaluate import cli

if __name__ == "__main__":
    cli()
