"""Captioned image grids: the prompt of each row (or of each cell) drawn beside the images.

Every grid the package writes (the training loop's samples, ``evaluate``'s grids and compare
grids, ``dag_jax.sample``'s grid.png, the tiny world's build grid) goes through
:func:`captioned_grid`. It is :func:`dag_jax.infra.metrics.image_grid` with text strips put
between the rows: a strip above a row holds that row's caption, a strip below it one caption
per cell. The strips are inserted, never drawn over the images: deleting them gives
``image_grid``'s array back, pixel for pixel.

The font is PIL's own (``ImageFont.load_default``), so no system font is needed: from Pillow
10.1 with FreeType it is the scalable font Pillow embeds, sized to the images (12 px for the
tiny world's 64-px cells, up to 40 px for 512-px cells); on Pillow 10.0 or without FreeType it
is PIL's fixed bitmap font, which draws Latin-1 only (other characters become ``?``). Long
captions wrap at word boundaries onto at most ``max_lines`` lines, the last one cut with an
ellipsis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dag_jax.infra.metrics import grid_shape, image_grid, to_uint8

__all__ = ["caption_font", "captioned_grid", "compare_captions", "fit_lines"]

MIN_FONT_PX = 12
MAX_FONT_PX = 40


def caption_font(cell_height: int) -> Any:
    """Return PIL's built-in font for images ``cell_height`` pixels high (see the module doc)."""
    size = max(MIN_FONT_PX, min(MAX_FONT_PX, int(cell_height) // 8))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow 10.0 (no size), or no FreeType
        return ImageFont.load_default()


def _is_bitmap(font: Any) -> bool:
    return not isinstance(font, ImageFont.FreeTypeFont)


def _drawable(text: str, font: Any) -> str:
    """Return ``text`` on one line, in characters ``font`` can draw."""
    text = " ".join(str(text).split())
    if _is_bitmap(font):
        text = text.encode("latin-1", errors="replace").decode("latin-1")
    return text


def _ellipsis(font: Any) -> str:
    return "..." if _is_bitmap(font) else "…"


def _cut(text: str, font: Any, width: int, ellipsis: str) -> str:
    """Return ``text`` shortened until it fits ``width`` pixels with ``ellipsis`` after it."""
    while text and font.getlength(text + ellipsis) > width:
        text = text[:-1]
    text = text.rstrip()
    return text + ellipsis if font.getlength(text + ellipsis) <= width else ""


def fit_lines(text: str, font: Any, width: int, max_lines: int = 2) -> list[str]:
    """Return ``text`` wrapped at word boundaries into lines of at most ``width`` pixels.

    A word wider than a line is split. Past ``max_lines`` lines the last kept line ends in an
    ellipsis. An empty text gives no lines.
    """
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    text = _drawable(text, font)
    lines: list[str] = []
    current = ""
    for word in text.split(" ") if text else []:
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width and len(word) > 1:  # split a word wider than a line
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        ellipsis = _ellipsis(font)
        lines = [*lines[: max_lines - 1], _cut(lines[max_lines - 1], font, width, ellipsis)]
    return lines


def _line_height(font: Any) -> int:
    return int(font.getbbox("Agjy|")[3]) + 1


def _strip(
    width: int,
    slots: Sequence[tuple[int, list[str]]],
    lines: int,
    font: Any,
    channels: int,
    background: int,
) -> np.ndarray:
    """Return a (height, width, channels) uint8 strip with each slot's lines drawn at its x."""
    line_h = _line_height(font)
    margin = max(1, line_h // 4)
    height = 2 * margin + lines * line_h
    image = Image.new("L", (width, height), color=background)
    draw = ImageDraw.Draw(image)
    ink = 255 if background < 128 else 0
    for x, text_lines in slots:
        for i, line in enumerate(text_lines):
            draw.text((x, margin + i * line_h), line, fill=ink, font=font)
    strip = np.repeat(np.asarray(image, np.uint8)[..., None], min(channels, 3), axis=-1)
    if channels == 4:  # opaque alpha
        strip = np.concatenate([strip, np.full_like(strip[..., :1], 255)], axis=-1)
    return strip


def captioned_grid(
    images: Any,
    rows: int | None = None,
    row_captions: Sequence[str] | None = None,
    cell_captions: Sequence[str] | None = None,
    pad: int = 2,
    pad_value: int = 0,
    max_lines: int = 2,
) -> np.ndarray:
    """Return ``image_grid(images, rows, pad, pad_value)`` with caption strips between its rows.

    ``row_captions`` (one per grid row) go in a strip above each row, wrapped to the grid's
    width; ``cell_captions`` (one per image) in a strip below each row, each wrapped to its
    cell's width. Every strip of a kind has the same height (the most lines any caption of that
    kind needs, at most ``max_lines``); the text is white on ``pad_value`` (black on a light
    ``pad_value``). With neither it is ``image_grid``'s array.

    Raises:
      ValueError: the number of captions does not match the rows (or the images).
    """
    grid = image_grid(images, rows=rows, pad=pad, pad_value=pad_value)
    if row_captions is None and cell_captions is None:
        return grid
    array = to_uint8(np.asarray(images))
    n, h, w, c = array.shape
    nrows, ncols = grid_shape(n, rows)
    if row_captions is not None and len(row_captions) != nrows:
        raise ValueError(f"{len(row_captions)} row captions for a grid of {nrows} rows")
    if cell_captions is not None and len(cell_captions) != n:
        raise ValueError(f"{len(cell_captions)} cell captions for {n} images")
    font = caption_font(h)
    width = grid.shape[1]
    inset = max(pad, 2)
    background = int(np.clip(pad_value, 0, 255))
    row_lines = [
        fit_lines(text, font, width - 2 * inset, max_lines) for text in (row_captions or ())
    ]
    cell_lines = [fit_lines(text, font, w, max_lines) for text in (cell_captions or ())]
    row_height = max((len(lines) for lines in row_lines), default=0) or 1
    cell_height = max((len(lines) for lines in cell_lines), default=0) or 1
    pieces = [grid[:pad]]
    for r in range(nrows):
        top = pad + r * (h + pad)
        if row_captions is not None:
            pieces.append(_strip(width, [(inset, row_lines[r])], row_height, font, c, background))
        pieces.append(grid[top : top + h])
        if cell_captions is not None:
            slots = [
                (pad + col * (w + pad), cell_lines[r * ncols + col])
                for col in range(ncols)
                if r * ncols + col < n
            ]
            pieces.append(_strip(width, slots, cell_height, font, c, background))
        pieces.append(grid[top + h : top + h + pad])
    return np.concatenate(pieces, axis=0)


def compare_captions(
    prompts: Sequence[str], rows: int, tags: Sequence[str] = ("base", "trained")
) -> list[str]:
    """Return the row captions of a compare grid of the first ``rows`` prompts, one row per
    tag and prompt, prompt-major: ``base: <prompt>``, ``trained: <prompt>``, …"""
    return [f"{tag}: {prompt}" for prompt in list(prompts)[:rows] for tag in tags]
