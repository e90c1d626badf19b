"""What the CLIs print: the project's own INFO lines, WARNING and above from the libraries.

Called by the command-line entry points only (never by library functions): absl's
``--verbosity`` (default 0) keeps absl, orbax, JAX and transformers at WARNING; ``--verbosity=1``
brings their INFO lines back.
"""

from __future__ import annotations

import logging

LIBRARIES = ("absl", "orbax", "jax", "jax._src", "transformers", "tensorflow", "etils")


def configure(verbosity: int = 0) -> None:
    """Set the log levels and format of a CLI run for absl's ``verbosity``."""
    from absl import logging as absl_logging

    library_level = logging.INFO if verbosity >= 1 else logging.WARNING
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(library_level)
    absl_logging.set_verbosity(absl_logging.INFO if verbosity >= 1 else absl_logging.WARNING)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    logging.getLogger("dag_jax").setLevel(logging.INFO)
