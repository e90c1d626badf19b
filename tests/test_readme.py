"""README's main job: the command it shows is the run BENCHMARKS.md measured ("The main job")."""

from __future__ import annotations

import shlex
from pathlib import Path

from dag_jax import configs

ROOT = Path(__file__).resolve().parents[1]


def main_job_argv() -> list[str]:
    """Return the arguments of README's first ``python -m dag_jax.train`` command."""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if "python -m dag_jax.train" in line:
            words = shlex.split(line.split("python -m dag_jax.train", 1)[1])
            return [w for w in words if w.startswith("--")]
    raise AssertionError("README shows no python -m dag_jax.train command")


def test_readme_main_job_is_dag_db_for_8_epochs_with_the_held_out_evaluation():
    argv = dict(a[2:].split("=", 1) for a in main_job_argv())
    spec = argv.pop("config")
    workdir = argv.pop("workdir")
    overrides = {k.removeprefix("config."): int(v) if v.isdigit() else v for k, v in argv.items()}
    config = configs.load(spec.removeprefix("configs/").removesuffix(".py").replace(".py:", ":"),
                          overrides)  # fmt: skip
    assert workdir == "runs/demo" and config.model == "tiny"
    assert (config.algo, config.train.epochs, config.reward.name) == (
        "dag_db",
        8,
        "jpeg_compressibility",
    )
    assert config.eval.every_epochs == 4 and config.eval.prompts == "test"
    bench = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    section = bench.split("## The main job", 1)[1].split("\n## ", 1)[0]
    assert "--config=configs/compressibility.py:demo --config.train.epochs=8" in section
