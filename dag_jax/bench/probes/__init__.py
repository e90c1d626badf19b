"""Research probes (``python -m dag_jax.bench``): the 2-D proof, DDPO's ascent, DB terms."""
