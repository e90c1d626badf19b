"""PickScore on the Linen CLIP against transformers' CLIPModel and PickScore's own formula.

The reference is PickScore's scoring code on a small random transformers ``CLIPModel`` of the
release's family (exact-erf GELU in both towers, a projection, ``logit_scale`` = ln 100 as
released), saved with ``save_pretrained`` beside a CLIP tokenizer (the tiny world's BPE files):
``CLIPImageProcessor`` (PIL path) and the tokenizer with ``padding=True, truncation=True,
max_length=77`` → ``get_image_features`` / ``get_text_features`` → L2 norm →
``logit_scale.exp() * text_embs @ image_embs.T``. Everything is fp32 and the preprocessing is
bit-exact, so only float32 summation orders differ: measured max relative |Δ| 2.8e-7 (square)
and 5.9e-7 (cropped) of the largest score (printed with ``-s``). The bound is 1e-4 relative,
while real mistakes move the scores far more: quick_gelu instead of GELU by 1.7e-2 relative,
``preprocess="jax"`` (float resize, no PIL rounding) by 7.4e-3 (both measured on the square case).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file, save_file

import dag_jax.rewards as R
from dag_jax.rewards import pickscore as ps
from dag_jax.rewards.base import RewardError
from dag_jax.tinyworld.assets import TINY_CLIP
from dag_jax.weights import remote

REL_TOL = 1e-4
VOCAB = 578  # the tiny world's CLIP BPE: the tokenizer used here
# PickScore_v1's architecture family at toy sizes: GELU, projection, logit_scale = ln 100.
SMALL = {
    "projection_dim": 24,
    "logit_scale_init_value": math.log(100.0),
    "text_config": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=576,  # the tokenizer's; ids 576, 577 are BOS and EOS (= pad)
        pad_token_id=577,
        eos_token_id=2,  # transformers' legacy rule: pool at the highest id (CLIP's EOS)
    ),
    "vision_config": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        hidden_act="gelu",
    ),
}
PROMPTS = ["a red circle", "A BLUE square, twice!", "", "big " * 60]


@functools.cache
def _torch_model() -> transformers.CLIPModel:
    model = transformers.CLIPModel(transformers.CLIPConfig(**SMALL))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _write_tokenizer(folder: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TINY_CLIP / name, folder / name)
    config = json.loads((TINY_CLIP / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pickscore") / "PickScore_small"
    _torch_model().save_pretrained(path)
    _write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def reward(folder):
    return R.get("pickscore", model=folder)


def _images(b: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((b, h, w, 3)).astype(np.float32)


def _torch_pickscore(folder: Path, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """PickScore's calc_probs scoring, one prompt at a time, on the uint8 images."""
    size = SMALL["vision_config"]["image_size"]
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    model = _torch_model()
    u8 = np.round(images * 255).astype(np.uint8)
    out = []
    with torch.no_grad():
        for image, prompt in zip(u8, prompts):
            pixels = processor(images=[Image.fromarray(image)], return_tensors="pt")
            text = tok(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            img = model.get_image_features(pixel_values=pixels["pixel_values"])
            txt = model.get_text_features(**text)
            img = img if isinstance(img, torch.Tensor) else img.pooler_output
            txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append(float((model.logit_scale.exp() * txt @ img.T)[0, 0]))
    return np.asarray(out)


@pytest.mark.parametrize("shape", [(4, 64, 64), (4, 48, 40)], ids=["square", "crop"])
def test_pickscore_matches_transformers_and_pickscores_formula(reward, folder, shape):
    x = _images(*shape, seed=shape[1])
    got = np.asarray(reward(x, PROMPTS))
    want = _torch_pickscore(folder, x, PROMPTS)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"\npickscore {shape}: max rel |Δ| {rel:.3g} (scores {np.round(want, 3).tolist()})")
    assert got.shape == (shape[0],) and got.dtype == np.float32
    assert rel <= REL_TOL
    assert np.ptp(want) > 0.1  # the perturbed towers tell the pairs apart
    assert reward.jittable and reward.config["preprocess"] == "pil"


def test_pickscore_inside_jit_takes_prompt_indices_and_has_no_gradient(reward):
    x = jnp.asarray(_images(4, 32, 32, seed=3))
    eager = reward(x, ["a", "b", "a", "b"])
    fn = jax.jit(reward.bound_with_params(["a", "b"]))
    idx = jnp.array([0, 1, 0, 1], jnp.int32)
    np.testing.assert_allclose(fn(reward.params, x, idx), eager, rtol=1e-6, atol=1e-5)
    grad = jax.grad(lambda im: fn(reward.params, im, idx).sum())(x)
    np.testing.assert_array_equal(grad, 0.0)


def _rewrite(src: Path, dest: Path, change) -> Path:
    shutil.copytree(src, dest)
    state = load_file(str(dest / "model.safetensors"))
    save_file(change(state), str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_wrong_keys_and_shapes_are_named(folder, tmp_path):
    def rename(state):
        state["visual_proj.weight"] = state.pop("visual_projection.weight")
        return state

    def reshape(state):
        state["text_projection.weight"] = state["text_projection.weight"][:, :-1]
        return state

    bad = _rewrite(folder, tmp_path / "renamed", rename)
    with pytest.raises(RewardError, match=r"(?s)missing keys.*visual_projection\.weight") as e:
        R.get("pickscore", model=bad)
    assert "unexpected keys" in str(e.value) and "visual_proj.weight" in str(e.value)
    bad = _rewrite(folder, tmp_path / "reshaped", reshape)
    with pytest.raises(RewardError, match=r"text_projection\.weight: checkpoint \(24, 31\)"):
        R.get("pickscore", model=bad)


def test_bad_options_and_missing_files_say_what_to_pass(folder, tmp_path):
    with pytest.raises(RewardError, match="could not find the model.*PickScore_v1"):
        R.get("pickscore", model=tmp_path / "nowhere")
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("vocab.json", "merges.txt"))
    (bare / "tokenizer_config.json").unlink()
    with pytest.raises(RewardError, match="has no CLIP tokenizer.*pass tokenizer="):
        R.get("pickscore", model=bare)
    assert R.get("pickscore", model=bare, tokenizer=folder).config["tokenizer"] == str(folder)
    with pytest.raises(RewardError, match="dtype must be one of"):
        R.get("pickscore", model=folder, dtype="int8")
    with pytest.raises(RewardError, match="preprocess must be one of"):
        R.get("pickscore", model=folder, preprocess="torch")
    with pytest.raises(RewardError, match="no option"):
        R.get("pickscore", checkpoint=folder)


def test_token_table_keeps_eos_when_truncating(folder):
    tok = ps.load_tokenizer(folder)
    table = ps.token_table(tok, ["a red circle", "big " * 100], 77)
    assert table.shape == (2, 2, 77) and table.dtype == np.int32
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert table[1, 0, -1] == eos and table[1, 1].all()  # truncated: EOS last, no padding
    assert table[0, 0, int(table[0, 1].sum()) - 1] == eos and not table[0, 1, -1]


def test_a_bucket_folder_is_copied_once_into_the_cache(folder, tmp_path):
    assert remote.is_url("gs://bucket/models/PickScore_v1")
    assert not remote.is_url("yuvalkirstain/PickScore_v1") and not remote.is_url(str(folder))
    dest = remote.cache_folder("gs://bucket/models/PickScore_v1", tmp_path)
    assert dest.name.startswith("PickScore_v1-") and dest.parent == tmp_path
    copied = remote.copy_folder(folder, dest)
    names = sorted(p.name for p in copied.iterdir())
    assert names == sorted(p.name for p in folder.iterdir() if p.is_file())
    weights = copied / "model.safetensors"
    assert weights.read_bytes() == (folder / "model.safetensors").read_bytes()
    mtime = weights.stat().st_mtime_ns
    remote.copy_folder(folder, dest)  # same sizes: nothing fetched again
    assert weights.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="not a bucket URL"):
        remote.local_copy("ftp://host/x", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        remote.copy_folder(tmp_path / "absent", tmp_path / "out")


def test_the_reward_bench_times_pickscore_beside_its_pytorch_reference():
    from dag_jax.bench.common import Settings
    from dag_jax.bench.reward import bench_reward

    settings = Settings(model="tiny", batch=2, repeats=1, warmup=0, reward="pickscore")
    records = bench_reward(settings)
    got = {(r["impl"], r["metric"]) for r in records}
    assert got == {
        ("dag_jax", "images_per_s"),
        ("dag_jax", "batch_s"),
        ("dag_jax", "compile_s"),
        ("torch_ref", "images_per_s"),
        ("torch_ref", "batch_s"),
    }
    assert all(r["config"]["reward"] == "pickscore" and r["value"] > 0 for r in records)
