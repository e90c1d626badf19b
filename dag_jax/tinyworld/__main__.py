"""``python -m dag_jax.tinyworld``: pretrain and write the built-in tiny world (see ``build``)."""

from dag_jax.tinyworld.build import cli

if __name__ == "__main__":
    cli()
