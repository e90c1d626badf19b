"""Rebuild a training run from its workdir: its config, model and a checkpoint's trainable tree.

Shared by evaluation (``dag_jax.eval.evaluate``: the full task, the initial and a restored
tree) and export (``dag_jax.export``: the base pipeline and one checkpoint's LoRA). A workdir
holds ``config.json`` (the run's config) and ``checkpoints/`` (one folder per epoch), as
``train_and_evaluate`` writes them; checkpoints are opened read-only, so a live run's saves are
left alone.

A workdir is a local folder or a URL that ``etils.epath`` (and so orbax) understands, e.g.
``gs://bucket/run``: every read and write goes through :func:`workdir_path`'s ``epath.Path``
(``gs://`` needs ``gcsfs``, the ``gcs`` extra, or TensorFlow). :func:`check_writable` is what
training calls before anything compiles.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from dag_jax.infra import parallel
from dag_jax.infra.checkpoint import Checkpointer, NoUsableCheckpointError
from dag_jax.train.config import ConfigError, default_config
from dag_jax.train.run import (
    Model,
    checkpoint_template,
    init_trainable,
    load_model,
    make_tx,
    without_frozen_unet,
)
from dag_jax.train.state import restore_arrays

log = logging.getLogger("dag_jax.train")

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"  # the configs a run was resumed with (train.guard)
CHECKPOINT_DIR = "checkpoints"
GCS_INSTALL_HINT = "pip install 'dag_jax[gcs]'"


class WorkdirAccessError(ConfigError):
    """The workdir cannot be used: its filesystem is not installed, or it cannot be written."""


class UnusableCheckpointsError(WorkdirAccessError):
    """The run has checkpoints, but none of those tried could be restored and verified.

    Raised by training (instead of starting over) and by :func:`restore_run`, from the
    checkpointer's ``NoUsableCheckpointError`` (``__cause__``): its message lists each
    checkpoint tried and what was wrong with it. Nothing was moved or deleted.
    """


def url_scheme(path: str | os.PathLike) -> str | None:
    """Return the scheme of a URL path (``gs`` for ``gs://b/x``), None for a local path."""
    head, sep, _ = os.fspath(path).partition("://")
    return head if sep and head.isalnum() else None


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """Return ``workdir`` as an ``epath.Path``: a local folder or a URL such as ``gs://b/run``.

    Pass URLs as strings (``pathlib.Path("gs://b/x")`` has already become ``gs:/b/x``).
    Raises WorkdirAccessError naming ``pip install 'dag_jax[gcs]'`` for a ``gs://`` workdir when
    neither ``gcsfs`` (what ``etils.epath`` uses for ``gs://`` without TensorFlow) nor
    TensorFlow is installed.
    """
    if url_scheme(workdir) == "gs" and not any(
        importlib.util.find_spec(m) is not None for m in ("gcsfs", "tensorflow")
    ):
        raise WorkdirAccessError(
            f"the workdir {os.fspath(workdir)} is on Google Cloud Storage, which needs gcsfs: "
            f"{GCS_INSTALL_HINT}"
        )
    return epath.Path(workdir)


def check_writable(workdir: str | os.PathLike, process_index: int | None = None) -> epath.Path:
    """Create ``workdir`` if needed and check that this process can write there; return it.

    Writes and deletes ``.write_check.<process>`` (orbax writes array shards from every
    process, so each one checks). On an object store, creating a folder does nothing and a
    missing bucket or a lacking permission shows only on the first write: this is it, before
    anything loads or compiles. Raises WorkdirAccessError naming the workdir and the cause.
    """
    path = workdir_path(workdir)
    index = jax.process_index() if process_index is None else process_index
    probe = path / f".write_check.{index}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("dag_jax write check\n", encoding="utf-8")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - any failure: the filesystems' errors vary
        hint = (
            "; check that the bucket exists and that this machine's credentials may write to it"
            if url_scheme(path)
            else ""
        )
        raise WorkdirAccessError(
            f"cannot write to the workdir {path} ({type(e).__name__}: {e}){hint}"
        ) from e
    return path


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run rebuilt from its workdir: config, model, optimizer and trainable trees."""

    workdir: epath.Path
    config: ml_collections.ConfigDict
    mesh: Mesh
    model: Model  # task=False: no prompts, negative embedding or reward
    tx: optax.GradientTransformation
    initial: dict  # init_trainable's tree: its LoRA B = 0, i.e. the base model
    trainable: dict | None = None  # the restored checkpoint's tree (None: not restored)
    step: int | None = None  # the restored checkpoint's epoch
    extra: dict = dataclasses.field(default_factory=dict)  # what the checkpoint saved beside
    ema: bool = False  # ``trainable`` is the checkpoint's EMA (``train.ema_decay``)


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Return the run's config: ``workdir/config.json`` over ``default_config()``.

    Keys the run's file lacks (added to the project after the run) keep their defaults, so an
    older run still rebuilds. A run resumed with accepted config changes is read as it was last
    resumed (the last line of ``config_history.jsonl``). Raises FileNotFoundError when there
    is no config.json.
    """
    path = workdir_path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training run's workdir?")
    text = path.read_text(encoding="utf-8")
    history = workdir_path(workdir) / HISTORY_FILE
    if history.exists():
        lines = [line for line in history.read_text(encoding="utf-8").splitlines() if line]
        text = lines[-1] if lines else text
    config = default_config()
    _merge(config, json.loads(text))
    return config


def _merge(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """Set ``values`` (a nested dict) into ``config`` in place; reward options are replaced."""
    for key, value in values.items():
        node = config.get(key)
        if isinstance(value, Mapping) and isinstance(node, ml_collections.ConfigDict):
            if key == "options":
                config[key] = ml_collections.ConfigDict(dict(value))
            else:
                _merge(node, value)
            continue
        with config.ignore_type():
            config[key] = tuple(value) if isinstance(value, list) else value


def default_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """Return a mesh over all devices, with the run's ``mesh.fsdp`` when it divides their count."""
    fsdp = config.mesh.fsdp if jax.device_count() % max(config.mesh.fsdp, 1) == 0 else 1
    return parallel.make_mesh(-1, fsdp)


def checkpoint_steps(workdir: str | os.PathLike, step: int | None = None) -> list[int]:
    """Return the epochs of the run's complete checkpoints (ascending; ``step`` among them).

    Raises FileNotFoundError naming the missing checkpoints folder, the folder without a
    complete checkpoint, or the missing ``step`` with the available ones.
    """
    directory = workdir_path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found: the run has no checkpoint yet")
    with Checkpointer(directory, read_only=True, async_save=False) as ckpt:
        steps = ckpt.all_epochs()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if step is not None and step not in steps:
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {directory}; available steps: {steps}"
        )
    return steps


def restore_run(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    task: bool = True,
    restore: bool = True,
    mesh: Mesh | None = None,
    ema: bool = False,
) -> Run:
    """Return the run in ``workdir`` rebuilt, with checkpoint ``step`` (None: the latest) restored.

    Uses the training builders as ``train_and_evaluate`` does (``load_model``,
    ``init_trainable``, ``make_tx``; the restore template is ``checkpoint_template``), so the
    restored tree matches what the run saved. ``task=False`` leaves out the prompts and the
    reward (export); ``restore=False`` restores nothing (the base model: ``initial``) and needs
    no checkpoint; ``mesh`` defaults to ``default_mesh``; ``ema=True`` restores the
    checkpoint's EMA of the trainable tree as ``trainable`` (a run with ``train.ema_decay`` >
    0; else ValueError naming the run). The initial and restored trees are
    laid out alike on the mesh (one placement: a sampler compiles once for both): replicated,
    or with ``train.trainable=unet`` FSDP-sharded (the model's frozen tree then holds no
    UNet: ``initial`` has the base one, ``trainable`` the trained one). Everything is
    checked before the model loads: raises FileNotFoundError naming the missing workdir,
    config.json, checkpoints folder or complete checkpoint (a missing ``step`` lists the
    available ones). The checkpoint is verified (``Checkpointer.restore``; read-only, so a
    damaged one is skipped but not moved): UnusableCheckpointsError when ``step``, or with
    ``step=None`` every checkpoint, is damaged.
    """
    workdir = workdir_path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    config = read_run_config(workdir)
    if restore:
        checkpoint_steps(workdir, step)
    if ema and not (restore and config.train.ema_decay > 0):
        why = "the base model has none" if not restore else "it trained with train.ema_decay = 0"
        raise ValueError(f"no EMA weights in {workdir}: {why}")
    mesh = default_mesh(config) if mesh is None else mesh
    model = load_model(config, mesh, task=task)
    key = jax.random.fold_in(jax.random.key(config.seed), 1 << 31)
    template = checkpoint_template(model, config)  # shapes only; needs the frozen UNet
    initial = model.trainable_layout.put(init_trainable(model, config, key))
    model = without_frozen_unet(model)
    run = Run(workdir, config, mesh, model, make_tx(config, initial), initial)
    if not restore:
        return run
    directory = workdir / CHECKPOINT_DIR
    with Checkpointer(directory, read_only=True, async_save=False) as ckpt:
        try:
            restored = restore_arrays(ckpt, template, epoch=step)
        except NoUsableCheckpointError as err:
            raise UnusableCheckpointsError(str(err)) from err
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {directory}")
    epoch, arrays, extra = restored
    if ema and "ema" not in arrays:
        raise ValueError(
            f"checkpoint {epoch} of {workdir} has no EMA weights (saved before train.ema_decay "
            "was set)"
        )
    trainable = model.trainable_layout.put(arrays["ema" if ema else "trainable"])
    log.info("restored step %d%s of %s", epoch, " (EMA)" if ema else "", workdir)
    return dataclasses.replace(run, trainable=trainable, step=epoch, extra=extra, ema=ema)
