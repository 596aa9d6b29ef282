"""Analyses of finished studies: from trials.csv and history.csv to fitted laws, tables and plots.

A spec's optional `analysis:` section names the kind and its options, e.g.

    analysis: {kind: lr_transfer, width_key: model.preset, lr_key: train.lr,
               group_key: model.parametrization}

Kinds (MiniCPM wind-tunnel studies, arXiv 2404.06395; minicpm_facts §3):
- `mup_hparams`: the best μP config of a hyperopt/random search and each parameter's sensitivity;
- `lr_transfer`: lr* per width (and parametrisation) and its drift with width;
- `batch_size`: the batch reaching each loss with the fewest tokens, and bs = a / L^b;
- `scaling`: the L(C) envelope, power law vs exponential, and L(N, D) with the optimal D/N;
- `wsd`: WSD decays branched from one stable run against cosine runs of the same length.
Without a section, `analyze` gives the generic report (best trials, curves, loss vs each key).

Each kind is a module with a frozen `Options` dataclass (validated when built), `check(options,
spec)` for what depends on the spec (keys must be searched), and `run(study, options)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import pandas as pd

from sandbox_service.analysis import batch_size, generic, lr_transfer, mup_hparams, scaling, wsd
from sandbox_service.analysis._common import METRICS, Analysis, Study
from sandbox_service.laws._fit import jsonable
from trainables.dictconfig import ConfigError, from_dict

KINDS: dict[str, ModuleType] = {
    "lr_transfer": lr_transfer,
    "mup_hparams": mup_hparams,
    "batch_size": batch_size,
    "scaling": scaling,
    "wsd": wsd,
}

__all__ = ["KINDS", "Analysis", "analyze", "options_of", "validate"]


def options_of(analysis: Mapping):
    """(module, typed options) of an analysis section; ConfigError names the bad key."""
    if not isinstance(analysis, Mapping):
        raise ConfigError(
            f"analysis: expected a mapping such as {{kind: lr_transfer, ...}}, got "
            f"{type(analysis).__name__}"
        )
    kind = analysis.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(
            f"analysis.kind: {kind!r} is not an analysis kind; allowed: {', '.join(KINDS)}"
        )
    module = KINDS[kind]
    rest = {k: v for k, v in analysis.items() if k != "kind"}
    return module, from_dict(module.Options, rest, "analysis")


def validate(analysis: Mapping | None, spec) -> None:
    """Check a spec's `analysis:` section against the spec (an empty section is valid)."""
    if analysis is None or (isinstance(analysis, Mapping) and not analysis):
        return
    module, options = options_of(analysis)
    module.check(options, spec)


def analyze(
    spec, trials: pd.DataFrame, history: pd.DataFrame, *, fingerprint: str | None = None
) -> Analysis:
    """Run the spec's analysis (or the generic report) on a finished study's tables.

    `fingerprint` overrides `spec.fingerprint()` in the provenance: the study folder records the
    fingerprint of the file as written, which a re-parsed spec.yaml need not reproduce.
    """
    section = spec.analysis or {}
    study = Study(spec, trials, history, fingerprint=fingerprint)
    if not section:
        # The search metric may be any reported number; the plots need one with a known unit.
        metric = spec.search.metric if spec.search.metric in METRICS else "val_loss"
        result = generic.run(study, generic.Options(metric=metric))
    else:
        module, options = options_of(section)
        module.check(options, spec)
        result = module.run(study, options)
    # JSON-safe: numpy scalars become Python numbers, NaN and inf become null.
    summary = jsonable({**result.summary, "options": dict(section)})
    return Analysis(result.kind, summary, result.tables, result.figures)
