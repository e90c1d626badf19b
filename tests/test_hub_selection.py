"""Hub downloads take one precision of the parts a load reads (an offline, listed repo)."""

from __future__ import annotations

import pytest

from dag_jax.weights import diffusers as folder

# The listing of stable-diffusion-v1-5/stable-diffusion-v1-5 (abridged to what matters).
SD15 = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
WEIGHTS = (".safetensors", ".bin", ".ckpt")


def weights(files: list[str]) -> list[str]:
    return sorted(f for f in files if f.endswith(WEIGHTS))


def test_the_default_takes_the_full_precision_safetensors_of_the_loaded_parts_only():
    chosen = folder.hub_selection(SD15)
    assert weights(chosen) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert {"model_index.json", "unet/config.json", "tokenizer/vocab.json"} <= set(chosen)
    assert "tokenizer/merges.txt" in chosen and "scheduler/scheduler_config.json" in chosen


def test_a_variant_takes_that_precision_alone():
    assert weights(folder.hub_selection(SD15, "fp16")) == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]


def test_shards_come_with_their_index_and_bin_only_without_safetensors():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
    ]
    chosen = folder.hub_selection(files)
    assert weights(chosen) == [
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ]
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in chosen


def test_a_missing_variant_names_the_part_and_what_the_repo_has():
    files = ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(FileNotFoundError, match="no vae weights of variant 'fp16'.*safetensors"):
        folder.hub_selection(files, "fp16")


def test_a_transformers_repo_keeps_its_root_weights():
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"]
    assert weights(folder.hub_selection(files, parts=("",))) == ["model.safetensors"]


def test_resolve_downloads_exactly_the_selection(monkeypatch, tmp_path):
    import huggingface_hub

    asked = {}

    class Listing:
        def list_repo_files(self, repo, revision=None):
            asked["listed"] = (repo, revision)
            return SD15

    def download(repo, revision=None, allow_patterns=None):
        asked["download"] = (repo, revision, sorted(allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "HfApi", Listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert folder.resolve(repo, revision="main", variant="fp16") == tmp_path
    assert asked["listed"] == (repo, "main")
    assert asked["download"][2] == sorted(folder.hub_selection(SD15, "fp16"))
