"""What the CLIs print: short log lines, the first calls of compiled code, one-line flag errors,
evaluate's paired summary."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from dag_jax.infra import console


def test_short_format_names_level_and_logger_from_warning_up():
    fmt = console.ShortFormatter()
    info = logging.LogRecord("dag_jax.train", logging.INFO, "f", 1, "epoch %d", (3,), None)
    warn = logging.LogRecord("orbax", logging.WARNING, "f", 1, "slow disk", (), None)
    assert fmt.format(info).split(" ", 1)[1] == "epoch 3"
    assert fmt.format(warn).split(" ", 1)[1] == "WARNING orbax: slow disk"


def test_configure_keeps_libraries_at_warning_unless_verbose():
    names = [*console.LIBRARIES, *console.QUIET_AT_DEFAULT, "dag_jax", ""]
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        console.configure(0)
        assert logging.getLogger("orbax").level == logging.WARNING
        assert logging.getLogger("dag_jax.infra.checkpoint").level == logging.WARNING
        assert logging.getLogger("dag_jax.train").getEffectiveLevel() == logging.INFO
        console.configure(1)
        assert logging.getLogger("orbax").level == logging.INFO
        assert logging.getLogger("dag_jax.infra.checkpoint").getEffectiveLevel() == logging.INFO
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def test_the_torch_missing_notice_of_transformers_is_dropped_unless_verbose():
    logger = logging.getLogger("transformers")
    record = lambda msg: logging.LogRecord("transformers", logging.WARNING, "f", 1, msg, (), None)
    notice = record("PyTorch was not found. Models won't be available and only tokenizers, …")
    try:
        console.configure(0)
        assert not logger.filter(notice) and logger.filter(record("a real warning"))
        console.configure(0)  # configuring twice keeps one filter
        assert sum(isinstance(f, console.DropNotices) for f in logger.filters) == 1
        console.configure(1)
        assert logger.filter(notice)
    finally:
        for f in list(logger.filters):
            logger.removeFilter(f)


@dataclasses.dataclass
class Phases:
    sample: object
    apply: object = None


def test_only_the_first_call_of_each_phase_is_announced(caplog):
    calls = []
    phases = Phases(sample=lambda x: calls.append(x) or x * 2)
    wrapped = console.announce_first_calls(phases, logging.getLogger("t"), {"sample": "sampler"})
    assert wrapped.apply is None and phases.sample is not wrapped.sample
    with caplog.at_level(logging.INFO, logger="t"):
        assert wrapped.sample(2) == 4 and wrapped.sample(3) == 6
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "compiling sampler …"
    assert messages[1].startswith("sampler: compiled and ran once in ")
    assert len(messages) == 2 and calls == [2, 3]


@pytest.mark.parametrize(
    "arg, expected",
    [
        (
            "--config.train.epoch=3",
            "unknown config key 'train.epoch' in --config.train.epoch=3 "
            "(did you mean 'train.epochs'?)",
        ),
        (
            "--config=configs/compressibilty.py:tiny",
            "no config file 'configs/compressibilty.py' "
            "(did you mean 'configs/compressibility.py'?)",
        ),
    ],
)
def test_a_bad_command_line_is_one_line_with_the_closest_name(arg, expected):
    from dag_jax.train.__main__ import flag_error

    assert flag_error(["train", arg], AttributeError("'epoch'\nDid you mean ...")) == expected


def test_other_command_line_errors_keep_their_last_line():
    from dag_jax.train.__main__ import flag_error

    err = ValueError("Traceback:\n  File x\nValueError: algo='dpo' is not one of (…)")
    assert flag_error(["train", "--config.algo=dpo"], err) == "algo='dpo' is not one of (…)"


def test_the_evaluate_summary_pairs_base_and_trained():
    from dag_jax.eval.evaluate import summary_lines

    reward = {"mean": -1.5, "std": 0.3, "change": 0.25, "change_se": 0.012}
    diversity = {"pairwise": 0.2, "vendi": 2.0}
    result = {
        "tag": "20",
        "label": "ddpo",
        "workdir": "runs/demo",
        "splits": {
            "train": {"rewards": {"jpeg": reward}, "diversity": diversity, "frechet_to_base": 3.0},
            "test": {"rewards": {"jpeg": {**reward, "change": None}}, "diversity": diversity,
                     "frechet_to_base": None},
        },
    }  # fmt: skip
    lines = summary_lines(result)
    assert lines[1] == "  jpeg: base -> trained, change ± SE (paired: same prompts and noise)"
    assert lines[2].split() == ["train", "-1.75", "->", "-1.5", "+0.25", "±", "0.012"]
    assert "no paired base samples" in lines[3]
    base = {**result, "splits": {"train": {**result["splits"]["test"]}}}
    assert summary_lines(base)[1:3] == ["  jpeg (mean ± std over images):", "    train -1.5 ± 0.3"]


def test_the_train_summary_ends_with_the_held_out_change_and_next_commands(tmp_path):
    import json

    from dag_jax.train.__main__ import summary

    rows = [
        {"epoch": 1, "reward_mean": -1.6, "trajectories_seen": 128},
        {"epoch": 2, "reward_mean": -1.5, "trajectories_seen": 256, "eval/test/reward_mean": -1.4,
         "eval/test/base_reward_mean": -1.66, "eval/test/reward_change": 0.26,
         "eval/test/reward_change_se": 0.02},
        {"epoch": 3, "reward_mean": -1.4, "trajectories_seen": 384},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = summary(str(tmp_path), 3).splitlines()
    assert lines[0] == f"done: 3 epochs in {tmp_path}"
    assert "-1.6 (epoch 1) -> -1.4 (epoch 3), 384 trajectories" in lines[1]
    assert lines[2].split(":", 1)[0] == "  held-out reward (epoch 2, same noise as before training)"
    assert lines[2].endswith("-1.66 -> -1.4, change +0.26 ± 0.02, +13.0 SE")
    assert lines[3] == "next:"
    commands = " ".join(lines[4:])
    for cli in ("dag_jax.eval", "dag_jax.export", "dag_jax.sample"):
        assert f"python -m {cli} " in commands
    assert '--prompt="YOUR PROMPT"' in commands  # no config.json
    config = {"prompts": {"name": "tiny_shapes"}, "sample": {"steps": 10, "guidance": 5.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    sample = [c for c in summary(str(tmp_path), 3).splitlines() if "dag_jax.sample" in c][0]
    assert "--steps=10 --guidance=5.0" in sample and '--prompt="YOUR' not in sample
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # no evaluation
    assert summary(str(tmp_path), 1).splitlines()[2] == "next:"
