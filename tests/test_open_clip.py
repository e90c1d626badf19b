"""OpenCLIP ViT (ViT-H-14 / HPS v2 layout) → Linen CLIPModel: parity with open_clip (tiny, fp32)."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dag_jax.weights.clip_loader import build_clip
from dag_jax.weights.convert import WeightsError, torch_to_linen
from dag_jax.weights.open_clip import (
    OPEN_CLIP_CONFIGS,
    clip_config_from_open_clip,
    convert_state_dict,
    load_open_clip,
    open_clip_token_ids,
    read_open_clip_checkpoint,
)

open_clip = pytest.importorskip("open_clip")

TOL = 1e-4
IMAGE = 32
VOCAB = 1000
SOT, EOT = VOCAB - 2, VOCAB - 1
EOS_AT = (9, 40)
PACKAGE_CONFIGS = Path(open_clip.__file__).parent / "model_configs"
# Only the sizes change; every other setting is ViT-H-14's (OpenCLIP's defaults).
SIZES = {
    "embed_dim": 16,
    "vision_cfg": dict(image_size=IMAGE, layers=2, width=48, head_width=12, patch_size=8),
    "text_cfg": dict(context_length=77, vocab_size=VOCAB, width=32, heads=4, layers=2),
}


def package_config(name: str) -> dict:
    """Return the installed open_clip's model config JSON."""
    return json.loads((PACKAGE_CONFIGS / f"{name}.json").read_text())


def tiny_config(quick_gelu: bool) -> dict:
    """Return ViT-H-14's OpenCLIP config (or its -quickgelu twin) with tiny sizes."""
    cfg = package_config("ViT-H-14-quickgelu" if quick_gelu else "ViT-H-14")
    tiny = copy.deepcopy(cfg)
    tiny["embed_dim"] = SIZES["embed_dim"]
    for tower in ("vision_cfg", "text_cfg"):
        assert set(tiny[tower]) == set(SIZES[tower]), "ViT-H-14 gained non-size settings"
        tiny[tower].update(SIZES[tower])
    return tiny


@functools.cache
def torch_model(quick_gelu: bool = False) -> torch.nn.Module:
    """Return a tiny open_clip CLIP (eval mode) with every weight perturbed."""
    torch.manual_seed(1)
    model = open_clip.CLIP(**tiny_config(quick_gelu)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Return the model's state dict as numpy arrays (OpenCLIP names)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.cache
def linen_setup(quick_gelu: bool = False):
    """Return (open_clip model, Linen CLIPModel, converted params)."""
    tm = torch_model(quick_gelu)
    module, shapes = build_clip(clip_config_from_open_clip(tiny_config(quick_gelu)))
    return tm, module, torch_to_linen(convert_state_dict(numpy_state_dict(tm)), shapes)


def pixels(seed: int = 0) -> np.ndarray:
    """Return random NCHW pixel values."""
    return np.random.default_rng(seed).normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)


def token_ids(seed: int = 0) -> np.ndarray:
    """Return OpenCLIP-style ids: SOT, random tokens, EOT (the highest id), then 0-padding."""
    ids = np.random.default_rng(seed).integers(1, SOT, (2, 77))
    ids[:, 0] = SOT
    for row, pos in enumerate(EOS_AT):
        ids[row, pos] = EOT
        ids[row, pos + 1 :] = 0
    return ids


def max_err(got, want: torch.Tensor) -> float:
    """Return max |got - want| after checking the shapes agree."""
    got, want = np.asarray(got, np.float32), want.detach().numpy()
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.max(np.abs(got - want)))


def check_features(module, params, tm, seed: int = 0) -> None:
    """Assert get_image/text_features equal open_clip's encode_image/encode_text."""
    px, ids = pixels(seed), token_ids(seed)
    with torch.no_grad():
        want_img = tm.encode_image(torch.from_numpy(px))
        want_txt = tm.encode_text(torch.from_numpy(ids))
    img = module.apply({"params": params}, jnp.asarray(px), method="get_image_features")
    txt = module.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
    assert max_err(img, want_img) <= TOL, max_err(img, want_img)
    assert max_err(txt, want_txt) <= TOL, max_err(txt, want_txt)


def test_tiny_model_uses_vit_h_14_settings():
    assert package_config("ViT-H-14") == OPEN_CLIP_CONFIGS["ViT-H-14"]
    tm = torch_model()
    assert tm.visual.pool_type == "tok" and tm.visual.attn_pool is None
    assert tm.text_pool_type == "argmax"
    assert isinstance(tm.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    quick = torch_model(True).transformer.resblocks[0].mlp.gelu
    assert isinstance(quick, open_clip.transformer.QuickGELU)
    assert torch.equal(tm.attn_mask, torch.full((77, 77), float("-inf")).triu(1))  # causal only


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_features_match_open_clip(quick_gelu):
    tm, module, params = linen_setup(quick_gelu)
    assert module.config.vision.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    check_features(module, params, tm)


def test_logits_match_open_clip():
    tm, module, params = linen_setup()
    px, ids = pixels(1), token_ids(1)
    with torch.no_grad():
        want, _ = tm.get_logits(torch.from_numpy(px), torch.from_numpy(ids))
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(px))
    assert max_err(out.logits_per_image, want) <= TOL


def test_derived_config_matches_vit_h_14():
    cfg = clip_config_from_open_clip("ViT-H-14")
    vision, text = cfg["vision_config"], cfg["text_config"]
    assert cfg["projection_dim"] == 1024
    assert (vision["hidden_size"], vision["intermediate_size"]) == (1280, 5120)
    assert (vision["num_hidden_layers"], vision["num_attention_heads"]) == (32, 16)
    assert (vision["image_size"], vision["patch_size"], vision["hidden_act"]) == (224, 14, "gelu")
    assert (text["hidden_size"], text["intermediate_size"]) == (1024, 4096)
    assert (text["num_hidden_layers"], text["num_attention_heads"]) == (24, 16)
    assert (text["vocab_size"], text["max_position_embeddings"]) == (49408, 77)
    assert (text["eos_token_id"], text["pad_token_id"], text["bos_token_id"]) == (2, 0, 49406)
    quick = clip_config_from_open_clip(PACKAGE_CONFIGS / "ViT-H-14-quickgelu.json")
    assert quick["text_config"]["hidden_act"] == "quick_gelu"
    forced = clip_config_from_open_clip("ViT-H-14", quick_gelu=True)
    assert forced["vision_config"]["hidden_act"] == "quick_gelu"


@pytest.mark.parametrize(
    "change, match",
    [
        (("vision_cfg", "pool_type", "avg"), "pool_type"),
        (("vision_cfg", "ls_init_value", 1e-5), "ls_init_value"),
        (("text_cfg", "pool_type", "eos"), "pool_type"),
        (("text_cfg", "hf_model_name", "bert-base-uncased"), "hf_model_name"),
        ((None, "custom_text", True), "custom_text"),
    ],
)
def test_unsupported_configs_are_refused(change, match):
    cfg = tiny_config(False)
    tower, key, value = change
    (cfg[tower] if tower else cfg)[key] = value
    with pytest.raises(ValueError, match=match):
        clip_config_from_open_clip(cfg)
    with pytest.raises(FileNotFoundError, match="ViT-Q-99"):
        clip_config_from_open_clip("ViT-Q-99")


def test_load_safetensors(tmp_path):
    from safetensors.numpy import save_file

    tm, _, _ = linen_setup()
    path = tmp_path / "open_clip_model.safetensors"
    save_file(numpy_state_dict(tm), str(path))
    module, params, config = load_open_clip(path, tiny_config(False))
    assert config["text_config"]["eos_token_id"] == 2
    check_features(module, params, tm, seed=2)


def test_load_hpsv2_style_checkpoint(tmp_path):
    """HPS v2 files: {"epoch", "state_dict": DDP ``module.``-prefixed weights, ...}."""
    tm, _, _ = linen_setup()
    path = tmp_path / "HPS_v2_compressed.pt"
    state = {f"module.{k}": v for k, v in tm.state_dict().items()}
    state["module.attn_mask"] = tm.attn_mask  # older open_clip versions saved it
    torch.save({"epoch": 3, "name": "hps", "state_dict": state}, path)
    assert "module.visual.proj" in read_open_clip_checkpoint(path)  # raw: unwrapped, not renamed
    module, params, _ = load_open_clip(path, tiny_config(False))
    check_features(module, params, tm, seed=3)


def test_missing_file_and_bad_weights_are_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_open_clip(missing, tiny_config(False))
    tm, _, _ = linen_setup()
    sd = numpy_state_dict(tm)
    sd["visual.transformer.resblocks.1.attn.in_proj_weight"] = np.zeros((144, 40), np.float32)
    del sd["ln_final.bias"]
    sd["visual.head.weight"] = np.zeros((3, 3), np.float32)
    path = tmp_path / "bad.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    with pytest.raises(WeightsError) as info:
        load_open_clip(path, tiny_config(False))
    msg = str(info.value)
    assert str(path) in msg
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in msg  # mis-shaped
    assert "text_model.final_layer_norm.bias" in msg  # missing
    assert "visual.head.weight" in msg  # unexpected
    not_tensors = tmp_path / "not_tensors.pt"
    torch.save({"epoch": 1}, not_tensors)
    with pytest.raises(WeightsError, match="no tensors"):
        read_open_clip_checkpoint(not_tensors)


def test_convert_splits_fused_qkv_and_transposes_projections():
    tm, _, _ = linen_setup()
    sd = numpy_state_dict(tm)
    out = convert_state_dict(sd)
    fused = sd["transformer.resblocks.0.attn.in_proj_weight"]
    for i, name in enumerate("qkv"):
        part = out[f"text_model.encoder.layers.0.self_attn.{name}_proj.weight"]
        np.testing.assert_array_equal(part, fused[32 * i : 32 * (i + 1)])
    np.testing.assert_array_equal(out["visual_projection.weight"], sd["visual.proj"].T)
    np.testing.assert_array_equal(out["text_projection.weight"], sd["text_projection"].T)
    assert out["logit_scale"].shape == ()
    assert not any(k.startswith(("visual.", "transformer.")) for k in out)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """Return a transformers CLIPTokenizer built from open_clip's own BPE file (49408 ids)."""
    import transformers
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def test_token_ids_match_open_clip_tokenize(bpe_tokenizer):
    prompts = [
        "a photo of a cat",
        "A  Photograph of an astronaut riding a horse, trending on ArtStation!",
        "ice-cream & café 42",
        " ".join(["a very long prompt"] * 40),  # truncated to 77 with EOT last
    ]
    got = open_clip_token_ids(bpe_tokenizer, prompts)
    want = open_clip.tokenize(prompts).numpy()
    assert got.dtype == np.int32 and got.shape == (4, 77)
    np.testing.assert_array_equal(got, want)
    assert got[3, -1] == 49407 and got[0, 0] == 49406 and got[0, -1] == 0
    np.testing.assert_array_equal(open_clip_token_ids(bpe_tokenizer, "a photo of a cat"), got[:1])


def test_token_ids_refuse_eos_below_other_ids(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.add_tokens(["qqzzxq"])
    with pytest.raises(ValueError, match="highest id"):
        open_clip_token_ids(tok, ["a qqzzxq photo"])
