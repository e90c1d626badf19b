"""Prompt sets read through TensorFlow Datasets (TFDS), without TensorFlow.

    ps = prompts.load("tfds:parti_prompts:train", field="Prompt", data_dir="gs://bucket/tfds")

Names: ``tfds:<dataset>[/<config>][:<split>]`` (``NameParts``). The split is any TFDS split
expression (``train``, ``train[:90%]``); without one, ``train`` is the training split and
``test``, if the dataset has one, the held-out split. ``field`` names the text feature, nested
features by path (``meta/prompt``; ``.`` works too); a feature holding a sequence of texts
(COCO's ``captions/text``) gives every text of every record. Prompts keep the dataset's record
order, the same on every host (each host reads the whole list: prompt lists are small).

Datasets are read as prepared in ``data_dir`` (TFDS's default, ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``, when empty; ``gs://`` works with the ``gcs`` extra): loading never
downloads or generates data, so a training run cannot start a large download on every host.
``python -m dag_jax.data.tfds --dataset=NAME --data_dir=DIR`` prepares a dataset once, in the
``array_record`` format that ``tfds.data_source`` reads without TensorFlow.

Hugging Face datasets: ``tfds:huggingface:<owner>/<name>[/<config>][:<split>]`` reads the TFDS
copy of a Hub dataset that ``--dataset=huggingface:<owner>/<name>`` prepared (TFDS stores it as
``<owner>__<name>``, lower case, ``-`` → ``_``; that name works too). Preparing it needs the
``datasets`` package and the Hub; reading it needs neither.

Datasets prepared as ``tfrecord`` (TFDS's default where TensorFlow is installed, and most of
``gs://tfds-data``) have no random access: they are read with ``tf.data`` when TensorFlow is
installed (extra ``tfds-tf``), else the error says how to rebuild them as ``array_record``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dag_jax.data.errors import PromptError

PREFIX = "tfds:"
HUGGINGFACE = "huggingface:"
EXTRA = "tfds"
TF_EXTRA = "tfds-tf"
FILE_FORMAT = "array_record"  # random access without TensorFlow (tfds.data_source)
READ_CHUNK = 1024  # records decoded per call
_NOT_DATASETS = ("downloads", "manual")  # TFDS's own folders in a data_dir
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class TfdsUnavailable(PromptError, ImportError):
    """tensorflow_datasets (or, for a tfrecord dataset, TensorFlow) is not installed."""


@dataclasses.dataclass(frozen=True)
class NameParts:
    """A parsed ``tfds:`` name: ``dataset`` (TFDS's ``name[/config]``), ``split`` ("" = default).

    ``huggingface`` holds the Hub id (``owner/name``) of a ``tfds:huggingface:`` name.
    """

    dataset: str
    split: str = ""
    huggingface: str = ""


def is_tfds_name(name: str) -> bool:
    """Return whether ``name`` names a TFDS prompt source (``tfds:...``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_name(name: str) -> NameParts:
    """Return the parts of ``tfds:<dataset>[/<config>][:<split>]``, or raise PromptError."""
    if not is_tfds_name(name):
        raise PromptError(f"not a TFDS prompt source: {name!r} (expected 'tfds:<dataset>...')")
    rest, hub = name[len(PREFIX) :], ""
    if rest.startswith(HUGGINGFACE):
        rest = rest[len(HUGGINGFACE) :]
        path, sep, split = rest.partition(":")
        parts = path.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PromptError(
                f"prompt source {name!r}: expected 'tfds:huggingface:<owner>/<name>[/<config>]"
                "[:<split>]'"
            )
        hub = "/".join(parts[:2])
        dataset = hf_tfds_name(hub) + (f"/{hf_tfds_name(parts[2])}" if len(parts) == 3 else "")
    else:
        dataset, sep, split = rest.partition(":")
    parts = dataset.split("/")
    if len(parts) > 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise PromptError(
            f"prompt source {name!r}: expected 'tfds:<dataset>[/<config>][:<split>]' with "
            "dataset and config made of letters, digits, '_', '-' and '.'"
        )
    if sep and not split.strip():
        raise PromptError(f"prompt source {name!r}: empty split after ':'")
    return NameParts(dataset, split.strip(), hub)


def hf_tfds_name(name: str) -> str:
    """Return the name TFDS gives a Hugging Face dataset id or config (``a/B-c`` → ``a__b_c``)."""
    return re.sub(r"[^a-z0-9_]", "_", name.lower().replace("/", "__"))


def require():
    """Return the ``tensorflow_datasets`` module, or raise TfdsUnavailable naming the extra."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise TfdsUnavailable(
            f"'tfds:' prompt sources and datasets need tensorflow_datasets: "
            f"pip install 'dag_jax[{EXTRA}]' ({e})"
        ) from e
    return tensorflow_datasets


# ---------------------------------------------------------------------------------------------
# Opening a prepared dataset


def open_builder(dataset: str, data_dir: str = ""):
    """Return the TFDS builder of prepared ``dataset`` (``name[/config]``) in ``data_dir``.

    Read from the dataset's files (no builder code runs, nothing is downloaded). Raises
    PromptError naming the dataset, where it was looked for and how to prepare it.
    """
    tfds = require()
    where = data_dir or "TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    prepare = f"prepare it once with: python -m dag_jax.data.tfds --dataset={dataset}" + (
        f" --data_dir={data_dir}" if data_dir else ""
    )
    try:
        return tfds.core.read_only_builder.builder_from_files(dataset, data_dir=data_dir or None)
    except tfds.core.DatasetNotFoundError:
        pass
    name = dataset.split("/")[0]
    found = _prepared_names(data_dir)
    if name in found and "/" in dataset:
        configs = _prepared_names(data_dir, name)
        raise PromptError(
            f"TFDS dataset {dataset!r}: no config {dataset.split('/')[1]!r} prepared in {where}; "
            f"prepared there: {', '.join(f'{name}/{c}' for c in configs)}. To add it, {prepare}"
        )
    if name in tfds.list_builders(with_community_datasets=False):
        raise PromptError(f"TFDS dataset {dataset!r} is not prepared in {where}; {prepare}")
    listing = f"; prepared there: {', '.join(found)}" if found else "; nothing is prepared there"
    raise PromptError(
        f"TFDS dataset {dataset!r} not found in {where}{listing}. To add it, {prepare}"
    )


def _prepared_names(data_dir: str, *below: str) -> list[str]:
    """Return the dataset (config) folders of ``data_dir`` (or of a dataset folder in it)."""
    from etils import epath

    tfds = require()
    root = epath.Path(data_dir) if data_dir else epath.Path(tfds.core.constants.DATA_DIR)
    try:
        return sorted(
            p.name
            for p in root.joinpath(*below).iterdir()
            if p.is_dir() and p.name not in _NOT_DATASETS and p.name[:1] not in ".0123456789"
        )
    except OSError:
        return []


def split_size(builder, split: str, dataset: str) -> int:
    """Return the number of records of ``split`` (a TFDS split expression), or raise PromptError."""
    splits = list(builder.info.splits)
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as e:
        raise PromptError(
            f"TFDS dataset {dataset!r}: no split {split!r} ({e}); its splits: {', '.join(splits)}"
        ) from e


def fields(features, prefix: str = "") -> dict[str, Any]:
    """Return {path: leaf feature} of a FeaturesDict; paths join nested keys with ``/``."""
    tfds = require()
    if isinstance(features, tfds.features.Sequence) and isinstance(
        features.feature, tfds.features.FeaturesDict
    ):
        features = features.feature
    if not isinstance(features, tfds.features.FeaturesDict):
        return {prefix.rstrip("/"): features}
    out = {}
    for key in features.keys():
        out.update(fields(features[key], f"{prefix}{key}/"))
    return out


def is_text(feature) -> bool:
    """Return whether a leaf feature holds strings (Text, string Tensors, sequences of them)."""
    return np.dtype(feature.np_dtype) == np.dtype(object)


def text_field(builder, field: str, dataset: str) -> tuple[str, ...]:
    """Return the key path of text feature ``field``, or raise PromptError listing the fields."""
    leaves = fields(builder.info.features)
    path = "/".join(p for p in re.split(r"[/.]", field.strip()) if p)
    if path not in leaves:
        listing = ", ".join(f"{k} ({type(f).__name__})" for k, f in leaves.items())
        raise PromptError(
            f"TFDS dataset {dataset!r} has no feature {field!r} (prompts.field); its features: "
            f"{listing}"
        )
    if not is_text(leaves[path]):
        raise PromptError(
            f"TFDS dataset {dataset!r}: feature {field!r} is {leaves[path]!r}, not text"
        )
    return tuple(path.split("/"))


def skip_decoders(builder, keep: str) -> dict:
    """Return decoders leaving every top-level leaf feature but ``keep`` encoded (cheap reads)."""
    tfds = require()
    features = builder.info.features
    return {
        key: tfds.decode.SkipDecoding()
        for key in features.keys()
        if key != keep
        and not isinstance(features[key], tfds.features.FeaturesDict | tfds.features.Sequence)
    }


def records(builder, split: str, dataset: str, decoders: dict | None = None) -> Iterator[dict]:
    """Yield the records of ``split`` in the dataset's order (random access, or tf.data)."""
    tfds = require()
    formats = {f.value for f in builder.info.available_file_formats()} or {
        builder.info.file_format.value
    }
    if FILE_FORMAT in formats:
        source = builder.as_data_source(split, decoders=decoders, file_format=FILE_FORMAT)
        for start in range(0, len(source), READ_CHUNK):
            yield from source.__getitems__(range(start, min(start + READ_CHUNK, len(source))))
        return
    if importlib.util.find_spec("tensorflow") is None:
        raise TfdsUnavailable(
            f"TFDS dataset {dataset!r} in {builder.data_dir} is stored as "
            f"{', '.join(sorted(formats))}, which only TensorFlow reads: pip install "
            f"'dag_jax[{TF_EXTRA}]', or rebuild it as {FILE_FORMAT} (python -m dag_jax.data.tfds "
            f"--dataset={dataset} --data_dir=<a new folder>)"
        )
    yield from tfds.as_numpy(builder.as_dataset(split, shuffle_files=False, decoders=decoders))


def texts(value: Any, where: str) -> list[str]:
    """Return the stripped strings of a decoded text value (bytes, str, or arrays/lists of them)."""
    items = _flat(value)
    out = []
    for item in items:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptError(f"{where}: not UTF-8 text ({e})") from e
        if not isinstance(item, str):
            raise PromptError(f"{where}: expected text, got {type(item).__name__}")
        if not item.strip():
            raise PromptError(f"{where}: empty text where a prompt should be")
        out.append(item.strip())
    return out


def _flat(value: Any) -> list:
    """Return the items of a (nested) list or array, or [value] for a scalar."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [item for v in value for item in _flat(v)]
    return [value]


def read_prompts(builder, dataset: str, split: str, path: Sequence[str]) -> list[str]:
    """Return every text of feature ``path`` in ``split``, record by record."""
    if split_size(builder, split, dataset) == 0:
        raise PromptError(f"TFDS dataset {dataset!r}: split {split!r} holds no records")
    feature = "/".join(path)
    prompts = []
    decoders = skip_decoders(builder, path[0])
    for index, record in enumerate(records(builder, split, dataset, decoders)):
        value = record
        for key in path:
            value = value[key]
        where = f"TFDS dataset {dataset!r}, split {split!r}, record {index}, feature {feature!r}"
        prompts += texts(value, where)
    if not prompts:
        raise PromptError(f"TFDS dataset {dataset!r}: split {split!r} holds no {feature!r} texts")
    return prompts


def read(name: str, field: str, data_dir: str = "") -> tuple[tuple[str, ...], ...]:
    """Return (train, test, files) of TFDS prompt source ``name`` (see the module docstring).

    ``dag_jax.data.prompts.load`` makes them a PromptSet.
    """
    parts = parse_name(name)
    if not str(field).strip():
        raise PromptError(
            f"prompt source {name!r}: prompts.field must name the text feature to read"
        )
    builder = open_builder(parts.dataset, data_dir)
    path = text_field(builder, field, parts.dataset)
    splits = list(builder.info.splits)
    if parts.split:
        train, test = read_prompts(builder, parts.dataset, parts.split, path), []
    elif "train" in splits:
        train = read_prompts(builder, parts.dataset, "train", path)
        test = read_prompts(builder, parts.dataset, "test", path) if "test" in splits else []
    else:
        raise PromptError(
            f"TFDS dataset {parts.dataset!r} has no 'train' split: name one "
            f"('{name}:<split>'); its splits: {', '.join(splits)}"
        )
    return tuple(train), tuple(test), (str(builder.data_dir),)


# ---------------------------------------------------------------------------------------------
# Preparing


def prepare(dataset: str, data_dir: str = "", imports: Sequence[str] = ()) -> str:
    """Generate ``dataset`` as array_record in ``data_dir`` (no TensorFlow); return its folder.

    ``imports``: modules to import first, to register their builders (the tiny world's is
    ``dag_jax.tinyworld.tfds_dataset``). ``huggingface:<owner>/<name>[/<config>]`` converts a
    Hub dataset (needs the ``datasets`` package and the Hub).
    """
    tfds = require()
    for module in imports:
        importlib.import_module(module)
    kwargs = {"data_dir": data_dir or None, "file_format": FILE_FORMAT}
    if dataset.startswith(HUGGINGFACE):
        if importlib.util.find_spec("datasets") is None:
            raise TfdsUnavailable(
                f"preparing {dataset!r} needs Hugging Face's datasets package: pip install "
                "datasets (reading the prepared copy does not)"
            )
        from tensorflow_datasets.core.dataset_builders import huggingface_dataset_builder as hf

        parts = dataset[len(HUGGINGFACE) :].split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PromptError(f"expected huggingface:<owner>/<name>[/<config>], got {dataset!r}")
        config = parts[2] if len(parts) == 3 else None
        builder = hf.HuggingfaceDatasetBuilder(
            hf_repo_id="/".join(parts[:2]), hf_config=config, **kwargs
        )
    else:
        try:
            builder = tfds.builder(dataset, **kwargs)
        except tfds.core.DatasetNotFoundError as e:
            raise PromptError(
                f"no TFDS builder named {dataset!r} (pass --imports=<module> for your own)"
            ) from e
    builder.download_and_prepare(file_format=FILE_FORMAT)
    return str(builder.data_dir)


def main(argv) -> None:
    """``python -m dag_jax.data.tfds --dataset=NAME [--data_dir=DIR] [--imports=MODULE,...]``."""
    from absl import flags

    del argv
    f = flags.FLAGS
    print(prepare(f.dataset, f.data_dir, [m for m in f.imports if m]))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("dataset", None, "TFDS dataset[/config], or huggingface:<owner>/<name>")
    flags.DEFINE_string("data_dir", "", "where to write it (default: TFDS's data_dir)")
    flags.DEFINE_list("imports", [], "modules to import first (they register builders)")
    flags.mark_flag_as_required("dataset")
    app.run(main)
