"""Reward rise of demo runs in the tiny world: ``python -m dag_jax.bench tinyworld``.

    python -m dag_jax.bench tinyworld --algos=ddpo,dag_db,dag_kl,b2,grpo \
        --tasks=compressibility,alignment --seeds=3 --json=tinyworld.json

Trains the ``:demo`` variant of each task's config (``configs/<task>.py:demo``: the built-in
tiny world, its captions, ``jpeg_compressibility`` or ``tiny_clipscore``) with each algorithm
and seed, in a fresh workdir under ``--workdir`` (default: a temporary folder), then evaluates
the final checkpoint and the base model with ``dag_jax.eval.evaluate`` on the same noise
(``EVAL_PROMPTS`` prompts of each split × ``EVAL_SEEDS`` images; the base model is sampled
once per task and reused). Records, per split ``train`` / ``test`` (held-out captions):

  reward_before_<split>   the base model's mean reward
  reward_after_<split>    the trained model's mean reward on the same noise
  reward_rise_<split>     after − before (paired: the same prompts and noise)
  diversity_<split>       per-prompt pairwise diversity (1 − cos of tiny-CLIP embeddings)
  vendi_<split>           per-prompt Vendi score
  diversity_before_<split>, vendi_before_<split>   the same for the base model
  frechet_<split>         Fréchet distance of the trained model's samples to the base's

and from ``metrics.jsonl``: ``reward_first_epoch`` / ``reward_last_epoch`` (the mean over each
epoch's fresh training trajectories), ``unique_trajectories`` and ``seconds`` (training wall
time, compilation included). ``impl`` is the algorithm (``b2`` = B² with its PPO objective,
``grpo`` = GRPO with ``:demo``'s KL 0.04 to the base model);
``config`` holds the task, the seed and the epochs. ``format_rise`` turns the records into a
mean ± std table over seeds, printed after the runs.
"""

from __future__ import annotations

import json
import runpy
import tempfile
import time
from pathlib import Path

import numpy as np

from dag_jax.bench.common import Settings, machine_info, record

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # dag_jax/configs
TASKS = ("compressibility", "alignment")
ALGOS = ("ddpo", "dag_db", "dag_kl", "b2", "grpo")


def demo_config(task: str, algo: str, seed: int, epochs: int = 0):
    """Return ``configs/<task>.py:demo`` with ``algo`` and ``seed`` (and ``epochs`` if > 0)."""
    path = CONFIGS / f"{task}.py"
    if not path.is_file():
        raise ValueError(f"unknown task {task!r}: no {path}; known: {', '.join(TASKS)}")
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; known: {', '.join(ALGOS)}")
    c = runpy.run_path(str(path))["get_config"]("demo")
    c.algo = algo
    c.seed = seed
    if epochs:
        c.train.epochs = epochs
        c.b2.stages = epochs
    c.log.grid_every_epochs = 0
    c.eval.every_epochs = 0  # evaluate_run evaluates both splits after training
    return c


def base_world(config):
    """Return (the run's ``train.phases.Context``, its trainable tree) of ``config``'s base
    model (LoRA at its init, as ``train_and_evaluate`` initialises it)."""
    import jax

    from dag_jax.infra import parallel
    from dag_jax.train import objectives
    from dag_jax.train.phases import Context, build_phases
    from dag_jax.train.run import init_trainable, load_model, make_tx

    mesh = parallel.make_mesh(-1, 1)
    model = load_model(config, mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 1 << 31)
    trainable = parallel.put(init_trainable(model, config, key), parallel.replicated(mesh))
    phases = build_phases(model, config, make_tx(config, trainable))
    return Context(model, config, mesh, objectives.get(config), phases), trainable


EVAL_PROMPTS = 45  # prompts per split (the tiny world holds out 45 test captions)
EVAL_SEEDS = 4  # images per prompt
EVAL_SEED = 0


def run_one(task: str, algo: str, seed: int, workdir: Path, epochs: int = 0) -> dict:
    """Train one demo run in ``workdir``; return its training summary (metrics.jsonl)."""
    from dag_jax import train
    from dag_jax.infra.metrics import read_metrics

    config = demo_config(task, algo, seed, epochs)
    t0 = time.time()
    train.train_and_evaluate(config, str(workdir))
    seconds = time.time() - t0
    rows = read_metrics(workdir)
    return {
        "reward_first_epoch": float(rows[0]["reward_mean"]),
        "reward_last_epoch": float(rows[-1]["reward_mean"]),
        "unique_trajectories": float(rows[-1]["unique_trajectories"]),
        "epochs": int(rows[-1]["epoch"]),
        "seconds": seconds,
    }


def evaluate_run(workdir: Path, base_eval: Path | None) -> dict:
    """Return {metric: value} of the run's final checkpoint against the base model.

    ``base_eval`` is a task's shared ``eval`` folder whose ``base`` samples are copied into the
    run's ``eval`` folder first (evaluate reuses them when the settings match, else resamples).
    """
    import shutil

    from dag_jax.eval import evaluate

    out = workdir / "eval"
    if base_eval is not None and (base_eval / evaluate.BASE_TAG).is_dir():
        shutil.copytree(base_eval / evaluate.BASE_TAG, out / evaluate.BASE_TAG, dirs_exist_ok=True)
    kw = dict(num_per_prompt=EVAL_SEEDS, seed=EVAL_SEED, max_prompts=EVAL_PROMPTS, progress=False)
    after = evaluate.evaluate(workdir, **kw)
    before = json.loads((out / evaluate.BASE_TAG / "eval.json").read_text(encoding="utf-8"))
    if base_eval is not None and not (base_eval / evaluate.BASE_TAG).is_dir():
        shutil.copytree(out / evaluate.BASE_TAG, base_eval / evaluate.BASE_TAG)
    reward = after["reward"]
    out_metrics = {}
    for split, m in after["splits"].items():
        b = before["splits"][split]
        r0, r1 = b["rewards"][reward]["mean"], m["rewards"][reward]["mean"]
        out_metrics.update(
            {
                f"reward_before_{split}": r0,
                f"reward_after_{split}": r1,
                f"reward_rise_{split}": r1 - r0,
                f"diversity_before_{split}": b["diversity"]["pairwise"],
                f"diversity_{split}": m["diversity"]["pairwise"],
                f"vendi_before_{split}": b["diversity"]["vendi"],
                f"vendi_{split}": m["diversity"]["vendi"],
                f"frechet_{split}": m["frechet_to_base"],
            }
        )
    return out_metrics


def bench_tinyworld(settings: Settings) -> list[dict]:
    """Return the records of every (task, algorithm, seed) of ``settings``; print their table."""
    tasks = [t for t in settings.tasks.split(",") if t]
    algos = [a for a in settings.algos.split(",") if a]
    for task in tasks:  # fail on a bad name before hours of training
        for algo in algos:
            demo_config(task, algo, 0)
    root = Path(settings.workdir) if settings.workdir else Path(tempfile.mkdtemp("tinyworld"))
    records = []
    for task in tasks:
        base_eval = root / f"{task}_base_eval"
        base_eval.mkdir(parents=True, exist_ok=True)
        for algo in algos:
            for seed in range(settings.seed, settings.seed + settings.seeds):
                workdir = root / f"{task}_{algo}_{seed}"
                out = run_one(task, algo, seed, workdir, settings.epochs)
                out.update(evaluate_run(workdir, base_eval))
                config = {"task": task, "seed": seed, "epochs": out.pop("epochs"), **machine_info()}
                for metric, value in out.items():
                    unit = "s" if metric == "seconds" else ""
                    records.append(record("tinyworld", algo, metric, value, unit, config))
                print(
                    f"[tinyworld] {task} {algo} seed {seed}: test reward "
                    f"{out['reward_before_test']:.4f} -> {out['reward_after_test']:.4f}, train "
                    f"{out['reward_before_train']:.4f} -> {out['reward_after_train']:.4f}; "
                    f"{out['seconds']:.0f}s",
                    flush=True,
                )
    print(format_rise(records))
    return records


def format_rise(records: list[dict]) -> str:
    """Return a markdown table: per task and algorithm, mean ± std over seeds."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in records:
        if r["bench"] != "tinyworld":
            continue
        key = (r["config"]["task"], r["impl"])
        groups.setdefault(key, {}).setdefault(r["metric"], []).append(r["value"])
    lines = [
        "| task | algorithm | seeds | test reward: base → trained | test rise | train rise "
        "| test diversity: base → trained | test Vendi: base → trained | s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(values: list[float | None], digits: int = 4) -> str:
        v = np.asarray([np.nan if x is None else x for x in values], np.float64)
        return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"

    def mean(values: list[float | None], digits: int = 4) -> str:
        v = np.asarray([np.nan if x is None else x for x in values], np.float64)
        return f"{v.mean():.{digits}f}"

    for (task, algo), m in sorted(groups.items()):
        lines.append(
            f"| {task} | {algo} | {len(m['reward_rise_test'])} | "
            f"{mean(m['reward_before_test'])} → {ms(m['reward_after_test'])} | "
            f"{ms(m['reward_rise_test'])} | {ms(m['reward_rise_train'])} | "
            f"{mean(m['diversity_before_test'], 3)} → {ms(m['diversity_test'], 3)} | "
            f"{mean(m['vendi_before_test'], 2)} → {ms(m['vendi_test'], 2)} | "
            f"{np.mean(m['seconds']):.0f} |"
        )
    return "\n".join(lines)
