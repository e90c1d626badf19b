"""``python -m dag_jax.train --config=configs/X.py --workdir=DIR``."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

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
    try:  # --config.algo=X: X's release settings; the config file loads here
        cfg = configs.from_flag(flags.FLAGS["config"])
    except Exception as err:  # noqa: BLE001 - a missing config file, a bad argument: one line
        raise SystemExit(f"error: {flag_error(sys.argv, err)}") from None
    try:
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
    """Return the lines a finished run ends with: what it did, the held-out change the loop's
    last evaluation measured (``config.eval``), and what to run next."""
    rows = read_metrics(workdir)
    lines = [f"done: {epochs} epochs in {workdir}"]
    if rows:
        first, last = rows[0], rows[-1]
        lines.append(
            f"  training reward {first['reward_mean']:.4g} (epoch {first['epoch']}) -> "
            f"{last['reward_mean']:.4g} (epoch {last['epoch']}), "
            f"{last['trajectories_seen']} trajectories"
        )
    lines += eval_summary(rows)
    lines += [
        "next:",
        f"  python -m dag_jax.eval --workdir={workdir} --prompts=both   # base vs trained",
        f"  python -m dag_jax.export --workdir={workdir} --out=export/run --format=pipeline",
        f"  python -m dag_jax.sample --model=export/run {sample_flags(workdir)} --grid_scale=2",
        f"  tensorboard --logdir={workdir}",
    ]
    return "\n".join(lines)


def sample_flags(workdir: str) -> str:
    """Return ``--prompt=… --steps=… --guidance=…`` for sampling a run's export as it sampled:
    the tiny world's first held-out caption, else a placeholder prompt."""
    import json

    from dag_jax.train.workdir import CONFIG_FILE, workdir_path

    try:
        config = json.loads((workdir_path(workdir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return '--prompt="YOUR PROMPT"'
    prompt = "YOUR PROMPT"
    if config.get("prompts", {}).get("name") == "tiny_shapes":
        from dag_jax.tinyworld import shapes

        prompt = shapes.captions("test")[0]
    s = config.get("sample", {})
    return f'--prompt="{prompt}" --steps={s.get("steps", 50)} --guidance={s.get("guidance", 7.5)}'


def eval_summary(rows: list[dict]) -> list[str]:
    """Return a line per split of the last evaluated epoch: base -> trained on the same noise,
    the paired change ± its standard error over prompts, and how many SEs that is ([] when
    the run evaluated nothing)."""
    evaluated = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evaluated:
        return []
    row = evaluated[-1]
    splits = sorted({k.split("/")[1] for k in row if k.endswith("/reward_change")})
    lines = []
    for split in splits:
        get = lambda k, split=split: row.get(f"eval/{split}/{k}", float("nan"))
        change, se = get("reward_change"), get("reward_change_se")
        ratio = f", {change / se:+.1f} SE" if se == se and se > 0 else ""
        name = "held-out" if split == "test" else split
        lines.append(
            f"  {name} reward (epoch {row['epoch']}, same noise as before training): "
            f"{get('base_reward_mean'):.4g} -> {get('reward_mean'):.4g}, "
            f"change {change:+.4g} ± {se:.2g}{ratio}"
        )
    return lines


def parse_flags(argv: list[str]) -> list[str]:
    """Parse the command line; a bad flag, config file, argument or key ends the process with
    one line (``flag_error``) instead of a traceback."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - absl, ml_collections and the config files' errors
        raise SystemExit(f"error: {flag_error(argv, err)}") from None
    problems = [p for p in map(config_file_problem, argv[1:]) if p]
    if problems:  # ml_collections reads the file only on first use
        raise SystemExit(f"error: {problems[0]}")
    return rest


def config_file_problem(arg: str) -> str:
    """Return what is wrong with the config file of a ``--config=FILE[:ARG]`` argument, or ""."""
    from dag_jax.configs import NAMES, ROOT
    from dag_jax.configs.base import did_you_mean

    if not arg.startswith("--config="):
        return ""
    path = arg[len("--config=") :].partition(":")[0]
    if not path or Path(path).expanduser().is_file() or Path(path).stem in NAMES:
        return ""
    packaged = [f"configs/{n}.py" for n in NAMES if (ROOT / f"{n}.py").is_file()]
    return f"no config file {path!r}{did_you_mean(path, packaged)}"


def flag_error(argv: list[str], err: BaseException) -> str:
    """Return one line saying what is wrong with the command line ``argv`` that raised ``err``.

    A ``--config.KEY`` that is no config key is named with the closest key; a config file that
    does not exist with the closest packaged config; anything else by the last line of the
    error (the config files' own errors already end in "did you mean").
    """
    from dag_jax.configs.base import did_you_mean
    from dag_jax.train.config import default_config, flat_keys

    known = set(flat_keys(default_config()))
    for arg in argv[1:]:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].partition("=")[0]
            if key not in known and not key.startswith("reward.options."):
                return f"unknown config key {key!r} in {arg}{did_you_mean(key, known)}"
        if config_file_problem(arg):
            return config_file_problem(arg)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", last)


def cli() -> None:
    """Console entry point: parse the flags (one line for a bad one) and run ``main``."""
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
