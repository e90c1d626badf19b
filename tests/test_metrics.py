"""metrics.jsonl, TensorBoard event files, sample grids and the progress line."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from dag_jax.infra.metrics import (
    MetricsWriter,
    ProgressLine,
    format_duration,
    format_progress,
    image_grid,
    read_metrics,
)


def _strict_json(line: str) -> dict:
    """json.loads that rejects the NaN/Infinity tokens Python would otherwise accept."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def _event_files(workdir: Path) -> list[Path]:
    """Return the TensorBoard event files in ``workdir``, in name order."""
    return sorted(workdir.glob("*tfevents*"))


def _tensorboard(logdir: Path) -> event_accumulator.EventAccumulator:
    """Return TensorBoard's own reader of ``logdir``, loaded, keeping every scalar and image."""
    sizes = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    return event_accumulator.EventAccumulator(str(logdir), size_guidance=sizes).Reload()


# ------------------------------------------------------------------------ metrics.jsonl


def test_each_write_is_one_complete_strict_json_line(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        for step in (1, 2, 3):
            writer.write_scalars(
                step,
                {
                    "epoch": np.int64(step),
                    "trajectories_seen": 64 * step,
                    "unique_trajectories": jnp.asarray(60 * step),
                    "reward_mean": jnp.float32(0.25 * step),
                    "reward_std": np.float64(0.5),
                    "loss": 1e-3 / step,
                    "kl_on": True,
                },
            )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [_strict_json(line) for line in lines]
    for step, record in enumerate(records, start=1):
        assert record["step"] == step and record["epoch"] == step
        assert record["trajectories_seen"] == 64 * step
        assert record["unique_trajectories"] == 60 * step
        assert record["reward_mean"] == pytest.approx(0.25 * step)
        assert record["reward_std"] == 0.5 and record["loss"] == pytest.approx(1e-3 / step)
        assert record["kl_on"] == 1
        assert isinstance(record["wall_time"], float)
        for key in ("step", "epoch", "trajectories_seen", "unique_trajectories"):
            assert isinstance(record[key], int), key
    assert read_metrics(tmp_path) == records


def test_non_finite_values_are_null_in_json_and_nan_when_read_back(tmp_path):
    with MetricsWriter(tmp_path, process_index=0) as writer:
        written = writer.write_scalars(
            7, {"loss": float("nan"), "up": np.float32("inf"), "down": -math.inf, "ok": 1.5}
        )
    assert written["loss"] is None and written["up"] is None and written["down"] is None
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = _strict_json(text)
    assert record["loss"] is None and record["ok"] == 1.5
    (back,) = read_metrics(tmp_path)
    assert math.isnan(back["loss"]) and math.isnan(back["up"]) and back["ok"] == 1.5
    assert read_metrics(tmp_path, nan_for_null=False)[0]["loss"] is None
    # TensorBoard keeps the actual values
    board = _tensorboard(tmp_path)
    (loss,) = board.Scalars("loss")
    assert loss.step == 7 and math.isnan(loss.value)
    assert [(e.step, e.value) for e in board.Scalars("up")] == [(7, math.inf)]
    assert [(e.step, e.value) for e in board.Scalars("down")] == [(7, -math.inf)]
    assert board.Scalars("ok")[0].value == 1.5


def test_only_process_zero_writes(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, process_index=1) as writer:
        assert writer.write_scalars(1, {"loss": 1.0}) is None
        assert writer.write_images(1, "samples", np.zeros((2, 4, 4, 3), np.uint8)) is None
        assert writer.truncate_after(0) == 0
        writer.flush()
    assert not workdir.exists()


def test_bad_scalars_are_rejected(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        with pytest.raises(TypeError):
            writer.write_scalars(1, {"vector": np.ones(3)})
        with pytest.raises(TypeError):
            writer.write_scalars(1, {"name": "dag-db"})
        with pytest.raises(ValueError, match="step"):
            writer.write_scalars(1, {"step": 1})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_read_metrics_skips_a_truncated_last_line(tmp_path, caplog):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_scalars(2, {"loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 0.2')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # the file itself works too
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # a resumed run appends after the partial line, which then stays a line of its own
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        writer.write_scalars(3, {"loss": 0.25})
    with caplog.at_level(logging.WARNING, logger="dag_jax.infra.metrics"):
        records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert any("line 3" in r.getMessage() for r in caplog.records)
    assert read_metrics(tmp_path / "missing") == []


def test_truncate_after_drops_the_steps_a_resumed_run_redoes(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        for step in range(1, 6):
            writer.write_scalars(step, {"loss": float(step)})
        assert writer.truncate_after(3) == 2
        writer.write_scalars(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]


# ------------------------------------------------------------------------ images


def test_image_grid_shape_padding_and_placement():
    images = np.stack([np.full((4, 6, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = image_grid(images, pad=2, pad_value=255)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 4 + 3 * 2, 3 * 6 + 4 * 2, 3)  # 2 rows × 3 cols
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # frame
    assert (grid[2:6, 2:8] == 10).all() and (grid[2:6, 10:16] == 20).all()
    assert (grid[8:12, 2:8] == 40).all() and (grid[8:12, 10:16] == 50).all()
    assert (grid[8:12, 18:24] == 255).all()  # the sixth cell is empty
    assert image_grid(images, rows=1, pad=0).shape == (4, 30, 3)
    assert image_grid(images, rows=5, pad=1).shape == (5 * 4 + 6, 6 + 2, 3)
    assert image_grid(images[:1], pad=3).shape == (10, 12, 3)


def test_image_grid_converts_floats_and_gray_images():
    floats = np.array([0.0, 0.5, 1.0, 2.0, -1.0, np.nan], np.float32).reshape(1, 1, 6, 1)
    grid = image_grid(floats, pad=0)
    assert grid.shape == (1, 6, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[0, :, 0], [0, 128, 255, 255, 0, 0])
    with pytest.raises(ValueError):
        image_grid(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError):
        image_grid(np.zeros((0, 4, 4, 3)))


def test_write_images_saves_a_png_grid(tmp_path):
    images = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    with MetricsWriter(epath.Path(tmp_path), process_index=0) as writer:
        path = writer.write_images(12, "eval/samples", images)
        grid_path = writer.write_images(13, "grid", image_grid(images, pad=0))
    assert path == tmp_path / "samples" / "eval_samples_000012.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image_grid(images))
    assert np.asarray(Image.open(grid_path)).shape == (16, 16, 3)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "eval_samples_000012.png",
        "grid_000013.png",
    ]
    board = _tensorboard(tmp_path)
    assert sorted(board.Tags()["images"]) == ["eval/samples", "grid"]
    (logged,) = board.Images("eval/samples")
    assert (logged.step, logged.height, logged.width) == (12, 22, 22)
    decoded = Image.open(io.BytesIO(logged.encoded_image_string))
    np.testing.assert_array_equal(np.asarray(decoded), image_grid(images))
    (logged,) = board.Images("grid")
    assert (logged.step, logged.height, logged.width) == (13, 16, 16)


# ------------------------------------------------------------------------ TensorBoard


def test_tensorboard_scalars_read_back_with_tensorboard(tmp_path):
    with MetricsWriter(str(tmp_path), process_index=0) as writer:
        for step in (1, 2, 3):
            writer.write_scalars(step, {"reward_mean": 0.1 * step, "loss": 2.0**-step})
    (event_file,) = _event_files(tmp_path)
    assert event_file.name.startswith("events.out.tfevents.")
    board = _tensorboard(tmp_path)
    assert sorted(board.Tags()["scalars"]) == ["loss", "reward_mean"]
    rewards = board.Scalars("reward_mean")
    assert [e.step for e in rewards] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in rewards], [0.1, 0.2, 0.3], rtol=1e-6)
    assert [(e.step, e.value) for e in board.Scalars("loss")] == [(1, 0.5), (2, 0.25), (3, 0.125)]


def test_a_resumed_run_adds_an_event_file_and_keeps_the_first(tmp_path):
    with MetricsWriter(tmp_path, process_index=0) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_scalars(2, {"loss": 0.5})
    with MetricsWriter(tmp_path, process_index=0) as writer:  # most likely within the second
        writer.write_scalars(3, {"loss": 0.25})
    assert len(_event_files(tmp_path)) == 2
    loss = _tensorboard(tmp_path).Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_tensorboard_off_writes_no_event_file(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, "grid", np.zeros((2, 4, 4, 3), np.uint8))
    assert _event_files(tmp_path) == []
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0]
    assert (tmp_path / "samples" / "grid_000001.png").exists()


# ------------------------------------------------------------------------ progress line


def test_format_progress_matches_the_documented_line():
    line = format_progress(3, 100, 0.4123, 0.0511, 0.0123, 12.44, elapsed=115.1)
    assert line == "epoch 3/100 | reward 0.412 ± 0.051 | loss 1.2e-02 | 12.4 traj/s | ETA 1h02m"


def test_format_progress_eta_edge_cases():
    resumed = format_progress(52, 100, 0.5, 0.1, 1.0, 3.0, elapsed=20.0, start_epoch=50)
    assert resumed.endswith("ETA 8m00s")  # 10 s/epoch over the 2 epochs since the resume
    assert format_progress(100, 100, 0.5, 0.1, 1.0, 3.0, elapsed=5.0).endswith("ETA 0s")
    assert format_progress(0, 100, 0.5, 0.1, 1.0, 3.0, elapsed=5.0).endswith("ETA ?")
    missing = format_progress(1, 10, None, None, None, None, elapsed=1.0)
    assert missing == "epoch 1/10 | reward n/a | loss n/a | n/a traj/s | ETA 9s"


def test_format_duration():
    cases = {0: "0s", 45.4: "45s", 60: "1m00s", 725: "12m05s", 3720: "1h02m"}
    cases.update({86400 + 3 * 3600 + 59: "1d03h", -1: "?", math.inf: "?", None: "?"})
    for seconds, text in cases.items():
        assert format_duration(seconds) == text, seconds


def test_progress_line_measures_rates_and_leaves_out_the_first_epoch():
    now = [0.0]
    progress = ProgressLine(num_epochs=10, clock=lambda: now[0])
    now[0] = 100.0  # first epoch: includes compilation
    first = progress.update(1, 0.5, 0.1, 0.02, trajectories=50)
    assert "0.5 traj/s" in first and first.endswith("ETA 15m00s")  # 100 s/epoch × 9
    now[0] = 110.0
    second = progress.update(2, jnp.float32(0.6), 0.1, 0.01, trajectories=50)
    assert "5.0 traj/s" in second and second.endswith("ETA 1m20s")  # 10 s/epoch × 8
    assert second.startswith("epoch 2/10 | reward 0.600 ± 0.100 | loss 1.0e-02")
    now[0] = 130.0
    assert progress.update(3, trajectories=50).endswith("ETA 1m45s")  # 15 s/epoch × 7


def test_progress_line_after_a_resume():
    now = [1000.0]
    progress = ProgressLine(num_epochs=100, start_epoch=40, clock=lambda: now[0])
    now[0] = 1030.0
    assert progress.update(41, trajectories=30).endswith("ETA 29m30s")  # 30 s × 59
