"""Rebuilding a run from its workdir: the config over the defaults, what is missing, the base.

The runs that restore trained checkpoints are in test_evaluate.py and test_export.py; here
workdirs are written by hand (config.json, checkpoints of stand-in trees), so nothing trains.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from dag_jax.infra import parallel
from dag_jax.infra.checkpoint import Checkpointer
from dag_jax.train.config import default_config
from dag_jax.train.workdir import checkpoint_steps, read_run_config, restore_run

ROOT = Path(__file__).resolve().parents[1]


def tiny_config() -> dict:
    """Return compressibility.py:tiny as a dict, on the random tiny SD with inline prompts."""
    cfg = runpy.run_path(str(ROOT / "configs" / "compressibility.py"))["get_config"]("tiny")
    cfg.model, cfg.resolution, cfg.algo, cfg.sample.steps = "random-tiny", 8, "ddpo", 2
    cfg.prompts.name, cfg.prompts.inline = "inline", ("a red circle", "two blue squares")
    return cfg.to_dict()


def write_config(workdir: Path, config: dict) -> Path:
    """Write ``config`` as ``workdir/config.json``; return ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config))
    return workdir


def test_read_run_config_fills_keys_an_older_run_lacks(tmp_path):
    config = tiny_config()
    del config["train"]["max_nonfinite"], config["log"]
    config["reward"]["options"] = {"quality": 80}
    loaded = read_run_config(write_config(tmp_path, config))
    default = default_config()
    assert loaded.train.max_nonfinite == default.train.max_nonfinite
    assert loaded.log.to_dict() == default.log.to_dict()
    assert loaded.sample.steps == 2 and loaded.prompts.inline == tuple(config["prompts"]["inline"])
    assert loaded.reward.options.to_dict() == {"quality": 80}  # replaced, not merged
    with pytest.raises(FileNotFoundError, match=r"nope/config.json not found: is .*nope a"):
        read_run_config(tmp_path / "nope")


def test_restore_run_names_what_is_missing_before_loading_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"workdir .*absent does not exist"):
        restore_run(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json not found"):
        restore_run(tmp_path / "empty")
    workdir = write_config(tmp_path / "run", tiny_config())
    with pytest.raises(FileNotFoundError, match=r"run/checkpoints not found: .*no checkpoint yet"):
        restore_run(workdir)
    (workdir / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint in .*run/checkpoints"):
        restore_run(workdir)
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        for epoch in (1, 3):  # stand-in trees: the steps are checked before anything loads
            ckpt.save(epoch, {"w": np.zeros(2, np.float32)}, {"epoch": epoch})
    assert checkpoint_steps(workdir) == [1, 3]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 2 in .*: \[1, 3\]$"):
        restore_run(workdir, step=2)


def test_restore_run_without_a_checkpoint_rebuilds_the_base_model(tmp_path):
    workdir = write_config(tmp_path / "run", tiny_config())
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    run = restore_run(workdir, task=False, restore=False, mesh=mesh)
    assert run.workdir == workdir and run.mesh is mesh and run.config.sample.steps == 2
    assert run.trainable is None and run.step is None and run.extra == {}
    assert run.model.reward is None and run.model.prompts == []  # task=False
    assert run.model.lora.rank == run.config.lora.rank
    lora = traverse_util.flatten_dict(jax.device_get(run.initial["lora"]))
    assert lora and not any(v.any() for k, v in lora.items() if k[-1] == "B")
    assert run.tx.init(run.initial) is not None
