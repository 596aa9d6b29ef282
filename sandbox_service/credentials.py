"""Cloud credentials stay out of the runtime environments Ray writes to its logs.

Ray Tune 2.60 copies four AWS variables from the driver's environment into every trial actor's
runtime env (`ENV_VARS_TO_PROPAGATE` in `ray/tune/execution/class_cache.py`), and Ray writes each
runtime env, values included, to `runtime_env_agent.log` in the node's session logs and shows it
in the dashboard. A study therefore runs its Tuner with those four taken out of Tune's list:
- trials on the driver's machine still have them: local Ray's workers inherit the driver's
  environment through the raylet it starts;
- trials on other nodes use the node's own credentials (instance profile, IRSA, a mounted
  Secret), which is what docs/cluster.md sets up.
`SANDBOX_TUNE_COPIES_AWS_CREDENTIALS=1` restores Ray's behaviour for a cluster whose nodes have
no credentials of their own; the driver then warns, naming the variables (never their values).
"""

from __future__ import annotations

import contextlib
import os
import sys

TUNE_COPIED_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SECURITY_TOKEN",
    "AWS_SESSION_TOKEN",
)
LET_TUNE_COPY = "SANDBOX_TUNE_COPIES_AWS_CREDENTIALS"


def set_credentials(environ) -> list[str]:
    """The names of Tune's copied credentials that are set in `environ`."""
    return [name for name in TUNE_COPIED_CREDENTIALS if environ.get(name)]


def warn_copied(names: list[str], why: str) -> None:
    print(
        f"warning: {', '.join(names)} set here and {why}: Ray Tune copies them into every "
        "trial's runtime environment, which Ray writes in plain text to runtime_env_agent.log in "
        "each node's Ray session logs and shows in its dashboard. Give the nodes their own "
        "credentials instead (instance profile, IRSA, a mounted Secret); see docs/cluster.md",
        file=sys.stderr,
    )


@contextlib.contextmanager
def kept_from_trials(environ=os.environ):
    """Within this block, Ray Tune starts trial actors without the driver's AWS credentials in
    their runtime env (unless `SANDBOX_TUNE_COPIES_AWS_CREDENTIALS=1`). Yields the names that
    would have been copied and were not."""
    names = set_credentials(environ)
    if environ.get(LET_TUNE_COPY) == "1":
        if names:
            warn_copied(names, f"{LET_TUNE_COPY}=1")
        yield []
        return
    from ray.tune.execution import class_cache

    original = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if not isinstance(original, set | frozenset):  # a Ray whose Tune no longer works this way
        if names:
            warn_copied(names, f"this Ray {_ray_version()} cannot be told otherwise")
        yield []
        return
    class_cache.ENV_VARS_TO_PROPAGATE = set(original) - set(TUNE_COPIED_CREDENTIALS)
    if names:
        print(
            f"note: {', '.join(names)} are not copied into trials' runtime environments (Ray "
            "logs those in plain text): trials on this machine inherit them, trials on other "
            f"nodes use their node's own credentials. {LET_TUNE_COPY}=1 lets Ray Tune copy them.",
            file=sys.stderr,
        )
    try:
        yield names
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = original


def _ray_version() -> str:
    import ray

    return ray.__version__
