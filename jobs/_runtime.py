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


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray.

    ``kwargs`` such as ``num_cpus`` size a local Ray only: an existing cluster has its own resources.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # "local": always a new local instance, never a cluster some other process left running.
        address = "local"
        kwargs.setdefault("include_dashboard", False)
    else:
        for local_only in ("num_cpus", "num_gpus", "include_dashboard", "object_store_memory"):
            kwargs.pop(local_only, None)
    ray.init(address=address, **kwargs)


def run_job(name: str, body: Callable[[], dict | None]) -> int:
    """Run a job body: print its result as one JSON line.

    A :class:`~mltr.errors.MltrError` (bad flags or input) exits 2 with one line; Ctrl-C exits 130
    with one line; any other exception is a bug and keeps its traceback (exit 1).
    """
    try:
        result = body()
    except MltrError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0
