"""The pipeline file: studies, transfer, pretrain, anneal, SFT, DPO, int4 and evaluation as stages.

    name: micro                               # folder under the storage root
    question: From search-space files to an aligned int4 model, at micro scale.
    stages:                                   # run in this order; `from` names earlier stages
      lr:       {kind: study, spec: ../micro_lr.yaml}
      transfer: {kind: transfer, from: lr, options: {target: micro-64, tokens: 2e6}}
      pretrain: {kind: pretrain, from: transfer, options: {checkpoint_every: 50}}
      anneal:   {kind: anneal, from: pretrain}
      sft:      {kind: sft, from: anneal, options: {steps: 100}}
      dpo:      {kind: dpo, from: sft}
      int4:     {kind: gptq, from: dpo, options: {group_size: 32}}
      eval:     {kind: eval, from: [anneal, sft, dpo, int4]}
      hf:       {kind: export, from: dpo}
    resources: {cpu: 1, gpu: 0}               # default per stage; a stage may set its own

`load_pipeline(path)` validates every stage's options against its kind's config before anything
runs, and raises `PipelineError` naming the file, the stage, the key and what is allowed. Paths
in `spec` are relative to the pipeline file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_service import yaml_safe
from sandbox_service.spec import NAME, SpecError, load_spec
from trainables.dictconfig import ConfigError, from_dict

# kind -> the kinds its `from` may name (None: takes no input)
INPUTS: dict[str, tuple[str, ...] | None] = {
    "study": None,
    "transfer": ("study",),
    "pretrain": ("transfer",),
    "anneal": ("pretrain",),
    "sft": ("anneal", "sft", "dpo"),
    "dpo": ("sft", "dpo"),
    "gptq": ("anneal", "sft", "dpo"),
    "eval": ("anneal", "sft", "dpo", "gptq"),
    "export": ("anneal", "sft", "dpo"),
}
MANY_INPUTS = ("transfer", "eval")  # kinds whose `from` may list several stages


class PipelineError(ValueError):
    """A pipeline file is invalid; the message names the file, the stage and the key."""


@dataclass(frozen=True)
class StageResources:
    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self):
        if not 0 < self.cpu <= 1024:
            raise ValueError(f"cpu={self.cpu}: must be in (0, 1024]")
        if not 0 <= self.gpu <= 64:
            raise ValueError(f"gpu={self.gpu}: must be in [0, 64]")


@dataclass(frozen=True)
class _StageFile:
    kind: str
    spec: str | None = None  # study: the search-space file
    inputs: tuple[str, ...] = ()  # written `from` in the file
    options: dict = field(default_factory=dict)
    resources: StageResources | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    inputs: tuple[str, ...]
    options: dict
    resources: StageResources
    spec: str | None = None  # study: absolute path of the search-space file
    fingerprint: str = ""  # of kind, options, spec content and the inputs' fingerprints


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    question: str
    stages: tuple[Stage, ...]
    source: str

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Load and validate a pipeline file (every stage's options too); see the module docstring."""
    path = str(path)
    try:
        raw = yaml_safe.load(path)
    except yaml_safe.YamlError as e:
        raise PipelineError(str(e)) from None
    return parse_pipeline(raw, path)


def parse_pipeline(raw: Any, source: str) -> PipelineSpec:
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping with name and stages")
    unknown = sorted(set(raw) - {"name", "question", "stages", "resources"})
    if unknown:
        raise PipelineError(
            f"{source}: unknown key(s) {unknown}; allowed name, question, stages, resources"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise PipelineError(f"{source}: name={name!r}: 1-64 letters, digits, '_', '.', '-'")
    default = _resources(raw.get("resources") or {}, f"{source}: resources")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise PipelineError(
            f"{source}: stages: expected a non-empty mapping of stage name -> stage"
        )
    stages: list[Stage] = []
    for stage_name, body in stages_raw.items():
        stages.append(_stage(str(stage_name), body, stages, default, source))
    return PipelineSpec(name, str(raw.get("question", "")).strip(), tuple(stages), source)


def _resources(raw: Any, where: str) -> StageResources:
    try:
        return from_dict(StageResources, raw, "resources")
    except (ConfigError, ValueError) as e:
        raise PipelineError(f"{where}: {e}") from None


def _stage(name: str, body: Any, earlier: list[Stage], default, source: str) -> Stage:
    where = f"{source}: stages.{name}"
    if not NAME.match(name) or name in (s.name for s in earlier):
        raise PipelineError(f"{where}: a stage name must be unique and 1-64 letters/digits/_.-")
    if not isinstance(body, dict):
        raise PipelineError(f"{where}: expected a mapping with kind (and from, options)")
    body = dict(body)
    inputs = body.pop("from", ())
    inputs = (inputs,) if isinstance(inputs, str) else inputs
    try:
        top = from_dict(_StageFile, {**body, "inputs": list(inputs)}, f"stages.{name}")
    except (ConfigError, ValueError) as e:
        raise PipelineError(f"{source}: {e}") from None
    if top.kind not in INPUTS:
        raise PipelineError(f"{where}.kind={top.kind!r}: allowed {', '.join(INPUTS)}")
    _check_inputs(top, earlier, where)
    spec = _study_file(top, source, where)
    options = _check_options(top.kind, top.options, f"{where}.options")
    parents = {s.name: s.fingerprint for s in earlier if s.name in top.inputs}
    digest = {"kind": top.kind, "options": options, "inputs": parents}
    if spec is not None:
        digest["spec"] = load_spec(spec).fingerprint()
    fingerprint = hashlib.sha256(json.dumps(digest, sort_keys=True, default=str).encode())
    return Stage(
        name=name,
        kind=top.kind,
        inputs=tuple(top.inputs),
        options=options,
        resources=top.resources or default,
        spec=spec,
        fingerprint=fingerprint.hexdigest()[:16],
    )


def _check_inputs(top: _StageFile, earlier: list[Stage], where: str) -> None:
    allowed = INPUTS[top.kind]
    if allowed is None:
        if top.inputs:
            raise PipelineError(f"{where}.from: a {top.kind} stage takes no input")
        return
    if not top.inputs:
        raise PipelineError(f"{where}.from: required: an earlier stage of kind {allowed}")
    if len(top.inputs) > 1 and top.kind not in MANY_INPUTS:
        raise PipelineError(f"{where}.from: a {top.kind} stage takes exactly one input")
    kinds = {s.name: s.kind for s in earlier}
    for name in top.inputs:
        if name not in kinds:
            raise PipelineError(
                f"{where}.from: {name!r} is not an earlier stage (earlier: {list(kinds) or 'none'})"
            )
        if kinds[name] not in allowed:
            raise PipelineError(
                f"{where}.from: {name!r} is a {kinds[name]} stage; a {top.kind} stage "
                f"takes {', '.join(allowed)}"
            )


def _study_file(top: _StageFile, source: str, where: str) -> str | None:
    if top.kind != "study":
        if top.spec is not None:
            raise PipelineError(f"{where}.spec: only a study stage has a spec file")
        return None
    if top.spec is None:
        raise PipelineError(f"{where}.spec: required: the study's search-space file")
    path = (Path(source).resolve().parent / top.spec).resolve()
    try:
        load_spec(path)
    except SpecError as e:
        raise PipelineError(f"{where}.spec: {e}") from None
    return str(path)


def _check_options(kind: str, options: dict, where: str) -> dict:
    """Validate a stage's options with its kind's config now, so nothing fails mid-pipeline."""
    from sandbox_service import stages

    try:
        stages.validate_options(kind, options)
    except (ConfigError, ValueError, TypeError) as e:
        raise PipelineError(f"{where}: {e}") from None
    return options
