"""The tiny world as a TensorFlow Datasets dataset: its captions, and scenes with their images.

    python -m dag_jax.tinyworld.tfds_dataset --data_dir=DIR            # both configs
    python -m dag_jax.tinyworld.tfds_dataset --data_dir=DIR --config=captions

writes ``DIR/tiny_shapes/{captions,scenes}/1.0.0`` as ``array_record`` (no TensorFlow needed):

- ``tiny_shapes/captions``: every caption of ``shapes.captions(split)`` once, in that order,
  with its attributes; ``prompts.name = "tfds:tiny_shapes/captions"`` with ``prompts.field =
  "caption"`` gives exactly the ``tiny_shapes`` prompt set (train and held-out test).
- ``tiny_shapes/scenes``: ``SCENES`` examples of ``shapes.example(SEED, i, split)`` per split
  (image, caption, attributes, index); ``python -m dag_jax.tinyworld --data=tiny_shapes/scenes
  --data_dir=DIR`` pretrains from it (``Scenes``) instead of the procedural stream. A finite
  dataset read in a fresh order each pass, as a TPU input pipeline reads any dataset; the
  procedural stream (the default, and what the shipped world was trained on) never repeats.

Other sizes: ``TinyShapes(config=TinyShapesConfig(name=..., scenes=True, num_train=...))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dag_jax.data import tfds as tfds_source
from dag_jax.data.errors import PromptError
from dag_jax.tinyworld import shapes

NAME = "tiny_shapes"
SEED = 0  # the scenes' stream seed (shapes.example(SEED, i, split))
SCENES = {"train": 65536, "test": 8192}
VERSION = "1.0.0"
_ORDERS = 8  # pass orders a Scenes keeps (stages interleave at most two streams)


@dataclasses.dataclass(eq=False)
class TinyShapesConfig(tfds.core.BuilderConfig):
    """``scenes``: images (``num_train`` / ``num_test`` of stream ``seed``); else captions."""

    scenes: bool = False
    seed: int = SEED
    num_train: int = 0
    num_test: int = 0


def _attributes() -> dict:
    return {
        "kind": tfds.features.ClassLabel(names=shapes.KINDS),
        "colour": tfds.features.ClassLabel(names=shapes.SHAPE_COLOURS),
        "background": tfds.features.ClassLabel(names=shapes.BACKGROUNDS),
        "count": np.int32,
    }


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """The tiny world's captions (``captions``) and captioned images (``scenes``)."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [
        TinyShapesConfig(name="captions", description="every caption once, with attributes"),
        TinyShapesConfig(
            name="scenes",
            description=f"{SCENES['train']} train / {SCENES['test']} test scenes of seed {SEED}",
            scenes=True,
            num_train=SCENES["train"],
            num_test=SCENES["test"],
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"caption": tfds.features.Text(), **_attributes()}
        if self.builder_config.scenes:
            size = (shapes.SIZE, shapes.SIZE, 3)
            features = {"image": tfds.features.Image(shape=size), "index": np.int64, **features}
        return tfds.core.DatasetInfo(
            builder=self,
            description="Coloured shapes on a plain background (dag_jax.tinyworld.shapes).",
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "caption") if self.builder_config.scenes else None,
            disable_shuffling=True,  # records in generation order: captions as shapes lists them
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # procedural: nothing to download
        return {split: self._generate_examples(split) for split in shapes.SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        if not config.scenes:
            for i, caption in enumerate(shapes.captions(split)):
                yield i, {"caption": caption, **shapes.parse(caption)}
            return
        for i in range(config.num_train if split == "train" else config.num_test):
            image, scene = shapes.example(config.seed, i, split)
            yield (
                i,
                {
                    "image": Image.fromarray(image),  # PIL: encoded without TensorFlow
                    "index": i,
                    "caption": scene.caption,
                    "kind": scene.kind,
                    "colour": scene.colour,
                    "background": scene.background,
                    "count": scene.count,
                },
            )


def prepare(data_dir: str, configs: Sequence[str] = ("captions", "scenes")) -> list[str]:
    """Write the given configs to ``data_dir`` as array_record; return their folders."""
    return [tfds_source.prepare(f"{NAME}/{c}", data_dir) for c in configs]


# --------------------------------------------------------------------------- reading scenes


class Scenes:
    """Batches of a prepared scenes dataset, drop-in for ``shapes.batch`` in pretraining.

    ``batch(seed, start, n, split)`` returns examples ``start .. start+n`` of stream ``seed``:
    position p is record ``order(seed, split, p // size)[p % size]``, a fresh permutation of
    the split per pass, so stages with different stream seeds read different orders.
    """

    def __init__(self, dataset: str, data_dir: str = ""):
        self.dataset = dataset
        self.builder = tfds_source.open_builder(dataset, data_dir)
        self.features = self.builder.info.features
        missing = {"image", "caption", "kind", "colour", "background", "count"} - set(
            self.features.keys()
        )
        if missing:
            raise PromptError(
                f"TFDS dataset {dataset!r} is not a tiny-world scenes dataset: it lacks "
                f"{', '.join(sorted(missing))} (prepare {NAME}/scenes)"
            )
        for key, names in (
            ("kind", shapes.KINDS),
            ("colour", shapes.SHAPE_COLOURS),
            ("background", shapes.BACKGROUNDS),
        ):
            if tuple(self.features[key].names) != names:
                raise PromptError(
                    f"TFDS dataset {dataset!r}: {key} labels {self.features[key].names} are not "
                    f"the tiny world's {list(names)}"
                )
        self.sizes = {s: tfds_source.split_size(self.builder, s, dataset) for s in shapes.SPLITS}
        self.caption_index = {c: i for i, c in enumerate(shapes.all_captions())}
        self._sources: dict = {}
        self._orders: dict = {}  # the last _ORDERS pass orders, oldest first

    def source(self, split: str):
        """Return the random-access data source of ``split`` (opened once)."""
        if split not in self._sources:
            if not self.sizes[split]:
                raise PromptError(f"TFDS dataset {self.dataset!r}: split {split!r} is empty")
            self._sources[split] = self.builder.as_data_source(
                split, file_format=tfds_source.FILE_FORMAT
            )
        return self._sources[split]

    def order(self, seed: int, split: str, epoch: int) -> np.ndarray:
        """Return the record order of pass ``epoch`` of stream (seed, split)."""
        key = (seed, split, epoch)
        if key not in self._orders:
            if len(self._orders) >= _ORDERS:
                self._orders.pop(next(iter(self._orders)))
            rng = np.random.default_rng([seed, shapes.SPLITS.index(split), epoch])
            self._orders[key] = rng.permutation(self.sizes[split])
        return self._orders[key]

    def indices(self, seed: int, start: int, n: int, split: str) -> np.ndarray:
        """Return the record indices of positions ``start .. start+n`` of stream (seed, split)."""
        size = self.sizes[split]
        positions = np.arange(start, start + n)
        out = np.empty(n, np.int64)
        for epoch in np.unique(positions // size):
            at = positions // size == epoch
            out[at] = self.order(seed, split, int(epoch))[positions[at] % size]
        return out

    def batch(
        self, seed: int, start: int, n: int, split: str = "train"
    ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """Return (images, captions, labels) as ``shapes.batch`` does."""
        rows = self.source(split).__getitems__(self.indices(seed, start, n, split).tolist())
        captions = [r["caption"].decode("utf-8") for r in rows]
        unknown = [c for c in captions if c not in self.caption_index]
        if unknown:
            raise PromptError(
                f"TFDS dataset {self.dataset!r}: caption {unknown[0]!r} is not one of the tiny "
                "world's"
            )
        labels = {
            key: np.array([r[key] for r in rows], np.int32)
            for key in ("kind", "colour", "background", "count")
        }
        labels["caption"] = np.array([self.caption_index[c] for c in captions], np.int32)
        return np.stack([r["image"] for r in rows]), captions, labels


def main(argv) -> None:
    """Prepare the configs named by ``--config`` in ``--data_dir``."""
    from absl import flags

    del argv
    for folder in prepare(flags.FLAGS.data_dir, flags.FLAGS.config):
        print(folder)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("data_dir", "", "where to write (default: TFDS's data_dir)")
    flags.DEFINE_list("config", ["captions", "scenes"], "configs to prepare")
    app.run(main)
