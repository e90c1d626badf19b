"""The sampling CLI writes PNGs for a diffusers folder and for the random tiny model."""

import subprocess
import sys

from PIL import Image


def _run(*args, cwd):
    cmd = [sys.executable, "-m", "dag_jax.sample", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_sample_cli_writes_pngs(torch_sd1, tmp_path):
    out = tmp_path / "imgs"
    res = _run(
        f"--model={torch_sd1[1]}",
        "--prompt=a cat",
        "--prompt=the dog",
        "--num_images=2",
        "--steps=3",
        f"--out={out}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    assert Image.open(pngs[0]).size == (64, 64)
    assert "the dog" in (out / "prompts.txt").read_text()


def test_sample_cli_reports_a_missing_model(tmp_path):
    res = _run(f"--model={tmp_path / 'absent'}", "--steps=2", f"--out={tmp_path}", cwd=tmp_path)
    assert res.returncode != 0
    assert "does not exist" in res.stderr
