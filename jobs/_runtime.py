"""What every job does around its work: logging, connecting to Ray, and turning known errors into exit codes."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from mltr.errors import MltrError

EXIT_USER_ERROR = 2  # a MltrError: bad flags or input, one line naming the problem
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# Ray's switch for a local-only Ray (despite its name): node IP 127.0.0.1 and every listener of GCS,
# raylet, workers and dashboard on loopback. Without it Ray turns a 127.0.0.1 node address back
# into the machine's external one and opens its ports there (measured: ../shared/DESIGN.md).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_only_ray() -> None:
    """Make the Ray this process starts listen on the loopback address only.

    Ray reads the switch when it is imported; this process has imported it already, so the value
    it read is set too, and the environment carries it to the processes Ray starts.
    """
    from ray._private import ray_constants

    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# A local Ray's jobs get these in their environment. Ray Train's preemption watcher (an actor per
# run, polling Ray Core for nodes being drained) has nothing to watch on the one node of a local
# Ray, which no autoscaler or cloud provider drains: one process fewer per run and per trial.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray.

    A local Ray listens on 127.0.0.1 only, with its dashboard there too: Ray Train cleans up the
    placement groups of runs that die through the dashboard's State API (without it, they leak and
    a sweep that stops trials hangs). Its job's processes get :data:`LOCAL_RAY_ENV` (a
    ``runtime_env`` of the job: this process's environment, and other Rays it starts, are left as
    they are). ``kwargs`` such as ``num_cpus`` size a local Ray only: an existing cluster has its
    own resources.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # "local": always a new local instance, never a cluster some other process left running.
        address = "local"
        local_only_ray()
        kwargs.setdefault("include_dashboard", True)
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {**LOCAL_RAY_ENV, **runtime_env.get("env_vars", {})}
        kwargs["runtime_env"] = runtime_env
    else:
        for local_only in (
            "num_cpus",
            "num_gpus",
            "include_dashboard",
            "dashboard_host",
            "object_store_memory",
        ):
            kwargs.pop(local_only, None)
    ray.init(address=address, **kwargs)


def covers(resources: dict[str, float], bundles: list[dict[str, float]]) -> bool:
    """Whether ``resources`` hold the sum of ``bundles`` (totals only: placing them is Ray's job)."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    return all(resources.get(key, 0.0) >= amount for key, amount in need.items())


_requested = False  # whether this process holds a request to the cluster's autoscaler


def wait_for_resources(
    bundles: list[dict[str, float]], timeout: float, poll: float = 5.0
) -> dict[str, float]:
    """The cluster's resources, once they hold ``bundles`` or ``timeout`` seconds have passed.

    An autoscaling cluster (KubeRay's GPU workers at ``minReplicas: 0``, the cluster launcher's
    ``min_workers: 0``) starts smaller than a run needs. With ``timeout`` > 0 the bundles are
    requested from its autoscaler (``ray.autoscaler.sdk.request_resources``, a hint it acts on at
    once) and the cluster is polled until they fit. The request stays until
    :func:`withdraw_resource_request`, which the jobs call when the run ends: an autoscaler removes
    nodes idle past its timeout, and the run's placement group and actors come seconds after the
    wait. A cluster without an autoscaler does not grow, and the wait ends at ``timeout``; the
    caller's checks then say what is missing. ``timeout`` 0 returns the resources as they are.

    The request is the cluster's one request (a later one from any job replaces it): on a shared
    cluster two jobs waiting at once each get at least what the other asked for, or their own.
    """
    global _requested
    import ray
    from ray.autoscaler.sdk import request_resources

    resources = ray.cluster_resources()
    if timeout <= 0 or covers(resources, bundles):
        return resources
    deadline = time.monotonic() + timeout
    request_resources(bundles=bundles)
    _requested = True
    log = logging.getLogger("mltr")
    log.info(
        "the cluster has %s; waiting up to %gs for its autoscaler to add %d bundles %s",
        {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
        timeout,
        len(bundles),
        sorted({tuple(sorted(b.items())) for b in bundles}),
    )
    while not covers(resources, bundles) and time.monotonic() < deadline:
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        resources = ray.cluster_resources()
    log.info("the cluster has %s", {k: v for k, v in resources.items() if k in ("CPU", "GPU")})
    return resources


def withdraw_resource_request() -> None:
    """Withdraw the request :func:`wait_for_resources` made, if this process made one: what the
    run still holds keeps its nodes, and the autoscaler may remove the others once idle."""
    global _requested
    import ray
    from ray.autoscaler.sdk import request_resources

    if _requested and ray.is_initialized():
        request_resources(bundles=[])
    _requested = False


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def run_job(name: str, body: Callable[[], dict | None]) -> int:
    """Run a job body: print its result as one JSON line, the last line of the output.

    A :class:`~mltr.errors.MltrError` (bad flags or input) exits 2 with one line; Ctrl-C exits 130
    with one line; either line is the last of the output. Any other exception is a bug and keeps
    its traceback (exit 1).
    """
    ray_before = _ray_initialized()

    def disconnect() -> None:
        # Ray prints its workers' deduplicated log lines ("[repeated 3x across cluster]") when it
        # disconnects: a job that connected disconnects first, so its own line stays the last.
        if not ray_before and _ray_initialized():
            sys.modules["ray"].shutdown()

    try:
        result = body()
    except MltrError as exc:
        disconnect()
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        disconnect()
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    disconnect()
    if result is not None:
        print(json.dumps(json_safe(result)), flush=True)
    return 0


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``null``: the last line is JSON any parser reads (Python's
    ``json`` writes ``NaN``, which is not JSON), e.g. the mAP of a split without positives."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
