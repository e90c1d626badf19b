"""Parity of the Linen Inception-v3 (FID pool features) with pytorch-fid and torchvision.

Weights are random (no Inception weights are available offline); BatchNorm's running
statistics are calibrated on a batch so activations stay O(1) through all 94 convolutions,
and its affine weights are randomised so a swapped scale/bias shows.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torchvision

from dag_jax.eval import features
from dag_jax.models.inception import InceptionV3, preprocess
from dag_jax.weights.convert import WeightsError
from dag_jax.weights.inception import inception_params, load_inception

pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")

RTOL = 5e-4  # of the feature scale, after ~100 fp32 layers on two backends (seen: 5e-5)


def _calibrated_state(model: torch.nn.Module, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Randomise BN affine weights, set running stats to one batch's, return the state dict."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=gen)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen)
            m.momentum = 1.0  # running stats := this batch's
    model.train()
    with torch.no_grad():
        model(2 * torch.rand(4, 3, size, size, generator=gen) - 1)
    model.eval()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fid_reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the layout of pytorch-fid's FID weights (1008 classes)."""
    torch.manual_seed(seed)
    model = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    for name, block in (
        ("Mixed_5b", pytorch_fid_inception.FIDInceptionA(192, pool_features=32)),
        ("Mixed_5c", pytorch_fid_inception.FIDInceptionA(256, pool_features=64)),
        ("Mixed_5d", pytorch_fid_inception.FIDInceptionA(288, pool_features=64)),
        ("Mixed_6b", pytorch_fid_inception.FIDInceptionC(768, channels_7x7=128)),
        ("Mixed_6c", pytorch_fid_inception.FIDInceptionC(768, channels_7x7=160)),
        ("Mixed_6d", pytorch_fid_inception.FIDInceptionC(768, channels_7x7=160)),
        ("Mixed_6e", pytorch_fid_inception.FIDInceptionC(768, channels_7x7=192)),
        ("Mixed_7b", pytorch_fid_inception.FIDInceptionE_1(1280)),
        ("Mixed_7c", pytorch_fid_inception.FIDInceptionE_2(2048)),
    ):
        setattr(model, name, block)
    return _calibrated_state(model, 299, seed)


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """(state dict, .pth path) of random FID-layout Inception weights."""
    state = _fid_reference_state()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return state, path


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Images on the uint8 grid (so the extractor's quantisation is exact)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3)) / 255.0).astype(np.float32)


def _close(ours: np.ndarray, ref: np.ndarray):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, atol=RTOL * scale, rtol=0)
    assert scale > 1e-3 and np.std(ref) > 1e-4 * scale  # the comparison is not of zeros


def test_fid_features_match_pytorch_fid(fid_weights, monkeypatch):
    state, path = fid_weights
    # pytorch-fid fetches its weights by URL; hand it ours instead.
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pytorch_fid_inception.InceptionV3([3]).eval()  # resize to 299, 2x − 1
    images = _images(2, 64, seed=1)
    with torch.no_grad():
        (pool,) = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    extractor = features.load_feature_extractor(f"inception:{path}")
    assert extractor.name == f"inception-fid:{path}"
    ours = extractor(images)
    assert ours.shape == (2, 2048) and ours.dtype == np.float32
    _close(ours, pool[:, :, 0, 0].numpy())


def test_torchvision_variant_matches_torchvision_and_differs_from_fid(tmp_path):
    torch.manual_seed(3)
    model = torchvision.models.inception_v3(
        weights=None, aux_logits=True, init_weights=False, transform_input=False
    )
    size = 107  # the stem and stride-2 blocks need ≥ 75; small keeps the test quick
    aux, model.AuxLogits = model.AuxLogits, None  # too small an input for the aux head
    _calibrated_state(model, size, seed=3)
    model.AuxLogits = aux  # back, so its keys are in the file (and must be dropped)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("AuxLogits.") for k in state)
    x = 2 * _images(2, size, seed=4) - 1
    model.fc = torch.nn.Identity()  # forward now ends at the pool features
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    # With the aux head and 1000 classes, saved as safetensors: all dropped or read off.
    from safetensors.torch import save_file

    path = tmp_path / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    module, params = load_inception(path)
    assert module.variant == "torchvision"
    ours = np.asarray(jax.jit(module.apply)({"params": params}, x))
    _close(ours, ref)
    # The same weights read as the FID graph pool differently (padding, Mixed_7c's max).
    fid = np.asarray(InceptionV3(variant="fid").apply({"params": params}, x))
    assert np.abs(fid - ref).max() > 10 * RTOL * np.abs(ref).max()


def test_preprocess_resizes_like_torch_bilinear_without_antialias():
    for size in (64, 512):  # up- and down-sampling to 299
        images = _images(1, size, seed=size)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(images).permute(0, 3, 1, 2),
            size=(299, 299),
            mode="bilinear",
            align_corners=False,
        )
        ours = np.asarray(preprocess(images))
        np.testing.assert_allclose(ours, 2 * ref.permute(0, 2, 3, 1).numpy() - 1, atol=1e-5)


def test_bad_weights_and_inputs_raise_clear_errors(fid_weights, tmp_path):
    state, path = fid_weights
    numpy_state = {k: v.float().numpy() for k, v in state.items()}
    broken = dict(numpy_state)
    del broken["Mixed_6b.branch7x7_2.conv.weight"]
    broken["Mixed_6b.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight") as err:
        inception_params(broken)
    assert "Mixed_6b.extra.weight" in str(err.value)
    wrong_classes = dict(numpy_state, **{"fc.weight": np.zeros((10, 2048), np.float32)})
    with pytest.raises(WeightsError, match="10 classes"):
        inception_params(wrong_classes)
    with pytest.raises(ValueError, match="unknown Inception-v3 variant 'tf'"):
        inception_params(numpy_state, variant="tf")
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        features.load_feature_extractor(f"inception:{tmp_path / 'no_such.pth'}")
    with pytest.raises(ValueError, match="at least 75"):
        InceptionV3().init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
