"""Run a study: a validated StudySpec becomes a Ray Tune `Tuner`, run locally or on a cluster.

    sandbox run search_spaces/smoke.yaml [--storage URL] [--address ADDR] [--wandb-mode MODE]

The study lives in `<storage>/<name>/`: `spec.yaml` (what was asked), `tune/` (Ray Tune's
experiment, which makes a rerun resume: finished trials are kept, unfinished ones continue from
their last checkpoint), and once it ends `trials.csv`, `history.csv` and `summary.json`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from sandbox_service import branching, credentials, results, status, storage
from sandbox_service.spec import Distribution, StudySpec, set_path
from trainables import data
from trainables.dictconfig import to_dict
from trainables.tracking import resolve_mode
from trainables.trial import parse_trial_config, tune_trial


class StudyError(RuntimeError):
    """The study cannot start or continue as asked; the message says why and what to do."""


def study_url(spec: StudySpec, root: str) -> str:
    return storage.join(root, spec.name)


def run_study(
    spec: StudySpec,
    *,
    root: str = storage.DEFAULT_ROOT,
    address: str | None = None,
    wandb_mode: str | None = None,
    num_cpus: int | None = None,
    verbose: int = 1,
) -> dict:
    """Run (or resume) the study; returns its summary, also written to `summary.json`."""
    url = study_url(spec, root)
    try:  # storage that refuses writes fails here, before Ray starts
        storage.check_writable(url)
        claim(spec, url)
        store_root = prepare_data(spec)
    except storage.StorageError as e:
        raise StudyError(f"study {spec.name} cannot start: {e}") from e
    runtime = _runtime(spec, url, wandb_mode) | {"token_store": store_root}
    init_ray(address, num_cpus)
    started = time.time()
    status.mark_running(url)
    try:
        with credentials.kept_from_trials():
            grids = [fit_phase(spec, url, main_phase(spec, runtime), verbose)]
            if spec.branching is not None:
                decay = decay_phase(spec, runtime, grids[0])
                grids.append(fit_phase(spec, url, decay, verbose))
    finally:
        status.clear_running(url)
    try:
        summary = results.write(grids, spec, url, wall_time_s=time.time() - started)
    except storage.StorageError as e:
        raise StudyError(
            f"study {spec.name}: its trials finished but the results could not be written: "
            f"{e}. Rerun `sandbox run {spec.source}` once storage has room: finished trials "
            "are kept and only the tables are written again"
        ) from e
    summary["token_store"] = store_root
    return summary


@dataclass
class Phase:
    """One Tuner run of a study: the main search, or the decays branched from it."""

    name: str  # the experiment folder under the study
    space: dict
    algorithm: str
    num_samples: int
    scheduler: bool  # whether the spec's scheduler (ASHA) applies


def main_phase(spec: StudySpec, runtime: dict) -> Phase:
    space = param_space(spec, runtime)
    if spec.branching is not None:
        tokens_per_step = parse_trial_config(spec.base_config()).train.tokens_per_step
        space["train"] = branching.stable_train(space["train"], spec.branching, tokens_per_step)
    return Phase("tune", space, spec.search.algorithm, spec.search.num_samples, True)


def decay_phase(spec: StudySpec, runtime: dict, stable_grid) -> Phase:
    """Grid over whole trial configs: every decay (and cosine baseline) of every stable run."""
    from ray import tune

    stable = [
        (t.trial_id, {k: v for k, v in t.config.items() if k != "runtime"})
        for t in results.tune_trials(stable_grid)
        if (t.last_result or {}).get("completed") and not t.last_result.get("diverged")
    ]
    if not stable:
        raise StudyError(f"study {spec.name}: no stable run completed, so nothing to branch from")
    tokens_per_step = parse_trial_config(spec.base_config()).train.tokens_per_step
    variants = branching.branch_variants(
        stable, spec.branching, tokens_per_step, runtime["save_root"]
    )
    space = {"variant": tune.grid_search(variants), "runtime": runtime}
    return Phase("tune-decay", space, "grid", 1, False)


def fit_phase(spec: StudySpec, url: str, phase: Phase, verbose: int):
    from sandbox_service.tune_callbacks import CompletionTracker

    tracker = CompletionTracker()
    grid = build_tuner(spec, url, phase, verbose, callbacks=[tracker]).fit()
    left = tracker.unfinished()
    if left:
        raise StudyError(
            f"study {spec.name} was interrupted with {left} trials unfinished; "
            f"rerun `sandbox run {spec.source}` to resume it"
        )
    return grid


def claim(spec: StudySpec, url: str) -> None:
    """Write spec.yaml for a new study; refuse to resume a folder that holds a different spec."""
    marker = storage.join(url, "fingerprint")
    if storage.exists(marker):
        found = storage.read_text(marker).strip()
        if found != spec.fingerprint():
            raise StudyError(
                f"{url} holds a study made from a different spec (fingerprint "
                f"{found} vs {spec.fingerprint()}); rename the study in "
                f"{spec.source} or use another --storage"
            )
        return
    import yaml

    storage.write_text(
        storage.join(url, "spec.yaml"),
        yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True),
    )
    storage.write_text(marker, spec.fingerprint() + "\n")


def prepare_data(spec: StudySpec) -> str:
    """Tokenise once on the driver; every trial then memory-maps the same cached store."""
    t0 = time.perf_counter()
    store = data.prepare(spec.data)
    meta = store.meta
    print(
        f"data: {meta['n_train_tokens']:,} train / {meta['n_val_tokens']:,} val tokens, "
        f"{store.val_bytes_per_token:.2f} bytes/token, vocab {meta['vocab_size']} "
        f"({time.perf_counter() - t0:.1f}s) -> {store.root}"
    )
    cfg = parse_trial_config(spec.base_config())
    print(
        f"trial: {cfg.model.name}, {cfg.train.total_tokens(cfg.model):,} tokens = "
        f"{cfg.train.total_steps(cfg.model)} steps x {cfg.train.tokens_per_step} tokens/step"
    )
    return str(store.root)


def _runtime(spec: StudySpec, url: str, wandb_mode: str | None) -> dict:
    mode = resolve_mode(wandb_mode or spec.tracking.wandb.mode)
    wandb_dir = str(storage.local_path(url)) if storage.is_local(url) else None
    return {
        "study": spec.name,
        "cache_dir": str(data.default_cache_dir()),
        "wandb": to_dict(spec.tracking.wandb),
        "wandb_mode": mode,
        "wandb_dir": wandb_dir,
        "save_root": _save_root(spec, url),
    }


def _save_root(spec: StudySpec, url: str) -> str | None:
    """Where stable runs keep the checkpoints their decays branch from (a shared path)."""
    if spec.branching is None:
        return None
    if not storage.is_local(url):
        raise StudyError(
            f"{spec.source}: branching keeps stable checkpoints on a file system "
            f"path every node can read (local disk or NFS), not {url}"
        )
    return str(storage.local_path(url) / "stable")


def init_ray(address: str | None, num_cpus: int | None, *, log_to_driver: bool = True) -> None:
    """A private local instance unless an address is given (`ray.init()` alone would join any
    instance it finds on the machine). log_to_driver=False keeps workers' logs in Ray's session
    folder (/tmp/ray/session_latest/logs) instead of the terminal; errors still reach the driver."""
    import ray

    # Tune warns at every forced experiment snapshot; with many short trials that is each trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
        )


def param_space(spec: StudySpec, runtime: dict) -> dict:
    from ray import tune

    space = spec.base_config()
    threads = max(1, math.floor(spec.resources.cpu))
    space["train"].setdefault("threads", threads)
    for dist in spec.space:
        set_path(space, dist.path, to_tune(dist, tune))
    space["runtime"] = runtime
    return space


def to_tune(dist: Distribution, tune):
    a = dist.args
    return {
        "grid": lambda: tune.grid_search(list(a)),
        "choice": lambda: tune.choice(list(a)),
        "uniform": lambda: tune.uniform(a[0], a[1]),
        "loguniform": lambda: tune.loguniform(a[0], a[1]),
        "randint": lambda: tune.randint(a[0], a[1] + 1),  # the YAML range is inclusive
        "quniform": lambda: tune.quniform(*a),
        "qloguniform": lambda: tune.qloguniform(*a),
    }[dist.kind]()


def build_tuner(spec: StudySpec, url: str, phase: Phase, verbose: int = 1, callbacks=()):
    from ray import tune

    trainable = tune.with_resources(
        tune_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    )
    exp_path = storage.join(url, phase.name)
    if tune.Tuner.can_restore(exp_path):
        print(f"resuming {exp_path}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(
            exp_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=phase.space,
        )
        # Restore brings back the pickled RunConfig; this run's callbacks replace the old ones.
        tuner._local_tuner._run_config.callbacks = list(callbacks)
        return tuner
    s = spec.search
    tune_config = tune.TuneConfig(
        metric=s.metric,
        mode=s.mode,
        num_samples=phase.num_samples,
        search_alg=_searcher(spec, phase.algorithm),
        # Tune wraps a Searcher in a ConcurrencyLimiter; the variant generator limits itself.
        max_concurrent_trials=s.max_concurrent if phase.algorithm == "hyperopt" else None,
        scheduler=_scheduler(spec) if phase.scheduler else None,
        reuse_actors=True,
        trial_dirname_creator=_trial_dirname,
    )
    # Two kept checkpoints: the newest may be mid-upload when a node dies, the older one is whole.
    run_config = tune.RunConfig(
        name=phase.name,
        storage_path=url,
        verbose=verbose,
        failure_config=tune.FailureConfig(max_failures=2),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks),
    )
    return tune.Tuner(
        trainable, param_space=phase.space, tune_config=tune_config, run_config=run_config
    )


def _searcher(spec: StudySpec, algorithm: str):
    s = spec.search
    if algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(
            random_state_seed=s.seed, n_initial_points=max(2, min(20, s.num_samples // 5))
        )
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=s.seed)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _scheduler(spec: StudySpec):
    sch = spec.search.scheduler
    if sch is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # `progress` (step / total steps) is reported by every trial, so rungs are fractions of
    # each trial's own budget even when budgets differ across trials (tokens_per_param).
    return ASHAScheduler(
        time_attr="progress",
        max_t=1.0,
        grace_period=sch.grace_fraction,
        reduction_factor=sch.reduction_factor,
        brackets=sch.brackets,
    )
