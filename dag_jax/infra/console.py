"""What the console shows: the CLIs' log levels and format, and the first calls of compiled code.

``configure`` is called by the command-line entry points only (never by library functions): at
absl's ``--verbosity`` 0 (the default) absl, orbax, JAX and transformers log WARNING and above,
the project logs its INFO lines without the per-epoch checkpoint saves, JAX's backend probing
(``Unable to initialize backend …``, "a CUDA-enabled jaxlib is not installed") and
transformers' "PyTorch was not found" notice (``DROPPED_AT_DEFAULT``) are silent, and
each line is ``HH:MM:SS message`` (``HH:MM:SS WARNING logger: message`` from WARNING up).
``--verbosity=1`` brings every INFO line back, in absl's full format.

``announce_first_calls`` wraps the jitted functions of a run so that the first minutes of a run
are not silent: the first call of each logs ``compiling NAME …`` and then how long compiling and
running it once took.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

LIBRARIES = ("absl", "orbax", "jax", "jax._src", "transformers", "tensorflow", "etils")
# quiet at verbosity 0: the backend probes on a CPU machine, and one line per checkpoint save
QUIET_AT_DEFAULT = {
    "jax._src.xla_bridge": logging.ERROR,
    "dag_jax.infra.checkpoint": logging.WARNING,
}
# notices dropped at verbosity 0, by logger: transformers' import-time advice when torch is
# absent (the project runs without torch; torch is a test oracle only), and orbax's (through
# absl) on opening a checkpoint folder read-only, as eval and export do on purpose
DROPPED_AT_DEFAULT = {
    "transformers": ("PyTorch was not found",),
    "absl": ("Given directory is read only",),
}


class DropNotices(logging.Filter):
    """Drop the records of a logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class ShortFormatter(logging.Formatter):
    """``HH:MM:SS message``; from WARNING up ``HH:MM:SS LEVEL logger: message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno < logging.WARNING:
            return line
        stamp, _, rest = line.partition(" ")
        return f"{stamp} {record.levelname} {record.name}: {rest}"


def configure(verbosity: int = 0) -> None:
    """Set the log levels and format of a CLI run for absl's ``verbosity``."""
    from absl import logging as absl_logging

    verbose = verbosity >= 1
    library_level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(library_level)
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    logging.getLogger("dag_jax").setLevel(logging.INFO)
    for name, level in QUIET_AT_DEFAULT.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)
    for name, prefixes in DROPPED_AT_DEFAULT.items():
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, DropNotices)]:
            logger.removeFilter(f)
        if not verbose:
            logger.addFilter(DropNotices(prefixes))
    if not verbose:
        handler = absl_logging.get_absl_handler()
        python_handler = getattr(handler, "python_handler", None)
        root_handlers = logging.getLogger().handlers
        targets = [python_handler] if handler in root_handlers and python_handler else []
        targets += [h for h in root_handlers if h is not handler]  # basicConfig's
        for h in targets:
            h.setFormatter(ShortFormatter())


def format_seconds(seconds: float) -> str:
    """Return ``4.2s``, ``1m05s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    return f"{whole // 60}m{whole % 60:02d}s"


class FirstCall:
    """Calls ``fn``; its first call is logged before (``compiling NAME …``) and after (how long
    compiling and one run took, the result waited for). Attributes are ``fn``'s."""

    def __init__(
        self,
        fn: Callable,
        name: str,
        logger: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fn, self.name, self.logger, self.clock = fn, name, logger, clock
        self.called = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.called:
            return self.fn(*args, **kwargs)
        self.called = True
        self.logger.info("compiling %s …", self.name)
        start = self.clock()
        out = self.fn(*args, **kwargs)
        import jax

        jax.block_until_ready(out)
        self.logger.info(
            "%s: compiled and ran once in %s", self.name, format_seconds(self.clock() - start)
        )
        return out

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.fn, attr)


def announce_first_calls(phases: Any, logger: logging.Logger, names: dict | None = None) -> Any:
    """Return a copy of the dataclass ``phases`` whose callable fields log their first call
    (``FirstCall``); ``names`` maps a field to the name logged (default: the field's name)."""
    names = names or {}
    wrapped = {
        f.name: FirstCall(getattr(phases, f.name), names.get(f.name, f.name), logger)
        for f in dataclasses.fields(phases)
        if callable(getattr(phases, f.name))
    }
    return dataclasses.replace(phases, **wrapped)
