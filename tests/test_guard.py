"""One run per workdir: a changed config is refused before anything is written; the lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from dag_jax import configs
from dag_jax.train import guard


def tiny(**overrides):
    return configs.load("compressibility:tiny", overrides)


def test_a_changed_defining_key_is_refused_naming_both_values(tmp_path):
    guard.record_config(tmp_path, tiny())
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(guard.WorkdirError) as err:
        guard.check_config(tmp_path, tiny(**{"train.learning_rate": 0.5, "seed": 3}))
    message = str(err.value)
    assert "train.learning_rate: 0.0003 in the run, 0.5 now" in message
    assert "seed: 0 in the run, 3 now" in message
    assert "--allow_config_change=seed,train.learning_rate" in message
    assert (tmp_path / "config.json").read_text() == before


def test_extending_a_run_or_changing_logging_is_a_resume(tmp_path):
    guard.record_config(tmp_path, tiny())
    assert guard.check_config(tmp_path, tiny(**{"train.epochs": 9, "log.grid_seeds": 1}))
    assert not guard.check_config(tmp_path / "new", tiny())


def test_an_accepted_change_is_kept_in_the_history_not_in_config_json(tmp_path):
    guard.record_config(tmp_path, tiny())
    first = (tmp_path / "config.json").read_text()
    changed = tiny(**{"lora.alpha": 16.0})
    assert guard.check_config(tmp_path, changed, allow=("lora.alpha",))
    guard.record_config(tmp_path, changed)
    assert (tmp_path / "config.json").read_text() == first
    history = [json.loads(x) for x in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["lora"]["alpha"] for h in history] == [4.0, 16.0]
    # the next resume compares with the last recorded config
    assert guard.check_config(tmp_path, changed)
    with pytest.raises(guard.WorkdirError, match="lora.alpha: 16.0 in the run, 4.0 now"):
        guard.check_config(tmp_path, tiny())


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    with guard.WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(guard.WorkdirError, match=f"pid {os.getpid()} on"):
            with guard.WorkdirLock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = {"host": socket.gethostname(), "pid": gone.pid, "started": "x", "what": "train"}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with guard.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text


def test_the_train_loop_refuses_a_changed_config_and_a_busy_workdir(tmp_path):
    from dag_jax import train

    cfg = tiny(**{"model": "random-tiny", "resolution": 8})
    guard.record_config(tmp_path, cfg)
    before = (tmp_path / "config.json").read_text()
    changed = tiny(**{"model": "random-tiny", "resolution": 8, "train.learning_rate": 1e-2})
    with pytest.raises(guard.WorkdirError, match="train.learning_rate"):
        train.train_and_evaluate(changed, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    with guard.WorkdirLock(tmp_path):
        with pytest.raises(guard.WorkdirError, match="is in use by train"):
            train.train_and_evaluate(cfg, str(tmp_path))
