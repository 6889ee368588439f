"""The whole pipeline as one job: preprocess -> train (or tune) -> register -> promote.

    mltr pipeline --dataset coco --root /data/coco2014 --out s3://bucket/datasets --config coco --use-gpu
    mltr pipeline --dataset voc --root ./VOCdevkit --out ./datasets --config tiny --sweep --promote

Every stage is the stage's own job (``jobs.preprocess``, ``jobs.train`` or ``jobs.tune``,
``jobs.register``, ``jobs.promote``), called in this one driver on one Ray. Training and sweep
flags are ``mltr train``'s and ``mltr tune``'s (``--config`` finds the ``train`` presets, or the
``tune`` presets with ``--sweep``); the dataset is ``<out>/<dataset>``.

Running it again skips what is done:

- preprocess, when ``<out>/<dataset>/_manifest.json`` was converted from the same annotation
  files (its source fingerprint equals the source's) with the same image settings;
- train (tune), when the run (sweep) of that name finished with the same flags on the same data
  (one that finished otherwise is refused): the default name is
  ``<dataset>-<model>-<fingerprint>-<flags>``, a digest of the dataset's fingerprint and of the
  flags and image settings that change what is trained, so the same flags on the same data find
  the same run; an unfinished one resumes from its checkpoint;
- register, when the name already holds a version of that run's current model;
- promote, when that version is already the champion.

Ends with one JSON line: each stage's result and whether it was skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from jobs import preprocess as preprocess_job
from jobs import promote as promote_job
from jobs import register as register_job
from jobs import train as train_job
from jobs import tune as tune_job
from jobs._config import component, opt, parse_config, replace_flat, to_dict
from jobs._models import TrackingArgs
from jobs._runtime import init_ray, run_job, setup_logging
from mltr.errors import ConfigError
from pipeline.convert import output_root

log = logging.getLogger("jobs.pipeline")

# Flags that say where or how a run happens, not what it trains: the same run under any of them.
# For a run, those mltr train resumes it under, but --epochs (a run of more epochs follows another
# schedule), --init-from (the start of a new run) and --data (in the name as the dataset's
# fingerprint); for a sweep, those mltr tune restarts it under (any other change would be refused
# there, so it names another sweep).
RUN_PLACE_FLAGS = train_job.RESUME_FREE - {"epochs", "init_from", "data"}
SWEEP_PLACE_FLAGS = frozenset(tune_job.RESTART_FREE)
# Conversion flags that change the images a run trains on (the fingerprint is of the annotations).
IMAGE_FLAGS = ("max_side", "quality")


@dataclass(frozen=True)
class PipelineArgs:
    """Whether to convert again, sweep, and what to do with the trained model."""

    reconvert: bool = opt(False, "convert again even when the converted dataset matches the source")
    allow_shrink: bool = opt(
        False, "convert over a committed dataset even if this conversion has under half of its rows"
    )
    sweep: bool = opt(
        False, "a Ray Tune sweep (mltr tune's flags) instead of one run; its best trial goes on"
    )
    register_as: str | None = opt(None, "registered model name (default: mltr-<dataset>)")
    promote: bool = opt(False, "then promote the new version if it beats the champion on --promote-split")
    promote_split: str = opt("val", "the split candidate and champion are scored on")
    min_gain: float = opt(0.0, "the least mAP gain over the champion that promotes")


@dataclass(frozen=True)
class PipelineConfig:
    """Preprocess, train (or sweep), register and promote: one job, re-runs skip what is done."""

    conversion: preprocess_job.ConversionArgs = component(preprocess_job.ConversionArgs)
    pipeline: PipelineArgs = component(PipelineArgs)
    sweep: tune_job.SweepArgs = component(tune_job.SweepArgs)
    train: train_job.TrainConfig = component(train_job.TrainConfig)

    def __post_init__(self):
        if not self.pipeline.sweep and self.sweep != tune_job.SweepArgs():
            given = [
                f"--{k.replace('_', '-')}"
                for k, v in to_dict(self.sweep).items()
                if v != to_dict(tune_job.SweepArgs())[k]
            ]
            raise ConfigError(f"{', '.join(given)}: sweep flags, which only --sweep uses")
        if self.train.data.uri.rstrip("/") != self.conversion.uri:
            raise ConfigError(
                f"--data is <out>/<dataset> in a pipeline ({self.conversion.uri}), got {self.train.data.uri}"
            )


def parse(argv: list[str] | None) -> PipelineConfig:
    """Flags as ``parse_config`` reads them, with ``--data`` from ``--out``/``--dataset`` and the
    presets of ``tune`` (with ``--sweep``) or ``train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--dataset", default="coco")
    early.add_argument("--out", default="")
    early.add_argument("--data", default=None)
    early.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=False)
    known, _ = early.parse_known_args(argv)
    if known.data is None and known.out and not any(a in ("-h", "--help") for a in argv):
        argv += ["--data", f"{known.out.rstrip('/')}/{known.dataset}"]
    return parse_config(PipelineConfig, argv, prog="mltr pipeline", job="tune" if known.sweep else "train")


def flags_digest(config: PipelineConfig) -> str:
    """What the training (or sweep) flags and the image settings say to train, as a short digest
    (see RUN_PLACE_FLAGS and SWEEP_PLACE_FLAGS)."""
    sweep = config.pipeline.sweep
    flags = {**to_dict(config.train), **(to_dict(config.sweep) if sweep else {})}
    place = SWEEP_PLACE_FLAGS if sweep else RUN_PLACE_FLAGS
    kept = {k: v for k, v in sorted(flags.items()) if k not in place and k != "data"}
    kept |= {k: getattr(config.conversion, k) for k in IMAGE_FLAGS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def stage_preprocess(config: PipelineConfig, address: str | None) -> dict[str, Any]:
    from pipeline.dataset import DatasetNotFound, load_manifest
    from pipeline.readers import read_index

    conversion = config.conversion
    uri = conversion.uri
    if not config.pipeline.reconvert:
        try:
            manifest = load_manifest(uri)
        except DatasetNotFound:
            manifest = None
        if manifest is not None:
            index = read_index(conversion.dataset, conversion.root)  # annotations only: the fingerprint
            stored = (manifest.image.max_side, manifest.image.quality)
            same_images = stored == (conversion.max_side, conversion.quality)
            hollow = [s for s in manifest.splits if manifest.rows(s) == 0]
            if hollow:  # the images were not where the annotations say last time: look again
                log.info("1/4 preprocess: %s has no rows in %s: converting again", uri, ", ".join(hollow))
            elif manifest.fingerprint == index.fingerprint and same_images:
                log.info("1/4 preprocess: skipped, %s was converted from these annotations", uri)
                return {
                    "skipped": True,
                    "uri": uri,
                    "fingerprint": manifest.fingerprint,
                    "rows": {s: manifest.rows(s) for s in manifest.splits},
                    "rejects": manifest.rejects.total,
                    "rejects_file": manifest.location.join(manifest.rejects.file).uri,
                }
            else:
                log.info(
                    "1/4 preprocess: %s is from other annotations or image settings: converting again", uri
                )
    log.info("1/4 preprocess: converting %s (%s) into %s", conversion.root, conversion.dataset, uri)
    result = preprocess_job.run(
        preprocess_job.PreprocessConfig(
            conversion=conversion, allow_shrink=config.pipeline.allow_shrink, address=address
        )
    )
    manifest = load_manifest(result["uri"])
    return {
        "skipped": False,
        "uri": result["uri"],
        "fingerprint": manifest.fingerprint,
        "rows": result["rows"],
        "rejects": sum(result["rejects"].values()),
        "rejects_file": result["rejects_file"],
    }


def _client(train: train_job.TrainConfig):
    # The pipeline trains into this store: on a new workdir its SQLite file is not there yet.
    return TrackingArgs(mlflow_uri=train.run.mlflow_uri, workdir=train.run.workdir).client(existing=False)


def check_same_training(run, what: str, params: dict[str, str], free, fingerprint: str) -> None:
    """Refuse to take a finished run (sweep) for this one when it was trained with other flags or
    on other data, as mltr train (tune) refuses to resume it: under an explicit --name, or on
    data converted again from the same annotations."""
    from mltr import tracking

    logged = run.data.params
    changes = [
        f"--{k.replace('_', '-')} {logged[k]} (now {params[k]})"
        for k in tracking.changed_params(logged, params, free)
    ]
    recorded = run.data.tags.get("mltr.dataset_fingerprint")
    if recorded and recorded != fingerprint:
        changes.append(f"dataset fingerprint {recorded} (now {fingerprint})")
    if changes:
        raise ConfigError(
            f"{what} (MLflow run {run.info.run_id}) finished with other flags or data: {', '.join(changes)}; "
            f"give a new --name, or none (the name is then derived from the flags and the data)"
        )


def finished_training(
    client, train: train_job.TrainConfig, name: str, fingerprint: str
) -> dict[str, Any] | None:
    """The finished run of this name (trained for at least --epochs), as train's result says it;
    else None. A finished run trained otherwise is refused (:func:`check_same_training`)."""
    from mltr import tracking

    experiment = client.get_experiment_by_name(train.run.experiment)
    if experiment is None:
        return None
    runs = tracking.runs_tagged(client, [experiment.experiment_id], tracking.NAME_TAG, name)
    if not runs or runs[0].info.status != "FINISHED":
        return None
    run = runs[0]
    params = {k: tracking.param_value(v) for k, v in to_dict(train).items()}
    check_same_training(run, f"run {name!r}", params, train_job.RESUME_FREE, fingerprint)
    if int(run.data.tags.get(tracking.EPOCHS_TAG) or 0) < train.optim.epochs:
        return None  # asked for more epochs now: jobs.train extends it
    metrics = run.data.metrics
    return {
        "name": name,
        "mlflow_run_id": run.info.run_id,
        "mlflow_uri": client.tracking_uri,
        "calib_mAP": metrics.get("calib_mAP"),
        "val_mAP": metrics.get("val_mAP"),
        "label_frequency_baseline_mAP": metrics.get("label_frequency_baseline_mAP"),
        "model_uri": run.data.tags.get("mltr.model_uri"),
        "checkpoint": run.data.tags.get("mltr.checkpoint"),
    }


def finished_sweep(
    config: PipelineConfig, client, train: train_job.TrainConfig, name: str, fingerprint: str
) -> dict[str, Any] | None:
    """The finished sweep of this name with a best trial, as tune's result says it; else None.
    A finished sweep run otherwise is refused (:func:`check_same_training`)."""
    from mltr import tracking

    experiment = client.get_experiment_by_name(train.run.experiment)
    if experiment is None:
        return None
    runs = tracking.runs_tagged(client, [experiment.experiment_id], tune_job.SWEEP_TAG, name)
    if not runs or runs[0].info.status != "FINISHED" or not runs[0].data.tags.get("mltr.best_run_id"):
        return None
    run = runs[0]
    params = tune_job.param_values(tune_job.SweepConfig(sweep=config.sweep, train=train))
    check_same_training(run, f"sweep {name!r}", params, tune_job.RESTART_FREE, fingerprint)
    best_run = client.get_run(run.data.tags["mltr.best_run_id"])
    return {
        "name": name,
        "parent_run_id": run.info.run_id,
        "mlflow_uri": client.tracking_uri,
        "best": {
            "config": json.loads(run.data.tags.get("mltr.best_config", "{}")),
            "mlflow_run_id": best_run.info.run_id,
            "calib_mAP": best_run.data.metrics.get("calib_mAP"),
            "val_mAP": best_run.data.metrics.get("val_mAP"),
            "model_uri": run.data.tags.get("mltr.best_model_uri"),
        },
    }


def default_name(config: PipelineConfig, fingerprint: str) -> str:
    """The run's (sweep's) name: dataset, model, the data's fingerprint and the digest of the flags."""
    sweep = "sweep-" if config.pipeline.sweep else ""
    return (
        f"{config.conversion.dataset}-{sweep}{config.train.model.variant}-"
        f"{fingerprint.rpartition(':')[2][:8]}-{flags_digest(config)}"
    )


def run_name(config: PipelineConfig, fingerprint: str) -> str:
    """The name the training stage runs (or finds) under: ``--name``, else :func:`default_name`."""
    return config.train.run.name or default_name(config, fingerprint)


def stage_train(config: PipelineConfig, fingerprint: str) -> tuple[dict[str, Any], str]:
    """Train (or sweep), or find the finished run of the same name: (its result, the run to register)."""
    from pipeline.dataset import load_manifest

    args, train = config.pipeline, config.train
    kind = "sweep" if args.sweep else "run"
    name = run_name(config, fingerprint)
    train = replace_flat(train, name=name)
    client = _client(train)
    done = (
        finished_sweep(config, client, train, name, fingerprint)
        if args.sweep
        else finished_training(client, train, name, fingerprint)
    )
    if done is not None:
        log.info("2/4 %s: skipped, %s %r finished (MLflow run %s)", "tune" if args.sweep else "train",
                 kind, name, done.get("parent_run_id") or done["mlflow_run_id"])  # fmt: skip
        return {"skipped": True, **done}, (
            done["best"]["mlflow_run_id"] if args.sweep else done["mlflow_run_id"]
        )
    if args.sweep:
        log.info("2/4 tune: sweep %r", name)
        result = tune_job.run(tune_job.SweepConfig(sweep=config.sweep, train=train))
        if result["best"] is None:
            raise ConfigError(f"sweep {name!r} ended with no trial that finished: nothing to register")
        return {"skipped": False, **result}, result["best"]["mlflow_run_id"]
    manifest = load_manifest(train.data.uri)
    log.info(
        "2/4 train: run %r, %s on %s (%d epochs)", name, train.model.variant, manifest.uri, train.optim.epochs
    )
    result = train_job.run(train)
    return {"skipped": False, **result}, result["mlflow_run_id"]


def stage_register(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    from mltr import registry

    train = config.train
    client = _client(train)
    name = config.pipeline.register_as or registry.default_name(config.conversion.dataset)
    # The version of this run's model as it is now: a run extended (more epochs) logged a new model.
    model_uri = client.get_run(run_id).data.tags.get("mltr.model_uri")
    of_run = (
        client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if _model_exists(client, name)
        else []
    )
    existing = [v for v in of_run if model_uri and v.source == model_uri]
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        log.info("3/4 register: skipped, %s version %s is run %s's model", name, version.version, run_id)
        return {
            "skipped": True,
            "name": name,
            "version": int(version.version),
            "model_uri": f"models:/{name}/{version.version}",
            "aliases": registry.aliases(client, name),
        }
    log.info("3/4 register: run %s as a new version of %s", run_id, name)
    result = register_job.run(
        register_job.RegisterConfig(
            run_id=run_id, name=name, tracking=TrackingArgs(train.run.mlflow_uri, train.run.workdir)
        )
    )
    result.pop("tags", None)
    return {"skipped": False, **result}


def _model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # the registry could not answer: not a missing model
        return False
    return True


def stage_promote(config: PipelineConfig, registered: dict[str, Any]) -> dict[str, Any]:
    from mltr import registry
    from pipeline.dataset import load_manifest

    args, train = config.pipeline, config.train
    name, version = registered["name"], str(registered["version"])
    client = _client(train)
    champion = registry.aliases(client, name).get(registry.CHAMPION)
    if champion == version:
        log.info("4/4 promote: skipped, %s version %s is the champion", name, version)
        return {"skipped": True, "decision": "already-champion", "champion": version}
    # Judged before against this champion on the same data and split: the same images, the same
    # models, the same decision.
    tags = client.get_model_version(name, version).tags
    manifest = load_manifest(train.data.uri)
    recorded = {
        k.removeprefix(promote_job.PROMOTION): v
        for k, v in tags.items()
        if k.startswith(promote_job.PROMOTION)
    }
    if (
        recorded.get("champion") == champion
        and recorded.get("data") == f"{manifest.uri}#{args.promote_split}"
        and recorded.get("dataset_fingerprint") == manifest.fingerprint
        and recorded.get("min_gain") == f"{args.min_gain:g}"
    ):
        log.info(
            "4/4 promote: skipped, %s version %s was %s against champion version %s on %s",
            name, version, recorded.get("decision"), champion, recorded["data"],
        )  # fmt: skip
        return {
            "skipped": True,
            "decision": recorded.get("decision"),
            "champion": champion,
            "recorded": recorded,
        }
    log.info("4/4 promote: %s version %s against the champion on %s", name, version, args.promote_split)
    result = promote_job.run(
        promote_job.PromoteConfig(
            name=name,
            version=int(version),
            data=train.data.uri,
            split=args.promote_split,
            min_gain=args.min_gain,
            tracking=TrackingArgs(train.run.mlflow_uri, train.run.workdir),
        )
    )
    return {"skipped": False, **result}


def local_cpus(config: PipelineConfig) -> int:
    """Logical CPUs of a local Ray for the training (or sweep) stage, the largest of the stages."""
    if config.pipeline.sweep:
        return tune_job.local_cpus(tune_job.SweepConfig(sweep=config.sweep, train=config.train))
    return train_job.local_cpus(config.train)


def run(config: PipelineConfig) -> dict:
    args, train = config.pipeline, config.train
    output_root(config.conversion.out)  # a bad --out or an unreachable store: refused before Ray starts
    # One Ray for every stage, sized for the largest (a cluster has its own resources).
    init_ray(train.run.address, num_cpus=local_cpus(config))
    converted = stage_preprocess(config, train.run.address)
    trained, run_id = stage_train(config, converted["fingerprint"])
    registered = stage_register(config, run_id)
    promoted = stage_promote(config, registered) if args.promote else None
    return {
        "preprocess": converted,
        "tune" if args.sweep else "train": trained,
        "register": registered,
        "promote": promoted,
        "config": {**to_dict(config.conversion), **to_dict(args), "name": trained["name"]},
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse(argv)
    return run_job("pipeline", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
