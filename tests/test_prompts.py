"""Prompt sets (SPEC §8): every loader on fixture files, errors, the sampler; real-file counts.

The fixtures are small files written in each source's exact format (the layout of
``../shared/data/prompts``), so a clone without ``../shared`` still tests every loader; the
checks against the real files run only where that folder exists.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax.data import prompts as P

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
needs_root = pytest.mark.skipif(not ROOT.is_dir(), reason=f"reference prompts not at {ROOT}")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    """Keep the user's prompt folder and cache out of the tests; never download."""
    monkeypatch.delenv(P.ENV_ROOT, raising=False)
    monkeypatch.setenv(P.ENV_CACHE, str(tmp_path / "cache"))

    def offline(url, dest, timeout=30.0):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(P, "_fetch", offline)


# ---------------------------------------------------------------------------------------------
# Fixture files, each in its source's format


def write_lines(path: Path, lines, end: str = "\n") -> Path:
    """Write DDPO-style text: one prompt a line (the real files: LF, last newline optional)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("\n".join(lines).encode() + end.encode())
    return path


def write_drawbench(path: Path, rows, bom: bool = False) -> Path:
    """Write the DrawBench sheet's CSV: header "Prompts,Category", CRLF rows, quotes as needed,
    no newline after the last row (as the real file)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)  # lineterminator "\r\n", fields with commas quoted
    writer.writerow(["Prompts", "Category"])
    writer.writerows(rows)
    text = buf.getvalue().removesuffix("\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def write_hpdv2(root: Path, style: str, prompts) -> Path:
    """Write an HPDv2 benchmark file: one line, a JSON list, non-ASCII as \\u escapes."""
    path = root / "hpdv2" / f"benchmark_{style}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts))
    return path


def write_b2(root: Path, k: int, split: str, prompts) -> Path:
    """Write a B²-DiffuRL template file: a JSON list indented by 4, no final newline."""
    path = root / "b2" / f"template{k}_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts, indent=4))
    return path


ANIMALS = ("cat", "dog", "ant", "eagle", "unicorn")
ACTIVITIES = ("washing the dishes", "riding a bike", "playing chess")
# 1000 class lines, synonyms after commas; line 517 repeats line 134 (the real file's "crane")
IMAGENET = tuple(
    f"class{i}, synonym {i}" if i != 517 else "class134, synonym 134" for i in range(1000)
)
# (prompt, category) in file order: categories interleaved, a prompt with commas (quoted), a
# non-ASCII prompt, a category with a trailing space, both dropped categories
DRAWBENCH = (
    ("A red colored car.", "Colors"),
    ("A stack of 3 cubes. A red cube, a green cube.", "DALL-E"),
    ("A black colored car.", "Colors"),
    ("Bzaseball galove.", "Misspellings"),
    ("A pink colored car.", "Colors"),
    ("An Mösli in a bowl.", "Rare Words"),
    ("A blue bird and a brown bear.", "Colors"),
    ("Paying for a quarter-sized pizza, with a pizza-sized quarter.", "Gary Marcus et al. "),
    ("A cube made of denim.", "DALL-E"),
    ("A sphere made of kitchen tile.", "DALL-E"),
)


def hpdv2_prompts(style: str) -> list[str]:
    """Return 13 prompts of ``style``: padded with spaces, one non-ASCII, one repeated."""
    prompts = [f"{style} prompt {i} " if i % 3 else f" {style} prompt {i}" for i in range(12)]
    prompts[4] = f"A Pokémon in {style} style."
    return prompts + [prompts[11]]


@pytest.fixture
def root(tmp_path) -> Path:
    """Return a prompt root holding a small file in each source's format, for every set."""
    folder = tmp_path / "prompts"
    write_lines(folder / "simple_animals.txt", ANIMALS)
    write_lines(folder / "activities.txt", ACTIVITIES, end="")
    write_lines(folder / "imagenet_classes.txt", IMAGENET, end="")
    write_drawbench(folder / "DrawBench_Prompts.csv", DRAWBENCH)
    for style in P.HPDV2_STYLES:
        write_hpdv2(folder, style, hpdv2_prompts(style))
    for k in (1, 2, 3):
        write_b2(folder, k, "train", [f"t{k} train {i}" for i in range(4)])
        write_b2(folder, k, "test", [f"t{k} test {i}" for i in range(3)])
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == set(P.SOURCES)
    return folder


# ---------------------------------------------------------------------------------------------
# Every loader on the fixture files


def test_every_set_loads_from_a_root_of_fixture_files(root):
    for name in P.names():
        ps = P.load(name, root=root)
        assert ps.train and all(isinstance(p, str) and p == p.strip() and p for p in ps.all)
        assert len(ps.train_metadata) == len(ps.train) and len(ps.test_metadata) == len(ps.test)
        assert set(ps.files) == set(P.files_of(name)) <= set(P.SOURCES)


def test_text_sets_are_the_stripped_lines_in_file_order(tmp_path):
    write_lines(tmp_path / "simple_animals.txt", ["  cat ", "dog\t", "cat", "ant"], end="\n\n \n")
    ps = P.load("simple_animals", root=tmp_path)
    assert ps.train == ("cat", "dog", "cat", "ant")  # no dedup; trailing blank lines ignored
    assert ps.test == () and ps.train_metadata == ({},) * 4
    assert ps.files == ("simple_animals.txt",)
    (tmp_path / "simple_animals.txt").write_bytes(b"cat\r\ndog\r\n")  # CRLF reads the same
    assert P.load("simple_animals", root=tmp_path).train == ("cat", "dog")


def test_imagenet_sets_are_line_slices_of_the_class_file_with_the_duplicate_kept(root):
    every = P.load("imagenet_classes", root=root)
    assert every.train == IMAGENET and len(every.train) == 1000 and every.test == ()
    assert len(set(every.train)) == 999  # the repeated line stays: line number = class id
    assert P.load("imagenet_all", root=root).train == IMAGENET
    animals = P.load("imagenet_animals", root=root)  # DDPO's JPEG-reward prompts: 0-397
    assert animals.train == IMAGENET[:398] and animals.train[-1] == "class397, synonym 397"
    dogs = P.load("imagenet_dogs", root=root)  # classes 151-268
    assert dogs.train == IMAGENET[151:269] and dogs.train[0] == "class151, synonym 151"


def test_nouns_activities_is_every_pair_noun_major_with_inflect_articles(root):
    ps = P.load("nouns_activities", root=root)
    assert len(ps.train) == len(ANIMALS) * len(ACTIVITIES) and ps.test == ()
    assert ps.train[:4] == (
        "a cat washing the dishes",
        "a cat riding a bike",
        "a cat playing chess",
        "a dog washing the dishes",
    )
    assert {"an ant playing chess", "an eagle riding a bike", "a unicorn playing chess"} <= set(
        ps.train
    )
    assert ps.train_metadata[3] == {"noun": "dog", "activity": "washing the dishes"}
    assert ps.files == ("simple_animals.txt", "activities.txt")


def test_drawbench_holds_out_the_first_two_of_each_category_and_drops_two(root):
    ps = P.load("drawbench", root=root)
    pairs = lambda prompts, meta: [(p, m["category"]) for p, m in zip(prompts, meta)]
    assert pairs(ps.test, ps.test_metadata) == [  # file order, categories interleaved
        ("A red colored car.", "Colors"),
        ("A stack of 3 cubes. A red cube, a green cube.", "DALL-E"),  # quoted commas
        ("A black colored car.", "Colors"),
        ("Paying for a quarter-sized pizza, with a pizza-sized quarter.", "Gary Marcus et al."),
        ("A cube made of denim.", "DALL-E"),
    ]
    assert pairs(ps.train, ps.train_metadata) == [
        ("A pink colored car.", "Colors"),
        ("A blue bird and a brown bear.", "Colors"),
        ("A sphere made of kitchen tile.", "DALL-E"),
    ]
    assert not {"Bzaseball galove.", "An Mösli in a bowl."} & set(ps.all)  # dropped categories


def test_drawbench_reads_the_sheet_with_a_byte_order_mark_and_padded_header(tmp_path):
    write_drawbench(tmp_path / "DrawBench_Prompts.csv", DRAWBENCH, bom=True)
    text = (tmp_path / "DrawBench_Prompts.csv").read_bytes()
    (tmp_path / "DrawBench_Prompts.csv").write_bytes(text.replace(b"Category", b" Category "))
    rows = P.read_drawbench(tmp_path / "DrawBench_Prompts.csv")
    assert rows == [(p, c.strip()) for p, c in DRAWBENCH]
    assert rows[5] == ("An Mösli in a bowl.", "Rare Words")


def test_hpdv2_holds_out_the_first_ten_of_each_style_in_style_order(root):
    ps = P.load("hpdv2", root=root)
    stripped = {s: [p.strip() for p in hpdv2_prompts(s)] for s in P.HPDV2_STYLES}
    assert list(ps.test) == [p for s in P.HPDV2_STYLES for p in stripped[s][:10]]
    assert list(ps.train) == [p for s in P.HPDV2_STYLES for p in stripped[s][10:]]
    assert [m["style"] for m in ps.test_metadata] == [s for s in P.HPDV2_STYLES for _ in range(10)]
    assert [m["style"] for m in ps.train_metadata] == [s for s in P.HPDV2_STYLES for _ in range(3)]
    assert ps.train[1] == ps.train[2] == "anime prompt 11"  # the repeated prompt is kept
    assert ps.test[4] == "A Pokémon in anime style."  # \\u escapes decoded
    one = P.load("hpdv2_photo", root=root)
    assert list(one.test) == stripped["photo"][:10] and list(one.train) == stripped["photo"][10:]
    assert one.files == ("hpdv2/benchmark_photo.json",)


def test_b2_templates_take_train_and_test_from_their_two_files_in_order(root):
    for k in (1, 2, 3):
        ps = P.load(f"b2_template{k}", root=root)
        assert ps.train == tuple(f"t{k} train {i}" for i in range(4))
        assert ps.test == tuple(f"t{k} test {i}" for i in range(3))
        assert ps.files == (f"b2/template{k}_train.json", f"b2/template{k}_test.json")


def test_tiny_shapes_needs_no_file_and_holds_out_whole_triples(tmp_path):
    ps = P.load("tiny_shapes", root=tmp_path / "no such folder")
    assert (len(ps.train), len(ps.test)) == (333, 45) and ps.files == ()
    triple = lambda m: (m["colour"], m["kind"], m["background"])
    held_out = {triple(m) for m in ps.test_metadata}
    assert held_out and not held_out & {triple(m) for m in ps.train_metadata}
    assert ps.train_metadata[0] == {
        "kind": "circle",
        "colour": "red",
        "background": "black",
        "count": 1,
    }
    assert ps.train[0] == "one red circle on a black background"


def test_env_var_is_the_root_when_none_is_given(monkeypatch, root):
    monkeypatch.setenv(P.ENV_ROOT, str(root))
    assert P.load("simple_animals").train == ANIMALS


# ---------------------------------------------------------------------------------------------
# Unusable files: errors naming the file and the line


def at(path: Path, line: int) -> str:
    """Return the regex of an error message's start: ``<path>:<line>: ``."""
    return f"^{re.escape(str(path))}:{line}: "


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"], ids=["no-bytes", "blank-lines"])
@pytest.mark.parametrize("name", ["simple_animals", "drawbench", "hpdv2_anime", "b2_template2"])
def test_an_empty_prompt_file_is_an_error_naming_it(root, name, content):
    path = root / P.files_of(name)[0]
    path.write_bytes(content)
    with pytest.raises(P.PromptError, match="is empty") as e:
        P.load(name, root=root)
    assert str(path) in str(e.value)


def test_a_file_without_prompts_is_an_error_naming_it(root):
    write_b2(root, 1, "train", [])
    with pytest.raises(P.PromptError, match=r"template1_train\.json is empty: its JSON list"):
        P.load("b2_template1", root=root)
    write_drawbench(root / "DrawBench_Prompts.csv", [])
    with pytest.raises(P.PromptError, match=r"DrawBench_Prompts\.csv holds no prompts"):
        P.load("drawbench", root=root)


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("simple_animals", "cat\ndog\ncaf\xe9\n".encode("latin-1"), 3),
        (
            "drawbench",
            "Prompts,Category\r\nA car.,Colors\r\nAn M\xf6sli.,Rare Words".encode("latin-1"),
            3,
        ),
        ("hpdv2_anime", '[\n"a",\n"b\xe9"\n]'.encode("cp1252"), 3),
        ("b2_template1", b"\xff\xfe[\x00]\x00", 1),  # UTF-16
    ],
    ids=["txt-latin1", "csv-latin1", "json-cp1252", "json-utf16"],
)
def test_a_file_that_is_not_utf8_is_an_error_naming_it_and_the_line(root, name, content, line):
    path = root / P.files_of(name)[0]
    path.write_bytes(content)
    with pytest.raises(P.PromptError, match="not UTF-8") as e:
        P.load(name, root=root)
    assert str(e.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("blank", ["", "   ", "\t"], ids=["empty", "spaces", "tab"])
def test_an_empty_line_between_prompts_is_an_error_naming_the_line(root, blank):
    path = write_lines(root / "activities.txt", ["washing the dishes", blank, "playing chess"])
    with pytest.raises(P.PromptError, match="empty line where a prompt should be") as e:
        P.load("nouns_activities", root=root)
    assert str(e.value).startswith(f"{path}:2: ")
    lines = list(IMAGENET)
    lines[400] = blank  # would shift every later class id
    path = write_lines(root / "imagenet_classes.txt", lines)
    with pytest.raises(P.PromptError, match=at(path, 401) + "empty line"):
        P.load("imagenet_dogs", root=root)


def test_an_empty_row_or_prompt_cell_in_drawbench_is_an_error_naming_the_line(root):
    path = root / "DrawBench_Prompts.csv"
    path.write_bytes(b'Prompts,Category\r\nA car.,Colors\r\n"A, b.",Colors\r\n\r\nA dog.,Colors')
    with pytest.raises(P.PromptError, match=at(path, 4) + "empty row where a prompt"):
        P.load("drawbench", root=root)
    path.write_bytes(b'Prompts,Category\r\nA car.,Colors\r\n"multi\r\nline",DALL-E\r\n ,Colors')
    with pytest.raises(P.PromptError, match=at(path, 5) + "empty 'Prompts' cell"):
        P.load("drawbench", root=root)
    path.write_bytes(b"Prompts,Category\r\nA car.,Colors\r\n,\r\n\r\n")  # trailing rows
    assert P.load("drawbench", root=root).test == ("A car.",)
    for broken in (b'"A "bad" quote,Colors', b'"An open quote,Colors\r\nA dog.,Colors'):
        path.write_bytes(b"Prompts,Category\r\nA car.,Colors\r\n" + broken)
        with pytest.raises(P.PromptError, match=at(path, 3) + "not a valid CSV row"):
            P.load("drawbench", root=root)


@pytest.mark.parametrize("blank", ["", "  "], ids=["empty", "spaces"])
def test_an_empty_json_entry_is_an_error_naming_its_line(root, blank):
    path = write_b2(root, 3, "test", ['chair "under" umbrella', "car on street", blank, "x"])
    with pytest.raises(P.PromptError, match=r"empty string \(entry 2\) where a prompt") as e:
        P.load("b2_template3", root=root)
    assert str(e.value).startswith(f"{path}:4: ")  # the list is indented one entry a line
    path = write_hpdv2(root, "paintings", ['a "quoted" one', "b", blank])
    with pytest.raises(P.PromptError, match=at(path, 1) + r"empty string \(entry 2\)"):
        P.load("hpdv2_paintings", root=root)


def test_invalid_json_is_an_error_naming_the_line(root):
    path = root / "b2" / "template2_train.json"
    path.write_text('[\n    "red apple",\n    "green apple"\n    "banana"\n]')
    with pytest.raises(P.PromptError, match=at(path, 4) + r"not valid JSON: Expecting ','"):
        P.load("b2_template2", root=root)


# ---------------------------------------------------------------------------------------------
# The real prompt files (only where ../shared/data exists)


@needs_root
def test_simple_animals_and_imagenet_sets_follow_ddpo():
    animals = P.load("simple_animals", root=ROOT)
    assert len(animals.train) == 45 and animals.test == ()
    assert animals.train[:3] == ("cat", "dog", "horse")
    lines = (ROOT / "imagenet_classes.txt").read_text().splitlines()
    assert len(lines) == 1000
    assert P.load("imagenet_classes", root=ROOT).train == tuple(x.strip() for x in lines)
    assert P.load("imagenet_all", root=ROOT).train == P.load("imagenet_classes", root=ROOT).train
    jpeg = P.load("imagenet_animals", root=ROOT)  # DDPO's JPEG-reward prompts: classes 0-397
    assert len(jpeg.train) == 398 and jpeg.train[0] == "tench, Tinca tinca"
    assert jpeg.train[-1] == lines[397].strip()
    dogs = P.load("imagenet_dogs", root=ROOT)
    assert len(dogs.train) == 118 and dogs.train[0] == "Chihuahua"


@needs_root
def test_nouns_activities_pairs_every_animal_with_every_activity():
    ps = P.load("nouns_activities", root=ROOT)
    assert len(ps.train) == 45 * 3 and ps.test == ()
    assert ps.train[:3] == (
        "a cat washing the dishes",
        "a cat riding a bike",
        "a cat playing chess",
    )
    assert "an ant riding a bike" in ps.train
    assert ps.train_metadata[0] == {"noun": "cat", "activity": "washing the dishes"}


@needs_root
def test_drawbench_split_drops_two_categories_and_holds_out_two_per_category():
    ps = P.load("drawbench", root=ROOT)
    assert len(ps.train) == 165
    with open(ROOT / "DrawBench_Prompts.csv", newline="", encoding="utf-8") as f:
        rows = [(r["Prompts"].strip(), r["Category"].strip()) for r in csv.DictReader(f)]
    kept = [c for c in dict.fromkeys(c for _, c in rows) if c not in P.DRAWBENCH_DROPPED]
    assert len(kept) == 9 and len(ps.test) == 2 * len(kept)
    for category in kept:
        in_file = [p for p, c in rows if c == category]
        test = [p for p, m in zip(ps.test, ps.test_metadata) if m["category"] == category]
        train = [p for p, m in zip(ps.train, ps.train_metadata) if m["category"] == category]
        assert test == in_file[:2] and train == in_file[2:]
    dropped = {p for p, c in rows if c in ("Misspellings", "Rare Words")}
    assert dropped and not dropped & set(ps.all)
    assert "Gary Marcus et al." in {m["category"] for m in ps.train_metadata}  # stripped


@needs_root
def test_hpdv2_holds_out_the_first_ten_of_each_style():
    ps = P.load("hpdv2", root=ROOT)
    assert len(ps.test) == 40 and len(ps.train) == 4 * 790
    for style in P.HPDV2_STYLES:
        prompts = json.loads((ROOT / "hpdv2" / f"benchmark_{style}.json").read_text())
        test = [p for p, m in zip(ps.test, ps.test_metadata) if m["style"] == style]
        train = [p for p, m in zip(ps.train, ps.train_metadata) if m["style"] == style]
        assert test == [p.strip() for p in prompts[:10]]
        assert train == [p.strip() for p in prompts[10:]]
        one = P.load(f"hpdv2_{style}", root=ROOT)
        assert list(one.test) == test and list(one.train) == train


@needs_root
@pytest.mark.parametrize(("k", "n_train", "n_test"), [(1, 45, 90), (2, 40, 40), (3, 40, 30)])
def test_b2_templates_are_the_files_as_given(k, n_train, n_test):
    ps = P.load(f"b2_template{k}", root=ROOT)
    assert (len(ps.train), len(ps.test)) == (n_train, n_test)
    assert list(ps.train) == json.loads((ROOT / "b2" / f"template{k}_train.json").read_text())
    assert not set(ps.train) & set(ps.test)


@needs_root
def test_every_set_loads_from_the_reference_root():
    for name in P.names():
        ps = P.load(name, root=ROOT)
        assert ps.train and all(isinstance(p, str) and p for p in ps.all)
        assert len(ps.train_metadata) == len(ps.train) and len(ps.test_metadata) == len(ps.test)
        assert set(ps.files) == set(P.files_of(name)) <= set(P.SOURCES)


def test_unknown_set_names_the_known_ones():
    with pytest.raises(P.PromptError, match=r"unknown prompt set 'drawbenc'.*drawbench"):
        P.load("drawbenc", root=ROOT)


def test_missing_root_folder_says_so_and_where_to_get_the_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(P.MissingPromptFile) as e:
        P.load("drawbench", root=missing)
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "DrawBench_Prompts.csv" in msg and "huggingface.co/datasets/sayakpaul/drawbench" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_missing_file_in_root_names_it(tmp_path):
    (tmp_path / "hpdv2").mkdir()
    (tmp_path / "hpdv2" / "benchmark_anime.json").write_text(json.dumps(["x"] * 12))
    with pytest.raises(P.MissingPromptFile, match=r"hpdv2/benchmark_concept-art\.json"):
        P.load("hpdv2", root=tmp_path)
    assert len(P.load("hpdv2_anime", root=tmp_path).train) == 2


def test_without_root_a_failed_download_explains_what_is_needed(tmp_path):
    with pytest.raises(P.MissingPromptFile) as e:
        P.load("simple_animals")
    msg = str(e.value)
    assert "simple_animals.txt" in msg and "downloading" in msg and P.ENV_ROOT in msg
    assert "raw.githubusercontent.com/kvablack/ddpo-pytorch" in msg
    with pytest.raises(P.MissingPromptFile, match="does not exist"):
        P.load("simple_animals", download=False, cache_dir=tmp_path / "empty")


def test_download_goes_to_the_cache_and_is_reused(monkeypatch, tmp_path):
    calls = []

    def fake_fetch(url, dest, timeout=30.0):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("cat\ndog\n")

    monkeypatch.setattr(P, "_fetch", fake_fetch)
    assert P.load("simple_animals").train == ("cat", "dog")
    assert P.load("simple_animals").train == ("cat", "dog")
    assert calls == [P.SOURCES["simple_animals.txt"]]
    assert (tmp_path / "cache" / "prompts" / "simple_animals.txt").is_file()


def test_malformed_files_raise_prompt_error(tmp_path):
    (tmp_path / "DrawBench_Prompts.csv").write_text("text,kind\na,b\n")
    with pytest.raises(P.PromptError, match="'Prompts' and 'Category'"):
        P.load("drawbench", root=tmp_path)
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "template1_train.json").write_text('{"a": 1}')
    (tmp_path / "b2" / "template1_test.json").write_text("[]")
    with pytest.raises(P.PromptError, match="JSON list"):
        P.load("b2_template1", root=tmp_path)


def test_drawbench_split_rule_on_a_toy_table():
    rows = [("a", "X"), ("b", "X"), ("c", "Misspellings"), ("d", "X"), ("e", "Y"), ("f", "Y")]
    train, test = P.split_drawbench(rows)
    assert [p for p, _ in test] == ["a", "b", "e", "f"] and [p for p, _ in train] == ["d"]


def test_indefinite_article():
    assert [P.indefinite_article(w) for w in ("ant", "cat", "eagle", "unicorn", "hour")] == [
        "an",
        "a",
        "an",
        "a",
        "an",
    ]


def test_sampler_is_deterministic_given_the_key_and_in_range():
    key = jax.random.key(3)
    a, b = P.sample(range(7), key, 50), P.sample(range(7), key, 50)
    assert a.dtype == jnp.int32 and a.shape == (50,)
    np.testing.assert_array_equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < 7
    assert not np.array_equal(a, P.sample(range(7), jax.random.key(4), 50))
    assert P.sample(7, jax.random.PRNGKey(3), 5).shape == (5,)  # raw uint32[2] keys too
    np.testing.assert_array_equal(P.sample(7, 3, 50), a)  # an int seed means jax.random.key
    ps = P.PromptSet("t", ("x", "y", "z"))
    assert P.sample(ps, key, 4).shape == (4,)
    jitted = jax.jit(lambda k: P.sample(7, k, 50))(key)
    np.testing.assert_array_equal(jitted, a)


def test_sampler_is_uniform():
    n, k = 20_000, 10
    counts = np.bincount(np.asarray(P.sample(k, jax.random.key(0), n)), minlength=k)
    expected = n / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40.0, counts  # 9 dof: P(chi2 > 40) < 1e-5
    rng_counts = np.bincount(P.sample(k, np.random.default_rng(0), n), minlength=k)
    assert float(((rng_counts - expected) ** 2 / expected).sum()) < 40.0
    np.testing.assert_array_equal(
        P.sample(k, np.random.default_rng(5), 30), P.sample(k, np.random.default_rng(5), 30)
    )


def test_sampler_rejects_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(P.PromptError, match="no prompts"):
        P.sample([], key, 3)
    with pytest.raises(P.PromptError, match="single string"):
        P.sample("cat", key, 3)
    with pytest.raises(P.PromptError, match="non-negative"):
        P.sample(3, key, -1)
    with pytest.raises(P.PromptError, match="PRNG key"):
        P.sample(3, "seed", 2)


# ---------------------------------------------------------------------------------------------
# tfds: names (parsing and config checks need no tensorflow_datasets; reading: test_tfds.py)


@pytest.mark.parametrize(
    "name, dataset, split, hub",
    [
        ("tfds:parti_prompts", "parti_prompts", "", ""),
        ("tfds:coco_captions/2017:validation", "coco_captions/2017", "validation", ""),
        ("tfds:my_set:train[:10%]", "my_set", "train[:10%]", ""),
        ("tfds:huggingface:Owner/Parti-Prompts", "owner__parti_prompts", "", "Owner/Parti-Prompts"),
        ("tfds:huggingface:a/b/full-set:test", "a__b/full_set", "test", "a/b"),
    ],
)
def test_tfds_names_parse_into_dataset_config_and_split(name, dataset, split, hub):
    from dag_jax.data import tfds as tfds_source

    assert tfds_source.parse_name(name) == tfds_source.NameParts(dataset, split, hub)


@pytest.mark.parametrize(
    "name", ["tfds:", "tfds:a b", "tfds:a/b/c", "tfds:x:", "tfds:huggingface:solo", "parti"]
)
def test_bad_tfds_names_are_refused(name):
    from dag_jax.data import tfds as tfds_source

    with pytest.raises(P.PromptError, match="expected|empty split|not a TFDS"):
        tfds_source.parse_name(name)


def test_field_and_data_dir_are_for_tfds_names_only():
    with pytest.raises(P.PromptError, match="only read by 'tfds:'"):
        P.load("tiny_shapes", field="caption")


@pytest.mark.parametrize(
    "prompts, message",
    [
        ({"name": "tfds:parti_prompts"}, "prompts.field must name the text feature"),
        ({"name": "tfds:a b", "field": "x"}, "config.prompts.name: prompt source"),
        ({"name": "tfds:p", "field": "x", "root": "/x"}, "prompts.root is not read"),
        ({"name": "tiny_shapes", "field": "caption"}, "prompts.field is only read for 'tfds:'"),
        ({"name": "tiny_shapes", "data_dir": "/d"}, "prompts.data_dir is only read for 'tfds:'"),
    ],
)
def test_config_checks_tfds_keys_before_anything_loads(prompts, message):
    from dag_jax.configs import base
    from dag_jax.train.config import ConfigError, check_prompts

    cfg = base.get_config()
    cfg.prompts.update(prompts)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_prompts(cfg)
    cfg.prompts.update({"name": "tfds:parti_prompts", "field": "Prompt", "root": ""})
    check_prompts(cfg)  # a well-formed tfds: source passes (nothing is read yet)
