"""Training metrics: ``metrics.jsonl``, TensorBoard event files, sample grids, a progress line.

Everything goes under the run's workdir::

    workdir/metrics.jsonl                     one JSON object per logged step
    workdir/events.out.tfevents.*             TensorBoard scalars and images
    workdir/samples/{name}_{step:06d}.png     image grids

Only process 0 writes (in multi-host jobs the other processes get a writer whose methods do
nothing), so every process can make the same calls.

``metrics.jsonl`` lines are strict JSON (no ``NaN``/``Infinity`` tokens): a non-finite value is
written as ``null`` and :func:`read_metrics` reads ``null`` back as ``nan``. Each line has
``step``, ``wall_time`` (Unix seconds) and the scalars, ints staying ints.

TensorBoard files are written by the first available of: clu's ``create_default_writer`` (only
when TensorFlow is importable), ``tensorboardX.SummaryWriter``, or the small built-in writer
here (TFRecord framing with masked CRC32C around hand-encoded ``Event`` protobufs, scalars as
``simple_value`` and PNG images), which needs nothing beyond NumPy and Pillow.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

__all__ = [
    "METRICS_FILE",
    "SAMPLES_DIR",
    "MetricsWriter",
    "ProgressLine",
    "format_duration",
    "format_progress",
    "image_grid",
    "read_events",
    "read_metrics",
    "read_tensorboard_scalars",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
TENSORBOARD_BACKENDS = ("auto", "clu", "tensorboardX", "builtin", "none")


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


def encode_png(image: np.ndarray) -> bytes:
    """Return the PNG bytes of one uint8 (H, W, 3|4) image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe_name(name: str) -> str:
    """Return ``name`` usable as a file name (runs of other characters become ``_``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "images"


# ============================================================================ TFRecord / Event


def _crc32c_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC-32C (Castagnoli) of ``data`` (pure Python, ~0.1 s per MB)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """Return TFRecord's masked CRC-32C of ``data``."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """Return ``data`` framed as one TFRecord: length, its CRC, data, its CRC."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def iter_tfrecords(raw: bytes) -> Iterator[bytes]:
    """Yield the records of a TFRecord byte string, checking both CRCs of each.

    A truncated final record (a writer still writing, or killed) ends the iteration quietly.

    Raises:
      ValueError: a CRC does not match (a damaged file).
    """
    offset = 0
    while offset + 12 <= len(raw):
        header = raw[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[offset + 8 : offset + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"TFRecord length CRC mismatch at byte {offset}")
        end = offset + 12 + length + 4
        if end > len(raw):
            return
        data = raw[offset + 12 : offset + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[end - 4 : end])
        if data_crc != masked_crc32c(data):
            raise ValueError(f"TFRecord data CRC mismatch at byte {offset}")
        yield data
        offset = end


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 → two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _pb_varint(number: int, value: int) -> bytes:
    return _field(number, 0) + _varint(value)


def _pb_double(number: int, value: float) -> bytes:
    return _field(number, 1) + struct.pack("<d", value)


def _pb_float(number: int, value: float) -> bytes:
    return _field(number, 5) + struct.pack("<f", value)


def _pb_bytes(number: int, value: bytes | str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _field(number, 2) + _varint(len(data)) + data


def encode_event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
    image: tuple[str, int, int, int, bytes] | None = None,
) -> bytes:
    """Return a serialised ``tensorflow.Event`` protobuf.

    Fields: Event{wall_time=1 double, step=2 int64, file_version=3 string, summary=5};
    Summary{value=1 repeated}; Summary.Value{tag=1, simple_value=2 float, image=4};
    Summary.Image{height=1, width=2, colorspace=3, encoded_image_string=4}. ``image`` is
    ``(tag, height, width, colorspace, png_bytes)``. The output is byte-identical to
    protobuf's own serialisation (fields in number order, a zero step left out).
    """
    event = _pb_double(1, wall_time)
    if step:  # proto3 leaves a default (0) field out
        event += _pb_varint(2, int(step))
    if file_version is not None:
        event += _pb_bytes(3, file_version)
    values = b""
    for tag, value in (scalars or {}).items():
        values += _pb_bytes(1, _pb_bytes(1, tag) + _pb_float(2, value))
    if image is not None:
        tag, height, width, colorspace, png = image
        body = (
            _pb_varint(1, height)
            + _pb_varint(2, width)
            + _pb_varint(3, colorspace)
            + _pb_bytes(4, png)
        )
        values += _pb_bytes(1, _pb_bytes(1, tag) + _pb_bytes(4, body))
    if values:
        event += _pb_bytes(5, values)
    return event


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def parse_protobuf(data: bytes) -> list[tuple[int, int, Any]]:
    """Return the ``(field number, wire type, value)`` triples of one protobuf message.

    Varints come back as ints, fixed64/fixed32 as their 8/4 raw bytes, length-delimited fields
    as bytes (decode nested messages with another call).
    """
    fields = []
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, offset = _read_varint(data, offset)
        elif wire_type == 1:
            value, offset = data[offset : offset + 8], offset + 8
        elif wire_type == 5:
            value, offset = data[offset : offset + 4], offset + 4
        elif wire_type == 2:
            length, offset = _read_varint(data, offset)
            value, offset = data[offset : offset + length], offset + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if offset > len(data):
            raise ValueError("truncated protobuf message")
        fields.append((number, wire_type, value))
    return fields


def decode_event(data: bytes) -> dict[str, Any]:
    """Decode an ``Event`` protobuf into a dict.

    Keys: ``wall_time``, ``step``, optionally ``file_version``, and ``values``: a list of
    ``{"tag", "simple_value"}`` or ``{"tag", "image": {"height", "width", "colorspace",
    "encoded_image_string"}}`` dicts (other summary kinds appear with only their ``tag``).
    """
    event: dict[str, Any] = {"wall_time": 0.0, "step": 0, "values": []}
    for number, _, value in parse_protobuf(data):
        if number == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3:
            event["file_version"] = value.decode("utf-8")
        elif number == 5:
            event["values"] += [_decode_value(v) for n, _, v in parse_protobuf(value) if n == 1]
    return event


def _decode_value(data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, _, value in parse_protobuf(data):
        if number == 1:
            out["tag"] = value.decode("utf-8")
        elif number == 2:
            out["simple_value"] = struct.unpack("<f", value)[0]
        elif number == 4:
            names = {1: "height", 2: "width", 3: "colorspace", 4: "encoded_image_string"}
            out["image"] = {names[n]: v for n, _, v in parse_protobuf(value) if n in names}
    return out


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Return the decoded events of one TensorBoard event file (see :func:`decode_event`)."""
    return [decode_event(record) for record in iter_tfrecords(Path(path).read_bytes())]


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Return ``{tag: [(step, value), …]}`` of the ``simple_value`` scalars in ``logdir``.

    Reads every ``*tfevents*`` file directly in ``logdir`` (in name order, i.e. creation
    order). Scalars written as tensors (TensorFlow 2 / clu) are not decoded.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("*tfevents*")):
        for event in read_events(path):
            for value in event["values"]:
                if "simple_value" in value:
                    out.setdefault(value["tag"], []).append((event["step"], value["simple_value"]))
    return out


# ============================================================================ TensorBoard backends


class _TensorBoard(Protocol):
    """What MetricsWriter needs from a TensorBoard writer."""

    name: str

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def image(self, step: int, tag: str, image: np.ndarray) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


_file_counter = itertools.count()


class BuiltinEventWriter:
    """A minimal TensorBoard event-file writer: scalars (``simple_value``) and PNG images.

    Creates ``events.out.tfevents.<time>.<host>.<pid>.<n>`` in ``logdir`` and starts it with the
    ``brain.Event:2`` version record, as TensorFlow does. Every call is flushed to disk.
    """

    name = "builtin"

    def __init__(self, logdir: str | os.PathLike) -> None:
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        filename = (
            f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_file_counter)}"
        )
        self.path = logdir / filename
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._write(encode_event(now, 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))
        self._file.flush()

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write one event holding all ``scalars`` at ``step``."""
        if scalars:
            self._write(encode_event(time.time(), step, scalars=scalars))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Write one uint8 (H, W, 3|4) image as a PNG image summary."""
        height, width, channels = image.shape
        png = encode_png(image)
        self._write(encode_event(time.time(), step, image=(tag, height, width, channels, png)))

    def flush(self) -> None:
        """Flush to disk (every write already is)."""
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        """Close the event file (idempotent)."""
        if not self._file.closed:
            self._file.close()


class _TensorboardXWriter:
    name = "tensorboardX"

    def __init__(self, logdir: Path) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _CluWriter:
    name = "clu"

    def __init__(self, logdir: Path) -> None:
        from clu import metric_writers

        self._writer = metric_writers.create_default_writer(str(logdir))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._writer.write_scalars(step, dict(scalars))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._writer.write_images(step, {tag: image[None]})

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def open_tensorboard(logdir: Path, backend: str = "auto") -> _TensorBoard | None:
    """Return a TensorBoard writer for ``logdir``, or None for ``backend="none"``.

    ``"auto"`` tries clu (only if TensorFlow is importable), then tensorboardX, then the
    built-in writer; a backend that fails to start is skipped with a warning. Naming a
    backend uses exactly that one (ImportError if it is missing).
    """
    if backend not in TENSORBOARD_BACKENDS:
        raise ValueError(f"tensorboard must be one of {TENSORBOARD_BACKENDS}, got {backend!r}")
    if backend == "none":
        return None
    factories: dict[str, Callable[[Path], _TensorBoard]] = {
        "clu": _CluWriter,
        "tensorboardX": _TensorboardXWriter,
        "builtin": BuiltinEventWriter,
    }
    if backend != "auto":
        return factories[backend](logdir)
    candidates = []
    if _importable("tensorflow"):
        candidates.append("clu")
    if _importable("tensorboardX"):
        candidates.append("tensorboardX")
    candidates.append("builtin")
    for name in candidates:
        try:
            return factories[name](logdir)
        except Exception as e:  # noqa: BLE001 - fall through to the next backend
            log.warning("TensorBoard backend %s unavailable (%s); trying the next one.", name, e)
    return None


# ============================================================================ writer


class MetricsWriter:
    """Append metrics to ``workdir/metrics.jsonl`` and TensorBoard; save sample grids.

    Args:
      workdir: the run directory (created if missing).
      process_index: this process's index; None asks ``jax.process_index()``. Only process 0
        writes; elsewhere every method is a no-op.
      tensorboard: ``"auto"`` (clu if TensorFlow is importable, else tensorboardX, else the
        built-in writer), one of those names, or ``"none"``.

    Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        process_index: int | None = None,
        *,
        tensorboard: str = "auto",
    ) -> None:
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.workdir = Path(workdir)
        self.active = process_index == 0
        self.metrics_path = self.workdir / METRICS_FILE
        self.samples_dir = self.workdir / SAMPLES_DIR
        self._tb: _TensorBoard | None = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._tb = open_tensorboard(self.workdir, tensorboard)
        backend = self._tb.name if self._tb is not None else "off"
        log.info("Metrics: %s, TensorBoard: %s (%s)", self.metrics_path, backend, self.workdir)

    @property
    def tensorboard_backend(self) -> str | None:
        """The TensorBoard backend in use (``"clu"``, ``"tensorboardX"``, ``"builtin"``)."""
        return self._tb.name if self._tb is not None else None

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
        _append_line(self.metrics_path, json.dumps(record, allow_nan=False))
        if self._tb is not None:
            self._tb.scalars(step, {str(k): _as_float(v) for k, v in scalars.items()})
        return record

    def write_images(
        self, step: int, name: str, images: Any, rows: int | None = None
    ) -> Path | None:
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
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(grid).save(tmp, format="PNG")
        os.replace(tmp, path)
        if self._tb is not None:
            self._tb.image(int(step), name, grid)
        return path

    def truncate_after(self, step: int) -> int:
        """Drop ``metrics.jsonl`` records with a step after ``step``; return how many.

        Call it when resuming from a checkpoint of ``step``: the records of the steps that
        will be redone (logged after that checkpoint, before the run stopped) go away.
        Unreadable lines are dropped too. The file is rewritten atomically.
        """
        if not self.active or not self.metrics_path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            record = _parse_line(line)
            if record is not None and int(record.get("step", 0)) <= step:
                kept.append(line.strip())
            elif line.strip():
                dropped += 1
        if dropped:
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.metrics_path)
            log.info("Dropped %d metrics record(s) after step %d.", dropped, step)
        return dropped

    def flush(self) -> None:
        """Flush TensorBoard (``metrics.jsonl`` lines are flushed as they are written)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard (idempotent)."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _append_line(path: Path, line: str) -> None:
    """Append one line to ``path``, first ending a partial last line a crash left behind."""
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(prefix + line + "\n")
        f.flush()


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

    ``workdir`` is the run directory or the ``.jsonl`` file itself; a missing file gives [].
    A truncated last line (a run killed mid-write, or still writing) is skipped silently;
    other unreadable lines are skipped with a warning. ``null`` values (non-finite when
    written) come back as ``nan`` unless ``nan_for_null`` is False.
    """
    path = Path(workdir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
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
