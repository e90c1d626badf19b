"""``python -m dag_jax.train --config=configs/X.py --workdir=DIR``."""

from __future__ import annotations

import logging

import jax

from dag_jax import configs, rewards
from dag_jax.infra import console, cpu_tuning
from dag_jax.infra.metrics import read_metrics
from dag_jax.train.config import ConfigError
from dag_jax.train.guard import WorkdirError
from dag_jax.train.loop import PREEMPTED_EXIT_CODE, Preempted, train_and_evaluate
from dag_jax.train.update import NonFiniteLoss

log = logging.getLogger("dag_jax.train")

# --------------------------------------------------------------------------- CLI


def define_flags() -> None:
    """Define --config (ml_collections config file with overrides), --workdir, --cpu_tuning."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "experiment config file, e.g. configs/aesthetic.py:tiny", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics, samples)")
    flags.DEFINE_list(
        "allow_config_change",
        [],
        "config keys a resumed run may change (kept in the run's config_history.jsonl)",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    cpu_tuning.define_flag()


def main(argv) -> None:
    """absl entry point."""
    from absl import flags

    del argv
    console.configure(flags.FLAGS.verbosity)
    cpu_tuning.apply_if_requested(flags.FLAGS.cpu_tuning)
    try:
        cfg = configs.from_flag(flags.FLAGS["config"])  # --config.algo=X: X's release settings
        state = train_and_evaluate(cfg, flags.FLAGS.workdir, flags.FLAGS.allow_config_change)
    except Preempted as err:
        print(f"stopped: {err}", flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except (
        ConfigError,
        WorkdirError,
        rewards.RewardError,
        NonFiniteLoss,
        FileNotFoundError,
    ) as err:
        raise SystemExit(f"error: {err}") from None
    if jax.process_index() == 0:
        print(summary(flags.FLAGS.workdir, state.epoch), flush=True)


def summary(workdir: str, epochs: int) -> str:
    """Return the lines a finished run ends with: what it did and what to run next."""
    rows = read_metrics(workdir)
    lines = [f"done: {epochs} epochs in {workdir}"]
    if rows:
        first, last = rows[0], rows[-1]
        lines.append(
            f"  training reward {first['reward_mean']:.4g} (epoch {first['epoch']}) -> "
            f"{last['reward_mean']:.4g} (epoch {last['epoch']}), "
            f"{last['trajectories_seen']} trajectories"
        )
    lines += [
        "next:",
        f"  python -m dag_jax.eval --workdir={workdir} --prompts=both   # base vs trained",
        f"  python -m dag_jax.export --workdir={workdir} --out=export/run --format=pipeline",
        f"  tensorboard --logdir={workdir}",
    ]
    return "\n".join(lines)


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
