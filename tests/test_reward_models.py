"""CLIP-based rewards (aesthetic, clipscore, hpsv2) against PyTorch references, tiny and offline.

aesthetic: a tiny random transformers CLIPModel (32 px, 768-d projection) saved with
``save_pretrained`` + the real LAION head from ../shared, against transformers'
``CLIPImageProcessor`` (PIL path) → ``get_image_features`` → L2 norm → the head as a torch
``nn.Linear`` stack. clipscore / hpsv2: a tiny random open_clip ``CLIP`` with ViT-H-14's
settings and the full 49408-token vocabulary (so OpenCLIP's own tokenizer applies), against
open_clip's ``image_transform`` + ``get_tokenizer("ViT-H-14")`` + ``encode_image`` /
``encode_text`` → cosine. The shapes are the reward bench's ``--model=tiny`` towers.

Tolerances: everything is fp32 and the preprocessing is bit-exact (PIL emulation), so the only
differences are float32 summation orders in the towers (XLA vs torch): relative ~1e-7 per
op, growing to a few 1e-7 through the towers. Measured (printed with ``-s``; the random
init differs from run order to run order): aesthetic max |Δ| 4.8e-7 on scores ≈ 5 (the real
head's offset; ~1e-7 relative), clipscore / hpsv2 max |Δ| 1.1e-7 – 3.7e-7 on cosines of size
< 0.6. 1e-5 absolute leaves a > 20× margin, while real mistakes move the scores far more:
torchvision's crop offset replaced by transformers' (one pixel off on 35×32 images) changes
the cosines by 0.11, and ``preprocess="jax"`` alone by ~1e-3.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import dag_jax.rewards as R
from dag_jax.bench.reward import TINY_CLIP, TINY_OPEN_CLIP
from dag_jax.rewards import clipscore as cs
from dag_jax.rewards.base import RewardError

open_clip = pytest.importorskip("open_clip")

SHARED = Path(__file__).resolve().parents[2] / "shared"
HEAD = SHARED / "data" / "weights" / "sac+logos+ava1-l14-linearMSE.pth"
TOL = 1e-5
PROMPTS = [
    "a photo of a cat",
    "An  astronaut riding a HORSE, &amp; highly detailed!",
    "",
    "x " * 90,
]


def _images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, h, w, 3)).astype(np.float32)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def _report(what: str, got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    print(f"\n{what}: max |Δ| {err:.3g} (scores {np.round(want, 4).tolist()})")
    assert err <= TOL, f"{what}: max |Δ| {err:.3g} > {TOL}"
    return err


# ---------------------------------------------------------------------------------------------
# aesthetic


@functools.cache
def _torch_clip() -> transformers.CLIPModel:
    config = transformers.CLIPConfig(**TINY_CLIP)
    return _perturb(transformers.CLIPModel(config), seed=0)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aesthetic") / "clip"
    _torch_clip().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def aesthetic_reward(clip_folder):
    if not HEAD.is_file():
        pytest.skip(f"LAION head not found at {HEAD}")
    return R.get("aesthetic", clip=clip_folder, head=HEAD)


def _torch_aesthetic(images: np.ndarray) -> np.ndarray:
    """The reference: CLIPImageProcessor (PIL) → get_image_features → L2 norm → torch head."""
    size = TINY_CLIP["vision_config"]["image_size"]
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixels = processor(images=[Image.fromarray(im) for im in _u8(images)], return_tensors="pt")
    state = torch.load(HEAD, map_location="cpu", weights_only=True)
    head = torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    with torch.no_grad():
        out = _torch_clip().get_image_features(pixel_values=pixels["pixel_values"])
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return head(feats)[:, 0].numpy()


@pytest.mark.parametrize("shape", [(3, 48, 40), (2, 64, 64)], ids=["crop", "square"])
def test_aesthetic_matches_torch_reference(aesthetic_reward, shape):
    x = _images(*shape, seed=shape[1])
    got = aesthetic_reward(x, ["ignored"] * shape[0])
    assert got.dtype == jnp.float32 and got.shape == (shape[0],)
    _report(f"aesthetic {shape}", got, _torch_aesthetic(x))
    assert aesthetic_reward.jittable and aesthetic_reward.config["preprocess"] == "pil"


def test_aesthetic_inside_jit_and_vmap(aesthetic_reward):
    x = jnp.asarray(_images(4, 40, 40, seed=7))
    eager = aesthetic_reward(x, ["a", "b", "a", "b"])
    bound = jax.jit(aesthetic_reward.bind(["a", "b"]))
    idx = jnp.array([0, 1, 0, 1], jnp.int32)
    np.testing.assert_allclose(bound(x, idx), eager, atol=1e-6)
    vm = jax.jit(jax.vmap(aesthetic_reward.bind(["a", "b"])))(
        x.reshape(2, 2, 40, 40, 3), idx.reshape(2, 2)
    )
    np.testing.assert_allclose(vm.reshape(-1), eager, atol=1e-5)
    grad = jax.grad(lambda im: bound(im, idx).sum())(x)
    np.testing.assert_array_equal(grad, 0.0)  # black box


def test_aesthetic_errors(tmp_path, clip_folder):
    with pytest.raises(
        RewardError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*improved-aesthetic"
    ):
        R.get("aesthetic", clip=clip_folder)
    missing = tmp_path / "head.pth"
    with pytest.raises(RewardError, match=str(missing)):
        R.get("aesthetic", clip=clip_folder, head=missing)
    if not HEAD.is_file():
        pytest.skip(f"LAION head not found at {HEAD}")
    nope = tmp_path / "no_clip"
    with pytest.raises(RewardError, match=f"could not load the CLIP model.*{nope}"):
        R.get("aesthetic", clip=nope, head=HEAD)
    small = transformers.CLIPModel(transformers.CLIPConfig(**{**TINY_CLIP, "projection_dim": 16}))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(RewardError, match="16-d but the LAION head expects 768-d"):
        R.get("aesthetic", clip=tmp_path / "small", head=HEAD)
    with pytest.raises(RewardError, match="no option"):
        R.get("aesthetic", head=HEAD, clip_model="x")
    with pytest.raises(RewardError, match="preprocess must be one of"):
        R.get("aesthetic", clip=clip_folder, head=HEAD, preprocess="torch")
    with pytest.raises(RewardError, match="dtype must be one of"):
        R.get("aesthetic", clip=clip_folder, head=HEAD, dtype="int8")


# ---------------------------------------------------------------------------------------------
# clipscore / hpsv2


@functools.cache
def _torch_open_clip() -> torch.nn.Module:
    return _perturb(open_clip.CLIP(**TINY_OPEN_CLIP), seed=1)


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    state = {k: v.contiguous() for k, v in _torch_open_clip().state_dict().items()}
    save_file(state, str(root / "open_clip_model.safetensors"))
    torch.save({"epoch": 3, "state_dict": state}, root / "HPS_v2.1_compressed.pt")
    return {
        "safetensors": root / "open_clip_model.safetensors",
        "hps": root / "HPS_v2.1_compressed.pt",
    }


def _torch_cosine(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """The reference: open_clip's eval transform + tokenizer + encode_* → normalised → cosine."""
    model = _torch_open_clip()
    size = TINY_OPEN_CLIP["vision_cfg"]["image_size"]
    pretrained = open_clip.get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k")
    transform = open_clip.image_transform(
        size,
        is_train=False,
        mean=pretrained["mean"],
        std=pretrained["std"],
        interpolation=pretrained["interpolation"],
        resize_mode=pretrained["resize_mode"],
    )
    pixels = torch.stack([transform(Image.fromarray(im)) for im in _u8(images)])
    tokens = open_clip.get_tokenizer("ViT-H-14")(prompts)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    return (img * txt).sum(-1).numpy()


@pytest.fixture(scope="module")
def clipscore_reward(open_clip_files):
    return R.get(
        "clipscore", checkpoint=open_clip_files["safetensors"], model_config=TINY_OPEN_CLIP
    )


# 35×32 → no resize, crop offset round(1.5) = 2 (torchvision) vs 3 // 2 = 1 (transformers);
# 64×48 → downscale to 42×32, crop offset 5; 40×40 → square downscale.
@pytest.mark.parametrize("shape", [(4, 35, 32), (4, 64, 48), (4, 40, 40)])
def test_clipscore_matches_open_clip(clipscore_reward, shape):
    x = _images(*shape, seed=shape[1])
    got = clipscore_reward(x, PROMPTS)
    _report(f"clipscore {shape}", got, _torch_cosine(x, PROMPTS))


def test_clipscore_inside_jit_with_repeated_prompts(clipscore_reward):
    x = _images(4, 32, 32, seed=3)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[3]]
    want = _torch_cosine(x, prompts)
    bound = jax.jit(clipscore_reward.bind(PROMPTS))
    got = bound(jnp.asarray(x), jnp.array([0, 1, 0, 3], jnp.int32))
    _report("clipscore jit", got, want)


def test_hpsv2_reads_a_nested_state_dict(open_clip_files):
    reward = R.get("hpsv2", checkpoint=open_clip_files["hps"], model_config=TINY_OPEN_CLIP)
    assert reward.config["version"] == "v2.1"
    x = _images(4, 40, 40, seed=11)
    _report("hpsv2", reward(x, PROMPTS), _torch_cosine(x, PROMPTS))


def test_tokenizer_matches_open_clip_and_a_saved_folder(tmp_path):
    prompts = [*PROMPTS, "café naïve 🐱 &lt;b&gt;", "it's 3.14 o'clock", "  tabs\tand\nnewlines "]
    want = open_clip.get_tokenizer("ViT-H-14")(prompts).numpy()
    tok = cs.load_tokenizer(None)
    np.testing.assert_array_equal(cs.token_ids(tok, prompts), want)
    tok.save_pretrained(tmp_path / "tok")
    folder = cs.load_tokenizer(tmp_path / "tok")
    np.testing.assert_array_equal(cs.token_ids(folder, prompts), want)
    assert want.dtype.kind == "i" and cs.token_ids(tok, prompts).dtype == np.int32


def test_center_crop_offsets_follow_torchvision():
    assert cs.center_crop_offsets(35, 32, 32) == (2, 0)  # round(1.5) = 2
    assert cs.center_crop_offsets(37, 32, 32) == (2, 0)  # round(2.5) = 2 (half to even)
    assert cs.center_crop_offsets(32, 33, 32) == (0, 0)  # round(0.5) = 0


def test_clipscore_and_hpsv2_errors(tmp_path, open_clip_files, monkeypatch):
    with pytest.raises(RewardError, match="CLIP-ViT-H-14-laion2B-s32B-b79K"):
        R.get("clipscore")
    with pytest.raises(RewardError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):
        R.get("hpsv2")
    with pytest.raises(RewardError, match=r"HPS_v2_compressed\.pt"):
        R.get("hpsv2", version="v2.0")
    with pytest.raises(RewardError, match="version must be one of"):
        R.get("hpsv2", version="v3", checkpoint=open_clip_files["hps"])
    missing = tmp_path / "nope.bin"
    with pytest.raises(RewardError, match=f"could not load the OpenCLIP checkpoint.*{missing}"):
        R.get("clipscore", checkpoint=missing, model_config=TINY_OPEN_CLIP)
    with pytest.raises(RewardError, match="could not load"):  # tiny weights, ViT-H-14 shapes
        R.get("clipscore", checkpoint=open_clip_files["safetensors"])
    with pytest.raises(RewardError, match="no option"):
        R.get("clipscore", ckpt=missing)
    with pytest.raises(RewardError, match="tokenizer folder"):
        R.get("clipscore", checkpoint=missing, tokenizer=tmp_path / "no_tok")
    monkeypatch.setattr(cs, "open_clip_bpe_path", lambda: None)
    with pytest.raises(RewardError, match="tokenizer=<folder of a transformers CLIPTokenizer>"):
        R.get("clipscore", checkpoint=open_clip_files["safetensors"], model_config=TINY_OPEN_CLIP)
