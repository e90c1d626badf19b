"""Epoch checkpoints of the training state in ``workdir/checkpoints`` (a thin orbax wrapper).

One checkpoint per saved epoch, written by orbax's ``CheckpointManager`` as three items:

* ``state``: a pytree of arrays (LoRA and flow params, the optax state, the raw uint32 RNG key
  data, step counters), written with ``StandardSave`` (tensorstore/OCDBT; sharded arrays are
  written by every host, orbax coordinates the hosts);
* ``extra``: JSON host state (reward tracker / B² history, the config dict, trajectories seen),
  written with ``JsonSave``. It goes through JSON: tuples come back as lists and non-string dict
  keys as strings; NaN/inf survive (Python's JSON dialect);
* ``digests``: JSON, the CRC-32 (``zlib.crc32``) of every array's bytes with its dtype and
  shape, computed from the host copy of each array at save time (:func:`tree_digests`).
  orbax's array files carry no checksum of the data (only of their index), so a flipped bit
  inside an array file otherwise reads back without an error.

Saves are atomic: orbax writes ``<epoch>.orbax-checkpoint-tmp-<n>/``, writes the commit marker
``commit_success.txt`` into it and renames it to ``<epoch>/`` (on object stores it writes the
marker last instead), so a save interrupted by a crash never looks like a checkpoint (and a
step directory that lacks the marker is skipped as incomplete).

:meth:`Checkpointer.restore` verifies what it reads: a checkpoint whose arrays or JSON cannot be
read, or whose restored arrays do not match their digests, is damaged. It warns, names it and
falls back to the previous one; once one is usable, the damaged (and incomplete) newer ones are
moved aside into ``damaged/`` (never deleted; see :meth:`Checkpointer.restore`). When none is
usable it raises :class:`NoUsableCheckpointError` listing what it tried, and moves nothing.

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

import datetime
import importlib.util
import json
import logging
import os
import socket
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dag_jax.infra import parallel

__all__ = [
    "COMMIT_MARKER",
    "DAMAGED_DIR",
    "CheckpointMismatchError",
    "Checkpointer",
    "NoUsableCheckpointError",
    "tree_digests",
    "verify_digests",
]

log = logging.getLogger(__name__)

#: File orbax writes into a step directory once every item of it is complete.
COMMIT_MARKER = "commit_success.txt"
#: Sub-directory of the checkpoint directory that damaged checkpoints are moved into.
DAMAGED_DIR = "damaged"
_STATE, _EXTRA, _DIGESTS = "state", "extra", "digests"
_DIGEST_FORMAT = "dag_jax.checkpoint.digests/1"
_DIGEST_ALGORITHM = "crc32"


class CheckpointMismatchError(ValueError):
    """The checkpoint is readable but holds a different tree than the restore template.

    Raised instead of falling back to an older checkpoint, which would not match either: this
    is a changed model or optimiser configuration, not a damaged file.
    """


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist, but none of those tried could be restored and verified.

    ``tried`` lists ``(epoch, what was wrong)`` newest first; ``incomplete`` the epochs
    skipped for lacking their commit marker. Nothing was moved or deleted.
    """

    def __init__(
        self, directory: epath.Path, tried: list[tuple[int, str]], incomplete: list[int]
    ) -> None:
        self.directory, self.tried, self.incomplete = directory, list(tried), list(incomplete)
        attempts = "; ".join(f"epoch {step}: {why}" for step, why in tried)
        skipped = ""
        if incomplete:
            skipped = f"; skipped as incomplete (no {COMMIT_MARKER}): {incomplete}"
        super().__init__(
            f"no usable checkpoint in {directory} (tried {attempts}{skipped}). Nothing was "
            f"moved or deleted; to start the run over, move {directory} out of the way"
        )


class Checkpointer:
    """Save and restore ``(epoch, state, extra)`` checkpoints in one directory.

    Args:
      directory: where the epoch sub-directories go (usually ``workdir/checkpoints``); local
        path or any path ``etils.epath`` understands (``gs://…``). Created if missing.
      max_to_keep: keep only the newest this many checkpoints (None keeps all).
      read_only: open for restoring only (tools reading a live run's directory): no saves, no
        moves or deletes, and orbax's start-up removal of leftover temporary directories is
        skipped so an in-flight save of the training process is left alone.
      async_save: let orbax finish writing in a background thread after :meth:`save` returns
        (the device-to-host copy happens before it returns, so the state may be donated or
        changed right away). :meth:`wait_until_finished` / :meth:`close` wait for it.

    All hosts of a multi-host job must construct it and call :meth:`save` and
    :meth:`restore` together; orbax decides which host writes what, and only process 0
    moves damaged checkpoints aside.
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

        The digest of every array (:func:`tree_digests`) is computed here, from host copies
        of the arrays (a collective for arrays that span processes), and saved beside them.
        Saving an epoch ≤ one already on disk is refused unless ``force=True``, which deletes
        and replaces those checkpoints (an explicit overwrite). Returns True once the save is
        under way (orbax may still be writing in the background; see
        :meth:`wait_until_finished`).

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
        if stale and not force:
            raise ValueError(
                f"{self.directory} already has checkpoint(s) of epoch(s) {stale} ≥ {epoch}; "
                "restore() first to resume, use a new directory, or pass force=True to "
                "replace them"
            )
        if stale:
            log.warning(
                "Deleting checkpoint(s) of epoch(s) %s in %s: saving epoch %d replaces them "
                "(force=True).",
                stale,
                self.directory,
                epoch,
            )
            for step in stale:
                self._manager.delete(step)
        digests = tree_digests(state)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _EXTRA: ocp.args.JsonSave(extra),
                _DIGESTS: ocp.args.JsonSave(digests),
            }
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
        """Restore the newest usable checkpoint into the structure of ``template_state``.

        ``template_state`` is a pytree like the saved state: concrete arrays, or abstract
        ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape``), optionally with
        shardings that restored arrays are placed on; dtypes are cast to the template's
        (after verification, which reads the arrays in their saved dtypes). Container types
        come from the template, so optax states come back as the same NamedTuples.

        Verified: the ``extra`` and ``digests`` JSON items parse, every array reads back, and
        every restored array's dtype, shape and CRC-32 equal the digest saved with it. A
        checkpoint saved before digests existed is restored unverified, with a WARNING. A
        checkpoint that fails (unreadable array data, missing or broken JSON, a digest
        mismatch) is damaged: a WARNING names it and the previous one is tried. On several
        processes, a checkpoint counts as usable only if it is on every process.

        Once a checkpoint is usable (``epoch`` not given), the damaged checkpoints newer than
        it, and any incomplete step directories, are moved to ``<directory>/damaged/<epoch>-
        <UTC time>/`` with a ``.json`` note beside saying why (process 0 moves; the others
        wait for it). Nothing is deleted. A read-only checkpointer moves nothing.

        ``epoch`` restores that checkpoint only (tools reading a run, e.g. evaluation): no
        fallback to an older one, nothing moved.

        Returns:
          ``(epoch, state, extra)``, or None when there is no complete checkpoint at all
          (INFO; incomplete step directories, WARNING, are moved aside as above).

        Raises:
          NoUsableCheckpointError: complete checkpoints exist, but none of those tried was
            usable; it lists each with what was wrong. Nothing is moved.
          CheckpointMismatchError: a checkpoint is readable but its tree (keys or shapes)
            differs from the template; older checkpoints of the run would not match either.
          FileNotFoundError: ``epoch`` is given and has no complete checkpoint.
        """
        self._manager.wait_until_finished()
        _forget_listings(self.directory)
        self._manager.reload()
        listed = list(self._manager.all_steps())
        committed = _committed_steps(self.directory, listed)
        incomplete = sorted(set(listed) - set(committed), reverse=True)
        for step in incomplete:
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
        aside = {s: f"incomplete: no {COMMIT_MARKER} (an interrupted save)" for s in incomplete}
        if not committed:
            if listed:
                log.warning("No complete checkpoint in %s; starting from scratch.", self.directory)
                self._move_aside(aside)
            else:
                log.info("No checkpoint in %s; starting from scratch.", self.directory)
            return None
        tried: list[tuple[int, str]] = []
        candidates = committed[::-1] if epoch is None else [_as_step(epoch)]
        for i, step in enumerate(candidates):
            self._check_template(step, template_state)
            problem, restored = self._restore_verified(step, template_state)
            if parallel.any_process(problem is not None) and problem is None:
                problem, restored = "damaged as read by another process", None
            if problem is None:
                break
            log.warning(
                "Checkpoint %s is damaged (%s)%s",
                self.epoch_path(step),
                problem,
                "; falling back to the previous one." if i + 1 < len(candidates) else ".",
            )
            tried.append((step, problem))
        else:
            raise NoUsableCheckpointError(self.directory, tried, incomplete)
        state, extra = restored
        if epoch is None:
            self._move_aside({**aside, **dict(tried)})
        if tried and epoch is None:
            log.warning(
                "Restored the older checkpoint %s (newer damaged: epoch(s) %s).",
                self.epoch_path(step),
                [s for s, _ in tried],
            )
        else:
            log.info("Restored checkpoint %s.", self.epoch_path(step))
        return step, state, extra

    def _restore_verified(
        self, step: int, template_state: Any
    ) -> tuple[str | None, tuple[Any, dict[str, Any]] | None]:
        """Return (None, (state, extra)) for a usable checkpoint, else (what is wrong, None)."""
        try:
            items = {_EXTRA: ocp.args.JsonRestore()}
            has_digests = (self.epoch_path(step) / _DIGESTS).exists()
            if has_digests:
                items[_DIGESTS] = ocp.args.JsonRestore()
            head = self._manager.restore(step, args=ocp.args.Composite(**items))
            extra = head[_EXTRA]
            if not isinstance(extra, dict):
                raise ValueError(f"extra is {type(extra).__name__}, not a JSON object")
            digests = _checked_digests(head[_DIGESTS]) if has_digests else None
            saved_as = _saved_dtypes(template_state, digests)
            state = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(saved_as)})
            )[_STATE]
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
            return f"unreadable: {type(e).__name__}: {_short(str(e))}", None
        if digests is None:
            log.warning(
                "Checkpoint %s has no array digests (saved before they existed): its arrays "
                "are restored unverified.",
                self.epoch_path(step),
            )
        else:
            mismatch = verify_digests(state, digests)
            if mismatch:
                return f"array digest mismatch: {mismatch}", None
        return None, (_cast_like(state, template_state), extra)

    def _move_aside(self, reasons: Mapping[int, str]) -> None:
        """Move the step directories of ``reasons`` into ``damaged/`` (process 0; all wait)."""
        if self.read_only or not reasons:
            return
        if jax.process_index() == 0:
            for step, why in sorted(reasons.items()):
                _move_step_aside(self.epoch_path(step), self.directory / DAMAGED_DIR, step, why)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dag_jax.checkpoint.move_aside")
        _forget_listings(self.directory)
        self._manager.reload()

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
    state = ocp.StandardCheckpointHandler()
    extra, digests = ocp.JsonCheckpointHandler(), ocp.JsonCheckpointHandler()
    for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(_STATE, args_type, state)
    for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add(_EXTRA, args_type, extra)
        registry.add(_DIGESTS, args_type, digests)
    return registry


# -------------------------------------------------------------------- digests


def tree_digests(tree: Any) -> dict[str, Any]:
    """Return the digests of a pytree of arrays, as the JSON saved beside a checkpoint.

    ``{"format", "algorithm": "crc32", "arrays": {path: {"dtype", "shape", "crc32"}}}``: one
    entry per leaf, keyed by its orbax path joined with ``/`` (``opt_state/0/mu/lora/…``), the
    CRC-32 (``zlib.crc32``) of its C-order bytes. Each leaf is copied to the host one at a
    time (arrays that span processes are all-gathered: a collective, so every process calls
    this). Costs one host copy and one pass over the bytes (about 3 GB/s on one CPU core).
    """
    arrays = {}
    for path, leaf in ocp.tree.to_flat_dict(tree).items():
        host = _host_bytes(leaf)
        arrays["/".join(path)] = {
            "dtype": host.dtype.name,
            "shape": list(host.shape),
            _DIGEST_ALGORITHM: _crc32(host),
        }
    return {"format": _DIGEST_FORMAT, "algorithm": _DIGEST_ALGORITHM, "arrays": arrays}


def verify_digests(tree: Any, digests: Mapping[str, Any], limit: int = 5) -> str:
    """Return how ``tree``'s arrays differ from ``digests`` (:func:`tree_digests`), '' if not.

    Every leaf of ``tree`` needs an entry with the same dtype, shape and CRC-32 (a leaf read
    back in another dtype is cast to the saved one first, which a lossless cast survives).
    Entries without a leaf are not checked (a restore of part of a tree).
    """
    arrays = digests["arrays"]
    bad = []
    for path, leaf in ocp.tree.to_flat_dict(tree).items():
        name = "/".join(path)
        want = arrays.get(name)
        if want is None:
            bad.append(f"{name} (no digest)")
            continue
        host = _host_bytes(leaf)
        if list(host.shape) != list(want["shape"]):
            bad.append(f"{name} (shape {list(host.shape)}, saved {want['shape']})")
            continue
        dtype = _dtype(want["dtype"])
        if host.dtype != dtype:
            host = host.astype(dtype, order="C")
        if _crc32(host) != want[_DIGEST_ALGORITHM]:
            bad.append(name)
    shown = ", ".join(bad[:limit]) + (f" (+{len(bad) - limit} more)" if len(bad) > limit else "")
    return f"{len(bad)} of {len(ocp.tree.to_flat_dict(tree))} arrays differ: {shown}" if bad else ""


def _host_bytes(leaf: Any) -> np.ndarray:
    """Return ``leaf`` as a C-contiguous host array (all-gathered when it spans processes)."""
    return np.asarray(parallel.gather(leaf), order="C")


def _crc32(host: np.ndarray) -> int:
    return zlib.crc32(host.reshape(-1).view(np.uint8))


def _dtype(name: str) -> np.dtype:
    """Return the dtype named ``name`` (numpy's names and ml_dtypes', e.g. bfloat16)."""
    return np.dtype(jax.numpy.dtype(name))


def _checked_digests(digests: Any) -> dict[str, Any] | None:
    """Return the digests item if this version can check it, None (with a warning) if not.

    Raises ValueError when it is not the JSON that :func:`tree_digests` writes (damaged).
    """
    if not isinstance(digests, dict) or not isinstance(digests.get("arrays"), dict):
        raise ValueError("the digests item is not a JSON object with 'arrays'")
    if digests.get("algorithm") != _DIGEST_ALGORITHM:
        log.warning(
            "Unknown checkpoint digest algorithm %r: arrays restored unverified.",
            digests.get("algorithm"),
        )
        return None
    for name, entry in digests["arrays"].items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get(_DIGEST_ALGORITHM), int)
            and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("dtype"), str)
        ):
            raise ValueError(f"the digest of {name} is malformed: {entry!r}")
    return digests


def _saved_dtypes(template: Any, digests: Mapping[str, Any] | None) -> Any:
    """Return ``template`` with each leaf whose saved dtype differs made a ShapeDtypeStruct of
    the saved dtype (same shape and sharding), so the digests check the bytes as saved."""
    if digests is None:
        return template
    arrays = digests["arrays"]
    names = ["/".join(p) for p in ocp.tree.to_flat_dict(template)]
    leaves, treedef = jax.tree.flatten(template)
    if len(names) != len(leaves):  # empty nodes: leave the template to orbax as it is
        return template
    out = []
    for name, leaf in zip(names, leaves):
        want = arrays.get(name)
        dtype = getattr(leaf, "dtype", None)
        if want is not None and dtype is not None and np.dtype(dtype) != _dtype(want["dtype"]):
            sharding = getattr(leaf, "sharding", None)
            leaf = jax.ShapeDtypeStruct(np.shape(leaf), _dtype(want["dtype"]), sharding=sharding)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _cast_like(tree: Any, template: Any) -> Any:
    """Return ``tree`` with each leaf cast to the template leaf's dtype where they differ."""

    def cast(leaf: Any, like: Any) -> Any:
        dtype = getattr(like, "dtype", None)
        if dtype is None or getattr(leaf, "dtype", dtype) == dtype:
            return leaf
        return leaf.astype(dtype)  # a jax.Array keeps its sharding

    return jax.tree.map(cast, tree, template)


# -------------------------------------------------------------------- moving aside


def _move_step_aside(step_dir: epath.Path, damaged: epath.Path, step: int, why: str) -> None:
    """Move ``step_dir`` to ``damaged/<step>-<UTC time>[.n]/`` with a JSON note beside it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    base = f"{step}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    name, n = base, 1
    while (damaged / name).exists() or (damaged / f"{name}.json").exists():
        name, n = f"{base}.{n}", n + 1
    target = damaged / name
    note = {
        "epoch": step,
        "moved_from": os.fspath(step_dir),
        "moved_to": os.fspath(target),
        "reason": why,
        "time": now.isoformat(),
        "host": socket.gethostname(),
    }
    damaged.mkdir(parents=True, exist_ok=True)
    # written first: on object stores it is what makes damaged/ exist for the rename
    (damaged / f"{name}.json").write_text(json.dumps(note, indent=2) + "\n")
    try:
        _move_tree(step_dir, target)
    except Exception as e:
        raise OSError(
            f"could not move the damaged checkpoint {step_dir} aside to {target} "
            f"({type(e).__name__}: {e}); it is still in place"
        ) from e
    log.warning("Moved the damaged checkpoint %s to %s (%s).", step_dir, target, why)


def _move_tree(src: epath.Path, dst: epath.Path) -> None:
    """Move the directory ``src`` to ``dst`` (which must not exist).

    Locally a rename. On object stores ``epath``'s rename is itself a copy of every object
    followed by deleting the originals (they have no rename); if it fails, the copy is done
    here object by object and ``src`` is deleted only once all of it is copied.
    """
    try:
        src.rename(dst)
        return
    except Exception as e:  # noqa: BLE001 - the backends' errors vary
        if not _is_url(src):
            raise
        log.info("rename of %s failed (%s); copying it object by object", src, e)
    for rel in _files_below(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).copy(dst / rel, overwrite=True)
    src.rmtree()


def _files_below(folder: epath.Path, prefix: str = "") -> list[str]:
    """Return the paths of the files below ``folder``, relative to it.

    Through ``iterdir``: on buckets ``epath`` refuses ``rglob`` and its ``walk`` yields paths
    without the ``gs://``.
    """
    out = []
    for path in folder.iterdir():
        if path.is_dir():
            out += _files_below(path, f"{prefix}{path.name}/")
        else:
            out.append(prefix + path.name)
    return out


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
