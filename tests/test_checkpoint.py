"""Checkpointer: round trips, retention, resume, and fallback from damaged checkpoints."""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dag_jax.algos.optim import GroupConfig, make_optimizer
from dag_jax.infra.checkpoint import (
    COMMIT_MARKER,
    DAMAGED_DIR,
    Checkpointer,
    CheckpointMismatchError,
    NoUsableCheckpointError,
    tree_digests,
    verify_digests,
)

LOGGER = "dag_jax.infra.checkpoint"
# orbax/tensorstore leave a callback on a closed event loop after a failed read of a damaged file
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _params(offset: float = 0.0) -> dict:
    """Nested LoRA + flow params, like the trainer's trainable tree."""
    base = {
        "lora": {
            "unet": {
                "down_0": {"a": jnp.full((4, 2), 1.0), "b": jnp.zeros((2, 6))},
                "mid": {"a": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones((2, 3))},
            },
        },
        "flow": {"dense": {"kernel": jnp.eye(3), "bias": jnp.linspace(0, 1, 3)}},
    }
    return jax.tree.map(lambda x: x + offset, base)


@functools.cache
def _base_state() -> dict:
    """Return a realistic training state: params, a stepped optax state, RNG key data, step."""
    params = _params()
    tx = make_optimizer(
        {"lora": GroupConfig(), "flow": GroupConfig(max_grad_norm=None)}, accumulate_steps=2
    )
    update = jax.jit(tx.update)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    for _ in range(3):  # one full accumulation cycle + one pending: all fields non-trivial
        _, opt_state = update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key_data(jax.random.PRNGKey(0)),
        "step": jnp.asarray(0, jnp.int32),
    }


def _state(epoch: int) -> dict:
    """Return the realistic state with every leaf offset by ``epoch`` (dtypes kept)."""
    return jax.tree.map(lambda x: x + epoch, _base_state())


def _extra(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "trajectories_seen": 64 * epoch,
        "tracker": {"a red circle": {"mean": 0.25 * epoch, "std": 0.5, "n": [1, 2, 3]}},
        "b2_history": [[0.1, 0.2], [0.3, float("nan")]],
        "config": {"lora_rank": 4, "algo": "dag-db", "resume": None, "flag": True},
    }


def _template() -> dict:
    return jax.tree.map(jnp.zeros_like, _state(0))


def _save(directory: Path, epochs, max_to_keep: int | None = 3) -> None:
    with Checkpointer(directory, max_to_keep=max_to_keep) as ckpt:
        for epoch in epochs:
            assert ckpt.save(epoch, _state(epoch), _extra(epoch))


def _assert_tree_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def _restore(directory: Path, template=None):
    with Checkpointer(directory) as ckpt:
        return ckpt.restore(_template() if template is None else template)


def _corrupt(step_dir: Path, kind: str) -> None:
    """Damage a finished checkpoint the ways a disk, a copy or a person can."""
    if kind in ("truncate_arrays", "garble_arrays"):
        files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
        assert files
        for path in files:
            data = path.read_bytes()
            if kind == "truncate_arrays":
                path.write_bytes(data[: len(data) // 2])
            else:
                path.write_bytes(bytes(b ^ 0x5A for b in data))
    elif kind == "missing_json":
        (step_dir / "extra" / "metadata").unlink()
    elif kind == "garbled_json":
        (step_dir / "extra" / "metadata").write_text('{"epoch": 3, "tra')
    elif kind == "missing_state":
        shutil.rmtree(step_dir / "state")
    else:
        raise ValueError(kind)


# ------------------------------------------------------------------------ round trips


def test_round_trip_of_a_realistic_state_and_extra(tmp_path):
    _save(tmp_path, [1])
    epoch, state, extra = _restore(tmp_path)
    assert epoch == 1
    _assert_tree_equal(state, _state(1))
    # optax states come back as the same NamedTuple types
    assert isinstance(state["opt_state"], optax.MultiStepsState)
    assert type(state["opt_state"].inner_opt_state) is type(_state(1)["opt_state"].inner_opt_state)
    assert state["rng"].dtype == jnp.uint32 and state["rng"].shape == (2,)
    assert state["step"].dtype == jnp.int32 and int(state["step"]) == 1
    # the restored RNG key data is usable as a key
    np.testing.assert_array_equal(
        jax.random.normal(state["rng"], (3,)),
        jax.random.normal(jax.random.PRNGKey(0) + 1, (3,)),
    )
    want = _extra(1)
    assert math.isnan(extra["b2_history"][1][1])
    extra["b2_history"][1][1] = want["b2_history"][1][1] = 0.0
    assert extra == want


def test_the_restored_optimizer_state_continues_training_identically(tmp_path):
    params = _params(2.0)
    tx = make_optimizer({"lora": GroupConfig(), "flow": GroupConfig()}, accumulate_steps=2)
    update = jax.jit(tx.update)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    opt_state = tx.init(params)
    _, opt_state = update(grads, opt_state, params)  # mid-accumulation
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"params": params, "opt": opt_state}, {})
        template = jax.tree.map(jnp.zeros_like, {"params": params, "opt": tx.init(params)})
        _, restored, _ = ckpt.restore(template)
    want, _ = update(grads, opt_state, params)
    got, _ = update(grads, restored["opt"], restored["params"])
    _assert_tree_equal(got, want)


def test_restore_onto_an_abstract_template_with_shardings(tmp_path):
    _save(tmp_path, [2])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(lambda: _state(0)),
    )
    # a bf16 compute copy of one leaf: restore casts to the template's dtype
    abstract["params"]["flow"]["dense"]["bias"] = jax.ShapeDtypeStruct(
        (3,), jnp.bfloat16, sharding=replicated
    )
    epoch, state, _ = _restore(tmp_path, abstract)
    assert epoch == 2
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array) and leaf.sharding == replicated
    assert state["params"]["flow"]["dense"]["bias"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        state["params"]["lora"]["unet"]["mid"]["a"], _params(2.0)["lora"]["unet"]["mid"]["a"]
    )


def test_restore_onto_eval_shape_without_shardings(tmp_path):
    _save(tmp_path, [1])
    epoch, state, _ = _restore(tmp_path, jax.eval_shape(lambda: _state(0)))
    assert epoch == 1
    _assert_tree_equal(state, _state(1))


# ------------------------------------------------------------------------ retention and resume


def test_max_to_keep_and_resume_picks_the_latest(tmp_path):
    _save(tmp_path, [1, 2, 3, 4, 5], max_to_keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:  # a new process resuming
        assert ckpt.all_epochs() == [4, 5]
        assert ckpt.latest_epoch() == 5
        epoch, state, extra = ckpt.restore(_template())
        assert (epoch, extra["trajectories_seen"]) == (5, 320)
        _assert_tree_equal(state, _state(5))
        ckpt.save(6, _state(6), _extra(6))
        ckpt.wait_until_finished()
        assert ckpt.all_epochs() == [5, 6]


def test_an_empty_directory_restores_nothing_without_warning(tmp_path, caplog):
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_epoch() is None and ckpt.all_epochs() == []
        assert ckpt.restore(_template()) is None
    assert _warnings(caplog) == []


def test_restore_waits_for_an_async_save_and_sees_it(tmp_path):
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, _state(1), _extra(1))
        assert ckpt.restore(_template())[0] == 1


# ------------------------------------------------------------------------ damage and fallback


def _files(root: Path) -> dict[str, bytes]:
    """Return {path relative to ``root``: bytes} of every file below ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _moved(directory: Path) -> dict[int, Path]:
    """Return {epoch: folder} of the checkpoints moved into ``directory/damaged``."""
    damaged = directory / DAMAGED_DIR
    if not damaged.exists():
        return {}
    return {int(p.name.split("-")[0]): p for p in damaged.iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "kind", ["truncate_arrays", "garble_arrays", "missing_json", "garbled_json", "missing_state"]
)
def test_a_damaged_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path, caplog, kind):
    _save(tmp_path, [1, 2, 3])
    _corrupt(tmp_path / "3", kind)
    damaged = _files(tmp_path / "3")
    epoch, state, extra = _restore(tmp_path)
    assert epoch == 2 and extra["epoch"] == 2
    _assert_tree_equal(state, _state(2))
    warnings = _warnings(caplog)
    assert any(str(tmp_path / "3") in w and "unreadable" in w for w in warnings), warnings
    # moved whole into damaged/, with a note saying why; not deleted
    moved = _moved(tmp_path)
    assert list(moved) == [3] and not (tmp_path / "3").exists()
    assert _files(moved[3]) == damaged
    note = json.loads(moved[3].with_name(moved[3].name + ".json").read_text())
    assert note["epoch"] == 3 and note["reason"].startswith("unreadable")
    assert any(str(moved[3]) in w for w in warnings), warnings
    with Checkpointer(tmp_path) as ckpt:  # damaged/ is not a step to orbax
        assert ckpt.all_epochs() == [1, 2]


def test_all_checkpoints_damaged_raises_naming_each_and_moves_nothing(tmp_path, caplog):
    _save(tmp_path, [1, 2])
    _corrupt(tmp_path / "1", "missing_json")
    _corrupt(tmp_path / "2", "truncate_arrays")
    (tmp_path / "3").mkdir()  # an incomplete step: skipped, listed, left in place too
    (tmp_path / "3" / "state").mkdir()
    before = _files(tmp_path)
    with pytest.raises(NoUsableCheckpointError) as err:
        _restore(tmp_path)
    message = str(err.value)
    assert f"no usable checkpoint in {tmp_path}" in message
    assert "epoch 2: unreadable" in message and "epoch 1: unreadable" in message
    assert message.index("epoch 2") < message.index("epoch 1")  # newest first
    assert "Nothing was moved or deleted" in message
    assert [s for s, _ in err.value.tried] == [2, 1]
    assert _files(tmp_path) == before and not (tmp_path / DAMAGED_DIR).exists()
    warnings = _warnings(caplog)
    assert any(str(tmp_path / "1") in w for w in warnings)
    assert any(str(tmp_path / "2") in w for w in warnings)
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # a named epoch: the same error
        with pytest.raises(NoUsableCheckpointError, match="epoch 2: unreadable"):
            ckpt.restore(_template(), epoch=2)


def test_changed_array_values_are_caught_by_the_digests(tmp_path, caplog):
    """Values that read back without an error but differ from those saved: a digest mismatch.

    (The array files themselves are damaged in tests/test_faults.py; here the saved digests
    are edited instead, which is the same to the check.)"""
    _save(tmp_path, [1, 2])
    digests_file = tmp_path / "2" / "digests" / "metadata"
    digests = json.loads(digests_file.read_text())
    name = "params/lora/unet/mid/a"
    digests["arrays"][name]["crc32"] ^= 1
    digests_file.write_text(json.dumps(digests))
    epoch, state, _ = _restore(tmp_path)
    assert epoch == 1
    _assert_tree_equal(state, _state(1))
    assert any("digest mismatch: 1 of" in w and name in w for w in _warnings(caplog))
    assert list(_moved(tmp_path)) == [2]


def test_digests_name_every_array_and_catch_a_changed_value():
    state = _state(1)
    digests = tree_digests(state)
    assert digests["algorithm"] == "crc32"
    arrays = digests["arrays"]
    assert arrays["params/flow/dense/kernel"]["shape"] == [3, 3]
    assert arrays["rng"]["dtype"] == "uint32" and arrays["step"]["shape"] == []
    assert len(arrays) == len(jax.tree.leaves(state))
    assert json.loads(json.dumps(digests)) == digests
    assert verify_digests(state, digests) == ""
    changed = jax.tree.map(lambda x: x, state)
    changed["params"]["flow"]["dense"]["bias"] = (
        state["params"]["flow"]["dense"]["bias"].at[1].add(1e-6)
    )
    assert (
        verify_digests(changed, digests)
        == f"1 of {len(arrays)} arrays differ: params/flow/dense/bias"
    )
    extra_leaf = {**state, "new": jnp.zeros(2)}
    assert "new (no digest)" in verify_digests(extra_leaf, digests)


def test_a_checkpoint_without_digests_restores_unverified_with_a_warning(tmp_path, caplog):
    """Checkpoints saved before digests existed stay resumable."""
    _save(tmp_path, [1])
    shutil.rmtree(tmp_path / "1" / "digests")
    epoch, state, _ = _restore(tmp_path)
    assert epoch == 1
    _assert_tree_equal(state, _state(1))
    assert any("no array digests" in w and "unverified" in w for w in _warnings(caplog))
    assert not (tmp_path / DAMAGED_DIR).exists()


def test_a_read_only_checkpointer_falls_back_but_moves_nothing(tmp_path):
    _save(tmp_path, [1, 2])
    _corrupt(tmp_path / "2", "garbled_json")
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.restore(_template())[0] == 1
    assert (tmp_path / "2").exists() and not (tmp_path / DAMAGED_DIR).exists()


def test_a_leftover_temporary_directory_of_an_interrupted_save_is_ignored(tmp_path, caplog):
    _save(tmp_path, [1, 2])
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1712345678901234"
    shutil.copytree(tmp_path / "2", tmp)
    (tmp / COMMIT_MARKER).unlink()
    shutil.rmtree(tmp / "extra")
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # read-only: leaves it in place
        assert ckpt.latest_epoch() == 2
        assert ckpt.restore(_template())[0] == 2
    assert tmp.exists()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_epochs() == [1, 2]
        assert ckpt.restore(_template())[0] == 2
        ckpt.save(3, _state(3), _extra(3))
        ckpt.wait_until_finished()
        assert ckpt.restore(_template())[0] == 3
    assert _warnings(caplog) == []


def test_a_step_directory_without_its_commit_marker_is_not_the_latest(tmp_path, caplog):
    _save(tmp_path, [1, 2, 3])
    (tmp_path / "3" / COMMIT_MARKER).unlink()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_epoch() == 2 and ckpt.all_epochs() == [1, 2]
        assert ckpt.restore(_template())[0] == 2
    assert any(str(tmp_path / "3") in w and "incomplete" in w for w in _warnings(caplog))
    assert list(_moved(tmp_path)) == [3]  # set aside like a damaged one, not deleted


def test_saving_after_a_fallback_keeps_the_damaged_checkpoints_aside(tmp_path, caplog):
    _save(tmp_path, [1, 2, 3, 4])
    _corrupt(tmp_path / "4", "truncate_arrays")
    _corrupt(tmp_path / "3", "missing_json")
    with Checkpointer(tmp_path) as ckpt:
        epoch, state, _ = ckpt.restore(_template())
        assert epoch == 2
        new_state = jax.tree.map(lambda x: x + 1, state)
        assert ckpt.save(3, new_state, {"epoch": 3, "retry": True})
        ckpt.wait_until_finished()
        assert ckpt.all_epochs() == [2, 3]  # max_to_keep=3 had dropped epoch 1
        epoch, state, extra = ckpt.restore(_template())
    assert (epoch, extra) == (3, {"epoch": 3, "retry": True})
    _assert_tree_equal(state, new_state)
    assert sorted(_moved(tmp_path)) == [3, 4]
    assert not any("Deleting" in w for w in _warnings(caplog))


# ------------------------------------------------------------------------ misuse


def test_a_template_of_another_tree_raises_instead_of_falling_back(tmp_path):
    _save(tmp_path, [1, 2])
    wrong_shape = _template()
    wrong_shape["params"]["lora"]["unet"]["mid"]["a"] = jnp.zeros((3, 8))
    with pytest.raises(CheckpointMismatchError, match="mid/a"):
        _restore(tmp_path, wrong_shape)
    missing_leaf = _template()
    del missing_leaf["params"]["flow"]["dense"]["bias"]
    with pytest.raises(CheckpointMismatchError, match="bias"):
        _restore(tmp_path, missing_leaf)


def test_saving_over_existing_checkpoints_needs_force(tmp_path):
    _save(tmp_path, [1, 2, 3])
    with Checkpointer(tmp_path) as ckpt:  # a fresh run in an old workdir, no restore()
        with pytest.raises(ValueError, match="force"):
            ckpt.save(1, _state(9), _extra(9))
        assert ckpt.all_epochs() == [1, 2, 3]
        assert ckpt.restore(_template())[0] == 3  # nothing was abandoned
        with pytest.raises(ValueError, match="force"):
            ckpt.save(3, _state(9), _extra(9))
        assert ckpt.save(2, _state(9), _extra(9), force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_epochs() == [1, 2]
        epoch, state, _ = ckpt.restore(_template())
    assert epoch == 2
    _assert_tree_equal(state, _state(9))


def test_non_json_extra_is_rejected_before_anything_is_written(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, _state(1), {"bad": object()})
        ckpt.wait_until_finished()
        assert ckpt.all_epochs() == []


def test_a_read_only_checkpointer_refuses_to_save(tmp_path):
    _save(tmp_path, [1])
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(2, _state(2), {})


def test_checkpoints_without_any_commit_marker_still_count(tmp_path, caplog):
    """orbax < 0.12 committed by rename alone and wrote no marker: such runs stay resumable."""
    _save(tmp_path, [1, 2])
    for step_dir in (tmp_path / "1", tmp_path / "2"):
        (step_dir / COMMIT_MARKER).unlink()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_epochs() == [1, 2]
        assert ckpt.restore(_template())[0] == 2
    assert _warnings(caplog) == []


def test_a_relative_directory_works(tmp_path, monkeypatch):
    """The CLI's ``--workdir=runs/x`` is relative; orbax needs absolute paths for arrays."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    monkeypatch.chdir(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = jax.device_put(_state(2), NamedSharding(mesh, PartitionSpec()))  # as the trainer's
    with Checkpointer(Path("runs/rel")) as ckpt:
        assert ckpt.save(2, state, _extra(2))
    epoch, state, extra = _restore(Path("runs/rel"))
    assert epoch == 2 and extra["epoch"] == 2
    _assert_tree_equal(state, _state(2))
