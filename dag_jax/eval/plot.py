"""Plot runs against each other: reward vs unique trajectories, and reward vs diversity.

    python -m dag_jax.eval.plot RUN [RUN ...] --out=DIR [--split=test] [--diversity=vendi]

Writes into DIR (matplotlib, Agg backend; ``pip install "dag_jax[plot]"``):

- ``reward_vs_trajectories.png``: each run's training reward (``reward_mean`` ± ``reward_std``
  of ``metrics.jsonl``, a shaded band) against the number of *unique* trajectories it has
  sampled (``unique_trajectories``), all runs on one axis (DAG Fig. 3–4, DDPO Fig. 4);
- ``reward_vs_diversity.png``: one point per evaluation (``RUN/eval/*/eval.json``, written by
  ``python -m dag_jax.eval``): the run's reward (mean ± std on ``--split``, "test" falling
  back to "train" when a run has no test split) against a diversity measure (``--diversity``:
  ``vendi``, ``pairwise`` or ``frechet`` to the base model); checkpoints of one run are joined
  in step order, the base model is a black cross.

Runs are labelled by algorithm (config.json ``algo``; ``b2/<objective>`` for B² runs), with
the run folder's name added when several runs share a label.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DIVERSITY = ("vendi", "pairwise", "frechet")
DIVERSITY_LABELS = {
    "vendi": "Vendi score (per prompt, mean)",
    "pairwise": "pairwise 1 − cos (per prompt, mean)",
    "frechet": "Fréchet distance to the base model",
}


def run_label(config: Mapping[str, Any]) -> str:
    """Return the algorithm label of a run: ``algo``, or ``b2/<objective>`` for B² runs."""
    algo = str(config.get("algo", "?"))
    if algo == "b2":
        objective = (config.get("b2") or {}).get("objective", "ddpo")
        return f"b2/{objective}"
    return algo


def pyplot():
    """Return matplotlib.pyplot on the Agg backend, or exit with how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            'error: plotting needs matplotlib: pip install "matplotlib>=3.7" '
            '(or pip install -e ".[plot]")'
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_config(run: Path) -> dict[str, Any]:
    """Return ``run/config.json`` as a dict ({} when missing)."""
    path = run / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_evals(run: Path) -> list[dict[str, Any]]:
    """Return the run's eval.json dicts (``run/eval/*/eval.json``), base first, then by step."""
    out = []
    for path in sorted((run / "eval").glob("*/eval.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError:
            print(f"skipping unreadable {path}", file=sys.stderr)
    return sorted(out, key=lambda e: -1 if e.get("base") else int(e.get("step") or 0))


def labels_of(runs: Sequence[Path]) -> list[str]:
    """Return one legend label per run: its algorithm, plus its folder name when ambiguous."""
    algos = [run_label(read_config(r)) for r in runs]
    return [f"{a} ({r.name})" if algos.count(a) > 1 else a for a, r in zip(algos, runs)]


def _values(records: list[dict], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in records]


def plot_reward_vs_trajectories(runs: Sequence[Path], out: Path) -> Path | None:
    """Write reward_vs_trajectories.png; return its path (None when no run has metrics)."""
    from dag_jax.infra.metrics import read_metrics

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for run, label in zip(runs, labels_of(runs)):
        records = [r for r in read_metrics(run) if "unique_trajectories" in r]
        if not records:
            print(f"{run}: no metrics.jsonl records, left out", file=sys.stderr)
            continue
        x = _values(records, "unique_trajectories")
        mean, std = _values(records, "reward_mean"), _values(records, "reward_std")
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
        lo = [m - s for m, s in zip(mean, std)]
        hi = [m + s for m, s in zip(mean, std)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    reward = read_config(runs[0]).get("reward", {}).get("name", "reward")
    ax.set(xlabel="unique trajectories", ylabel=f"{reward} (mean ± std)")
    ax.set_title("Training reward vs trajectories")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, out / "reward_vs_trajectories.png")


def _point(ev: Mapping[str, Any], split: str, diversity: str):
    """Return (x, y, yerr) of an eval on ``split`` (or "train" if it lacks it), or None."""
    splits = ev.get("splits", {})
    m = splits.get(split) or splits.get("train")
    if not m:
        return None
    r = m["rewards"].get(ev.get("reward")) or next(iter(m["rewards"].values()))
    x = m.get("frechet_to_base") if diversity == "frechet" else m["diversity"].get(diversity)
    if x is None or r.get("mean") is None:
        return None
    return float(x), float(r["mean"]), float(r.get("std") or 0.0)


def plot_reward_vs_diversity(
    runs: Sequence[Path], out: Path, split: str = "test", diversity: str = "vendi"
) -> Path | None:
    """Write reward_vs_diversity.png; return its path (None when no run has evaluations)."""
    if diversity not in DIVERSITY:
        raise ValueError(f"diversity must be one of {DIVERSITY}, got {diversity!r}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn, base_drawn, reward = 0, set(), "reward"
    for run, label in zip(runs, labels_of(runs)):
        evals = read_evals(run)
        if not evals:
            print(f"{run}: no eval/*/eval.json (run python -m dag_jax.eval)", file=sys.stderr)
        for ev in (e for e in evals if e.get("base")):
            p = _point(ev, split, diversity)
            key = (ev.get("model"), p)
            if p is not None and key not in base_drawn:
                name = None if base_drawn else "base model"
                ax.errorbar(*p[:2], yerr=p[2], fmt="kx", capsize=3, markersize=8, label=name)
                base_drawn.add(key)
        points = [p for e in evals if not e.get("base") for p in [_point(e, split, diversity)]]
        points = [p for p in points if p is not None]
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
            drawn += 1
            reward = evals[-1].get("reward", reward)
    if not drawn and not base_drawn:
        plt.close(fig)
        return None
    ax.set(xlabel=DIVERSITY_LABELS[diversity], ylabel=f"{reward} on {split} prompts (± std)")
    ax.set_title("Reward–diversity trade-off")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, out / "reward_vs_diversity.png")


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dag_jax.eval.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--diversity", choices=DIVERSITY, default="vendi")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        parser.error(f"no such run folder(s): {', '.join(missing)}")
    written = [
        plot_reward_vs_trajectories(args.runs, args.out),
        plot_reward_vs_diversity(args.runs, args.out, args.split, args.diversity),
    ]
    for path in written:
        if path is not None:
            print(f"wrote {path}")
    return 0 if any(written) else 1


if __name__ == "__main__":
    sys.exit(main())
