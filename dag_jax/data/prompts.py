"""Prompt sets of the papers (SPEC §8) with their train/test splits, and a uniform sampler.

    ps = load("drawbench", root="path/to/prompts")    # PromptSet(name, train, test, ...)
    idx = sample(ps.train, jax.random.key(0), 256)     # (256,) int32 indices into ps.train

Sets (``names()``), what they are for, and where their file comes from (``SOURCES``):

- ``simple_animals``: the 45 animals of DDPO's aesthetic experiment (``prompt_fn=
  "simple_animals"``); ``simple_animals.txt`` from ddpo-pytorch's assets. No held-out split.
- ``imagenet_animals``: ImageNet classes 0–397 (the animals), DDPO's prompts for the JPEG
  (in)compressibility rewards (``prompt_fn="imagenet_animals"``); ``imagenet_all`` /
  ``imagenet_classes``: all 1000 lines; ``imagenet_dogs``: classes 151–268. As in DDPO a prompt is
  a whole line of ``imagenet_classes.txt`` (synonyms included, e.g. "tench, Tinca tinca"; the
  file has one duplicate line, kept). No held-out split.
- ``nouns_activities``: DDPO's prompt-image alignment prompts (``prompt_fn="nouns_activities"``
  with ``simple_animals.txt`` × ``activities.txt``, reward ``llava_bertscore``): every
  "a/an <animal> <activity>", 45 × 3 = 135, animal-major. The article follows inflect's ``a()``
  (DDPO's choice) for these words: "an" before a vowel letter ("an ant"). No held-out split.
- ``drawbench``: DrawBench (ImageReward experiments): categories "Misspellings" and
  "Rare Words" dropped, the first 2 prompts (file order) of each remaining category held out as
  test → 165 train, 18 test. Metadata: ``{"category": ...}``.
- ``hpdv2``: the HPDv2 benchmark prompts of the four styles anime, concept-art, paintings, photo
  (HPSv2 experiments); the first 10 of each style held out as test → 4 × 790 train, 40 test.
  ``hpdv2_<style>``: one style. Metadata: ``{"style": ...}``.
- ``b2_template1`` / ``2`` / ``3``: the B²-DiffuRL prompt templates, train and test as the
  files give them.
- ``tiny_shapes``: the captions of the built-in tiny world (``dag_jax.tinyworld.shapes``),
  e.g. "two red circles on a blue background": 333 train, 45 test (every caption of the held-out
  colour/kind/background triples). Needs no file. Metadata: the parsed attributes.
- ``tfds:<dataset>[/<config>][:<split>]``: the text feature ``field`` of a TFDS dataset
  prepared in ``data_dir`` (``dag_jax.data.tfds``, extra ``tfds``; Hugging Face datasets via
  ``tfds:huggingface:<owner>/<name>``). Without a split: ``train``, and ``test`` held out if
  the dataset has it. ``tfds:tiny_shapes/captions`` (field ``caption``) is ``tiny_shapes``.

Where the files are looked for: ``load(name, root=...)``, else the folder in the environment
variable ``DAG_JAX_PROMPTS``, both laid out like ``../shared/data/prompts`` (``SOURCES``). With
neither, the cache folder (``$DAG_JAX_CACHE`` or ``~/.cache/dag_jax``, then ``prompts/``) is
used, and files missing there are downloaded from ``SOURCES`` (``download=False`` to forbid
that). A file that cannot be found or fetched raises ``MissingPromptFile`` naming it, where it
was looked for and where to get it. A file that is there but unusable (not UTF-8, empty, not
in its format, or with an empty line or entry where a prompt should be) raises ``PromptError``
naming the file and, where there is one, the line (``path:line: ...``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dag_jax.data.errors import MissingPromptFile, PromptError

TFDS_PREFIX = "tfds:"  # names read through TensorFlow Datasets (dag_jax.data.tfds)
ENV_ROOT = "DAG_JAX_PROMPTS"
ENV_CACHE = "DAG_JAX_CACHE"
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
DRAWBENCH_DROPPED = ("Misspellings", "Rare Words")
DRAWBENCH_TEST_PER_CATEGORY = 2
HPDV2_TEST_PER_STYLE = 10

_DDPO = "https://raw.githubusercontent.com/kvablack/ddpo-pytorch/main/ddpo_pytorch/assets/"
_B2 = "https://raw.githubusercontent.com/hu-zijing/B2-DiffuRL/main/config/prompt/"
_HPD = "https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark/"

# file (relative to the prompt root) -> public source it is downloaded from
SOURCES: dict[str, str] = {
    "simple_animals.txt": _DDPO + "simple_animals.txt",
    "activities.txt": _DDPO + "activities.txt",
    "imagenet_classes.txt": _DDPO + "imagenet_classes.txt",
    # the DrawBench sheet (Imagen paper) as a CSV with columns "Prompts", "Category"
    "DrawBench_Prompts.csv": (
        "https://huggingface.co/datasets/sayakpaul/drawbench/resolve/main/"
        "DrawBench%20Prompts%20-%20Sheet1.csv"
    ),
    **{f"hpdv2/benchmark_{s}.json": f"{_HPD}{s}.json" for s in HPDV2_STYLES},
    **{
        f"b2/template{k}_{split}.json": f"{_B2}template{k}_{split}.json"
        for k in (1, 2, 3)
        for split in ("train", "test")
    },
}


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """A named prompt set: ``train`` and held-out ``test`` prompts (``test`` may be empty).

    ``train_metadata`` / ``test_metadata`` hold one dict per prompt, aligned with ``train`` /
    ``test`` (empty dicts where a set has none). ``files`` are the files it was read from.
    """

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...] = ()
    train_metadata: tuple[dict, ...] = ()
    test_metadata: tuple[dict, ...] = ()
    files: tuple[str, ...] = ()

    def __post_init__(self):
        """Fill empty metadata and check it is aligned with the prompts."""
        for split in ("train", "test"):
            prompts, meta = getattr(self, split), getattr(self, f"{split}_metadata")
            if not meta:
                object.__setattr__(self, f"{split}_metadata", tuple({} for _ in prompts))
            elif len(meta) != len(prompts):
                raise PromptError(
                    f"prompt set {self.name!r}: {len(meta)} {split} metadata for "
                    f"{len(prompts)} prompts"
                )

    @property
    def all(self) -> tuple[str, ...]:
        """Return train then test prompts."""
        return self.train + self.test


# ---------------------------------------------------------------------------------------------
# Loading


def names() -> list[str]:
    """Return the names ``load`` knows."""
    return sorted(_BUILDERS)


def files_of(name: str) -> tuple[str, ...]:
    """Return the files (relative to the prompt root) prompt set ``name`` is read from."""
    return _builder(name)[0]


def load(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    *,
    field: str = "",
    data_dir: str = "",
) -> PromptSet:
    """Return prompt set ``name`` read from ``root`` (or ``$DAG_JAX_PROMPTS``, or the cache).

    With neither ``root`` nor ``$DAG_JAX_PROMPTS``, files come from ``cache_dir`` (default
    ``$DAG_JAX_CACHE/prompts`` or ``~/.cache/dag_jax/prompts``) and, if missing there and
    ``download``, are fetched from ``SOURCES``. Raises MissingPromptFile for a file that is not
    there, and PromptError for an unknown name or a malformed file.

    ``tfds:<dataset>[/<config>][:<split>]`` names read text feature ``field`` of a TFDS dataset
    prepared in ``data_dir`` (``dag_jax.data.tfds``; ``root``, ``download`` and ``cache_dir``
    are not used); ``field`` and ``data_dir`` are for those names only.
    """
    if isinstance(name, str) and name.startswith(TFDS_PREFIX):
        from dag_jax.data import tfds

        train, test, files = tfds.read(name, field, data_dir)
        return PromptSet(name, train, test, files=files)
    if field or data_dir:
        raise PromptError(
            f"prompt set {name!r}: field and data_dir are only read by '{TFDS_PREFIX}' prompt "
            f"sources, got field={field!r}, data_dir={data_dir!r}"
        )
    files, build = _builder(name)
    folder, fetch = _resolve_root(root, download, cache_dir)
    paths = {rel: _locate(name, rel, folder, fetch) for rel in files}
    return build(name, paths)


def from_config(prompts) -> PromptSet:
    """Return the prompt set a config's ``prompts`` block names (any name but "inline").

    Reads ``name``, ``root``, ``field`` and ``data_dir`` (the last two may be missing from the
    config of a run recorded before they existed).
    """
    return load(
        prompts.name,
        root=prompts.root or None,
        field=prompts.get("field", "") or "",
        data_dir=prompts.get("data_dir", "") or "",
    )


def _builder(name: str) -> tuple[tuple[str, ...], Callable]:
    """Return (files, build function) of prompt set ``name``, or raise PromptError."""
    if name not in _BUILDERS:
        raise PromptError(
            f"unknown prompt set {name!r}; known sets: {', '.join(names())}, or a TFDS "
            f"dataset '{TFDS_PREFIX}<dataset>[/<config>][:<split>]' (with prompts.field)"
        )
    return _BUILDERS[name]


def _resolve_root(
    root: str | os.PathLike | None, download: bool, cache_dir: str | os.PathLike | None
) -> tuple[Path, bool]:
    """Return (folder to read, whether missing files may be downloaded into it)."""
    if root is not None:
        return Path(root).expanduser(), False
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser(), False
    if cache_dir is not None:
        return Path(cache_dir).expanduser(), download
    cache = os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "dag_jax"
    return Path(cache).expanduser() / "prompts", download


def _locate(name: str, rel: str, folder: Path, fetch: bool) -> Path:
    """Return the path of file ``rel`` under ``folder``, downloading it if allowed."""
    path = folder / rel
    if path.is_file():
        return path
    url = SOURCES[rel]
    where = (
        f"Put it at {path} (source: {url}), or pass root=<folder> / set {ENV_ROOT} to a folder "
        f"laid out as <folder>/{rel}"
    )
    if not folder.is_dir() and not fetch:
        raise MissingPromptFile(
            f"prompt set {name!r}: prompt folder {folder} does not exist. {where}"
        )
    if not fetch:
        raise MissingPromptFile(f"prompt set {name!r} needs {rel}, not found in {folder}. {where}")
    try:
        _fetch(url, path)
    except OSError as e:
        raise MissingPromptFile(
            f"prompt set {name!r} needs {rel}: not in {folder} and downloading {url} failed "
            f"({e}). {where}"
        ) from e
    return path


def _fetch(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` (atomically: a partial download never stays there)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)


# ---------------------------------------------------------------------------------------------
# Readers


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Return the text of prompt file ``path``; PromptError if it is not UTF-8 or is empty."""
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from e
    if not text.strip():
        raise PromptError(f"{path} is empty: it holds no prompts")
    return text


def read_lines(path: Path) -> list[str]:
    """Return the stripped lines of a text file, one prompt each (DDPO's ``_load_lines``).

    Blank lines after the last prompt are ignored; a blank line before it raises PromptError
    naming the line (a prompt is missing there, and for ImageNet line numbers are class ids).
    """
    lines = [line.strip() for line in read_text(path).splitlines()]
    while not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line:
            raise PromptError(f"{path}:{number}: empty line where a prompt should be")
    return lines


def read_json_list(path: Path) -> list[str]:
    """Return a JSON file's non-empty list of prompt strings (stripped), or raise PromptError."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise PromptError(f"{path} must hold a JSON list of prompt strings")
    if not data:
        raise PromptError(f"{path} is empty: its JSON list holds no prompts")
    prompts = [p.strip() for p in data]
    if "" in prompts:
        index = prompts.index("")
        raise PromptError(
            f"{path}:{_json_entry_line(text, index)}: empty string (entry {index}) where a "
            "prompt should be"
        )
    return prompts


def _json_entry_line(text: str, index: int) -> int:
    """Return the line of entry ``index`` of ``text``, a valid JSON list of strings."""
    end = 0
    for _ in range(index + 1):  # outside strings, the only quotes open the list's entries
        start = text.index('"', end)
        _, end = json.decoder.scanstring(text, start + 1)
    return text.count("\n", 0, start) + 1


def read_drawbench(path: Path) -> list[tuple[str, str]]:
    """Return (prompt, category) rows of the DrawBench CSV (columns "Prompts", "Category").

    Blank rows after the last prompt are ignored; a blank row or an empty "Prompts" cell before
    it, or broken quoting (which would merge rows), raises PromptError naming the line.
    """
    reader = csv.reader(io.StringIO(read_text(path, "utf-8-sig"), newline=""), strict=True)
    header = next(reader)
    columns = [name.strip() for name in header]
    if "Prompts" not in columns or "Category" not in columns:
        raise PromptError(
            f"{path} must be a CSV with columns 'Prompts' and 'Category', got {header}"
        )
    i_prompt, i_category = columns.index("Prompts"), columns.index("Category")
    rows: list[tuple[str, str]] = []
    blank = None  # the first blank row's line, an error only if a prompt follows it
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as e:
            raise PromptError(f"{path}:{line}: not a valid CSV row: {e}") from e
        if row is None:
            break
        cells = [cell.strip() for cell in row] + [""] * (len(columns) - len(row))
        if not any(cells):
            blank = blank or line
            continue
        if blank is not None:
            raise PromptError(f"{path}:{blank}: empty row where a prompt should be")
        if not cells[i_prompt]:
            raise PromptError(f"{path}:{line}: empty 'Prompts' cell where a prompt should be")
        rows.append((cells[i_prompt], cells[i_category]))
    if not rows:
        raise PromptError(f"{path} holds no prompts: only its header")
    return rows


def indefinite_article(word: str) -> str:
    """Return "an" before a vowel letter, else "a" (inflect's ``a()`` on DDPO's nouns)."""
    w = word.strip().lower()
    if w.startswith(("uni", "use", "eu", "one", "ewe")):
        return "a"
    if w.startswith(("hour", "honest", "honour", "honor", "heir")):
        return "an"
    return "an" if w[:1] in "aeiou" and w else "a"


# ---------------------------------------------------------------------------------------------
# Split rules


def split_drawbench(
    rows: Sequence[tuple[str, str]],
    dropped: Sequence[str] = DRAWBENCH_DROPPED,
    test_per_category: int = DRAWBENCH_TEST_PER_CATEGORY,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return (train, test) rows: ``dropped`` categories removed, the first prompts held out.

    The first ``test_per_category`` rows (file order) of each remaining category go to test.
    """
    seen: dict[str, int] = {}
    train, test = [], []
    for prompt, category in rows:
        if category in dropped:
            continue
        seen[category] = seen.get(category, 0) + 1
        (test if seen[category] <= test_per_category else train).append((prompt, category))
    return train, test


def split_head(prompts: Sequence[str], n_test: int) -> tuple[list[str], list[str]]:
    """Return (train, test) with the first ``n_test`` prompts as test."""
    return list(prompts[n_test:]), list(prompts[:n_test])


# ---------------------------------------------------------------------------------------------
# Builders: (name, {relative file: path}) -> PromptSet


def _lines_set(rel: str, low: int | None = None, high: int | None = None):
    """Return a builder of a train-only set of lines ``[low:high]`` of file ``rel``."""

    def build(name: str, paths: dict[str, Path]) -> PromptSet:
        return PromptSet(name, tuple(read_lines(paths[rel])[low:high]), files=(rel,))

    return (rel,), build


def _nouns_activities(name: str, paths: dict[str, Path]) -> PromptSet:
    """Build DDPO's "a/an <noun> <activity>" set (all pairs, noun-major)."""
    nouns = read_lines(paths["simple_animals.txt"])
    activities = read_lines(paths["activities.txt"])
    prompts = tuple(f"{indefinite_article(n)} {n} {a}" for n in nouns for a in activities)
    meta = tuple({"noun": n, "activity": a} for n in nouns for a in activities)
    return PromptSet(name, prompts, train_metadata=meta, files=tuple(paths))


def _drawbench(name: str, paths: dict[str, Path]) -> PromptSet:
    """Build the DrawBench split of SPEC §8."""
    train, test = split_drawbench(read_drawbench(paths["DrawBench_Prompts.csv"]))
    return PromptSet(
        name,
        tuple(p for p, _ in train),
        tuple(p for p, _ in test),
        tuple({"category": c} for _, c in train),
        tuple({"category": c} for _, c in test),
        files=tuple(paths),
    )


def _hpdv2(styles: Sequence[str]):
    """Return a builder of the HPDv2 benchmark split (first 10 per style held out)."""
    files = tuple(f"hpdv2/benchmark_{s}.json" for s in styles)

    def build(name: str, paths: dict[str, Path]) -> PromptSet:
        train, test, train_meta, test_meta = [], [], [], []
        for style, rel in zip(styles, files):
            tr, te = split_head(read_json_list(paths[rel]), HPDV2_TEST_PER_STYLE)
            train += tr
            test += te
            train_meta += [{"style": style}] * len(tr)
            test_meta += [{"style": style}] * len(te)
        return PromptSet(
            name, tuple(train), tuple(test), tuple(train_meta), tuple(test_meta), files=files
        )

    return files, build


def _b2(k: int):
    """Return a builder of B²-DiffuRL template ``k`` (train and test files as given)."""
    files = (f"b2/template{k}_train.json", f"b2/template{k}_test.json")

    def build(name: str, paths: dict[str, Path]) -> PromptSet:
        train, test = (tuple(read_json_list(paths[rel])) for rel in files)
        return PromptSet(name, train, test, files=files)

    return files, build


def _tiny_shapes(name: str, paths: dict[str, Path]) -> PromptSet:
    """The tiny world's captions: held-out (colour, kind, background) triples are the test."""
    from dag_jax.tinyworld import shapes

    def meta(captions):
        return tuple(shapes.parse(c) for c in captions)

    train, test = shapes.captions("train"), shapes.captions("test")
    return PromptSet(name, train, test, meta(train), meta(test))


_BUILDERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "tiny_shapes": ((), _tiny_shapes),
    "simple_animals": _lines_set("simple_animals.txt"),
    "imagenet_animals": _lines_set("imagenet_classes.txt", 0, 398),
    "imagenet_all": _lines_set("imagenet_classes.txt"),
    "imagenet_classes": _lines_set("imagenet_classes.txt"),
    "imagenet_dogs": _lines_set("imagenet_classes.txt", 151, 269),
    "nouns_activities": (("simple_animals.txt", "activities.txt"), _nouns_activities),
    "drawbench": (("DrawBench_Prompts.csv",), _drawbench),
    "hpdv2": _hpdv2(HPDV2_STYLES),
    **{f"hpdv2_{s}": _hpdv2((s,)) for s in HPDV2_STYLES},
    **{f"b2_template{k}": _b2(k) for k in (1, 2, 3)},
}


# ---------------------------------------------------------------------------------------------
# Sampling


def sample(prompts: Sequence[str] | PromptSet | int, key_or_rng, n: int):
    """Return ``n`` prompt indices drawn uniformly with replacement.

    ``prompts``: a prompt list, a PromptSet (its ``train`` prompts) or their number.
    ``key_or_rng``: a JAX PRNG key (new-style or raw uint32[2]) → a (n,) int32 ``jax.Array``,
    deterministic given the key (``jax.random.randint``; usable inside jit); a NumPy
    ``Generator`` → a (n,) int32 ``np.ndarray``; an int → treated as the seed of a JAX key.
    For mesh-independent runs (SPEC §10) draw the whole global batch from the epoch key and
    shard the indices, rather than drawing per device.
    """
    count = _count(prompts)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise PromptError(f"sample: n must be a non-negative int, got {n!r}")
    if isinstance(key_or_rng, np.random.Generator):
        return key_or_rng.integers(0, count, size=int(n)).astype(np.int32)
    import jax
    import jax.numpy as jnp

    if isinstance(key_or_rng, int | np.integer) and not isinstance(key_or_rng, bool):
        key_or_rng = jax.random.key(int(key_or_rng))
    if not isinstance(key_or_rng, jax.Array):
        raise PromptError(
            f"sample: expected a JAX PRNG key, a numpy Generator or an int seed, "
            f"got {type(key_or_rng).__name__}"
        )
    return jax.random.randint(key_or_rng, (int(n),), 0, count, dtype=jnp.int32)


def _count(prompts: Sequence[str] | PromptSet | int) -> int:
    """Return how many prompts there are to sample from (>= 1), or raise PromptError."""
    if isinstance(prompts, PromptSet):
        count = len(prompts.train)
    elif isinstance(prompts, int | np.integer) and not isinstance(prompts, bool):
        count = int(prompts)
    elif isinstance(prompts, str):
        raise PromptError("sample: pass a list of prompts, not a single string")
    else:
        count = len(prompts)
    if count < 1:
        raise PromptError("sample: there are no prompts to sample from")
    return count
