"""Every input a config needs, checked together before anything loads, compiles or is written.

    findings = check_inputs(config)      # raises MissingInputs naming every missing input

A config reads: the diffusion model (``model``: a diffusers folder, a hub id, ``tiny``), the
files of its prompt set (``prompts``), the files its reward options name (``reward.options``,
every part of a ``mix`` too) and, when the run evaluates in the loop, the feature model
(``eval.feature_model``). :func:`config_inputs` lists them without loading any;
:func:`check_inputs` looks each one up and raises one :class:`MissingInputs` (a
``ConfigError``) listing all the missing ones, each with the flag that sets it and where to get
it. Nothing touches the network: a hub id counts as present when the hub cache holds it and
as "will be downloaded" otherwise (missing when ``HF_HUB_OFFLINE`` is set); a prompt file the
loader may download is "will be downloaded"; bucket URLs (``gs://``) are looked up through
``etils.epath`` and left unchecked when that fails.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dag_jax.train.config import ConfigError

log = logging.getLogger("dag_jax.train")

MODEL_SOURCE = (
    "a diffusers folder (diffusers' save_pretrained) or a hub id such as "
    "stable-diffusion-v1-5/stable-diffusion-v1-5 (downloaded into the hub cache)"
)
TINY_SOURCE = "rebuild it with `python -m dag_jax.tinyworld` (or reinstall dag_jax)"
HUB = "https://huggingface.co/"


@dataclasses.dataclass(frozen=True)
class Input:
    """One thing a config reads.

    ``kind``: "file", "folder" (holding ``marker`` when set), "hub_or_folder" (a hub id or a
    folder holding ``marker``), "hub_file" (``hub_file`` of the hub repo ``value``, or a local
    file), or "problem" (a value that cannot name an input; ``problem`` says why).
    ``download``: a missing local file is fetched by the loader (the prompt cache).
    """

    what: str
    value: str | None
    flag: str
    source: str
    kind: str = "file"
    marker: str = ""
    hub_file: str = ""
    revision: str = ""
    download: bool = False
    problem: str = ""


@dataclasses.dataclass(frozen=True)
class Finding:
    """An input and what was found: "ok", "download" (fetched on first use), "unchecked" or
    "missing", with the detail."""

    input: Input
    status: str
    detail: str


class MissingInputs(ConfigError):
    """Inputs of a config are missing; ``missing`` holds their findings."""

    def __init__(self, missing: Sequence[Finding]):
        self.missing = list(missing)
        n = len(self.missing)
        lines = [f"{n} input{'s' if n > 1 else ''} of the config {'are' if n > 1 else 'is'} "]
        lines[0] += "missing (nothing was loaded or written):"
        for f in self.missing:
            lines.append(f"  - {f.input.what}: {f.detail}")
            lines.append(f"      set it with {f.input.flag}; get it: {f.input.source}")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- what a config reads


def config_inputs(config) -> list[Input]:
    """Return every input ``config`` reads (model, prompt files, reward files, feature model)."""
    out = list(model_inputs(str(config.model), str(config.get("revision", "") or "")))
    out += prompt_inputs(config.prompts)
    out += reward_inputs(str(config.reward.name), _as_dict(config.reward.options))
    ev = config.get("eval")
    if ev is not None and int(ev.get("every_epochs", 0) or 0) > 0:
        spec = str(ev.get("feature_model", "") or "")
        out += feature_model_inputs(spec, str(config.model), "--config.eval.feature_model")
    return out


def model_inputs(model: str, revision: str = "", flag: str = "--config.model") -> list[Input]:
    """Return the diffusion model ``model`` reads (none for ``random-tiny``)."""
    what = "the diffusion model"
    if model == "random-tiny":
        return []
    if model == "tiny":
        from dag_jax.tinyworld.assets import TINY_SD

        return [Input(what, str(TINY_SD), flag, TINY_SOURCE, "folder", "model_index.json")]
    return [
        Input(what, model, flag, MODEL_SOURCE, "hub_or_folder", "model_index.json", "", revision)
    ]


def prompt_inputs(prompts) -> list[Input]:
    """Return the files of a config's prompt set (``prompts``: its ``prompts`` block)."""
    from dag_jax.data import prompts as prompt_sets
    from dag_jax.data.prompts import PromptError

    name = str(prompts.name)
    if name == "inline":
        return []
    if name.startswith("tfds:"):
        data_dir = str(prompts.get("data_dir", "") or "")
        if not data_dir:  # TFDS's own default folder
            return []
        source = f"prepare the dataset with TensorFlow Datasets in that folder ({name})"
        flag = "--config.prompts.data_dir=<folder>"
        return [Input(f"the TFDS data of {name!r}", data_dir, flag, source, "folder")]
    try:
        files = prompt_sets.files_of(name)
    except PromptError:
        from dag_jax.configs.base import did_you_mean

        known = ", ".join(prompt_sets.names())
        hint = did_you_mean(name, prompt_sets.names())
        problem = f"no prompt set {name!r}{hint}"
        return [Input("the prompt set", name, "--config.prompts.name", known, problem=problem)]
    root, flag = str(prompts.get("root", "") or ""), "--config.prompts.root=<folder>"
    if root:
        folder, download = Path(root).expanduser(), False
    elif os.environ.get(prompt_sets.ENV_ROOT):
        folder, download = Path(os.environ[prompt_sets.ENV_ROOT]).expanduser(), False
        flag += f" (now ${prompt_sets.ENV_ROOT})"
    else:
        cache = os.environ.get(prompt_sets.ENV_CACHE) or Path.home() / ".cache" / "dag_jax"
        folder, download = Path(cache).expanduser() / "prompts", True
    return [
        Input(
            f"prompt file {rel} of prompt set {name!r}",
            str(folder / rel),
            flag,
            prompt_sets.SOURCES.get(rel, "the prompt set's source"),
            download=download,
        )
        for rel in files
    ]


@dataclasses.dataclass(frozen=True)
class RewardFile:
    """A reward option naming an input: its kind, whether it must be given, its default."""

    option: str
    kind: str
    source: str
    required: bool = False
    default: str = ""  # used when the option is not given ("" = nothing read)
    marker: str = ""
    hub_file: str = ""


AESTHETIC_HEAD = (
    "sac+logos+ava1-l14-linearMSE.pth of LAION's improved-aesthetic-predictor, "
    "https://github.com/christophschuhmann/improved-aesthetic-predictor"
)
HPS = "HPS_v2.1_compressed.pt (v2.0: HPS_v2_compressed.pt) from https://huggingface.co/xswu/HPSv2"
OPEN_CLIP_H = (
    "OpenCLIP ViT-H-14 laion2b_s32b_b79k weights (open_clip_pytorch_model.bin), "
    "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
)
CLIP_FOLDER = "a transformers CLIPModel folder (save_pretrained) or its hub id"
REWARD_FILES: dict[str, tuple[RewardFile, ...]] = {
    "aesthetic": (
        RewardFile("head", "file", AESTHETIC_HEAD, required=True),
        RewardFile(
            "clip", "hub_or_folder", CLIP_FOLDER, default="openai/clip-vit-large-patch14",
            marker="config.json",
        ),
    ),
    "clipscore": (
        RewardFile("checkpoint", "file", OPEN_CLIP_H, required=True),
        RewardFile("tokenizer", "folder", "a transformers CLIPTokenizer folder"),
    ),
    "hpsv2": (
        RewardFile("checkpoint", "file", HPS, required=True),
        RewardFile("tokenizer", "folder", "a transformers CLIPTokenizer folder"),
    ),
    "tiny_clipscore": (
        RewardFile("clip", "folder", TINY_SOURCE, default="<tiny clip>", marker="config.json"),
    ),
    "imagereward": (
        RewardFile(
            "checkpoint", "hub_file", f"ImageReward.pt from {HUB}THUDM/ImageReward",
            default="THUDM/ImageReward", hub_file="ImageReward.pt",
        ),
        RewardFile("med_config", "file", f"med_config.json from {HUB}THUDM/ImageReward"),
        RewardFile(
            "tokenizer", "hub_file", f"the bert-base-uncased tokenizer, {HUB}bert-base-uncased",
            default="bert-base-uncased", hub_file="vocab.txt",
        ),
    ),
    "pickscore": (
        RewardFile(
            "model", "hub_or_folder", f"{CLIP_FOLDER}, e.g. yuvalkirstain/PickScore_v1",
            default="yuvalkirstain/PickScore_v1", marker="config.json",
        ),
    ),
}  # fmt: skip


def reward_inputs(name: str, options: Mapping[str, Any], prefix: str = "") -> list[Input]:
    """Return the files reward ``name`` reads with ``options`` (a ``mix``: those of its parts).

    Options in ``REWARD_FILES`` are checked as listed there; any other option whose value looks
    like a local path (``/``, ``./``, ``~``) must exist.
    """
    flag = f"--config.reward.options.{prefix}"
    if name == "mix":
        parts = options.get("parts") or {k: {} for k in options.get("weights", {})}
        out = []
        for part, spec in parts.items():
            spec = _as_dict(spec)
            sub = f"{prefix}parts.{part}.options."
            out += reward_inputs(
                str(spec.get("reward") or part), _as_dict(spec.get("options")), sub
            )
        return out
    out, listed = [], set()
    for rf in REWARD_FILES.get(name, ()):
        listed.add(rf.option)
        value = options.get(rf.option)
        value = str(value) if value not in (None, "") else rf.default
        what = f"reward {name!r} option {rf.option}"
        if value == "<tiny clip>":
            from dag_jax.tinyworld.assets import TINY_CLIP

            value = str(TINY_CLIP)
        if not value:
            if rf.required:
                problem = "not given (the reward has no default for it)"
                out.append(
                    Input(what, None, f"{flag}{rf.option}=<path>", rf.source, problem=problem)
                )
            continue
        kind = rf.kind
        if kind == "hub_file" and _local_looking(value):
            kind = "file" if not Path(value).expanduser().is_dir() else "folder"
        out.append(
            Input(what, value, f"{flag}{rf.option}=<path>", rf.source, kind, rf.marker, rf.hub_file)
        )
    for option, value in options.items():
        if option in listed or not isinstance(value, str) or not _local_looking(value):
            continue
        what = f"reward {name!r} option {option}"
        source = "the file or folder the reward's documentation names"
        out.append(Input(what, value, f"{flag}{option}=<path>", source, "path"))
    return out


def feature_model_inputs(spec: str, model: str, flag: str) -> list[Input]:
    """Return the input of an evaluation feature model ``spec`` ("": the default for ``model``)."""
    from dag_jax.eval.features import default_feature_model

    spec = spec or default_feature_model(model)
    what = "the evaluation feature model"
    if spec == "pixels" or spec.startswith("pixels:"):
        return []
    if spec.startswith("inception:"):
        source = "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torchvision's inception_v3"
        return [Input(what, spec.partition(":")[2], f"{flag}=inception:<file>", source)]
    if spec.count(":") == 1 and not _local_looking(spec) and "://" not in spec:
        return []  # module:factory, imported when used
    return [Input(what, spec, f"{flag}=<CLIP folder or hub id>", CLIP_FOLDER, "hub_or_folder",
                  "config.json")]  # fmt: skip


# --------------------------------------------------------------------------- looking them up


def check_inputs(config, extra: Sequence[Input] = ()) -> list[Finding]:
    """Look up every input of ``config`` (and ``extra``); return the findings, or raise
    MissingInputs listing every missing one. Inputs fetched on first use are logged."""
    findings = [find(i) for i in [*config_inputs(config), *extra]]
    missing = [f for f in findings if f.status == "missing"]
    if missing:
        raise MissingInputs(missing)
    for f in findings:
        if f.status in ("download", "unchecked"):
            log.info("%s %s: %s", f.input.what, f.input.value, f.detail)
    return findings


def find(item: Input) -> Finding:
    """Return what is found of ``item`` (no network: the hub cache and local files only)."""
    value = item.value
    if item.problem or value is None:
        return Finding(item, "missing", item.problem or "not given")
    if "://" in value:
        return _find_url(item)
    path = Path(value).expanduser()
    if item.kind in ("hub_or_folder", "hub_file") and _is_hub_id(value, item.kind == "hub_file"):
        return _find_on_hub(item, item.hub_file or item.marker)
    if item.kind in ("folder", "hub_or_folder"):
        if not path.is_dir():
            return Finding(item, "missing", f"no such folder {value!r}")
        if item.marker and not (path / item.marker).is_file():
            return Finding(item, "missing", f"{value} holds no {item.marker}")
        return Finding(item, "ok", "found")
    if item.kind == "path":
        ok = path.exists()
        return Finding(item, "ok" if ok else "missing", "found" if ok else f"no such path {value}")
    if path.is_file():
        return Finding(item, "ok", "found")
    if item.download:
        return Finding(item, "download", f"not there yet; will be downloaded from {item.source}")
    return Finding(item, "missing", f"no such file {value}")


def _find_on_hub(item: Input, filename: str) -> Finding:
    repo = str(item.value)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return Finding(item, "missing", f"{repo!r} is a hub id and huggingface_hub is missing")
    try:
        cached = try_to_load_from_cache(repo, filename, revision=item.revision or None)
    except Exception as err:  # noqa: BLE001 - a malformed id or revision: not in the cache
        return Finding(item, "missing", f"{repo!r} is neither a folder nor a hub id ({err})")
    if isinstance(cached, str):
        return Finding(item, "ok", "in the hub cache")
    if hub_offline():
        return Finding(
            item,
            "missing",
            f"no such folder, and the hub id {repo!r} is not in the hub cache while the hub is "
            "offline (HF_HUB_OFFLINE)",
        )
    return Finding(item, "download", f"will be downloaded from {HUB}{repo}")


def _find_url(item: Input) -> Finding:
    try:
        from etils import epath

        ok = epath.Path(str(item.value)).exists()
    except Exception as err:  # noqa: BLE001 - no filesystem for the scheme, no credentials
        return Finding(item, "unchecked", f"could not be looked up here ({type(err).__name__})")
    return Finding(item, "ok" if ok else "missing", "found" if ok else "no such object")


def hub_offline() -> bool:
    """Return whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _local_looking(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or os.sep in value and Path(value).exists()


def _is_hub_id(value: str, bare: bool = False) -> bool:
    """Return whether ``value`` is read as a hub id: ``owner/name`` that is no local path (as
    ``weights.diffusers.resolve`` reads a model); ``bare``: a lone ``name`` too."""
    parts = value.split("/")
    if value.startswith(("/", ".", "~")) or Path(value).expanduser().exists():
        return False
    return len(parts) == 2 and all(parts) or bare and len(parts) == 1 and bool(value)


def _as_dict(options: Any) -> dict:
    if options is None:
        return {}
    return options.to_dict() if hasattr(options, "to_dict") else dict(options)
