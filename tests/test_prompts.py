"""Prompt sets (SPEC §8): counts and split rules on the reference files, errors, the sampler."""

from __future__ import annotations

import csv
import json
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
def test_env_var_is_the_root_when_none_is_given(monkeypatch):
    monkeypatch.setenv(P.ENV_ROOT, str(ROOT))
    assert len(P.load("drawbench").train) == 165


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
