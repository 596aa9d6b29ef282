"""The search-space file: a study's question, model, data, budget, search and resources.

    name: lr-micro                      # folder name under the storage root
    question: Does the optimal lr stay put as width grows under μP?
    model: {preset: micro-64}           # a preset plus any ModelConfig overrides
    data: {sources: [embedded:python-stdlib], vocab_size: 2048}
    train: {tokens: 2e6, batch_size: 16, seq_len: 128, lr: 0.01, schedule: {kind: wsd}}
    search:
      algorithm: grid                   # grid | random | hyperopt (TPE)
      space:
        train.lr: {grid: [0.003, 0.01, 0.03]}
        model.preset: {grid: [micro-64, micro-256]}
      scheduler: {kind: asha}           # optional early stopping
    resources: {cpu: 1, gpu: 0}
    tracking: {wandb: {project: minicpm-sandbox}}

`load_spec(path)` validates everything (every searched value too) before anything starts and
raises `SpecError` naming the file, the key path and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox_service import yaml_safe
from sandbox_service.branching import BranchingSpec, decay_steps
from trainables.data import DataConfig
from trainables.dictconfig import ConfigError, from_dict, to_dict
from trainables.shapes import ModelConfig
from trainables.tracking import WandbConfig
from trainables.trainer import TrainConfig
from trainables.trial import parse_trial_config

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: `$` also matches before a "\n"
ALGORITHMS = ("grid", "random", "hyperopt")
KINDS = {  # distribution kind -> number of arguments (None: a non-empty list of values)
    "grid": None,
    "choice": None,
    "uniform": 2,
    "loguniform": 2,
    "randint": 2,
    "quniform": 3,
    "qloguniform": 3,
}
SEARCHABLE = ("model.", "train.")


class SpecError(ValueError):
    """A search-space file is invalid; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Distribution:
    path: str  # dotted key in the trial config, e.g. "train.lr"
    kind: str
    args: tuple  # grid/choice: the values; ranges: (low, high[, q])

    def samples(self) -> list:
        """Values that must each make a valid trial: every listed value, or the range ends."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        return list(self.args[:2])


@dataclass(frozen=True)
class SchedulerSpec:
    kind: str = "asha"
    grace_fraction: float = 0.1  # first rung at this fraction of each trial's budget
    reduction_factor: float = 3.0
    brackets: int = 1

    def __post_init__(self):
        if self.kind != "asha":
            raise ValueError(f"kind={self.kind!r}: allowed asha")
        rungs_ok = self.reduction_factor > 1 and 1 <= self.brackets <= 100
        if not 0 < self.grace_fraction < 1 or not rungs_ok:
            raise ValueError(
                "need 0 < grace_fraction < 1, reduction_factor > 1, 1 <= brackets <= 100"
            )


@dataclass(frozen=True)
class SearchSpec:
    algorithm: str = "grid"
    space: dict = field(default_factory=dict)
    num_samples: int = 1  # grid: repeats of the whole grid; random/hyperopt: trials
    max_concurrent: int = 2
    metric: str = "val_loss"
    mode: str = "min"
    seed: int = 0
    scheduler: SchedulerSpec | None = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}: allowed {', '.join(ALGORITHMS)}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode={self.mode!r}: allowed min, max")
        if not 1 <= self.num_samples <= 100_000 or not 1 <= self.max_concurrent <= 10_000:
            raise ValueError("num_samples must be in 1..100000 and max_concurrent in 1..10000")
        if not 0 <= self.seed < 2**32:  # numpy's RandomState, which Tune's searchers seed
            raise ValueError(f"seed={self.seed}: must be in [0, 2**32)")


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0  # per trial; fractions allowed (several trials per core)
    gpu: float = 0.0  # per trial; fractions share a GPU

    def __post_init__(self):
        if not 0 < self.cpu <= 1024 or not 0 <= self.gpu <= 64:
            raise ValueError(
                f"cpu={self.cpu}, gpu={self.gpu}: need 0 < cpu <= 1024, 0 <= gpu <= 64"
            )


@dataclass(frozen=True)
class Tracking:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class _SpecFile:
    """The file's top level, as written; StudySpec adds the parsed search space."""

    name: str
    question: str
    model: dict
    train: dict
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: Resources = field(default_factory=Resources)
    tracking: Tracking = field(default_factory=Tracking)
    branching: BranchingSpec | None = None
    analysis: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StudySpec:
    name: str
    question: str
    model: dict
    train: dict
    data: DataConfig
    search: SearchSpec
    resources: Resources
    tracking: Tracking
    space: tuple[Distribution, ...]
    source: str
    branching: BranchingSpec | None = None  # WSD decays branched from stable runs
    analysis: dict = field(default_factory=dict)  # what `sandbox report` fits
    raw: dict = field(default_factory=dict, compare=False)  # the file as written

    def base_config(self) -> dict:
        """The trial config with no searched values substituted."""
        return {
            "model": copy.deepcopy(self.model),
            "train": copy.deepcopy(self.train),
            "data": to_dict(self.data),
        }

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "question": self.question,
            "model": self.model,
            "train": self.train,
            "data": to_dict(self.data),
            "search": to_dict(self.search),
            "resources": to_dict(self.resources),
            "tracking": to_dict(self.tracking),
            "branching": to_dict(self.branching),
            "analysis": self.analysis,
        }

    def fingerprint(self) -> str:
        """Hash of the file as written, less tracking and analysis (they change no trial): a
        rerun may resume only the same study."""
        d = {k: v for k, v in self.raw.items() if k not in ("tracking", "analysis")}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> StudySpec:
    """Load and validate a search-space file; `overrides` are `key.path=yaml-value` strings
    applied first (e.g. `data.sources=[corpus.txt]`), and become part of the study's spec."""
    path = str(path)
    try:
        raw = yaml_safe.load(path)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SpecError(f"--set {item!r}: expected key.path=value")
            if not isinstance(raw, dict):
                break
            set_path(raw, key.strip(), yaml_safe.loads(value, f"--set {key}"))
        return parse_spec(raw, path)
    except (yaml_safe.YamlError, ConfigError) as e:
        raise SpecError(f"{path}: {e}" if not str(e).startswith(path) else str(e)) from None


def parse_spec(raw: Any, source: str = "<spec>") -> StudySpec:
    try:
        top = from_dict(_SpecFile, raw, "")
        top = replace(top, data=replace(top.data, sources=absolute_sources(top.data.sources)))
        _check_name(top.name)
        space = tuple(_distribution(k, v) for k, v in top.search.space.items())
        spec = StudySpec(
            name=top.name,
            question=top.question.strip(),
            model=top.model,
            train=top.train,
            data=top.data,
            search=top.search,
            resources=top.resources,
            tracking=top.tracking,
            space=space,
            source=source,
            raw=copy.deepcopy(raw),
            branching=top.branching,
            analysis=top.analysis,
        )
        _check_search(spec)
        _check_trials(spec)
        _check_branching(spec)
        if spec.analysis:
            from sandbox_service import analysis

            analysis.validate(spec.analysis, spec)
    except ConfigError as e:
        raise SpecError(f"{source}: {e}") from None
    return spec


def absolute_sources(sources: tuple[str, ...]) -> tuple[str, ...]:
    """Local relative paths become absolute here, where the user ran the command: trials run
    in their own working directories (and on other nodes)."""
    return tuple(
        s if "://" in s or s.startswith("embedded:") or os.path.isabs(s) else os.path.abspath(s)
        for s in sources
    )


def _check_name(name: str) -> None:
    if not NAME.match(name) or ".." in name:
        raise ConfigError(
            f"name: {name!r} is not allowed; use 1-64 letters, digits, '_', '-', "
            "'.', starting with a letter or digit, no '..' and no '/'"
        )


def _distribution(path: Any, value: Any) -> Distribution:
    where = f"search.space.{path}"
    if not isinstance(path, str) or not path.startswith(SEARCHABLE) or path.count(".") > 3:
        raise ConfigError(
            f"{where}: searchable keys start with model. or train. "
            "(the data is prepared once per study)"
        )
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(KINDS)}: ...}}")
    ((kind, args),) = value.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; allowed: {', '.join(KINDS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list")
    n = KINDS[kind]
    if n is None:
        return Distribution(path, kind, tuple(args))
    return Distribution(path, kind, _range_args(kind, args, n, f"{where}.{kind}"))


def _range_args(kind: str, args: list, n: int, where: str) -> tuple:
    if len(args) != n or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) <= sys.float_info.max
        for a in args  # finite, and an int that fits a float
    ):
        raise ConfigError(
            f"{where}: expected {n} finite numbers [low, high{', q' if n == 3 else ''}]"
        )
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"{where}: empty range, low {low} must be < high {high}")
    if "log" in kind and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if n == 3 and not 0 < args[2] <= high - low:
        raise ConfigError(f"{where}: q={args[2]} must be in (0, high - low]")
    return tuple(args)


def _check_search(spec: StudySpec) -> None:
    kinds = {d.kind for d in spec.space}
    if spec.search.algorithm == "grid" and kinds - {"grid"}:
        raise ConfigError(
            "search.space: algorithm grid takes only {grid: [...]} distributions; "
            "use algorithm random or hyperopt for ranges"
        )
    if spec.search.algorithm != "grid" and "grid" in kinds:
        raise ConfigError(
            f"search.space: algorithm {spec.search.algorithm} samples; write "
            "{choice: [...]} instead of {grid: [...]}"
        )
    if spec.search.algorithm == "hyperopt" and not spec.space:
        raise ConfigError("search.space: hyperopt needs at least one searched key")
    trials = math.prod(len(d.args) for d in spec.space if d.kind == "grid")
    if trials * spec.search.num_samples > 100_000:
        raise ConfigError(
            f"search.space: the grid has {trials:,} points x num_samples "
            f"{spec.search.num_samples}; at most 100,000 trials per study"
        )


def _check_trials(spec: StudySpec) -> None:
    """Every searched value must make a valid trial: check each one against the base config."""
    parse_trial_config(spec.base_config())
    for dist in spec.space:
        _check_integer_range(dist)
    for dist in spec.space:
        for value in dist.samples():
            try:
                parse_trial_config(set_path(spec.base_config(), dist.path, value))
            except ConfigError as e:
                raise ConfigError(
                    f"search.space.{dist.path}: value {value!r} is invalid: {e}"
                ) from None


FLOAT_KINDS = ("uniform", "loguniform", "quniform", "qloguniform")  # Tune samples floats
TRIAL_SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def _check_integer_range(dist: Distribution) -> None:
    """A float range on an integer key would hand trials values like 37.4 (refused only when a
    trial starts) or 64.0; refuse it here and point to randint or choice."""
    if dist.kind in FLOAT_KINDS and _is_integer(field_type(dist.path)):
        raise ConfigError(
            f"search.space.{dist.path}.{dist.kind}: {dist.path} is an integer but {dist.kind} "
            "samples floats; use {randint: [low, high]} (both ends included) or "
            "{choice: [...]}"
        )


def field_type(path: str) -> Any:
    """The declared type of a dotted trial-config key (`train.schedule.warmup_steps` -> int);
    None when the path names no dataclass field (e.g. model.preset)."""
    section, *keys = path.split(".")
    owner, hint = TRIAL_SECTIONS.get(section), None
    for key in keys:
        hints = typing.get_type_hints(owner) if dataclasses.is_dataclass(owner) else {}
        if key not in hints:
            return None
        hint = hints[key]
        owner = hint
    return hint


def _is_integer(hint: Any) -> bool:
    """int, or an optional int (`int | None`); not a float, a bool or a tuple of ints."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return int in args and float not in args
    return hint is int


FIXED_IN_BRANCHING = ("train.batch_size", "train.seq_len", "train.tokens", "train.schedule")


def _check_branching(spec: StudySpec) -> None:
    """Branches share their stable run's batches and schedule, so those may not be searched."""
    if spec.branching is None:
        return
    for dist in spec.space:
        if dist.path.startswith(FIXED_IN_BRANCHING) or dist.path == "train.tokens_per_param":
            raise ConfigError(
                f"search.space.{dist.path}: a branching study fixes the batch, "
                "sequence length, budget and schedule of its stable runs"
            )
    # The stable run and the longest branch must be valid runs too (e.g. within the token cap).
    b = spec.branching
    train = parse_trial_config(spec.base_config()).train
    _check_run_steps(train, b.steps[-1], "the stable run")
    fractions = b.decay_fractions + ((b.cosine_fraction,) if b.cosine_baselines else ())
    longest = b.steps[-1] + decay_steps(b.steps[-1], max(fractions))
    _check_run_steps(train, longest, "the longest branch")


def _check_run_steps(train: TrainConfig, steps: int, what: str) -> None:
    try:
        replace(train, tokens=steps * train.tokens_per_step, tokens_per_param=None)
    except ValueError as e:
        raise ConfigError(f"branching.steps: {what} ({steps:,} steps) is invalid: {e}") from None


def set_path(config: dict, path: str, value: Any) -> dict:
    """Set a dotted key (`train.schedule.decay_fraction`) in a nested dict; returns the dict."""
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {key} is not a mapping")
    node[leaf] = value
    return config
