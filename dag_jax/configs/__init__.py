"""Experiment configs (big_vision style): one file per experiment, ``get_config(arg)``.

``python -m dag_jax.train --config=configs/aesthetic.py:algo=b2,size=tiny`` (the repository's
``configs/`` is this package). ``load`` builds a config from a file or a name of this package
with command-line overrides, re-applying an overridden ``algo``'s released settings first.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

ROOT = Path(__file__).resolve().parent
NAMES = (
    "aesthetic",
    "alignment",
    "b2_template",
    "compressibility",
    "hpsv2",
    "imagereward",
    "incompressibility",
    "pickscore",
)


def config_file(name_or_path: str) -> Path:
    """Return the config file of a name of this package ("aesthetic") or of a path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = ROOT / f"{Path(name_or_path).stem}.py"
    if Path(name_or_path).stem in NAMES and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"no config file {name_or_path!r}; packaged configs: {NAMES}")


def load(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Return the config of ``spec`` ("FILE_OR_NAME[:ARG]") with dotted ``overrides`` applied.

    An ``algo`` override joins the argument (``algo=X``), so its release settings apply before
    the other overrides, as ``--config.algo=X`` does on the command line.
    """
    source, _, arg = spec.partition(":")
    overrides = dict(overrides or {})
    if "algo" in overrides:
        arg = with_algo(arg, str(overrides.pop("algo")))
    module_spec = importlib.util.spec_from_file_location("dag_jax_config", config_file(source))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in overrides.items():
        set_dotted(config, key, value)
    return config


def with_algo(arg: str, algo: str) -> str:
    """Return the config argument ``arg`` with its ``algo=`` item replaced by ``algo``."""
    from dag_jax.configs import base

    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    items = [s for s in items if not s.startswith("algo=") and s not in base.ALGOS]
    return ",".join([*items, f"algo={algo}"])


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set ``config.a.b = value`` for the dotted ``key`` "a.b" (an unknown key is an error)."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise KeyError(f"unknown config key {key!r}")
    node[leaf] = value


def from_flag(flag) -> ml_collections.ConfigDict:
    """Return the config of an ml_collections ``--config`` flag, an overridden algo applied.

    ``--config.algo=X`` rebuilds the config with ``algo=X`` in its argument (that release's
    settings) and then re-applies the other overrides; otherwise the flag's value is returned.
    """
    from ml_collections import config_flags

    overrides = config_flags.get_override_values(flag)
    if "algo" not in overrides:
        return flag.value
    return load(config_flags.get_config_filename(flag), overrides)
