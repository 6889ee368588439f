"""Register a training run's model as a new version and point ``challenger`` at it.

    mltr register --run-id 0123abcd... [--name mltr-coco] [--alias challenger] [--mlflow-uri URI]

The version's tags say what it is: dataset and its fingerprint, variant, window size, loss,
calibration and validation mAP (as training logged them), git commit when known. Ends with one
JSON line: ``name``, ``version``, ``model_uri``, ``aliases``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from jobs._config import component, opt, parse_config
from jobs._models import TrackingArgs
from jobs._runtime import run_job, setup_logging
from mltr import registry
from mltr.errors import ConfigError

log = logging.getLogger("jobs.register")


@dataclass(frozen=True)
class RegisterConfig:
    """Which run's model, under which name."""

    run_id: str | None = opt(None, "the training run (or sweep trial) whose model to register")
    name: str | None = opt(None, "registered model name (default: mltr-<dataset>)")
    alias: str = opt(registry.CHALLENGER, "alias to point at the new version ('' for none)")
    tracking: TrackingArgs = component(TrackingArgs)


def run(config: RegisterConfig) -> dict:
    if not config.run_id:
        raise ConfigError("--run-id is required")
    client = config.tracking.client()
    try:
        run = client.get_run(config.run_id)
    except Exception:  # MLflow raises its own exception for an unknown id
        raise ConfigError(f"no run {config.run_id} in {client.tracking_uri}") from None
    name = config.name
    if name is None:
        dataset = (
            run.data.tags.get("mltr.dataset")
            or run.data.tags.get("mltr.dataset_uri", "").rstrip("/").rsplit("/", 1)[-1]
        )
        if not dataset:
            raise ConfigError(f"run {config.run_id} names no dataset (tag mltr.dataset_uri): pass --name")
        name = registry.default_name(dataset)
    version = registry.register_run(client, config.run_id, name, alias=config.alias or None)
    current = registry.aliases(client, name)
    log.info("registered %s version %s; aliases %s", name, version.version, current)
    return {
        "name": name,
        "version": int(version.version),
        "model_uri": f"models:/{name}/{version.version}",
        "aliases": current,
        "tags": dict(version.tags),
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(RegisterConfig, argv, prog="mltr register", job="register")
    return run_job("register", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
