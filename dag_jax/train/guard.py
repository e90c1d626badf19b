"""One run per workdir: the recorded config a later run must match, and the workdir lock.

A workdir holds one run. Its first run records ``config.json``; a later run in the same
workdir (a resume) must have the same values for every key that defines the run, except
those in ``MAY_CHANGE`` (extending a run, logging, checkpoint cadence, the mesh and other
settings that leave the numbers alone). Other changes stop the run before anything is
written, naming each key with both values; ``--allow_config_change=KEY,…`` accepts them and
records the new config in ``config_history.jsonl`` (``config.json`` stays the first one).

While a run (or an evaluate/export that writes into the workdir) is active it holds
``workdir/.lock`` (host, pid, start time); a second one fails at once naming the holder. A
lock whose process is gone on this host is taken over with a warning. On object stores
(``gs://``) there is no atomic create through ``etils.epath``: the lock is then advisory
(written and checked, but two runs starting within the same second can both take it).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import os
import socket
from typing import Any

import ml_collections
from etils import epath

from dag_jax.train.workdir import CONFIG_FILE, HISTORY_FILE

log = logging.getLogger("dag_jax.train")

CONFIG, HISTORY = CONFIG_FILE, HISTORY_FILE
LOCK = ".lock"
# keys a resumed run may change: the run's length, logging, checkpoint cadence, and settings
# that change how the same numbers are computed (mesh, chunk sizes, attention kernel, remat)
MAY_CHANGE = (
    "train.epochs",
    "b2.stages",
    "log.*",
    "checkpoint.*",
    "mesh.*",
    "sample.chunk",
    "train.micro_batch",
    "attention",
    "remat",
    "prompts.root",
    "prompts.data_dir",  # where the same TFDS prompts are stored
    "eval.*",  # evaluation in the loop reads the weights, never changes them
    "train.ema_decay",  # the EMA follows the weights; a checkpoint without one starts it there
)


class WorkdirError(RuntimeError):
    """The workdir holds another run, or another process is running in it."""


def flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """Return {dotted key: value} of a nested dict (reward options count as one value)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "options":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def as_json(config: ml_collections.ConfigDict) -> dict:
    """Return the config as the JSON data ``config.json`` holds."""
    return json.loads(config.to_json_best_effort())


def differences(recorded: dict, config: dict, allow: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Return {key: (recorded, new)} of the keys that differ and may not change."""
    old, new = flat(recorded), flat(config)
    patterns = (*MAY_CHANGE, *allow)
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not any(fnmatch.fnmatch(key, p) for p in patterns)
    }


def check_config(workdir: epath.PathLike, config: ml_collections.ConfigDict, allow=()) -> bool:
    """Raise WorkdirError if ``workdir`` holds a run with another config; return whether it
    holds one (a resume). ``allow``: keys whose change the user accepts (recorded later)."""
    path = epath.Path(workdir) / CONFIG
    if not path.exists():
        return False
    recorded = json.loads(path.read_text())
    history = epath.Path(workdir) / HISTORY
    if history.exists():  # compare with the config the run was last resumed with
        lines = [line for line in history.read_text().splitlines() if line.strip()]
        recorded = json.loads(lines[-1]) if lines else recorded
    diff = differences(recorded, as_json(config), tuple(allow))
    if diff:
        listed = "\n".join(f"  {k}: {a!r} in the run, {b!r} now" for k, (a, b) in diff.items())
        raise WorkdirError(
            f"{workdir} holds a run with another config:\n{listed}\n"
            "Start a new workdir for a new run, or pass --allow_config_change="
            f"{','.join(diff)} to continue this one with the change (kept in {HISTORY})."
        )
    return True


def record_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """Write ``config.json`` for a new run, or append the config to the run's history when it
    differs from the one last recorded (a resume with accepted changes)."""
    root = epath.Path(workdir)
    data = as_json(config)
    path = root / CONFIG
    if not path.exists():
        path.write_text(json.dumps(data, indent=2))
        return
    history = root / HISTORY
    lines = history.read_text().splitlines() if history.exists() else []
    last = json.loads(lines[-1]) if lines else json.loads(path.read_text())
    if flat(last) != flat(data):
        if not lines:  # the history starts with the first config
            lines = [json.dumps(json.loads(path.read_text()))]
        history.write_text("\n".join([*lines, json.dumps(data)]) + "\n")


def process_alive(pid: int) -> bool:
    """Return whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class WorkdirLock:
    """Holds ``workdir/.lock`` while a run is active (a context manager)."""

    def __init__(self, workdir: epath.PathLike, what: str = "train"):
        self.path = epath.Path(workdir) / LOCK
        self.what = what
        self.held = False

    def holder(self) -> dict | None:
        """Return the current lock's JSON (host, pid, started, what), or None."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def __enter__(self) -> WorkdirLock:
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "what": self.what,
        }
        for _ in range(2):
            if self.create(json.dumps(me)):
                self.held = True
                return self
            other = self.holder()
            if other is None:
                continue  # released meanwhile (or unreadable: retried once)
            stale = other.get("host") == me["host"] and not process_alive(int(other["pid"]))
            if not stale:
                raise WorkdirError(
                    f"{self.path.parent} is in use by {other.get('what', 'a run')} "
                    f"(pid {other.get('pid')} on {other.get('host')}, since "
                    f"{other.get('started')}); wait for it to finish or stop it first"
                )
            log.warning("taking over the stale lock of pid %s in %s", other["pid"], self.path)
            self.path.unlink(missing_ok=True)
        raise WorkdirError(f"could not take the lock {self.path}")

    def create(self, text: str) -> bool:
        """Return whether the lock file was created by this call (atomically where local)."""
        if str(self.path).startswith(("gs://", "s3://")):
            if self.path.exists():
                return False
            self.path.write_text(text)  # advisory on object stores (see module docstring)
            return True
        try:
            fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
