"""Weighted mixes of rewards: ``reward.name = "mix"``, total = Σ weight_i · reward_i.

    reward = dag_jax.rewards.get("mix", weights={"imagereward": 1.0, "aesthetic": 0.1})
    reward = dag_jax.rewards.get("mix", parts={
        "imagereward": {"weight": 1.0, "options": {"checkpoint": "ImageReward.pt"}},
        "aesthetic": {"weight": 0.1, "options": {"head": "sac+logos+ava1-l14-linearMSE.pth"}},
        "small_jpeg": {"reward": "jpeg_compressibility", "weight": 0.01},
    })

In a config (``ml_collections``; a new key cannot be added from the command line, so a mix is
written in a config file or passed as a whole)::

    c.reward.name = "mix"
    c.reward.options.parts = {"imagereward": {"weight": 1.0, "options": {...}},
                              "aesthetic": {"weight": 0.1, "options": {"head": "..."}}}

Options (give exactly one of the two):

- ``weights``: part name → weight; each part is the registered reward of that name with its
  default options.
- ``parts``: part name → ``{"weight": w, "options": {...}, "reward": name}``; ``options`` are
  the part's keyword options (default none), ``reward`` the registered reward it runs (default:
  the part's name), so one reward can appear twice with different options.

Weights are finite numbers; negative ones penalise, and a weight of 0 scores (and logs) a part
without training on it. Each part's own scale stays as it is (ImageReward is standardised,
PickScore ≈ 20, JPEG in kB), so the weights carry the units. Part names become the metric tags
``reward/<name>``: letters, digits, ``_``, ``-`` and ``.``.

How it runs: when every part is JAX-native the mix is JAX-native, one jitted function scoring
every part on the same quantised images (the weights of all parts enter as one argument, a dict
part name → that part's ``params``). A host part (JPEG, BERTScore) makes the mix a host reward
(``jittable=False``): the training loop then scores the process's own rows on the host, the
in-graph parts through one jitted function compiled once per prompt list, the host parts as
themselves; inside a jitted program (DAG's forward-looking rewards) the in-graph parts stay in
the graph and each host part is its own ``pure_callback``. ``MixReward.parts_scorer`` gives every
part's score, unweighted, so the loop logs them (``train/collect.py``), and evaluation scores
each part on its own too, as ``<mix>/<part>`` (``named_parts``). One cost to know: a host mix
called eagerly (``reward(images, prompts)``, as evaluation scores host rewards) compiles its
in-graph parts once per distinct set of prompts in a call (the last 8 sets are kept).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.rewards.base import Reward, RewardError

NAME = "mix"
PART_KEYS = ("weight", "options", "reward")
_PART_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_CACHED_SCORERS = 8  # prompt lists whose part scorers an eager caller keeps compiled


@dataclasses.dataclass(frozen=True)
class PartSpec:
    """One part of a mix, checked but not built: its name, reward, weight and options."""

    name: str
    reward: str
    weight: float
    options: dict


@dataclasses.dataclass(frozen=True)
class MixReward(Reward):
    """A Reward whose score is Σ weight_i · part_i; the parts stay reachable for logging.

    ``params`` is a dict part name → that part's ``params`` (None for host parts).
    """

    part_names: tuple[str, ...] = ()
    parts: tuple[Reward, ...] = ()
    weights: tuple[float, ...] = ()
    _scorers: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def combine(self, scores):
        """Return Σ weight_i · scores[..., i] in float32 (numpy in, numpy out; jax likewise).

        The terms are added in the parts' order, the same in the graph and on the host.
        """
        xp = jnp if isinstance(scores, jax.Array | jax.core.Tracer) else np
        scores = xp.asarray(scores, xp.float32)
        total = None
        for i, w in enumerate(self.weights):
            term = xp.float32(w) * scores[..., i]
            total = term if total is None else total + term
        return total

    def bind_parts(self, prompt_list: Sequence[str]) -> Callable:
        """Return ``fn(params, images, prompt_idx)`` → (..., n_parts) unweighted part scores.

        Traceable: in-graph parts are traced, host parts call back to the host.
        """
        fns = [p.bound_with_params(prompt_list) for p in self.parts]
        names = self.part_names

        def fn(params, images, prompt_idx):
            cols = [f(params[n], images, prompt_idx) for f, n in zip(fns, names)]
            return jnp.stack([jnp.asarray(c, jnp.float32) for c in cols], axis=-1)

        return fn

    def parts_scorer(
        self, prompts: Sequence[str], to_host: Callable[[Any], np.ndarray] = np.asarray
    ) -> Callable[[Any, Any], np.ndarray]:
        """Return ``score(images, prompt_idx)`` → (B, n_parts) float32 host part scores.

        In-graph parts run as one jitted function (compiled once per prompt list and kept);
        host parts score the host images against the prompt strings. ``images`` and
        ``prompt_idx`` may be device arrays (``to_host`` brings them over, e.g.
        ``parallel.gather``) or host arrays.
        """
        key = (tuple(prompts), to_host)
        if key not in self._scorers:
            while len(self._scorers) >= _CACHED_SCORERS:
                self._scorers.pop(next(iter(self._scorers)))
            self._scorers[key] = self._make_scorer(list(prompts), to_host)
        return self._scorers[key]

    def _make_scorer(self, table: list[str], to_host: Callable) -> Callable:
        graph = [i for i, p in enumerate(self.parts) if p.jittable]
        host = [i for i, p in enumerate(self.parts) if not p.jittable]
        jitted = None
        if graph:
            fns = {i: self.parts[i].bound_with_params(table) for i in graph}
            names = self.part_names

            def run(params, images, prompt_idx):
                cols = [fns[i](params[names[i]], images, prompt_idx) for i in graph]
                return jnp.stack([jnp.asarray(c, jnp.float32) for c in cols], axis=-1)

            jitted = jax.jit(run)

        def score(images, prompt_idx) -> np.ndarray:
            out = np.zeros((images.shape[0], len(self.parts)), np.float32)
            if jitted is not None:
                idx = prompt_idx
                if not isinstance(idx, jax.Array):
                    idx = np.asarray(idx, np.int32)
                out[:, graph] = np.asarray(to_host(jitted(self.params, images, idx)))
            if host:
                pixels = np.asarray(to_host(images), np.float32)
                rows = np.asarray(to_host(prompt_idx)).reshape(-1)
                texts = [table[int(i)] for i in rows]
                for i in host:
                    out[:, i] = np.asarray(self.parts[i](pixels, texts), np.float32)
            return out

        return score

    def part_scores(self, images, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Return {part name: (B,) float32 unweighted scores} of eager images and prompts."""
        prompts = list(prompts)
        unique = sorted(set(prompts))
        idx = np.asarray([unique.index(p) for p in prompts], np.int32)
        scores = self.parts_scorer(unique)(np.asarray(images, np.float32), idx)
        return {n: scores[:, i] for i, n in enumerate(self.part_names)}


def named_parts(name: str, reward: Reward) -> dict[str, Reward]:
    """Return {"<name>/<part>": part Reward} of a mix (for scoring each part on its own), or {}."""
    if not isinstance(reward, MixReward):
        return {}
    return {f"{name}/{n}": p for n, p in zip(reward.part_names, reward.parts)}


def mix(
    parts: Mapping[str, Mapping[str, Any]] | None = None,
    weights: Mapping[str, float] | None = None,
) -> MixReward:
    """Return the weighted mix of ``parts`` (name → {weight, options, reward}) or ``weights``.

    Every part is checked (names, weights, option keys) before any is built; a part's own
    loading errors come back as RewardError naming the part.
    """
    specs = parse(parts=parts, weights=weights)
    from dag_jax import rewards

    built = []
    for spec in specs:
        try:
            built.append(rewards.get(spec.reward, **spec.options))
        except RewardError as err:
            raise RewardError(f"reward 'mix', part {spec.name!r}: {err}") from err
    return mix_reward(specs, built)


def mix_reward(specs: Sequence[PartSpec], parts: Sequence[Reward]) -> MixReward:
    """Return the MixReward of built ``parts`` with the names and weights of ``specs``."""
    if len(specs) != len(parts) or not parts:
        raise RewardError(f"reward {NAME!r}: {len(specs)} part specs for {len(parts)} rewards")
    names = tuple(s.name for s in specs)
    weights = tuple(float(s.weight) for s in specs)
    jittable = all(p.jittable for p in parts)
    config = {
        "parts": {
            s.name: {"reward": s.reward, "weight": s.weight, "options": dict(p.config)}
            for s, p in zip(specs, parts)
        }
    }
    holder: dict[str, MixReward] = {}

    def bind_params(prompt_list: Sequence[str]) -> Callable:
        mixed = holder["reward"]
        fn = mixed.bind_parts(prompt_list)
        return lambda params, images, prompt_idx: mixed.combine(fn(params, images, prompt_idx))

    def bind(prompt_list: Sequence[str]) -> Callable:
        fn = bind_params(prompt_list)
        return lambda images, prompt_idx: fn(holder["reward"].params, images, prompt_idx)

    def host(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        mixed = holder["reward"]
        scores = mixed.part_scores(np.asarray(images, np.float32) / 255.0, prompts)
        return mixed.combine(np.stack([scores[n] for n in names], axis=-1))

    reward = MixReward(
        name=NAME,
        bind=bind,
        jittable=jittable,
        config=config,
        host=None if jittable else host,
        params={s.name: p.params for s, p in zip(specs, parts)},
        bind_params=bind_params,
        part_names=names,
        parts=tuple(parts),
        weights=weights,
    )
    holder["reward"] = reward
    return reward


# ---------------------------------------------------------------------------------------------
# Checking the options (also used by the config check, before anything is built)


def plain(value: Any) -> Any:
    """Return ``value`` with ConfigDicts and other mappings turned into plain dicts."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def check_options(options: Mapping[str, Any]) -> list[PartSpec]:
    """Return the PartSpecs of a config's ``reward.options`` for a mix (see ``parse``).

    Keys other than ``parts`` and ``weights`` raise RewardError with a did-you-mean.
    """
    options = plain(options) or {}
    unknown = sorted(set(options) - {"parts", "weights"})
    if unknown:
        hint = _did_you_mean(unknown[0], ("parts", "weights"))
        raise RewardError(
            f"reward {NAME!r} has no option(s) {', '.join(unknown)}{hint}; its options: "
            "parts, weights"
        )
    return parse(**options)


def parse(
    parts: Mapping[str, Mapping[str, Any]] | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[PartSpec]:
    """Return the checked PartSpecs of a mix's options, or raise RewardError naming the problem.

    Refused: both or neither of ``parts``/``weights``, an empty mix, a part name that is not
    ``[A-Za-z0-9_.-]+``, an unknown reward (with a did-you-mean), a nested mix, a weight that
    is not a finite number, a part entry with keys other than ``weight``/``options``/``reward``
    or without ``weight``, and options that are not a mapping.
    """
    from dag_jax import rewards

    parts, weights = plain(parts), plain(weights)
    if parts and weights:
        raise RewardError(
            f"reward {NAME!r}: give either parts= (name → {{weight, options}}) or weights= "
            "(name → weight), not both"
        )
    if weights:
        if not isinstance(weights, Mapping):
            raise RewardError(f"reward {NAME!r}: weights must map part names to numbers")
        parts = {name: {"weight": w} for name, w in weights.items()}
    if not parts:
        raise RewardError(
            f"reward {NAME!r} needs at least one part: e.g. weights={{'imagereward': 1.0, "
            "'aesthetic': 0.1}} or parts={'imagereward': {'weight': 1.0, 'options': {...}}}"
        )
    if not isinstance(parts, Mapping):
        raise RewardError(f"reward {NAME!r}: parts must map part names to {{weight, options}}")
    known = [n for n in rewards.names() if n != NAME]
    specs = []
    for name, entry in parts.items():
        where = f"reward {NAME!r}, part {name!r}"
        if not isinstance(name, str) or not _PART_NAME.match(name):
            raise RewardError(f"{where}: a part name is letters, digits, '_', '-' or '.'")
        if not isinstance(entry, Mapping):
            raise RewardError(
                f"{where}: expected {{'weight': w, 'options': {{...}}}}, got {entry!r}"
            )
        extra = sorted(set(entry) - set(PART_KEYS))
        if extra:
            raise RewardError(
                f"{where}: unknown key(s) {extra}{_did_you_mean(extra[0], PART_KEYS)}; "
                f"a part has {PART_KEYS}"
            )
        if "weight" not in entry:
            raise RewardError(f"{where} has no weight")
        reward = entry.get("reward") or name
        if reward == NAME:
            raise RewardError(f"{where}: a mix cannot contain a mix (list its parts instead)")
        if reward not in known:
            raise RewardError(
                f"{where}: unknown reward {reward!r}{_did_you_mean(reward, known)}; "
                f"known rewards: {', '.join(known)}"
            )
        options = entry.get("options") or {}
        if not isinstance(options, Mapping):
            raise RewardError(f"{where}: options must be a mapping, got {options!r}")
        specs.append(PartSpec(name, reward, check_weight(entry["weight"], where), dict(options)))
    return specs


def check_weight(weight: Any, where: str) -> float:
    """Return ``weight`` as a float, raising RewardError unless it is a finite real number."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise RewardError(f"{where}: the weight must be a number, got {weight!r}")
    if not math.isfinite(float(weight)):
        raise RewardError(f"{where}: the weight must be finite, got {weight!r}")
    return float(weight)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
