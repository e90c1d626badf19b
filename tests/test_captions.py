"""Captioned grids: strips between the rows, the images untouched, text that fits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from dag_jax.infra import captions
from dag_jax.infra.captions import captioned_grid, compare_captions, fit_lines
from dag_jax.infra.metrics import image_grid

PROMPT = "two red circles on a blue background"


def noise(n: int, h: int = 16, w: int = 20, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, (n, h, w, c), dtype=np.uint8)


def strip_rows(out_height: int, plain_height: int, rows: int) -> int:
    extra = out_height - plain_height
    assert extra > 0 and extra % rows == 0, (out_height, plain_height, rows)
    return extra // rows


def test_row_captions_are_strips_above_the_rows_and_leave_the_cells_alone():
    images, pad = noise(6), 2
    plain = image_grid(images, rows=2, pad=pad)
    out = captioned_grid(images, rows=2, row_captions=[PROMPT, "a green star"], pad=pad)
    assert out.shape[1] == plain.shape[1]
    s, h = strip_rows(out.shape[0], plain.shape[0], 2), images.shape[1]
    strips = [np.arange(pad + r * (h + pad + s), pad + r * (h + pad + s) + s) for r in range(2)]
    np.testing.assert_array_equal(np.delete(out, np.concatenate(strips), axis=0), plain)
    first, second = (out[rows] for rows in strips)
    assert first.max() > 128 and second.max() > 128  # text was drawn
    assert not np.array_equal(first, second)  # and it is each row's own


def test_cell_captions_go_below_each_row_one_per_image_rgba_too():
    images, pad = noise(5, c=4, h=64, w=64), 3
    plain = image_grid(images, rows=2, pad=pad)
    labels = ["a blue circle", "a red square", "two stars", "one", "last"]
    out = captioned_grid(images, rows=2, cell_captions=labels, pad=pad)
    s, h = strip_rows(out.shape[0], plain.shape[0], 2), 64
    strips = np.concatenate(
        [np.arange(pad + h + r * (h + pad + s), pad + h + r * (h + pad + s) + s) for r in range(2)]
    )
    np.testing.assert_array_equal(np.delete(out, strips, axis=0), plain)
    assert out.shape[-1] == 4 and (out[strips][..., 3] == 255).all()
    below_last = out[pad + 2 * h + pad + s : pad + 2 * h + pad + 2 * s]  # second row's strip
    empty_cell = below_last[:, pad + 2 * (64 + pad) : pad + 3 * (64 + pad)]
    assert empty_cell[..., :3].max() == 0 and below_last[..., :3].max() > 128  # no image: no text


def test_no_captions_is_image_grid_and_counts_must_match():
    images = noise(4)
    np.testing.assert_array_equal(captioned_grid(images), image_grid(images))
    with pytest.raises(ValueError, match="3 row captions for a grid of 2 rows"):
        captioned_grid(images, rows=2, row_captions=["a", "b", "c"])
    with pytest.raises(ValueError, match="1 cell captions for 4 images"):
        captioned_grid(images, cell_captions=["a"])


def test_long_captions_wrap_and_end_in_an_ellipsis_within_the_width():
    font = captions.caption_font(64)
    lines = fit_lines(" ".join([PROMPT] * 6), font, 120, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith(("…", "..."))
    assert all(font.getlength(line) <= 120 for line in lines)
    assert fit_lines(PROMPT, font, 1000) == [PROMPT]
    assert fit_lines("", font, 100) == []
    split = fit_lines("x" * 80, font, 50, max_lines=40)  # a word wider than a line is split
    assert "".join(split) == "x" * 80 and all(font.getlength(line) <= 50 for line in split)


def test_the_bitmap_font_draws_any_text_as_latin_1(monkeypatch):
    bitmap = ImageFont.load_default_imagefont()
    monkeypatch.setattr(captions, "caption_font", lambda height: bitmap)
    lines = fit_lines("ein Bär im Schnee — 雪の熊 " * 4, bitmap, 90, max_lines=2)
    assert lines[-1].endswith("...") and "?" in "".join(lines)
    out = captioned_grid(noise(2), rows=1, row_captions=["雪の熊 on snow"])
    assert out.shape[0] > image_grid(noise(2), rows=1).shape[0]


def test_compare_captions_label_each_prompt_base_then_trained():
    assert compare_captions(["a", "b", "c"], 2) == [
        "base: a",
        "trained: a",
        "base: b",
        "trained: b",
    ]
    assert compare_captions(["a"], 1, ("base", "now")) == ["base: a", "now: a"]


def test_the_cli_grids_carry_their_captions(tmp_path):
    from dag_jax.eval.evaluate import compare_grid, write_grid
    from dag_jax.sample import write_grid as sample_grid

    grid = noise(6, h=32, w=32).reshape(2, 3, 32, 32, 3)
    write_grid(tmp_path / "g.png", grid, ["a blue circle", "a red square"])
    written = np.asarray(Image.open(tmp_path / "g.png"))
    assert written.shape[0] > image_grid(grid.reshape(6, 32, 32, 3), rows=2).shape[0]
    pair = compare_grid(grid, grid[::-1])
    write_grid(tmp_path / "c.png", pair, compare_captions(["p", "q"], 2))
    assert np.asarray(Image.open(tmp_path / "c.png")).shape[0] > written.shape[0]
    images = [noise(2, h=8, w=8).astype(np.float32) / 255]
    sample_grid(tmp_path / "s.png", images, per_row=2, scale=2, prompts=[PROMPT])
    assert np.asarray(Image.open(tmp_path / "s.png")).shape[0] > 2 * 8 + 2 * 2
