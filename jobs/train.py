"""Train MlTr on a converted dataset across a Ray cluster, tracked in MLflow.

    python -m jobs.train --data s3://bucket/datasets/coco --model mltr_s --num-workers 8 --use-gpu
    python -m jobs.train --config coco --data s3://bucket/datasets/coco   # preset: jobs/presets/train/coco.yaml

parse -> :func:`resolve` (manifest, calibration split, model config: read once, on the driver;
the MLflow server checked) -> :func:`start` (Ray, the datasets, the MLflow run) ->
``mltr.trainer.build_trainer`` -> fit -> :func:`report`, the MLflow run marked FAILED (KILLED
on Ctrl-C) if anything after its start fails. Ends with one JSON line: calib_mAP, val_mAP, epochs, mlflow_run_id, checkpoint, ...
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mlflow.tracking import MlflowClient

from jobs._config import component, opt, parse_config, to_dict
from jobs._runtime import init_ray, run_job, setup_logging, wait_for_resources, withdraw_resource_request
from mltr import tracking
from mltr.checkpoint import check_pretrained
from mltr.config import ModelArgs, OptimConfig, ScalingArgs
from mltr.errors import ConfigError
from mltr.model import MlTrConfig
from mltr.train import epoch_batches, label_frequency_baseline
from mltr.trainer import (
    DataPlan,
    TrainRun,
    best_checkpoint,
    build_trainer,
    epochs_held,
    fit,
    stored_result,
    trained_result,
)
from pipeline.dataset import CalibSplit, Manifest, load_manifest, plan_calibration
from pipeline.ingest import AugmentConfig, IngestConfig, build_dataset, multi_hot
from pipeline.storage import resolve as resolve_storage

log = logging.getLogger("jobs.train")

EVAL_CPUS = 1  # CPUs left free for the evaluation passes' Ray Data tasks beside the decode actors
# Flags a run may be resumed with other values of: where and on what it runs, not what it trains
# (--epochs only grows, checked apart; the data is compared by fingerprint; a resume starts from
# its checkpoint, not from --init-from). Any other flag that differs is refused: a resume with
# another --calib-fraction would select on rows it trained on, another --lr would be ignored.
RESUME_FREE = frozenset(
    {
        "epochs", "address", "mlflow_uri", "experiment", "name", "workdir", "storage", "data", "init_from",
        "max_failures", "oversubscribe", "wait_for_resources", "decode_actors", "cpus_per_worker",
        "gpus_per_worker", "use_gpu", "placement_strategy",
    }
)  # fmt: skip


@dataclass(frozen=True)
class DataArgs:
    """Which dataset, how its train split is cut, and how it is fed."""

    uri: str = opt(
        "", "converted dataset: <out>/<dataset> as written by preprocess (local or s3://)", flag="data"
    )
    calib_fraction: float = opt(
        0.1, "fraction of train held out (by a hash of image_id) to choose the epoch, weights and thresholds"
    )
    calib_max: int = opt(5000, "at most this many calibration images")
    shuffle_buffer: int = opt(256, "rows in each worker's local shuffle buffer")
    decode_actors: int | None = opt(
        None,
        "Ray Data actors (one CPU each) decoding and augmenting the training stream "
        "(default: the cluster's CPUs beside the Train workers, less one for evaluation)",
    )

    def __post_init__(self):
        if not self.uri:
            raise ConfigError("--data is required: the converted dataset, <out>/<dataset>")
        if not 0.0 < self.calib_fraction < 1.0:
            raise ConfigError(f"--calib-fraction must be in (0, 1), got {self.calib_fraction}")
        if self.calib_max < 1:
            raise ConfigError(f"--calib-max must be at least 1, got {self.calib_max}")
        if self.decode_actors is not None and self.decode_actors < 1:
            raise ConfigError(f"--decode-actors must be at least 1, got {self.decode_actors}")


@dataclass(frozen=True)
class RunArgs:
    """Where the run lives: its name, storage, MLflow, the Ray cluster."""

    name: str | None = opt(
        None, "run name; the same name again resumes it (default: <dataset>-<model>-<time>)"
    )
    workdir: str = opt("work", "local folder for the embedded defaults (Ray results, MLflow SQLite store)")
    storage: str | None = opt(
        None, "checkpoints and Ray results: a folder or s3://bucket/prefix (default: <workdir>/ray_results)"
    )
    max_failures: int = opt(0, "worker failures survived by restarting from the last checkpoint")
    mlflow_uri: str | None = opt(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in workdir)"
    )
    experiment: str = opt("mltr", "MLflow experiment")
    address: str | None = opt(None, "Ray address (default: RAY_ADDRESS, else a local Ray)")


@dataclass(frozen=True)
class TrainConfig:
    """Train MlTr on a converted dataset with Ray Train (DDP) and track it in MLflow."""

    model: ModelArgs = component(ModelArgs)
    optim: OptimConfig = component(OptimConfig)
    augment: AugmentConfig = component(AugmentConfig)
    data: DataArgs = component(DataArgs)
    scaling: ScalingArgs = component(ScalingArgs)
    run: RunArgs = component(RunArgs)


@dataclass(frozen=True)
class Resolved:
    """What the driver reads and decides once, before Ray starts: every later step uses it."""

    config: TrainConfig
    manifest: Manifest
    model: MlTrConfig
    calib: CalibSplit
    baseline_mAP: float  # the label-frequency baseline on val (train frequencies, calibration rows excluded)
    mlflow_uri: str  # checked to answer before Ray starts


def resolve(config: TrainConfig) -> Resolved:
    """Read the manifest and the labels once; cut the calibration split; check what the workers would refuse."""
    manifest = load_manifest(config.data.uri)
    manifest.verify(("train", "val"))  # names a missing split, a missing or truncated shard
    model = config.model.resolve(manifest.num_classes)
    if config.model.init_from:
        check_pretrained(model, config.model.init_from)
    check_local_cores(config)
    train = manifest.read_columns("train", ["image_id", "labels", "ignore"])
    val = manifest.read_columns("val", ["labels", "ignore"])
    ids = train["image_id"].to_pylist()
    calib = plan_calibration(ids, config.data.calib_fraction, config.data.calib_max)
    try:  # the workers cut the training stream into epochs with it: refuse here what they would
        epoch_batches(calib.fit_rows, config.scaling.num_workers, config.optim.batch_size, 0)
    except ValueError as exc:
        raise ConfigError(
            f"the train split less its {calib.calib_rows} calibration rows: {exc}: "
            f"lower --batch-size or --num-workers"
        ) from None
    fit = calib.fit.mask(ids)
    train_targets, _ = multi_hot(
        train["labels"].to_pylist(), train["ignore"].to_pylist(), manifest.num_classes
    )
    val_targets, val_ignore = multi_hot(
        val["labels"].to_pylist(), val["ignore"].to_pylist(), manifest.num_classes
    )
    # The epoch and weights are chosen on the calibration rows' mAP, the run is reported on val's:
    # both are means over classes with a positive, so without any there is nothing to choose or report.
    if not train_targets[~fit].any():
        raise ConfigError(
            f"{manifest.uri}: the {calib.calib_rows} calibration rows (of split 'train') hold no "
            f"positive label, so no epoch or weights could be chosen on them: raise --calib-fraction "
            f"or --calib-max"
        )
    if not val_targets.any():
        raise ConfigError(f"{manifest.uri}: split 'val' holds no positive label: the run could not be scored")
    baseline = label_frequency_baseline(train_targets[fit], val_targets, val_ignore)
    mlflow_uri = config.run.mlflow_uri or tracking.default_tracking_uri(Path(config.run.workdir).resolve())
    tracking.check_reachable(mlflow_uri)
    return Resolved(config, manifest, model, calib, baseline, mlflow_uri)


def check_local_cores(config: TrainConfig) -> None:
    """Refuse Train workers that need more CPUs than this machine has, on a local Ray the job would start.

    A local Ray gets more logical CPUs than cores (workers wait on each other and on their data),
    but workers beyond the cores run oversubscribed, each with its own copy of the model.
    """
    import ray

    if config.run.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    cores, need = os.cpu_count() or 1, train_cpus(config.scaling)
    if need > cores and not config.scaling.oversubscribe:
        raise ConfigError(
            f"{config.scaling.num_workers} workers x {config.scaling.cpus_per_worker:g} CPUs need {need} cores; "
            f"this machine has {cores}: lower --num-workers, pass --address of a cluster, or --oversubscribe"
        )


def train_cpus(scaling: ScalingArgs) -> int:
    return math.ceil(scaling.num_workers * scaling.cpus_per_worker)


def local_cpus(config: TrainConfig) -> int:
    """Logical CPUs for a local Ray: the Train workers, a decode actor per core, and evaluation.

    More than the machine's cores on a small machine: the Train workers wait on each other and on
    their data, and an idle reservation would leave a core unused.
    """
    cores = os.cpu_count() or 1
    return max(cores, train_cpus(config.scaling) + (config.data.decode_actors or cores) + EVAL_CPUS)


def decode_actors(config: TrainConfig, cluster_cpus: float) -> int:
    """``--decode-actors``, else every CPU the cluster has beside the Train workers and evaluation."""
    if config.data.decode_actors is not None:
        return config.data.decode_actors
    return max(1, math.floor(cluster_cpus) - train_cpus(config.scaling) - EVAL_CPUS)


def run_bundles(config: TrainConfig, actors: int | None = None) -> list[dict[str, float]]:
    """What a run places on the cluster: a bundle per Train worker, a CPU per decode actor
    (``actors``, else ``--decode-actors``, else at least one: by default they take what the
    cluster has left), the CPU for evaluation."""
    scaling = config.scaling
    return (
        [scaling.resources_per_worker()] * scaling.num_workers
        + [{"CPU": 1.0}] * (actors or config.data.decode_actors or 1)
        + [{"CPU": float(EVAL_CPUS)}]
    )


def run_cpus(config: TrainConfig, actors: int | None = None) -> float:
    """The CPUs of :func:`run_bundles`: what a run needs of the cluster, and a sweep of each trial."""
    return sum(bundle.get("CPU", 0.0) for bundle in run_bundles(config, actors))


def grow_hint(scaling: ScalingArgs) -> str:
    """How to get more of the cluster: what the refusal messages end with."""
    if scaling.wait_for_resources > 0:
        return f"add nodes (the autoscaler did not add them in --wait-for-resources {scaling.wait_for_resources:g}s)"
    return "add nodes, or on an autoscaling cluster pass --wait-for-resources SECONDS"


def check_resources(config: TrainConfig, actors: int) -> None:
    """Fail fast when the cluster cannot place the workers and the decode actors."""
    import ray

    scaling = config.scaling
    total = ray.cluster_resources()
    need_cpu = run_cpus(config, actors)
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"the cluster has {total.get('CPU', 0):g} CPUs; {scaling.num_workers} workers x "
            f"{scaling.cpus_per_worker:g} CPUs, {actors} decode actors and {EVAL_CPUS} CPU for evaluation "
            f"need {need_cpu:g}: lower --num-workers, --cpus-per-worker or --decode-actors, or {grow_hint(scaling)}"
        )
    need_gpu = scaling.num_workers * scaling.gpus_per_worker
    if scaling.use_gpu and total.get("GPU", 0) < need_gpu:
        raise ConfigError(
            f"--use-gpu: {scaling.num_workers} workers x {scaling.gpus_per_worker:g} GPUs need {need_gpu:g}, "
            f"the cluster has {total.get('GPU', 0):g}; lower --num-workers or --gpus-per-worker, or "
            f"{grow_hint(scaling)}"
        )


def data_plan(resolved: Resolved, actors: int) -> DataPlan:
    """The run's datasets, from the manifest already read: train less calibration (every epoch), calib, val."""
    config, manifest, model = resolved.config, resolved.manifest, resolved.model

    def ingest(augment: AugmentConfig | None) -> IngestConfig:
        return IngestConfig(manifest.num_classes, model.image_size, augment=augment, resize=model.resize)

    datasets = {
        "train": build_dataset(
            manifest,
            "train",
            ingest(config.augment),
            rows=resolved.calib.fit,
            passes=config.optim.epochs,
            decode_actors=actors,
        ),
        "calib": build_dataset(manifest, "train", ingest(None), rows=resolved.calib.calib),
        "val": build_dataset(manifest, "val", ingest(None)),
    }
    return DataPlan(datasets, train_rows=resolved.calib.fit_rows, shuffle_buffer=config.data.shuffle_buffer)


def start(
    resolved: Resolved, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> tuple[TrainRun, MlflowClient]:
    """Connect to Ray, build the datasets, then open (or reopen) the MLflow run: the resolved run.

    The MLflow run is opened last, so a failure before it leaves no run behind; from then on
    :func:`run` marks it FAILED (KILLED on Ctrl-C) if anything fails. ``parent_run_id`` makes it a
    child run (a sweep's trial); ``tags`` are added to it.
    """

    config, manifest = resolved.config, resolved.manifest
    workdir = Path(config.run.workdir).resolve()
    name = (
        config.run.name
        or f"{manifest.name}-{config.model.variant}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    )
    storage = resolve_storage(config.run.storage or str(workdir / "ray_results"))
    storage_filesystem = storage.fs if storage.scheme == "s3" else None
    # A run whose checkpoints already hold every epoch is only finished (run() starts no worker
    # group): it neither waits for the workers' nodes nor is refused for lacking them, as after
    # the nodes of a GPU run have left the cluster.
    held = epochs_held(stored_result(storage.path, name, storage_filesystem)) if config.run.name else 0
    trained = held >= config.optim.epochs
    init_ray(config.run.address, num_cpus=local_cpus(config))
    resources = wait_for_resources(run_bundles(config), 0 if trained else config.scaling.wait_for_resources)
    actors = decode_actors(config, resources.get("CPU", 0))
    if not trained:
        check_resources(config, actors)
    data = data_plan(resolved, actors)

    mlflow_uri = resolved.mlflow_uri
    client = MlflowClient(mlflow_uri)
    artifact_root = (workdir / "mlartifacts").as_uri() if mlflow_uri.startswith("sqlite:") else None
    experiment_id = tracking.ensure_experiment(client, config.run.experiment, artifact_root)
    params = to_dict(config) | {
        "resolved_image_size": resolved.model.image_size,
        "resolved_window_size": resolved.model.window_size,
        "calib_rows": resolved.calib.calib_rows,
        "train_rows": resolved.calib.fit_rows,
    }
    commit = source_commit()
    tags = {
        "mltr.dataset": manifest.name,
        "mltr.dataset_uri": config.data.uri,
        "mltr.model": config.model.variant,
        **({"mlflow.source.git.commit": commit} if commit else {}),
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
        **(tags or {}),
    }
    identity = tracking.RunIdentity(
        model_config=tracking.jsonable(dataclasses.asdict(resolved.model)),
        dataset_fingerprint=manifest.fingerprint,
        loss=config.optim.loss,
    )
    run_id, resumed = tracking.start_or_resume_run(
        client,
        experiment_id,
        name,
        params,
        tags,
        identity,
        config.optim.epochs,
        RESUME_FREE,
        checkpoints=(storage.join(name).uri, held),
    )
    log.info("MLflow run %s (%s) in %s", run_id, "resumed" if resumed else "new", mlflow_uri)
    run = TrainRun(
        name=name,
        model=resolved.model,
        optim=config.optim,
        data=data,
        scaling=config.scaling,
        storage_path=storage.path,
        storage_filesystem=storage_filesystem,
        mlflow_uri=mlflow_uri,
        mlflow_run_id=run_id,
        max_failures=config.run.max_failures,
        init_from=config.model.init_from,
    )
    return run, client


def source_commit() -> str | None:
    """The git commit of the checkout this code runs from, when it is one (a job's packed working
    directory is not: then the run has no commit and its registered version says none)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def report(resolved: Resolved, run: TrainRun, client: MlflowClient, result) -> dict:
    """Log the selected model and its figures, mark the MLflow run FINISHED, and say what was trained."""
    client.log_metric(run.mlflow_run_id, "label_frequency_baseline_mAP", resolved.baseline_mAP)
    best = best_checkpoint(result)
    with best.as_directory() as folder:
        final = tracking.log_final_model(
            client,
            run.mlflow_run_id,
            Path(folder),
            list(resolved.manifest.classes),
            variant=resolved.config.model.variant,
            dataset_fingerprint=resolved.manifest.fingerprint,
            stored_images=resolved.manifest.stored_images(),
        )
    metrics = result.metrics or {}
    storage = "s3://" if run.storage_filesystem is not None else ""
    summary = {
        "calib_mAP": final["calib_mAP"],
        "val_mAP": final["val_mAP"],
        "val_CF1": final["val_CF1"],
        "val_OF1": final["val_OF1"],
        "best_epoch": final["best_epoch"],
        "weights": final["weights"],
        "label_frequency_baseline_mAP": resolved.baseline_mAP,
        "epochs": metrics.get("epoch", -1) + 1,
        "val_model_mAP_last": metrics.get("val_model_mAP"),
        "val_ema_mAP_last": metrics.get("val_ema_mAP"),
        "train_images_per_s_per_worker": metrics.get("train_images_per_s_per_worker"),
        "data_wait_s": metrics.get("data_wait_s"),
        "calib_rows": resolved.calib.calib_rows,
        "train_rows": resolved.calib.fit_rows,
        "mlflow_run_id": run.mlflow_run_id,
        "mlflow_uri": run.mlflow_uri,
        "model_uri": final["model_uri"],
        "checkpoint": f"{storage}{best.path}",
        "name": run.name,
    }
    # Where the selected model and its checkpoint are, for whoever reads the run later (a sweep).
    client.set_tag(run.mlflow_run_id, "mltr.model_uri", summary["model_uri"])
    client.set_tag(run.mlflow_run_id, "mltr.checkpoint", summary["checkpoint"])
    client.set_terminated(run.mlflow_run_id, status="FINISHED")
    return summary


def run(config: TrainConfig) -> dict:
    resolved = resolve(config)
    try:
        train_run, client = start(resolved)
        with tracking.run_outcome(client, train_run.mlflow_run_id):
            result = trained_result(train_run, client)
            if result is not None:
                log.info(
                    "run %s: its checkpoints hold all %d epochs; finishing it",
                    train_run.name,
                    config.optim.epochs,
                )
            else:
                result = fit(build_trainer(train_run))
            return report(resolved, train_run, client, result)
    finally:
        withdraw_resource_request()  # nodes --wait-for-resources asked for may leave once idle


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(TrainConfig, argv, prog="mltr train", job="train")
    return run_job("train", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
