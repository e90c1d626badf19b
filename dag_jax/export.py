"""Export a run's aligned weights back to PyTorch diffusers (safetensors, no torch needed).

    python -m dag_jax.export --workdir=RUN --out=DIR --format=pipeline   # full folder, LoRA merged
    python -m dag_jax.export --workdir=RUN --out=DIR --format=lora       # the LoRA alone
    [--step=N]       an epoch of RUN/checkpoints (default: the latest)
    [--ema]          its EMA weights (a run with train.ema_decay > 0) instead of the trained ones
    [--overwrite]    replace a DIR that an earlier export wrote (never anything else)

RUN is a local folder or a URL such as ``gs://bucket/run`` (read through ``etils.epath``, as
training wrote it; ``gs://`` needs ``pip install 'dag_jax[gcs]'``); DIR is a local folder.

``pipeline`` writes a complete diffusers folder: the UNet with W + (α/r)·A·B in every adapted
projection, the VAE, text encoder, tokenizer and scheduler of the run's base model. Load it with
``StableDiffusionPipeline.from_pretrained(DIR)``. A run that fine-tuned the whole UNet
(``train.trainable=unet``) has no LoRA: ``pipeline`` writes its trained UNet as it is (gathered
from its shards), and ``lora`` is refused.

``lora`` writes ``DIR/pytorch_lora_weights.safetensors`` in the PEFT layout diffusers'
``pipe.load_lora_weights(DIR)`` reads (needs ``peft``): ``unet.<module>.lora_A.weight`` = Aᵀ
(r, in) and ``unet.<module>.lora_B.weight`` = Bᵀ (out, r), with the rank, α and target modules
in the file's ``lora_adapter_metadata`` so that diffusers scales the adapter by α/r.

Both are written into a temp folder beside DIR and renamed into place: a failure leaves
nothing half-written. Every export folder holds a ``.dag_jax_export`` marker; an existing
non-empty DIR is refused unless ``overwrite``, and even then only a folder with that marker is
replaced. DIR may never be RUN, lie inside RUN or contain it, nor hold a run (``checkpoints/``
or ``metrics.jsonl``); these are refused before anything loads. Weights with NaN or inf (a
diverged run) are refused too, and nothing is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from dag_jax.infra import console, parallel
from dag_jax.models.lora import LoRAConfig, merge, pairs
from dag_jax.pipeline import Pipeline, save_pipeline
from dag_jax.train.config import trains_unet
from dag_jax.train.workdir import Run, read_run_config, restore_run
from dag_jax.weights.convert import torch_key
from dag_jax.weights.diffusers import AtomicDir

FORMATS = ("pipeline", "lora")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base
UNET_PREFIX = "unet"  # StableDiffusionLoraLoaderMixin.unet_name
EXPORT_MARKER = ".dag_jax_export"  # in every export folder: what ``overwrite`` may replace
RUN_ENTRIES = ("checkpoints", "metrics.jsonl")  # what marks a training run's folder


class UnsafeOutputError(FileExistsError):
    """The output folder cannot be written or replaced without destroying other data."""


class NonFiniteWeightsError(ValueError):
    """The weights to export hold NaN or inf."""


# --------------------------------------------------------------------------- reading a run


def load_run(workdir: str | os.PathLike, step: int | None = None, ema: bool = False) -> Run:
    """Return the run of ``workdir`` (no prompts or reward) with checkpoint ``step`` restored.

    ``step`` None restores the latest; ``ema`` its EMA weights as ``trainable``; one device
    holds it all. Raises FileNotFoundError naming the missing workdir, config.json or
    checkpoint, ValueError for ``ema`` on a run without one (``train.workdir.restore_run``).
    """
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    return restore_run(workdir, step, task=False, mesh=mesh, ema=ema)


def host_lora(run: Run) -> dict:
    """Return the restored checkpoint's LoRA tree as fp32 host arrays."""
    if "lora" not in run.trainable:
        raise ValueError(full_unet_has_no_lora(run.workdir))
    return jax.tree.map(lambda a: np.asarray(a, np.float32), run.trainable["lora"])


def full_unet_has_no_lora(workdir) -> str:
    """Return the message for a LoRA export of a run that fine-tuned the whole UNet."""
    return (
        f"the run {workdir} trained the whole UNet (train.trainable='unet'): it has no LoRA to "
        "export; export --format=pipeline, which writes its trained UNet"
    )


def host_unet(run: Run) -> dict:
    """Return a full fine-tune's trained UNet params as fp32 host arrays (all shards gathered)."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32), parallel.gather(run.trainable["unet"]))


# --------------------------------------------------------------------------- writing


def check_out(
    out: str | os.PathLike, overwrite: bool, workdir: str | os.PathLike | None = None
) -> Path:
    """Raise early (before a long load) if writing ``out`` could destroy data; return it.

    UnsafeOutputError, whatever ``overwrite`` says, for: the (local) ``workdir`` itself, a
    folder inside it or one that contains it; a folder holding a run (``checkpoints/`` or
    ``metrics.jsonl``); a file. A non-empty folder raises FileExistsError unless
    ``overwrite``, and with it UnsafeOutputError unless an earlier export wrote it (it holds
    ``EXPORT_MARKER``). Every message names the folder and why.
    """
    out = Path(out).expanduser().absolute()
    real = out.resolve()
    if workdir is not None and "://" not in os.fspath(workdir):
        run = Path(workdir).expanduser().resolve()
        where = (
            "is the run's workdir"
            if real == run
            else "is inside the run's workdir"
            if real.is_relative_to(run)
            else "contains the run's workdir"
            if run.is_relative_to(real)
            else ""
        )
        if where:
            raise UnsafeOutputError(
                f"output {out} {where} {run}: export never writes into or replaces a training "
                "run; choose a folder outside it"
            )
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise UnsafeOutputError(
            f"output {out} is an existing file, not a folder; export writes a folder and "
            "replaces only a folder that an earlier export wrote"
        )
    held = [name for name in RUN_ENTRIES if (out / name).exists()]
    if held:
        raise UnsafeOutputError(
            f"output {out} holds {' and '.join(held)}: it is a training run, which export "
            "never writes into or replaces; choose another folder"
        )
    if not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(
            f"output {out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    if not (out / EXPORT_MARKER).is_file():
        raise UnsafeOutputError(
            f"output {out} is not a folder that dag_jax.export wrote (it has no {EXPORT_MARKER} "
            "file), so --overwrite does not replace it; remove it yourself or choose another folder"
        )
    return out


def check_finite(tree, what: str) -> None:
    """Raise NonFiniteWeightsError naming ``what`` and its arrays that hold NaN or inf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    bad = []
    for path, leaf in leaves:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            bad.append(f"{name} ({int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} inf)")
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to export {what}: {len(bad)} of {len(leaves)} arrays hold NaN or inf, "
            f"e.g. {'; '.join(bad[:3])}; nothing was written. The run diverged at or before "
            "this checkpoint: export an earlier one (--step=N)"
        )


def write_marker(folder: Path, fmt: str, source: Mapping | None = None) -> None:
    """Write ``EXPORT_MARKER`` (JSON: the format and, if given, the workdir and step)."""
    info = {"written_by": "dag_jax.export", "format": fmt, **dict(source or {})}
    (folder / EXPORT_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _describe(what: str, source: Mapping | None) -> str:
    if not source:
        return what
    return f"{what} of {source.get('workdir')} at step {source.get('step')}"


def save_merged_pipeline(
    pipe: Pipeline,
    lora: Mapping,
    lora_config: LoRAConfig,
    out: str | os.PathLike,
    overwrite: bool = False,
    source: Mapping | None = None,
) -> Path:
    """Write a diffusers folder of ``pipe`` with the LoRA merged into its UNet; return it.

    ``out`` is checked by ``check_out``; a LoRA or merged UNet with NaN or inf raises
    NonFiniteWeightsError and nothing is written. ``source`` (workdir, step) goes into the
    folder's ``EXPORT_MARKER``.
    """
    check_out(out, overwrite)
    check_finite(lora, _describe("the LoRA", source))
    merged = merge(pipe.params["unet"], lora, lora_config.scale)
    check_finite(merged, _describe("the merged UNet", source))
    with AtomicDir(out, overwrite) as tmp:  # the pipeline and the marker appear together
        save_pipeline(pipe, tmp, params={"unet": merged}, overwrite=True)
        write_marker(tmp, "pipeline", source)
    return Path(out)


def save_unet_pipeline(
    pipe: Pipeline,
    unet: Mapping,
    out: str | os.PathLike,
    overwrite: bool = False,
    source: Mapping | None = None,
) -> Path:
    """Write a diffusers folder of ``pipe`` with ``unet`` (a full fine-tune's params) as its UNet.

    As ``save_merged_pipeline``: ``out`` checked by ``check_out``, a UNet with NaN or inf
    refused with nothing written, ``source`` in the folder's ``EXPORT_MARKER``.
    """
    check_out(out, overwrite)
    check_finite(unet, _describe("the trained UNet", source))
    with AtomicDir(out, overwrite) as tmp:
        save_pipeline(pipe, tmp, params={"unet": unet}, overwrite=True)
        write_marker(tmp, "pipeline", source)
    return Path(out)


def lora_modules(lora: Mapping) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """Return {Linen module path: (A (in, r), B (r, out))} of a LoRA tree, sorted by path."""
    return {path: (np.asarray(a), np.asarray(b)) for path, (a, b) in pairs(lora).items()}


def lora_module_name(path: tuple[str, ...]) -> str:
    """Return the diffusers module name of a Linen module path (``to_out_0`` → ``to_out.0``)."""
    return torch_key(path + ("weight",)).removesuffix(".weight")


def lora_state_dict(lora: Mapping, prefix: str = UNET_PREFIX) -> dict[str, np.ndarray]:
    """Return the PEFT-style state dict of a LoRA tree: lora_A = Aᵀ (r, in), lora_B = Bᵀ."""
    out = {}
    for path, (a, b) in lora_modules(lora).items():
        name = f"{prefix}.{lora_module_name(path)}"
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    return out


def lora_adapter_metadata(
    lora: Mapping, lora_config: LoRAConfig, prefix: str = UNET_PREFIX
) -> dict:
    """Return diffusers' adapter metadata: PEFT ``LoraConfig`` kwargs, keys ``<prefix>.<kw>``.

    ``target_modules`` lists every adapted module by its full name, so PEFT adapts exactly
    those; ``r`` and ``lora_alpha`` make the loaded adapter scale by α/r.
    """
    kwargs = {
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "target_modules": [lora_module_name(p) for p in lora_modules(lora)],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    return {f"{prefix}.{k}": v for k, v in kwargs.items()}


def save_lora(
    lora: Mapping,
    lora_config: LoRAConfig,
    out: str | os.PathLike,
    overwrite: bool = False,
    source: Mapping | None = None,
) -> Path:
    """Write ``out/pytorch_lora_weights.safetensors`` (diffusers' LoRA layout); return ``out``.

    As ``save_merged_pipeline``: ``out`` checked, a LoRA with NaN or inf refused.
    """
    from safetensors.numpy import save_file

    check_out(out, overwrite)
    check_finite(lora, _describe("the LoRA", source))
    ranks = {a.shape[1] for a, _ in lora_modules(lora).values()}
    if ranks != {lora_config.rank}:
        raise ValueError(f"LoRA ranks {sorted(ranks)} differ from the config's {lora_config.rank}")
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(
            lora_adapter_metadata(lora, lora_config), indent=2, sort_keys=True
        ),
    }
    with AtomicDir(out, overwrite) as tmp:
        save_file(lora_state_dict(lora), str(tmp / LORA_WEIGHT_NAME), metadata=metadata)
        write_marker(tmp, "lora", source)
    return Path(out)


# --------------------------------------------------------------------------- from a workdir


def export_pipeline(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    overwrite: bool = False,
    ema: bool = False,
) -> Path:
    """Write the run's model at ``step`` (None: latest) as a diffusers folder, LoRA merged
    (``ema``: the LoRA's EMA; a full fine-tune: its trained UNet)."""
    check_out(out, overwrite, workdir)
    run = load_run(workdir, step, ema)
    source = _source(workdir, run)
    if "unet" in run.trainable:  # train.trainable=unet: the trained UNet itself
        return save_unet_pipeline(run.model.pipe, host_unet(run), out, overwrite, source)
    lora = host_lora(run)
    return save_merged_pipeline(run.model.pipe, lora, run.model.lora, out, overwrite, source)


def export_lora(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    overwrite: bool = False,
    ema: bool = False,
) -> Path:
    """Write the run's LoRA at ``step`` (None: latest) for diffusers' ``load_lora_weights``
    (``ema``: its EMA)."""
    check_out(out, overwrite, workdir)
    if trains_unet(read_run_config(workdir)):  # before the model loads
        raise ValueError(full_unet_has_no_lora(workdir))
    run = load_run(workdir, step, ema)
    return save_lora(host_lora(run), run.model.lora, out, overwrite, _source(workdir, run))


def _source(workdir: str | os.PathLike, run: Run) -> dict:
    source = {"workdir": os.fspath(workdir), "step": int(run.step)}
    return {**source, "ema": True} if run.ema else source


def export(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "pipeline",
    step: int | None = None,
    overwrite: bool = False,
    ema: bool = False,
) -> Path:
    """Export in format ``fmt`` ("pipeline" or "lora"); return the output folder."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    writer = export_pipeline if fmt == "pipeline" else export_lora
    return writer(workdir, out, step, overwrite, ema)


# --------------------------------------------------------------------------- CLI


def define_flags(flag_values=None) -> None:
    """Define --workdir, --step, --out, --format, --overwrite and --ema (on absl's FLAGS by
    default)."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_string("workdir", None, "training run folder", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint epoch (default: the latest)", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder", flag_values=fv)
    flags.DEFINE_enum("format", "pipeline", FORMATS, "what to write", flag_values=fv)
    flags.DEFINE_bool(
        "overwrite", False, "replace an output folder that an earlier export wrote", flag_values=fv
    )
    flags.DEFINE_bool(
        "ema", False, "export the EMA weights (train.ema_decay > 0) instead", flag_values=fv
    )
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def main(argv, flag_values=None) -> None:
    """absl entry point (``flag_values``: parsed flags, for calling it in-process)."""
    from absl import flags

    del argv
    fv = flag_values if flag_values is not None else flags.FLAGS
    console.configure(fv["verbosity"].value if "verbosity" in fv else 0)
    try:
        out = export(fv.workdir, fv.out, fv.format, fv.step, fv.overwrite, fv.ema)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    what = f"{fv.format} (EMA)" if fv.ema else fv.format
    print(f"[export] wrote the {what} of {fv.workdir} to {out}", flush=True)


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
