"""What every job does around its work: logging, connecting to Ray, and turning known errors into exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pipeline.dataset import DatasetNotFound
from pipeline.readers import AnnotationError, LayoutError

# Errors a user fixes by changing input or flags: a message and exit status 2, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (LayoutError, AnnotationError, DatasetNotFound, ValueError)


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
    """Run a job body: print its result as one JSON line; known input errors exit 2 with a message."""
    try:
        result = body()
    except USER_ERRORS as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0
