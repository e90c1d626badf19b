"""Research probes (``python -m dag_jax.bench toy2d|ascent|dbterms``): the 2-D proof, whether
DDPO's gradient ascends, the DB residual's terms."""
