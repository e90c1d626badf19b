"""Every missing input of a config reported at once, before anything is written."""

from __future__ import annotations

import pytest

from dag_jax import configs
from dag_jax.train import inputs
from dag_jax.train.inputs import MissingInputs, check_inputs, config_inputs, find


def tiny(**overrides):
    return configs.load("configs/compressibility.py:tiny", overrides)


def test_missing_model_prompt_file_and_reward_file_are_reported_together(tmp_path):
    from dag_jax import train

    (tmp_path / "prompts").mkdir()
    workdir = tmp_path / "run"
    workdir.mkdir()
    cfg = tiny(model=str(tmp_path / "no_model"))
    cfg.prompts.name = "simple_animals"
    cfg.prompts.root = str(tmp_path / "prompts")
    cfg.reward.name = "hpsv2"
    cfg.reward.options.checkpoint = str(tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(MissingInputs) as caught:
        train.train_and_evaluate(cfg, str(workdir))
    message = str(caught.value)
    assert message.startswith("3 inputs of the config are missing")
    for expected in (
        "no such folder",
        "--config.model",
        "simple_animals.txt",
        "--config.prompts.root",
        "ddpo-pytorch",  # where to get the prompt file
        "HPS_v2.1_compressed.pt",
        "--config.reward.options.checkpoint",
        "huggingface.co/xswu/HPSv2",
    ):
        assert expected in message, expected
    assert list(workdir.iterdir()) == []
    with pytest.raises(MissingInputs):  # a workdir that does not exist yet is not created
        train.train_and_evaluate(cfg, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_the_tiny_world_needs_nothing_but_its_shipped_files():
    findings = check_inputs(tiny())
    assert [f.input.what for f in findings] == ["the diffusion model"]
    assert findings[0].status == "ok"
    cfg = configs.load("configs/alignment.py:tiny")
    assert {f.status for f in check_inputs(cfg)} == {"ok"}  # its tiny CLIP reward too


def test_a_hub_id_is_downloaded_unless_offline_or_cached(monkeypatch):
    cfg = tiny(model="owner/some-model")
    item = config_inputs(cfg)[0]
    monkeypatch.setattr(inputs, "hub_offline", lambda: True)
    finding = find(item)
    assert finding.status == "missing" and "HF_HUB_OFFLINE" in finding.detail
    monkeypatch.setattr(inputs, "hub_offline", lambda: False)
    online = find(item)
    assert online.status == "download" and "huggingface.co/owner/some-model" in online.detail
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/x")
    assert find(item).status == "ok"


def test_the_prompt_cache_downloads_and_a_required_reward_option_must_be_given(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("DAG_JAX_PROMPTS", raising=False)
    monkeypatch.setenv("DAG_JAX_CACHE", str(tmp_path))
    cfg = tiny()
    cfg.prompts.name = "imagenet_animals"
    cfg.reward.name = "aesthetic"
    cfg.reward.options.clip = str(tmp_path / "clip")
    (tmp_path / "clip").mkdir()  # a folder, but not a CLIP folder
    found = {f.input.what: f for f in map(find, config_inputs(cfg))}
    prompt = found["prompt file imagenet_classes.txt of prompt set 'imagenet_animals'"]
    assert prompt.status == "download" and str(tmp_path / "prompts") in prompt.input.value
    head = found["reward 'aesthetic' option head"]
    assert head.status == "missing" and "improved-aesthetic-predictor" in head.input.source
    clip = found["reward 'aesthetic' option clip"]
    assert clip.status == "missing" and "holds no config.json" in clip.detail


def test_mix_parts_unknown_prompt_sets_and_stray_paths_are_named(tmp_path):
    cfg = tiny()
    cfg.prompts.name = "simple_animal"
    names = inputs.reward_inputs(
        "mix",
        {
            "parts": {
                "ir": {"reward": "imagereward", "options": {"med_config": "/no/med.json"}},
                "jpeg": {"reward": "jpeg_compressibility"},
            }
        },
    )
    med = [i for i in names if i.what.endswith("med_config")]
    assert med and med[0].flag.startswith("--config.reward.options.parts.ir.options.med_config")
    assert find(med[0]).status == "missing"
    stray = inputs.reward_inputs("pickscore", {"tokenizer": str(tmp_path / "tok")})
    assert [find(i).status for i in stray if i.what.endswith("tokenizer")] == ["missing"]
    with pytest.raises(MissingInputs, match="did you mean 'simple_animals'"):
        check_inputs(cfg)
