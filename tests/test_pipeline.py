"""Loading a diffusers folder, sampling it, and writing it back (offline, tiny models)."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util

import dag_jax
from dag_jax.models.vae import AutoencoderKL
from dag_jax.sample import generate
from dag_jax.weights.convert import LEGACY_ATTENTION, WeightsError

PROMPTS = ["a cat on the mat", "the dog"]


def _latents(batch=2):
    return np.random.RandomState(0).randn(batch, 4, 32, 32).astype(np.float32)


def _assert_same_params(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_text_encoder_and_vae_match_pytorch(torch_sd1, sd1):
    tp = torch_sd1[0]
    ids = sd1.encode_prompt_ids(PROMPTS)
    ours = sd1.encode_text(sd1.params["text_encoder"], ids)
    with torch.no_grad():
        ref = tp.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    z = _latents()
    img = sd1.vae.apply({"params": sd1.params["vae"]}, z, method=AutoencoderKL.decode).sample
    with torch.no_grad():
        ref = tp.vae.decode(torch.from_numpy(z)).sample.numpy()
    assert np.abs(np.asarray(img) - ref).max() <= 1e-4


def test_ddim_pipeline_matches_diffusers(torch_sd1, sd1):
    tp, z = torch_sd1[0], _latents()
    ours = generate(sd1, PROMPTS, steps=10, guidance=7.5, eta=0.0, latents=z)
    ref = tp(
        PROMPTS,
        num_inference_steps=10,
        guidance_scale=7.5,
        eta=0.0,
        latents=torch.from_numpy(z),
        output_type="np",
    ).images
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(ours - ref).max() <= 1e-3


def test_saved_folder_loads_in_diffusers_with_identical_outputs(torch_sd1, sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = dag_jax.save_pipeline(sd1, tmp_path / "export")
    assert not list((tmp_path / "export").rglob("*.bin"))
    reloaded = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    z = torch.from_numpy(_latents())
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, latents=z, output_type="np")
    a = torch_sd1[0](PROMPTS, **kwargs).images
    b = reloaded(PROMPTS, **kwargs).images
    np.testing.assert_array_equal(a, b)
    again = dag_jax.load_pipeline(out)
    for part in dag_jax.pipeline.PARTS:
        _assert_same_params(sd1.params[part], again.params[part])


def test_save_refuses_a_non_empty_folder_and_keeps_it(sd1, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        dag_jax.save_pipeline(sd1, out)
    assert (out / "keep.txt").read_text() == "precious"
    dag_jax.save_pipeline(sd1, out, overwrite=True)
    assert (out / "model_index.json").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_legacy_flax_msgpack_loads_through_the_same_loader(torch_sd1, sd1, tmp_path):
    root = _copy(torch_sd1[1], tmp_path / "legacy")
    inverse = {v: k for k, v in LEGACY_ATTENTION.items()}
    for part, name in [
        ("unet", "diffusion_flax_model.msgpack"),
        ("vae", "diffusion_flax_model.msgpack"),
        ("text_encoder", "flax_model.msgpack"),
    ]:
        for f in (root / part).glob("*.safetensors"):
            f.unlink()
        flat = traverse_util.flatten_dict(sd1.params[part])
        if part == "vae":  # diffusers-Flax named the VAE attention query/key/value/proj_attn
            flat = {tuple(inverse.get(s, s) for s in k[:-1]) + k[-1:]: v for k, v in flat.items()}
        tree = traverse_util.unflatten_dict(flat)
        (root / part / name).write_bytes(serialization.msgpack_serialize(tree))
    legacy = dag_jax.load_pipeline(root)
    for part in dag_jax.pipeline.PARTS:
        _assert_same_params(sd1.params[part], legacy.params[part])


def test_tokenizer_loads_from_vocab_and_merges_or_tokenizer_json(torch_sd1, sd1, tmp_path):
    from dag_jax.pipeline import load_tokenizer
    from dag_jax.tinyworld.random_tiny import write_byte_tokenizer

    bpe = load_tokenizer(write_byte_tokenizer(tmp_path / "bpe"))
    assert (torch_sd1[1] / "tokenizer" / "tokenizer.json").is_file()
    ids = sd1.encode_prompt_ids(PROMPTS)
    np.testing.assert_array_equal(
        bpe(PROMPTS, padding="max_length", max_length=77)["input_ids"], ids
    )
    assert ids.shape == (2, 77)


def test_missing_weight_file_names_the_folder(torch_sd1, tmp_path):
    root = _copy(torch_sd1[1], tmp_path / "m")
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weight file in .*vae"):
        dag_jax.load_pipeline(root)


def test_truncated_safetensors_is_reported(torch_sd1, tmp_path):
    root = _copy(torch_sd1[1], tmp_path / "t")
    f = root / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"truncated or corrupt"):
        dag_jax.load_pipeline(root)


def test_config_that_disagrees_with_weights_lists_the_mismatch(torch_sd1, tmp_path):
    root = _copy(torch_sd1[1], tmp_path / "c")
    cfg_path = root / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError) as err:
        dag_jax.load_pipeline(root)
    msg = str(err.value)
    assert "weights do not fit unet" in msg and "shape mismatches" in msg
    assert "attn2.to_k.weight" in msg and "model expects (48, 64)" in msg


def test_missing_folder_and_unreachable_hub_id_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dag_jax.load_pipeline(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="could not be listed on the hub"):
        dag_jax.load_pipeline("nobody-xyz/not-a-model")


def test_random_tiny_pipeline_samples_and_is_deterministic():
    from dag_jax.tinyworld.random_tiny import random_tiny_pipeline

    pipe = random_tiny_pipeline(0)
    a = generate(pipe, ["a cat"], steps=2, guidance=5.0, eta=1.0, seed=3)
    b = generate(pipe, ["a cat"], steps=2, guidance=5.0, eta=1.0, seed=3)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_leaves(pipe.params)[0].dtype == np.float32
