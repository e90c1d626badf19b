"""Training metrics: ``metrics.jsonl``, TensorBoard event files, sample grids, a progress line.

Everything goes under the run's workdir (a str or any ``etils.epath`` path, ``gs://`` too)::

    workdir/metrics.jsonl                     one JSON object per logged step
    workdir/metrics_superseded.jsonl          records of steps a resumed run redid
    workdir/events.out.tfevents.*             TensorBoard scalars and images
    workdir/samples/{name}_{step:06d}.png     image grids

Only process 0 writes (in multi-host jobs the other processes get a writer whose methods do
nothing), so every process can make the same calls.

Object stores (``gs://``) cannot append to a file, so ``metrics.jsonl`` is never appended to:
the writer keeps its lines in memory (those of an earlier run in the same workdir read back
first) and writes the whole file anew on each :meth:`MetricsWriter.write_scalars` (locally to
a temporary name renamed into place; on an object store one upload, which replaces the object
at once). Readers see the previous file or the new one, never half a line. For a URL workdir
the TensorBoard event file is written in a local temporary folder and copied to the workdir
(whole, with ``epath``) at :meth:`MetricsWriter.flush`, :meth:`MetricsWriter.close` and after
a ``write_*`` call once ``sync_secs`` have passed since the last copy; a run that crashes
loses the TensorBoard events since that copy (``metrics.jsonl`` and the grids are complete).

``metrics.jsonl`` lines are strict JSON (no ``NaN``/``Infinity`` tokens): a non-finite value is
written as ``null`` and :func:`read_metrics` reads ``null`` back as ``nan``. Each line has
``step``, ``wall_time`` (Unix seconds) and the scalars, ints staying ints.

TensorBoard event files are written by ``tensorboardX.SummaryWriter``, which needs no
TensorFlow. clu's ``metric_writers`` would be the natural interface, but importing any of its
modules runs its package ``__init__``, which imports TensorFlow (clu 0.0.12).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from etils import epath
from PIL import Image

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

__all__ = [
    "METRICS_FILE",
    "SAMPLES_DIR",
    "SUPERSEDED_FILE",
    "MetricsWriter",
    "ProgressLine",
    "format_duration",
    "format_progress",
    "image_grid",
    "read_metrics",
    "to_json_number",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Records of steps after the checkpoint a run resumed from (``MetricsWriter.truncate_after``).
SUPERSEDED_FILE = "metrics_superseded.jsonl"
SAMPLES_DIR = "samples"


# ============================================================================ values


def to_json_number(value: Any) -> int | float | None:
    """Return a scalar as a Python int or float for JSON; non-finite floats become None.

    Accepts Python and NumPy numbers, bools (as 0/1) and one-element NumPy/JAX arrays.

    Raises:
      TypeError: the value is not a number or holds more than one element.
    """
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    array = np.asarray(value)
    if array.size != 1 or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise TypeError(f"a metric must be a single number, got {value!r}")
    item = array.reshape(()).item()
    if isinstance(item, complex):
        raise TypeError(f"a metric must be a real number, got {value!r}")
    return to_json_number(item)


def _as_float(value: Any) -> float:
    """Return a scalar as a Python float for TensorBoard (non-finite values kept)."""
    return float(np.asarray(value, dtype=np.float64).reshape(()))


# ============================================================================ images


def to_uint8(images: Any) -> np.ndarray:
    """Return images as uint8 with 3 (or 4) channels.

    Floats are taken in [0, 1] (clipped; NaN → 0); other integer dtypes are clipped to
    [0, 255]; one channel is repeated to three. The channel axis is the last one.
    """
    array = np.asarray(images)
    if array.dtype == np.uint8:
        out = array
    elif array.dtype == np.bool_:
        out = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        clean = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        out = np.rint(np.clip(clean, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        out = np.clip(array, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"images must be numeric, got dtype {array.dtype}")
    if out.ndim < 3 or out.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images need a last (channel) axis of 1, 3 or 4, got {out.shape}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def grid_shape(n: int, rows: int | None = None) -> tuple[int, int]:
    """Return ``(rows, cols)`` for ``n`` images: as square as possible, cols ≥ rows by default.

    ``rows`` fixes the number of rows (at most ``n``); cols is then ``ceil(n / rows)``.
    """
    if n < 1:
        raise ValueError("an image grid needs at least one image")
    if rows is None:
        rows = max(1, math.isqrt(n))
    if rows < 1:
        raise ValueError(f"rows must be ≥ 1, got {rows}")
    rows = min(rows, n)
    cols = -(-n // rows)
    return rows, cols


def image_grid(
    images: Any, rows: int | None = None, pad: int = 2, pad_value: int = 0
) -> np.ndarray:
    """Tile ``images`` (N, H, W, C) into one uint8 (H', W', C) grid, row-major.

    Images are float in [0, 1] or uint8 (see :func:`to_uint8`). ``pad`` pixels of
    ``pad_value`` separate the images and frame the grid, so with ``rows × cols`` cells
    ``H' = rows·H + (rows + 1)·pad`` and ``W' = cols·W + (cols + 1)·pad``. Cells past the last
    image stay ``pad_value``. ``rows=None`` picks :func:`grid_shape`'s near-square layout.
    """
    if pad < 0:
        raise ValueError(f"pad must be ≥ 0, got {pad}")
    array = np.asarray(images)
    if array.ndim != 4:
        raise ValueError(f"image_grid takes (N, H, W, C) images, got shape {array.shape}")
    array = to_uint8(array)
    n, h, w, c = array.shape
    nrows, ncols = grid_shape(n, rows)
    out = np.full(
        (nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c), pad_value, np.uint8
    )
    for i, image in enumerate(array):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = image
    return out


def _safe_name(name: str) -> str:
    """Return ``name`` usable as a file name (runs of other characters become ``_``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "images"


# ============================================================================ writer

_writer_ids = itertools.count()


def _is_url(path: epath.Path) -> bool:
    """Return whether ``path`` is a URL (``gs://b/x``) rather than a local path."""
    head, sep, _ = os.fspath(path).partition("://")
    return bool(sep) and head.isalnum()


def _write_whole(path: epath.Path, data: bytes) -> None:
    """Write ``path`` at once: locally to a temporary name renamed into place; on an object
    store as one upload (the new object replaces the old one when the upload completes)."""
    if _is_url(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _open_tensorboard(logdir: epath.Path | str) -> SummaryWriter:
    """Return a tensorboardX writer of a new event file in ``logdir``.

    The file name ends in ``.{pid}.{n}`` so that two writers started in the same second (a
    resumed run) do not share a name: tensorboardX names files by the second alone.
    """
    # imported here: tensorboardX imports torch when it is installed, seconds of start-up
    from tensorboardX import SummaryWriter

    suffix = f".{os.getpid()}.{next(_writer_ids)}"
    return SummaryWriter(logdir=str(logdir), flush_secs=30, filename_suffix=suffix)


class MetricsWriter:
    """Log metrics to ``workdir/metrics.jsonl`` and TensorBoard; save sample grids.

    Args:
      workdir: the run directory, a str or path (``etils.epath``, so ``gs://`` too: pass URLs
        as str or ``epath.Path``); created if missing. An existing ``metrics.jsonl`` (a resumed
        run) is read and kept; new records follow its lines.
      process_index: this process's index; None asks ``jax.process_index()``. Only process 0
        writes; elsewhere every method is a no-op.
      tensorboard: whether to write TensorBoard event files (with ``tensorboardX``) too.
      sync_secs: URL workdirs only: the least seconds between two copies of the local
        TensorBoard event file to the workdir after ``write_*`` calls.

    Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        process_index: int | None = None,
        *,
        tensorboard: bool = True,
        sync_secs: float = 60.0,
    ) -> None:
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.workdir = epath.Path(workdir)
        self.active = process_index == 0
        self.metrics_path = self.workdir / METRICS_FILE
        self.samples_dir = self.workdir / SAMPLES_DIR
        self._tb: SummaryWriter | None = None
        self._lines: list[str] = []  # metrics.jsonl as written, one entry a line
        self._tb_local: str | None = None  # URL workdirs: the local folder of the event file
        self._sync_secs, self._synced_at = sync_secs, time.monotonic()
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():
            text = self.metrics_path.read_bytes().decode("utf-8", errors="replace")
            self._lines = [line.strip() for line in text.splitlines() if line.strip()]
        if tensorboard:
            if _is_url(self.workdir):
                self._tb_local = tempfile.mkdtemp(prefix="dag_jax_tensorboard_")
            self._tb = _open_tensorboard(self._tb_local or self.workdir)
        log.info("Metrics: %s, TensorBoard: %s", self.metrics_path, "on" if tensorboard else "off")

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any] | None:
        """Log ``scalars`` at ``step``: one ``metrics.jsonl`` line and TensorBoard scalars.

        Values are numbers or one-element arrays; ints stay ints, non-finite values become
        ``null`` in JSON (TensorBoard gets them as they are). Returns the JSON record written
        (None on processes other than 0).

        Raises:
          ValueError: ``scalars`` has a ``step`` key (the argument is the step).
          TypeError: a value is not a single number.
        """
        if "step" in scalars:
            raise ValueError("pass the step as the argument, not as a scalar")
        step = int(step)
        record: dict[str, Any] = {"step": step, "wall_time": round(time.time(), 3)}
        record.update({str(k): to_json_number(v) for k, v in scalars.items()})
        if not self.active:
            return None
        self._lines.append(json.dumps(record, allow_nan=False))
        self._write_metrics()
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(str(tag), _as_float(value), global_step=step)
            self._maybe_sync()
        return record

    def write_images(
        self, step: int, name: str, images: Any, rows: int | None = None
    ) -> epath.Path | None:
        """Save images as ``samples/{name}_{step:06d}.png`` and log them to TensorBoard.

        ``images`` is a batch (N, H, W, C), tiled with :func:`image_grid` (``rows`` as there),
        or one ready grid (H, W, C); float in [0, 1] or uint8. Returns the PNG path (None on
        processes other than 0). The PNG is written to a temporary name and renamed.
        """
        if not self.active:
            return None
        array = np.asarray(images)
        if array.ndim == 4:
            grid = image_grid(array, rows=rows)
        elif array.ndim == 3:
            grid = to_uint8(array)
        else:
            raise ValueError(f"images must be (N, H, W, C) or (H, W, C), got {array.shape}")
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        path = self.samples_dir / f"{_safe_name(name)}_{int(step):06d}.png"
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        _write_whole(path, png.getvalue())
        if self._tb is not None:
            self._tb.add_image(name, grid, global_step=int(step), dataformats="HWC")
            self._maybe_sync()
        return path

    def truncate_after(self, step: int) -> int:
        """Move ``metrics.jsonl`` records with a step after ``step`` to a side file; return how
        many.

        Call it when resuming from a checkpoint of ``step``: the records of the steps that
        will be redone (logged after that checkpoint, before the run stopped, and held by no
        checkpoint) leave ``metrics.jsonl`` for ``metrics_superseded.jsonl``, appended there
        as they were (unreadable lines too), so nothing logged is ever lost. The side file is
        written before ``metrics.jsonl``: a crash in between leaves a record in both, never
        in neither. Both are rewritten whole (see the module doc).
        """
        if not self.active:
            return 0
        kept, moved = [], []
        for line in self._lines:
            record = _parse_line(line)
            if record is not None and int(record.get("step", 0)) <= step:
                kept.append(line)
            else:
                moved.append(line)
        if moved:
            side = self.workdir / SUPERSEDED_FILE
            old = side.read_bytes().decode("utf-8", errors="replace") if side.exists() else ""
            earlier = [line for line in old.splitlines() if line.strip()]
            _write_whole(side, "".join(f"{line}\n" for line in [*earlier, *moved]).encode())
            self._lines = kept
            self._write_metrics()
            log.info(
                "Moved %d metrics record(s) after step %d (epochs the resumed run redoes) to %s.",
                len(moved),
                step,
                side,
            )
        return len(moved)

    def _write_metrics(self) -> None:
        """Write ``metrics.jsonl`` anew from the lines in memory."""
        _write_whole(self.metrics_path, "".join(f"{line}\n" for line in self._lines).encode())

    def _maybe_sync(self) -> None:
        """Copy the local TensorBoard files to a URL workdir if ``sync_secs`` have passed."""
        if self._tb_local is not None and time.monotonic() - self._synced_at >= self._sync_secs:
            self.flush()

    def _sync_tensorboard(self) -> None:
        """Copy every file of the local TensorBoard folder to the workdir, each whole."""
        for name in sorted(os.listdir(self._tb_local)):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                (self.workdir / name).write_bytes(f.read())
        self._synced_at = time.monotonic()

    def flush(self) -> None:
        """Flush TensorBoard (``metrics.jsonl`` is complete after each write) and, for a URL
        workdir, copy its event file there."""
        if self._tb is not None:
            self._tb.flush()
            if self._tb_local is not None:
                self._sync_tensorboard()

    def close(self) -> None:
        """Flush and close TensorBoard, copying a URL workdir's event file there (idempotent)."""
        try:
            if self._tb is not None:
                self._tb.close()
                self._tb = None
                if self._tb_local is not None:
                    self._sync_tensorboard()
        finally:
            if self._tb_local is not None:
                shutil.rmtree(self._tb_local, ignore_errors=True)
                self._tb_local = None


def _parse_line(line: str) -> dict[str, Any] | None:
    """Return the JSON object of one metrics line, or None if it is blank or unreadable."""
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(workdir: str | os.PathLike, nan_for_null: bool = True) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` back as a list of dicts, in file order.

    ``workdir`` is the run directory or the ``.jsonl`` file itself (a str or path); a missing
    file gives []. A truncated last line (a run killed mid-write, or still writing) is skipped
    silently; other unreadable lines are skipped with a warning. ``null`` values (non-finite
    when written) come back as ``nan`` unless ``nan_for_null`` is False.
    """
    path = epath.Path(workdir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        record = _parse_line(line)
        if record is None:
            if line.strip() and number < len(lines):
                log.warning("Skipping unreadable line %d of %s", number, path)
            continue
        if nan_for_null:
            record = {k: math.nan if v is None else v for k, v in record.items()}
        records.append(record)
    return records


# ============================================================================ progress line


def format_duration(seconds: float | None) -> str:
    """Return a short duration: ``45s``, ``12m05s``, ``1h02m``, ``2d03h`` (``?`` if unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def format_progress(
    epoch: int,
    num_epochs: int,
    reward_mean: float | None,
    reward_std: float | None,
    loss: float | None,
    traj_per_s: float | None,
    elapsed: float,
    start_epoch: int = 0,
) -> str:
    """Return ``epoch 3/100 | reward 0.412 ± 0.051 | loss 1.2e-02 | 12.4 traj/s | ETA 1h02m``.

    ``epoch`` is the number of epochs finished; ``elapsed`` the seconds spent on epochs
    ``start_epoch + 1 … epoch``, so the ETA is ``elapsed / (epoch − start_epoch)`` per epoch
    times the epochs left. Missing values (None) show as ``n/a``.
    """
    reward = (
        "n/a"
        if reward_mean is None
        else f"{reward_mean:.3f}" + ("" if reward_std is None else f" ± {reward_std:.3f}")
    )
    loss_text = "n/a" if loss is None else f"{loss:.1e}"
    rate = "n/a" if traj_per_s is None else f"{traj_per_s:.1f}"
    done, left = epoch - start_epoch, max(num_epochs - epoch, 0)
    if left == 0:
        eta = format_duration(0)
    elif done > 0 and elapsed > 0:
        eta = format_duration(elapsed / done * left)
    else:
        eta = "?"
    return (
        f"epoch {epoch}/{num_epochs} | reward {reward} | loss {loss_text} | {rate} traj/s "
        f"| ETA {eta}"
    )


class ProgressLine:
    """Time the epochs and format :func:`format_progress` lines.

    Construct it right before the first epoch (``start_epoch`` = the epoch resumed from) and
    call :meth:`update` after each epoch. traj/s is measured over the last epoch; the ETA
    uses the mean epoch time since the first update once there is one (the first epoch,
    which includes compilation, is left out), else since construction.
    """

    def __init__(
        self, num_epochs: int, start_epoch: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.num_epochs = num_epochs
        self._clock = clock
        self._origin = (start_epoch, clock())
        self._first: tuple[int, float] | None = None
        self._last_time = self._origin[1]

    def update(
        self,
        epoch: int,
        reward_mean: float | None = None,
        reward_std: float | None = None,
        loss: float | None = None,
        trajectories: int | None = None,
    ) -> str:
        """Return the line after finishing ``epoch`` with ``trajectories`` sampled in it."""
        now = self._clock()
        interval = now - self._last_time
        traj_per_s = trajectories / interval if trajectories is not None and interval > 0 else None
        self._last_time = now
        if self._first is not None and epoch > self._first[0]:
            start_epoch, start_time = self._first
        else:
            start_epoch, start_time = self._origin
        if self._first is None:
            self._first = (epoch, now)
        return format_progress(
            epoch,
            self.num_epochs,
            _maybe_float(reward_mean),
            _maybe_float(reward_std),
            _maybe_float(loss),
            traj_per_s,
            now - start_time,
            start_epoch,
        )


def _maybe_float(value: Any) -> float | None:
    return None if value is None else _as_float(value)
