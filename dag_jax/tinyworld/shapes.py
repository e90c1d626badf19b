"""A procedural captioned image dataset: coloured shapes on a plain background.

    images, captions, labels = shapes.batch(seed=0, start=0, n=64, split="train")
    # images (64, 64, 64, 3) uint8; captions like "two red circles on a blue background"

A scene is one kind of shape (circle, square, triangle), drawn ``count`` times (1–3) in one
colour, at random non-overlapping positions and sizes, on a background of another colour.
Example ``i`` of a seed is a pure function of (seed, split, i): batches are reproducible and
independent of how the stream is cut. This is a plain NumPy generator; ``tfds_dataset`` offers
a finite sample of it (and every caption) as a TensorFlow Datasets dataset, for pipelines that
read their data through TFDS.

Split: the (colour, kind, background) triples are split once, by a fixed hash, into train and
held-out triples (``HELD_OUT_FRACTION``). Test scenes and test captions use held-out triples
only, at every count, so a model evaluated on them has never seen those combinations together,
only each attribute on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from functools import cache

import numpy as np

SIZE = 64
KINDS = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
PALETTE = {  # RGB of every colour word
    "red": (215, 45, 45),
    "green": (45, 170, 70),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 45),
    "purple": (140, 65, 185),
    "white": (240, 240, 240),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
}
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUNDS = ("black", "gray", "white", "red", "green", "blue", "yellow", "purple")
HELD_OUT_FRACTION = 0.15
COLOUR_JITTER = 12  # uniform ± this many uint8 levels per channel, per scene
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Scene:
    """What an image shows; ``shapes`` holds (cx, cy, radius) per shape, in pixels."""

    kind: str
    colour: str
    background: str
    count: int
    shapes: tuple[tuple[float, float, float], ...]

    @property
    def caption(self) -> str:
        """Return e.g. "two red circles on a blue background"."""
        return caption(self.kind, self.colour, self.background, self.count)


def caption(kind: str, colour: str, background: str, count: int) -> str:
    """Return the caption of a scene's attributes."""
    noun = kind if count == 1 else kind + "s"
    return f"{COUNTS[count - 1]} {colour} {noun} on a {background} background"


def _triple_hash(triple: tuple[str, str, str]) -> float:
    """Return a fixed number in [0, 1) for a (colour, kind, background) triple."""
    digest = hashlib.sha256("/".join(triple).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@cache
def triples(split: str) -> tuple[tuple[str, str, str], ...]:
    """Return the (colour, kind, background) triples of ``split`` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    out = []
    for colour, kind, background in itertools.product(SHAPE_COLOURS, KINDS, BACKGROUNDS):
        if colour == background:
            continue
        held_out = _triple_hash((colour, kind, background)) < HELD_OUT_FRACTION
        if held_out == (split == "test"):
            out.append((colour, kind, background))
    return tuple(out)


@cache
def captions(split: str) -> tuple[str, ...]:
    """Return every caption of ``split``, count-major within each triple."""
    return tuple(
        caption(kind, colour, background, count)
        for colour, kind, background in triples(split)
        for count in (1, 2, 3)
    )


def all_captions() -> tuple[str, ...]:
    """Return the captions of both splits (train first)."""
    return captions("train") + captions("test")


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw a scene of ``split``: attributes uniformly, then non-overlapping shape positions."""
    options = triples(split)
    colour, kind, background = options[rng.integers(len(options))]
    count = int(rng.integers(1, 4))
    shapes: list[tuple[float, float, float]] = []
    max_radius = {1: 16.0, 2: 12.0, 3: 10.0}[count]
    while len(shapes) < count:
        shapes = []
        for _ in range(200):  # rejection sampling; restarts in the rare dead end
            r = float(rng.uniform(6.0, max_radius))
            cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
            if all(np.hypot(cx - x, cy - y) > r + s + 3 for x, y, s in shapes):
                shapes.append((float(cx), float(cy), r))
                if len(shapes) == count:
                    break
    return Scene(kind, colour, background, count, tuple(shapes))


def _distance(kind: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float):
    """Return a signed distance (pixels, < 0 inside) to one shape, exact inside and near edges."""
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return np.hypot(dx, dy) - r
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    if kind == "triangle":  # equilateral, apex up (image y points down), circumradius r
        c, s = np.sqrt(3) / 2, 0.5
        edges = (dy, c * dx - s * dy, -c * dx - s * dy)  # outward normals: down, right, left
        return np.maximum.reduce(edges) - r / 2
    raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = SIZE) -> np.ndarray:
    """Return the (size, size, 3) uint8 image of ``scene``, edges antialiased over one pixel.

    ``rng`` jitters both colours by up to ``COLOUR_JITTER`` levels (None: exact palette).
    """
    scale = size / SIZE
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    coverage = np.zeros((size, size), np.float32)
    for cx, cy, r in scene.shapes:
        d = _distance(scene.kind, x, y, cx * scale, cy * scale, r * scale)
        coverage = np.maximum(coverage, np.clip(0.5 - d, 0.0, 1.0))
    fg = np.asarray(PALETTE[scene.colour], np.float32)
    bg = np.asarray(PALETTE[scene.background], np.float32)
    if rng is not None:
        fg = fg + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
        bg = bg + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
    image = coverage[..., None] * fg + (1.0 - coverage[..., None]) * bg
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def example(seed: int, index: int, split: str = "train") -> tuple[np.ndarray, Scene]:
    """Return (image, scene) of example ``index`` of the stream (seed, split)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng, split)
    return render(scene, rng), scene


def batch(
    seed: int, start: int, n: int, split: str = "train"
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Return examples start..start+n: (n, 64, 64, 3) uint8 images, captions, integer labels.

    ``labels`` has "kind", "colour", "background" (indices into KINDS, SHAPE_COLOURS,
    BACKGROUNDS), "count" (1–3) and "caption" (index into ``all_captions()``).
    """
    images, scenes = [], []
    for i in range(start, start + n):
        image, scene = example(seed, i, split)
        images.append(image)
        scenes.append(scene)
    index = {c: i for i, c in enumerate(all_captions())}
    labels = {
        "kind": np.array([KINDS.index(s.kind) for s in scenes], np.int32),
        "colour": np.array([SHAPE_COLOURS.index(s.colour) for s in scenes], np.int32),
        "background": np.array([BACKGROUNDS.index(s.background) for s in scenes], np.int32),
        "count": np.array([s.count for s in scenes], np.int32),
        "caption": np.array([index[s.caption] for s in scenes], np.int32),
    }
    return np.stack(images), [s.caption for s in scenes], labels


def parse(text: str) -> dict[str, str | int] | None:
    """Return the attributes of a caption of this dataset, or None if it is not one."""
    words = text.strip().lower().split()
    if len(words) != 7 or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    count_word, colour, noun, _, _, background, _ = words
    if count_word not in COUNTS or colour not in SHAPE_COLOURS or background not in BACKGROUNDS:
        return None
    count = COUNTS.index(count_word) + 1
    kind = noun if count == 1 else noun[:-1]
    if kind not in KINDS or (count > 1) != noun.endswith("s"):
        return None
    return {"kind": kind, "colour": colour, "background": background, "count": count}


def read(images: np.ndarray, min_area: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Return (kind index, count) of uint8 NHWC images, read by geometry rather than a model.

    The foreground is every pixel further from the background colour (the border's median)
    than half the image's largest such distance; each connected part of ``min_area`` pixels or
    more is a shape. The kind is read from the median fill of the parts' bounding boxes: a
    square fills 1, a circle π/4, an apex-up triangle 1/2 (cut at 0.9 and 0.65). Exact on
    ``render``'s images; on a model's images, a check on what the judge reports that the
    judge's own features cannot sway.
    """
    from scipy import ndimage

    kinds, counts = [], []
    for image in np.asarray(images, np.float32):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        distance = np.abs(image - np.median(border, axis=0)).sum(axis=-1)
        parts, n = ndimage.label(distance > 0.5 * max(float(distance.max()), 1.0))
        fills = []
        for i, box in enumerate(ndimage.find_objects(parts), start=1):
            area = int(np.sum(parts[box] == i))
            if area >= min_area:
                fills.append(area / parts[box].size)
        counts.append(len(fills))
        fill = float(np.median(fills)) if fills else 0.0
        kind = "square" if fill >= 0.9 else "circle" if fill >= 0.65 else "triangle"
        kinds.append(KINDS.index(kind))
    return np.array(kinds, np.int32), np.array(counts, np.int32)
