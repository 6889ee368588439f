"""What every job does around its work: logging, connecting to Ray, and turning known errors into exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
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


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray.

    A local Ray listens on 127.0.0.1 only, with its dashboard there too: Ray Train cleans up the
    placement groups of runs that die through the dashboard's State API (without it, they leak and
    a sweep that stops trials hangs). ``kwargs`` such as ``num_cpus`` size a local Ray only: an
    existing cluster has its own resources.
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


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def run_job(name: str, body: Callable[[], dict | None]) -> int:
    """Run a job body: print its result as one JSON line, the last line of the output.

    A :class:`~mltr.errors.MltrError` (bad flags or input) exits 2 with one line; Ctrl-C exits 130
    with one line; any other exception is a bug and keeps its traceback (exit 1).
    """
    ray_before = _ray_initialized()
    try:
        result = body()
    except MltrError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # Ray prints its workers' deduplicated log lines ("[repeated 3x across cluster]") when it
    # disconnects: a job that connected disconnects first, so the result stays the last line.
    if not ray_before and _ray_initialized():
        sys.modules["ray"].shutdown()
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0
