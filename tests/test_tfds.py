"""TFDS prompt sources and the tiny world's TFDS dataset, on datasets built here, offline.

Every dataset is a ``GeneratorBasedBuilder`` written as array_record to a temporary data_dir
(no TensorFlow: ``tfds.data_source`` reads it), once per module.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip(
    "tensorflow_datasets", reason="TFDS prompt sources need pip install 'dag_jax[tfds]'"
)

from dag_jax import train  # noqa: E402
from dag_jax.data import PromptError, prompts  # noqa: E402
from dag_jax.data import tfds as tfds_source  # noqa: E402
from dag_jax.tinyworld import pretrain, shapes, tfds_dataset  # noqa: E402
from dag_jax.train import run as run_lib  # noqa: E402
from tests.test_train import read_metrics, tiny_config  # noqa: E402

N_TRAIN, N_TEST = 6, 2
SCENES = {"train": 12, "test": 4}


def record(i: int, split: str) -> dict:
    """Return record ``i`` of a split of ``PromptsForTests``."""
    return {
        "meta": {"prompt": f"a {split} prompt number {i}", "id": i},
        "captions": [f"caption {i}a", f"caption {i}b"],
        "image": np.full((4, 4, 3), i, np.uint8),
        # record 1 of train is not UTF-8, record 3 of train is blank
        "raw": b"\xff\xfe" if (split, i) == ("train", 1) else f"raw {i}".encode(),
        "blank": "  " if (split, i) == ("train", 3) else f"blank {i}",
    }


class PromptsForTests(tfds.core.GeneratorBasedBuilder):
    """Prompts nested in a dict, a sequence of texts, an image and two broken text features."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "meta": {"prompt": tfds.features.Text(), "id": np.int32},
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "image": tfds.features.Image(shape=(4, 4, 3)),
                    "raw": tfds.features.Text(),
                    "blank": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
        from PIL import Image

        for i in range(N_TRAIN if split == "train" else N_TEST):
            example = record(i, split)
            yield i, {**example, "image": Image.fromarray(example["image"])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Return a data_dir holding prompts_for_tests, tiny_shapes/captions and a small scenes set."""
    root = str(tmp_path_factory.mktemp("tfds"))
    tfds_source.prepare("prompts_for_tests", root)
    tfds_dataset.prepare(root, ["captions"])
    config = tfds_dataset.TinyShapesConfig(
        name="scenes_small", scenes=True, num_train=SCENES["train"], num_test=SCENES["test"]
    )
    builder = tfds_dataset.TinyShapes(config=config, data_dir=root, file_format="array_record")
    builder.download_and_prepare()
    return root


def stored_order(data_dir: str, split: str) -> list[str]:
    """Return the prompts of a split in the order TFDS stored them (read directly)."""
    source = tfds.data_source("prompts_for_tests", split=split, data_dir=data_dir, download=False)
    return [source[i]["meta"]["prompt"].decode() for i in range(len(source))]


# --------------------------------------------------------------------------- prompt sources


def test_a_tfds_source_feeds_a_tiny_training_run(tmp_path, data_dir, monkeypatch):
    seen = []

    def spy(config):
        seen.append(load_prompts(config))
        return seen[-1]

    load_prompts = run_lib.load_prompts
    monkeypatch.setattr(run_lib, "load_prompts", spy)
    # the smallest run (as test_gcs_workdir's): DDPO, 2 steps, 4 trajectories, one epoch
    cfg = tiny_config(
        algo="ddpo",
        train__epochs=1,
        sample__steps=2,
        sample__trajectories=4,
        sample__chunk=4,
        train__micro_batch=4,
    )
    cfg.prompts.name = "tfds:prompts_for_tests"
    cfg.prompts.field = "meta/prompt"
    cfg.prompts.data_dir = data_dir
    state = train.train_and_evaluate(cfg, str(tmp_path))
    assert state.epoch == 1
    assert seen == [stored_order(data_dir, "train")]
    assert np.isfinite(read_metrics(tmp_path)[-1]["loss"])


def test_prompts_keep_the_stored_order_and_train_test_splits(data_dir):
    ps = prompts.load("tfds:prompts_for_tests", field="meta/prompt", data_dir=data_dir)
    assert list(ps.train) == stored_order(data_dir, "train")
    assert sorted(ps.train) == sorted(record(i, "train")["meta"]["prompt"] for i in range(N_TRAIN))
    assert list(ps.test) == stored_order(data_dir, "test") and len(ps.test) == N_TEST
    assert ps.files and ps.files[0].startswith(data_dir)
    # "." separates nested keys too; a split expression reads that split only
    part = prompts.load("tfds:prompts_for_tests:train[:2]", field="meta.prompt", data_dir=data_dir)
    assert part.train == ps.train[:2] and part.test == ()


def test_a_sequence_of_texts_gives_every_text_of_every_record(data_dir):
    ps = prompts.load("tfds:prompts_for_tests:test", field="captions", data_dir=data_dir)
    ids = [int(p.split()[-1]) for p in stored_order(data_dir, "test")]
    assert list(ps.train) == [f"caption {i}{c}" for i in ids for c in "ab"]


def test_the_config_block_reads_field_and_data_dir(data_dir):
    cfg = tiny_config()
    cfg.prompts.name, cfg.prompts.field = "tfds:prompts_for_tests:test", "meta/prompt"
    cfg.prompts.data_dir = data_dir
    assert run_lib.load_prompts(cfg) == stored_order(data_dir, "test")
    # evaluation's splits: a source without a split names trains on train, holds out test
    from dag_jax.eval.evaluate import prompt_splits

    cfg.prompts.name = "tfds:prompts_for_tests"
    splits, skipped = prompt_splits(cfg)
    assert splits == {
        "train": stored_order(data_dir, "train"),
        "test": stored_order(data_dir, "test"),
    }
    assert not skipped


@pytest.mark.parametrize(
    "name, field, message",
    [
        ("tfds:prompts_for_tests", "meta/nope", "has no feature 'meta/nope'"),
        ("tfds:prompts_for_tests", "meta/id", "'meta/id' is Tensor"),
        ("tfds:prompts_for_tests", "raw", "split 'train', record"),
        ("tfds:prompts_for_tests", "blank", "empty text where a prompt should be"),
        ("tfds:prompts_for_tests:validation", "meta/prompt", "its splits: train, test"),
        ("tfds:prompts_for_tests:train[:0]", "meta/prompt", "holds no records"),
        ("tfds:no_such_dataset", "text", "prepared there: prompts_for_tests, tiny_shapes"),
        (
            "tfds:tiny_shapes/nope",
            "caption",
            "there: tiny_shapes/captions, tiny_shapes/scenes_small",
        ),
        ("tfds:mnist", "label", "not prepared in"),
        ("tfds:prompts_for_tests", "", "prompts.field must name"),
    ],
)
def test_bad_sources_fail_with_the_fix(data_dir, name, field, message):
    with pytest.raises(PromptError) as err:
        prompts.load(name, field=field, data_dir=data_dir)
    assert message in str(err.value)


def test_the_missing_field_error_lists_the_fields(data_dir):
    with pytest.raises(PromptError) as err:
        prompts.load("tfds:prompts_for_tests", field="prompt", data_dir=data_dir)
    for path in ("meta/prompt (Text)", "meta/id (Tensor)", "captions (Sequence)", "image (Image)"):
        assert path in str(err.value)


def test_a_non_utf8_record_is_named(data_dir):
    with pytest.raises(PromptError, match=r"record (\d+), feature 'raw': not UTF-8") as err:
        prompts.load("tfds:prompts_for_tests", field="raw", data_dir=data_dir)
    index = int(str(err.value).split("record ")[1].split(",")[0])
    source = tfds.data_source("prompts_for_tests", split="train", data_dir=data_dir)
    assert source[index]["meta"]["id"] == 1


def test_without_tensorflow_datasets_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(tfds_source.TfdsUnavailable, match=r"pip install 'dag_jax\[tfds\]'"):
        prompts.load("tfds:anything", field="text")


def test_a_tfrecord_dataset_without_tensorflow_names_the_tf_extra(data_dir, tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: tfrecord datasets are read with tf.data")
    # the dataset's metadata says tfrecord (as where TensorFlow prepared it): nothing is read
    copy = tmp_path / "prompts_for_tests"
    shutil.copytree(Path(data_dir) / "prompts_for_tests", copy)
    info = copy / "1.0.0" / "dataset_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "fileFormat": "tfrecord"}))
    with pytest.raises(tfds_source.TfdsUnavailable, match=r"dag_jax\[tfds-tf\]'.*array_record"):
        prompts.load("tfds:prompts_for_tests", field="meta/prompt", data_dir=str(tmp_path))


def test_preparing_a_hugging_face_dataset_without_datasets_names_the_package(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "datasets" else find_spec(name, *a),
    )
    with pytest.raises(tfds_source.TfdsUnavailable, match="pip install datasets"):
        tfds_source.prepare("huggingface:owner/prompts", "/nonexistent")


# --------------------------------------------------------------------------- the tiny world


def test_tiny_shapes_captions_are_the_tiny_shapes_prompt_set(data_dir):
    ps = prompts.load("tfds:tiny_shapes/captions", field="caption", data_dir=data_dir)
    assert ps.train == shapes.captions("train") and ps.test == shapes.captions("test")


def test_scenes_are_the_procedural_examples_read_in_a_fresh_order_per_pass(data_dir):
    scenes = tfds_dataset.Scenes("tiny_shapes/scenes_small", data_dir)
    n = SCENES["train"]
    images, captions, labels = scenes.batch(seed=7, start=0, n=2 * n, split="train")
    first, second = scenes.indices(7, 0, n, "train"), scenes.indices(7, n, n, "train")
    assert sorted(first) == sorted(second) == list(range(n)) and list(first) != list(second)
    assert list(first) != list(scenes.indices(8, 0, n, "train"))  # another stream, another order
    for k, index in enumerate(np.concatenate([first, second])):
        image, scene = shapes.example(tfds_dataset.SEED, int(index), "train")
        np.testing.assert_array_equal(images[k], image)
        assert captions[k] == scene.caption
        assert shapes.all_captions()[labels["caption"][k]] == scene.caption
        assert shapes.KINDS[labels["kind"][k]] == scene.kind and labels["count"][k] == scene.count
    # the same positions give the same examples, however the stream is cut
    one_by_one = [scenes.batch(7, 3 + k, 1, "test")[0] for k in range(5)]
    np.testing.assert_array_equal(scenes.batch(7, 3, 5, "test")[0], np.concatenate(one_by_one))


def test_pretraining_draws_from_the_tfds_scenes_when_the_recipe_names_them(data_dir):
    recipe = pretrain.Recipe(data="tiny_shapes/scenes_small", data_dir=data_dir)
    batch = pretrain.examples(recipe.scaled(0.01))
    assert pretrain.examples(pretrain.Recipe()) is shapes.batch
    images, labels = pretrain.judge_batch(3, 0, 8, batch)
    scenes = tfds_dataset.Scenes("tiny_shapes/scenes_small", data_dir)
    n_train, n_test = len(shapes.triples("train")), len(shapes.triples("test"))
    n_test = max(1, round(8 * n_test / (n_train + n_test)))  # the test split's share of triples
    expected = np.concatenate(
        [scenes.batch(3, 0, 8 - n_test, "train")[0], scenes.batch(3, 0, n_test, "test")[0]]
    )
    np.testing.assert_array_equal(images, expected)
    assert set(labels[: 8 - n_test]) <= set(range(len(shapes.captions("train"))))


def test_pretraining_checks_its_dataset_before_any_stage(tmp_path, data_dir, monkeypatch):
    from dag_jax.tinyworld import build

    monkeypatch.setattr(build, "_tokenizer_stage", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(PromptError, match="not a tiny-world scenes dataset"):
        build.build_world(tmp_path, pretrain.Recipe(data="tiny_shapes/captions", data_dir=data_dir))
