"""Epoch checkpoints of the training state in ``workdir/checkpoints`` (a thin orbax wrapper).

One checkpoint per saved epoch, written by orbax's ``CheckpointManager`` as two items:

* ``state``: a pytree of arrays (LoRA and flow params, the optax state, the raw uint32 RNG key
  data, step counters), written with ``StandardSave`` (tensorstore/OCDBT; sharded arrays are
  written by every host, orbax coordinates the hosts);
* ``extra``: JSON host state (reward tracker / B² history, the config dict, trajectories seen),
  written with ``JsonSave``. It goes through JSON: tuples come back as lists and non-string dict
  keys as strings; NaN/inf survive (Python's JSON dialect).

Saves are atomic: orbax writes ``<epoch>.orbax-checkpoint-tmp-<n>/``, writes the commit marker
``commit_success.txt`` into it and renames it to ``<epoch>/`` (on object stores it writes the
marker last instead), so a save interrupted by a crash never looks like a checkpoint (and a
step directory that lacks the marker is skipped as incomplete). On top of that,
:meth:`Checkpointer.restore` survives checkpoints that are damaged after the fact (a truncated
or garbled array file, a missing JSON item): it warns, names the broken checkpoint and falls
back to the previous one.

Typical use in a training loop::

    with Checkpointer(workdir / "checkpoints", max_to_keep=3) as ckpt:
        start_epoch, extra = 0, {}
        restored = ckpt.restore(jax.eval_shape(lambda: state))
        if restored is not None:
            start_epoch, state, extra = restored
        for epoch in range(start_epoch + 1, num_epochs + 1):
            ...
            ckpt.save(epoch, state, {"trajectories_seen": n, "tracker": tracker.to_dict()})
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["COMMIT_MARKER", "CheckpointMismatchError", "Checkpointer"]

log = logging.getLogger(__name__)

#: File orbax writes into a step directory once every item of it is complete.
COMMIT_MARKER = "commit_success.txt"
_STATE, _EXTRA = "state", "extra"


class CheckpointMismatchError(ValueError):
    """The checkpoint is readable but holds a different tree than the restore template.

    Raised instead of falling back to an older checkpoint, which would not match either: this
    is a changed model or optimiser configuration, not a damaged file.
    """


class Checkpointer:
    """Save and restore ``(epoch, state, extra)`` checkpoints in one directory.

    Args:
      directory: where the epoch sub-directories go (usually ``workdir/checkpoints``); local
        path or any path ``etils.epath`` understands (``gs://…``). Created if missing.
      max_to_keep: keep only the newest this many checkpoints (None keeps all).
      read_only: open for restoring only (tools reading a live run's directory): no saves, no
        deletes, and orbax's start-up removal of leftover temporary directories is skipped so
        an in-flight save of the training process is left alone.
      async_save: let orbax finish writing in a background thread after :meth:`save` returns
        (the device-to-host copy happens before it returns, so the state may be donated or
        changed right away). :meth:`wait_until_finished` / :meth:`close` wait for it.

    All hosts of a multi-host job must construct it and call :meth:`save` and
    :meth:`restore` together; orbax decides which host writes what.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        *,
        read_only: bool = False,
        async_save: bool = True,
    ) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be ≥ 1 or None, got {max_to_keep}")
        # orbax needs absolute paths for array data (a relative workdir is common on the CLI);
        # a URL (gs://…; pass it as a str or epath.Path) goes to orbax as it is
        self.directory = epath.Path(directory if _is_url(directory) else os.path.abspath(directory))
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry()
        )
        # epochs newer than what restore() returned: damaged or incomplete, replaced on save
        self._abandoned: set[int] = set()

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- queries

    def all_epochs(self) -> list[int]:
        """Return the epochs of all complete checkpoints, oldest first.

        Complete means orbax finalised the step directory and, when this directory's
        checkpoints carry commit markers at all, that this one has its marker too. A
        read-only checkpointer reads the directory afresh (the run may have saved since).
        """
        _forget_listings(self.directory)
        if self.read_only:
            self._manager.reload()
        return _committed_steps(self.directory, self._manager.all_steps())

    def latest_epoch(self) -> int | None:
        """Return the newest complete checkpoint's epoch, or None when there is none."""
        epochs = self.all_epochs()
        return epochs[-1] if epochs else None

    def epoch_path(self, epoch: int) -> epath.Path:
        """Return the directory of the checkpoint of ``epoch`` (it may not exist)."""
        return self.directory / str(epoch)

    # ---------------------------------------------------------------- save

    def save(self, epoch: int, state: Any, extra: Mapping[str, Any], force: bool = False) -> bool:
        """Save ``state`` (pytree of arrays) and ``extra`` (JSON dict) as epoch ``epoch``.

        Saving an epoch ≤ one already on disk is refused unless those newer checkpoints were
        abandoned by :meth:`restore` (it fell back past them because they were damaged or
        incomplete, or restored nothing): then they are deleted first, with a warning, since
        the resumed run redoes those epochs. ``force=True`` deletes and replaces them in any
        case (an explicit overwrite). Returns True once the save is under way (orbax may
        still be writing in the background; see :meth:`wait_until_finished`).

        Raises:
          ValueError: a checkpoint of an epoch ≥ ``epoch`` exists and ``force`` is False
            (e.g. a fresh run started in an old workdir without resuming).
          TypeError: ``extra`` is not JSON-serialisable (checked here, before any write, rather
            than in orbax's background thread).
        """
        if self.read_only:
            raise RuntimeError(f"Checkpointer on {self.directory} is read-only")
        epoch = _as_step(epoch)
        extra = dict(extra)
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint extra must be JSON-serialisable: {e}") from e
        self._manager.wait_until_finished()
        stale = [s for s in self._manager.all_steps() if s >= epoch]
        kept = [s for s in stale if s not in self._abandoned]
        if kept and not force:
            raise ValueError(
                f"{self.directory} already has checkpoint(s) of epoch(s) {kept} ≥ {epoch}; "
                "restore() first to resume, use a new directory, or pass force=True to "
                "replace them"
            )
        if stale:
            log.warning(
                "Deleting checkpoint(s) of epoch(s) %s in %s: saving epoch %d replaces them.",
                stale,
                self.directory,
                epoch,
            )
            for step in stale:
                self._manager.delete(step)
            self._abandoned.difference_update(stale)
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}
        )
        # force: this class has no save-interval policy; every requested epoch is written
        saved = bool(self._manager.save(epoch, args=args, force=True))
        if saved:
            log.info("Saving checkpoint of epoch %d to %s", epoch, self.epoch_path(epoch))
        return saved

    # ---------------------------------------------------------------- restore

    def restore(
        self, template_state: Any, epoch: int | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restore the newest readable checkpoint into the structure of ``template_state``.

        ``template_state`` is a pytree like the saved state: concrete arrays, or abstract
        ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape``), optionally with
        shardings that restored arrays are placed on; dtypes are cast to the template's.
        Container types come from the template, so optax states come back as the same
        NamedTuples.

        A damaged checkpoint (unreadable array data, missing or broken JSON, missing commit
        marker) is skipped with a WARNING naming it, and the previous one is tried.

        ``epoch`` restores that checkpoint only (tools reading a run, e.g. evaluation): no
        fallback to an older one, and newer checkpoints are not marked abandoned.

        Returns:
          ``(epoch, state, extra)``, or None when there is no checkpoint (INFO) or none could
          be read (WARNING).

        Raises:
          CheckpointMismatchError: a checkpoint is readable but its tree (keys or shapes)
            differs from the template; older checkpoints of the run would not match either.
          FileNotFoundError: ``epoch`` is given and has no complete checkpoint.
        """
        self._manager.wait_until_finished()
        _forget_listings(self.directory)
        self._manager.reload()
        listed = list(self._manager.all_steps())
        committed = _committed_steps(self.directory, listed)
        self._abandoned = set()
        for step in sorted(set(listed) - set(committed), reverse=True):
            log.warning(
                "Skipping checkpoint %s: incomplete (no %s; an interrupted save).",
                self.epoch_path(step),
                COMMIT_MARKER,
            )
        if epoch is not None and _as_step(epoch) not in committed:
            raise FileNotFoundError(
                f"no complete checkpoint of epoch {epoch} in {self.directory}; "
                f"complete checkpoints: {committed or 'none'}"
            )
        if not committed:
            self._abandoned = set(listed)
            if listed:
                log.warning("No restorable checkpoint in %s.", self.directory)
            else:
                log.info("No checkpoint in %s; starting from scratch.", self.directory)
            return None
        for step in reversed(committed) if epoch is None else [_as_step(epoch)]:
            self._check_template(step, template_state)
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{
                            _STATE: ocp.args.StandardRestore(template_state),
                            _EXTRA: ocp.args.JsonRestore(),
                        }
                    ),
                )
                state, extra = restored[_STATE], restored[_EXTRA]
                if not isinstance(extra, dict):
                    raise ValueError(f"extra is {type(extra).__name__}, not a JSON object")
            except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
                log.warning(
                    "Checkpoint %s is unreadable (%s: %s); falling back to the previous one.",
                    self.epoch_path(step),
                    type(e).__name__,
                    _short(str(e)),
                )
                continue
            self._abandoned = {s for s in listed if s > step} if epoch is None else set()
            if step != committed[-1] and epoch is None:
                log.warning("Restored the older checkpoint %s.", self.epoch_path(step))
            else:
                log.info("Restored checkpoint %s.", self.epoch_path(step))
            return step, state, extra
        self._abandoned = set(listed) if epoch is None else set()
        log.warning(
            "No restorable checkpoint in %s (tried epochs %s).", self.directory, committed[::-1]
        )
        return None

    def _check_template(self, step: int, template_state: Any) -> None:
        """Raise CheckpointMismatchError if ``step``'s readable tree metadata differs."""
        try:
            metadata = self._manager.item_metadata(step)[_STATE]
            stored = _flat_shapes(getattr(metadata, "tree", metadata))
        except Exception:  # noqa: BLE001 - unreadable metadata: let the restore decide
            return
        if not stored:
            return
        wanted = _flat_shapes(template_state)
        problem = _describe_mismatch(stored, wanted)
        if problem:
            raise CheckpointMismatchError(
                f"checkpoint {self.epoch_path(step)} does not match the restore template: {problem}"
            )

    # ---------------------------------------------------------------- lifetime

    def wait_until_finished(self) -> None:
        """Block until a background (async) save has been fully written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources (idempotent)."""
        self._manager.close()


# -------------------------------------------------------------------- helpers


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Return the item handlers up front, so metadata is readable before any save/restore."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, extra = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
    for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(_STATE, args_type, state)
    for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add(_EXTRA, args_type, extra)
    return registry


def _is_url(path: str | os.PathLike) -> bool:
    """Return whether ``path`` is a URL (``gs://b/x``, ``s3://…``) rather than a local path."""
    head, sep, _ = os.fspath(path).partition("://")
    return bool(sep) and head.isalnum()


def _forget_listings(directory: epath.Path) -> None:
    """Drop the directory listings that ``epath``'s fsspec filesystem cached (URLs only).

    Without TensorFlow, ``epath`` reads ``gs://`` through one cached fsspec filesystem
    (gcsfs) that remembers listings until it writes there itself; what other processes, other
    hosts or tensorstore (orbax's array writes) wrote since would stay unseen. Locally, and
    with TensorFlow's gfile (no cache), there is nothing to drop.
    """
    if not _is_url(directory) or importlib.util.find_spec("tensorflow") is not None:
        return
    try:
        from etils.epath import backend

        backend.fsspec_backend.fs(os.fspath(directory)).invalidate_cache()
    except Exception as e:  # noqa: BLE001 - no fsspec filesystem for it: nothing cached
        log.debug("could not drop cached listings of %s: %s", directory, e)


def _as_step(epoch: Any) -> int:
    """Return ``epoch`` as a non-negative Python int (accepts 0-d integer arrays)."""
    value = np.asarray(epoch)
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise TypeError(f"epoch must be an integer, got {epoch!r}")
    if int(value) < 0:
        raise ValueError(f"epoch must be ≥ 0, got {int(value)}")
    return int(value)


def _committed_steps(directory: epath.Path, steps: list[int] | tuple[int, ...]) -> list[int]:
    """Return the sorted steps whose directory has the commit marker.

    orbax < 0.12 did not write the marker when committing by atomic rename, so when no step
    has one, the marker proves nothing and every finalised step orbax lists counts.
    """
    steps = sorted(steps)
    marked = [s for s in steps if (directory / str(s) / COMMIT_MARKER).exists()]
    return marked if marked else steps


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Return ``{key path: shape}`` of a pytree or an orbax metadata tree (empty nodes drop)."""
    flat = ocp.tree.to_flat_dict(tree)
    return {tuple(str(k) for k in path): _shape(leaf) for path, leaf in flat.items()}


def _shape(leaf: Any) -> tuple[int, ...]:
    """Return a leaf's shape (arrays, ShapeDtypeStructs, orbax metadata, Python scalars)."""
    shape = getattr(leaf, "shape", None)
    if shape is None:
        shape = np.shape(leaf)
    return tuple(int(d) for d in shape)


def _describe_mismatch(
    stored: dict[tuple[str, ...], tuple[int, ...]],
    wanted: dict[tuple[str, ...], tuple[int, ...]],
    limit: int = 5,
) -> str:
    """Return a short description of how two flat shape dicts differ ('' if they agree)."""

    def names(paths: list[tuple[str, ...]]) -> str:
        shown = ", ".join("/".join(p) for p in sorted(paths)[:limit])
        more = len(paths) - limit
        return shown + (f" (+{more} more)" if more > 0 else "")

    parts = []
    missing = [p for p in wanted if p not in stored]
    unexpected = [p for p in stored if p not in wanted]
    reshaped = [p for p in wanted if p in stored and stored[p] != wanted[p]]
    if missing:
        parts.append(f"template leaves not in the checkpoint: {names(missing)}")
    if unexpected:
        parts.append(f"checkpoint leaves not in the template: {names(unexpected)}")
    if reshaped:
        shown = ", ".join(
            f"{'/'.join(p)} {stored[p]} vs {wanted[p]}" for p in sorted(reshaped)[:limit]
        )
        parts.append(f"shapes differ (checkpoint vs template): {shown}")
    return "; ".join(parts)


def _short(text: str, limit: int = 300) -> str:
    """Return the first line of ``text``, cut to ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
