"""Train: ``python -m dag_jax.train --config=configs/imagereward.py --workdir=DIR``.

One epoch (one B² stage) reads top to bottom:

  1. sample   trajectories of the current policy (``sample.trajectories`` per epoch, in compiled
              chunks; B²: prefixes to the interval start, then ``b2.branches`` branches each);
  2. reward   the final images (a jitted JAX reward, or a host reward on the gathered images);
  3. advantages / selection   DDPO: per-prompt standardisation (or within ``sample.group``);
              B²: z-scores against the prompt's history (or within each prefix) and best/worst
              selection; DAG: none (the reward enters through the flow);
  4. update   per window of ``train.trajectories_per_step`` trajectories: (DAG) forward-looking
              rewards of every state with the current θ, then all the window's transitions,
              in the objective's order (DAG-KL: leave-one-out groups of distinct trajectories;
              ``dag.baseline=step``: blocks of one step of a trajectory group), in
              micro-batches whose gradients are accumulated into one AdamW update (DAG: F̃ of
              every state once at the window's start, and φ's gradient as one VJP over the
              states at its end, where states chain); B² with PPO updates on full windows only;
  5. log and checkpoint; on SIGTERM (any process) stop at the next window boundary.

The state is a ``TrainState`` passed into each step and returned by it; each objective
(``objectives/``) says how its epoch is collected, cut into windows and trained.

Everything random comes from ``fold_in(key(seed), epoch)`` and per-sample keys from *global*
sample indices, so any mesh shape and any restart gives the same numbers. Workdir contents:
docs/workdir.md.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dag_jax.algos import dag
from dag_jax.infra import console, parallel
from dag_jax.infra.captions import captioned_grid, compare_captions
from dag_jax.infra.checkpoint import Checkpointer, NoUsableCheckpointError
from dag_jax.infra.metrics import MetricsWriter, ProgressLine
from dag_jax.train import guard, objectives
from dag_jax.train.collect import Collected
from dag_jax.train.config import check_workdir, validate
from dag_jax.train.inputs import check_inputs
from dag_jax.train.phases import Context, build_phases
from dag_jax.train.run import (
    init_opt_state,
    init_trainable,
    load_model,
    make_tx,
    put_batch,
    without_frozen_unet,
)
from dag_jax.train.state import TrainState, restore_arrays
from dag_jax.train.update import train_epoch
from dag_jax.train.workdir import CHECKPOINT_DIR, UnusableCheckpointsError, check_writable

log = logging.getLogger("dag_jax.train")
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143, the convention for "stopped by SIGTERM"
PHASE_NAMES = {  # what the log calls the compiled phases (others: their field name)
    "sample": "the sampler",
    "prefix": "the B² prefix sampler",
    "branches": "the B² branch sampler",
    "fl_rewards": "the forward-looking rewards",
    "grad_step": "the train step",
    "grad_step_per_state": "the train step",
    "state_flows": "the state flows",
    "flow_grad": "the flow gradient",
    "apply": "the optimizer update",
    "grid": "the sample grid",
    "reward": "the reward",
}


class Preempted(RuntimeError):
    """The run stopped on SIGTERM (preemption) after saving what resuming needs."""

    def __init__(self, epoch: int, workdir: str):
        super().__init__(
            f"preempted: stopped at an update-window boundary; the checkpoint of epoch {epoch} "
            f"in {workdir} is what the same command resumes from"
        )
        self.epoch = epoch


def num_epochs(config) -> int:
    """Return the number of epochs (B²: stages) of the run."""
    return config.b2.stages if config.algo == "b2" else config.train.epochs


def write_grid(ctx: Context, state: TrainState, writer: MetricsWriter) -> None:
    """Write a sample grid of fixed prompts × seeds (η = 0), each row captioned with its
    prompt, to the workdir."""
    c, model, mesh = ctx.config, ctx.model, ctx.mesh
    p = min(c.log.grid_prompts, len(model.prompts))
    n = p * c.log.grid_seeds
    pidx = np.repeat(np.arange(p), c.log.grid_seeds)
    ids = put_batch(mesh, model.prompt_ids[pidx], batch_axis=False)
    idx = put_batch(mesh, np.arange(n, dtype=np.int32), batch_axis=False)
    images = parallel.gather(ctx.phases.grid(model.frozen, state.trainable, ids, idx))
    grid = captioned_grid(np.asarray(images), rows=p, row_captions=model.prompts[:p])
    writer.write_images(state.epoch, "grid", grid)


class SigtermFlag:
    """Remembers a SIGTERM (preemption notice) while the loop runs; ``requested()`` asks all
    processes, so every one of them stops at the same update window."""

    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: stopping at the next update-window boundary")
        self.received = True

    def requested(self) -> bool:
        """Return whether any process received SIGTERM (a collective on several processes)."""
        return parallel.any_process(self.received)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run_epoch(
    ctx: Context, state: TrainState, key: jax.Array, stop, keep_input: bool = True
) -> tuple:
    """Return (the state after one epoch, its metrics record, whether it finished).

    ``keep_input=False``: the updates may consume ``state``'s arrays (``train_epoch``).
    """
    c, total, t0 = ctx.config, num_epochs(ctx.config), time.time()
    ekey = jax.random.fold_in(key, state.epoch)
    data, state = ctx.objective.collect(ctx, state, ekey)
    beta = dag.annealed_beta(c.dag.beta, state.epoch, total, c.dag.anneal_fraction)
    state, updates, finished = train_epoch(ctx, state, data, beta, stop, keep_input=keep_input)
    state = state.replace(
        epoch=state.epoch + 1,
        trajectories_seen=state.trajectories_seen + int(data.rewards.size),
        unique_trajectories=state.unique_trajectories + int(data.unique),
    )
    return state, epoch_scalars(state, data, updates, beta, time.time() - t0), finished


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: Sequence[str] = ()
) -> TrainState:
    """Run (or resume) the training run of ``config`` in ``workdir``; return the final state.

    A workdir holds one run: resuming it with another config is refused unless the changed
    keys are in ``allow_config_change`` (``guard``). Raises ``Preempted`` after SIGTERM,
    once the last complete epoch is checkpointed.
    """
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    validate(config, mesh.size)
    check_workdir(workdir)
    check_inputs(config)  # every missing model, prompt and reward file at once, nothing written
    # a local folder or a URL (gs://…), all through etils.epath; unwritable: an error right away
    workdir = check_writable(workdir)
    lead = jax.process_index() == 0
    with guard.WorkdirLock(workdir) if lead else contextlib.nullcontext():
        guard.check_config(workdir, config, tuple(allow_config_change))
        return run(config, workdir, mesh)


def run(config: ml_collections.ConfigDict, workdir, mesh) -> TrainState:
    """Return the final state of the run in ``workdir`` (checked and locked by the caller)."""
    model = load_model(config, mesh)  # the model, prompts and reward load before any write
    if jax.process_index() == 0:
        guard.record_config(workdir, config)
    key = jax.random.key(config.seed)
    # committed, laid out from the start (replicated; train.trainable=unet: FSDP-sharded): the
    # arrays the jitted phases return look the same, so epoch 2 reuses epoch 1's programs
    trainable = init_trainable(model, config, jax.random.fold_in(key, 1 << 31))
    trainable = model.trainable_layout.put(trainable)
    model = without_frozen_unet(model)  # a trained UNet lives in ``trainable`` alone
    tx = make_tx(config, trainable)
    objective = objectives.get(config)
    # the first call of each compiled phase is logged: the first minutes are not silent
    phases = console.announce_first_calls(build_phases(model, config, tx), log, PHASE_NAMES)
    ctx = Context(model, config, mesh, objective, phases)
    state = TrainState(
        trainable=trainable,
        opt_state=init_opt_state(model, tx, trainable),
        trackers=objective.trackers(config),
    )
    if config.train.ema_decay > 0:  # the EMA starts at the initial parameters (own buffers)
        state = state.replace(ema=jax.tree.map(jnp.copy, trainable))
    # evaluation in the loop (config.eval): its prompts are checked before anything trains
    evaluator = loop_evaluator(ctx, tx, trainable, workdir) if config.eval.every_epochs else None
    total = num_epochs(config)
    with Checkpointer(workdir / CHECKPOINT_DIR, config.checkpoint.max_to_keep) as ckpt:
        try:  # verified; damaged newer checkpoints are moved to checkpoints/damaged/
            restored = restore_arrays(ckpt, state.arrays())  # with or without an EMA
        except NoUsableCheckpointError as err:  # all damaged: stop, keeping everything
            raise UnusableCheckpointsError(str(err)) from err
        if restored is not None:
            _, arrays, extra = restored
            state = state.with_restored(arrays, extra)
            log.info("resumed from epoch %d in %s", state.epoch, workdir)
        writer = MetricsWriter(workdir)
        # lines of epochs the checkpoint does not hold go to metrics_superseded.jsonl
        writer.truncate_after(state.epoch)
        progress = ProgressLine(total, start_epoch=state.epoch)
        saved_epoch, preempted = state.epoch, False
        with SigtermFlag() as sigterm:
            while state.epoch < total:
                # the updates donate the state's arrays; a copy is kept only while this
                # state is the last complete epoch and not on disk (a preemption saves it)
                keep = saved_epoch != state.epoch
                new, scalars, finished = run_epoch(ctx, state, key, sigterm.requested, keep)
                if not finished:  # preempted mid-epoch: keep the last complete epoch
                    preempted = True
                    break
                state = new
                if evaluator is not None and (
                    state.epoch % config.eval.every_epochs == 0 or state.epoch == total
                ):
                    scalars.update(evaluate_in_loop(evaluator, state, writer, config))
                writer.write_scalars(state.epoch, scalars)
                line = progress.update(
                    state.epoch,
                    scalars["reward_mean"],
                    scalars["reward_std"],
                    scalars["loss"],
                    int(scalars["trajectories"]),
                )
                if jax.process_index() == 0:
                    print("\n".join([line, *eval_lines(scalars)]), flush=True)
                if config.log.grid_every_epochs and state.epoch % config.log.grid_every_epochs == 0:
                    write_grid(ctx, state, writer)
                if state.epoch % config.checkpoint.every_epochs == 0 or state.epoch == total:
                    ckpt.save(state.epoch, state.arrays(), state.extra())
                    saved_epoch = state.epoch
                if state.epoch < total and sigterm.requested():
                    preempted = True
                    break
            if saved_epoch != state.epoch:
                ckpt.save(state.epoch, state.arrays(), state.extra())
            ckpt.wait_until_finished()
        writer.close()
    if preempted:
        raise Preempted(state.epoch, str(workdir))
    return state


def loop_evaluator(ctx: Context, tx, initial: dict, workdir):
    """Return the evaluation of ``config.eval`` (``dag_jax.eval.evaluate.LoopEvaluator``)."""
    from dag_jax.eval.evaluate import LoopEvaluator  # eval builds on train: imported on use

    return LoopEvaluator(ctx.model, ctx.config, ctx.mesh, tx, initial, workdir)


def evaluate_in_loop(evaluator, state: TrainState, writer: MetricsWriter, config) -> dict:
    """Evaluate the state's weights (``eval.ema``: its EMA); write the compare grids; return
    the ``eval/…`` scalars (and ``eval/seconds``)."""
    t0 = time.time()
    scalars, grids = evaluator(state.ema if config.eval.ema else state.trainable)
    for split, grid in grids.items():  # base row above current row, per prompt
        images = grid.reshape(-1, *grid.shape[2:])
        prompts = getattr(evaluator, "splits", {}).get(split)
        tags = ("base", "now")
        captions = None if prompts is None else compare_captions(prompts, len(grid) // 2, tags)
        tiled = captioned_grid(images, rows=grid.shape[0], row_captions=captions)
        writer.write_images(state.epoch, f"eval_compare_{split}", tiled)
    scalars["eval/seconds"] = time.time() - t0
    return scalars


def eval_lines(scalars: dict) -> list[str]:
    """Return a console line per evaluated split of an epoch's scalars (none: []), e.g.
    ``eval test | reward -1.66 → -1.33 (+0.334 ± 0.025) | pairwise 0.03 | Vendi 1.09``."""
    splits = [k.split("/")[1] for k in scalars if k.startswith("eval/") and k.endswith("/vendi")]
    lines = []
    for split in splits:
        get = lambda k, split=split: scalars[f"eval/{split}/{k}"]
        lines.append(
            f"eval {split} | reward {get('base_reward_mean'):.4g} → {get('reward_mean'):.4g} "
            f"({get('reward_change'):+.3g} ± {get('reward_change_se'):.2g}) | "
            f"pairwise {get('pairwise'):.3g} | Vendi {get('vendi'):.3g}"
        )
    return lines


def replicate(mesh, tree):
    """Return ``tree`` as arrays replicated over ``mesh``."""
    rep = parallel.replicated(mesh)
    return parallel.put(tree, jax.tree.map(lambda _: rep, tree))


def epoch_scalars(state: TrainState, data: Collected, updates: list[dict], beta, seconds) -> dict:
    """Return the metrics.jsonl record of an epoch."""
    out = {
        "epoch": state.epoch,
        "optimizer_updates": state.updates,
        "trajectories_seen": state.trajectories_seen,
        "unique_trajectories": state.unique_trajectories,
        "trajectories": int(data.rewards.size),
        "reward_mean": float(np.mean(data.rewards)),
        "reward_std": float(np.std(data.rewards)),
        "beta": float(beta),
        "epoch_updates": len(updates),
        "trained_fraction": float(np.mean(data.weight > 0)),
        "epoch_seconds": float(seconds),
        "trajectories_per_s": float(data.rewards.size / max(seconds, 1e-9)),
    }
    out.update({f"reward/{k}": float(np.mean(v)) for k, v in data.parts.items()})  # a mix's
    keys = sorted({k for u in updates for k in u})
    for k in keys:
        out[k] = float(np.mean([u[k] for u in updates if k in u]))
    out.setdefault("loss", float("nan"))
    return out
