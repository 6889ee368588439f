"""Train MlTr on a converted dataset across a Ray cluster, tracked in MLflow.

    python -m jobs.train --data s3://bucket/datasets/coco --model mltr_s --num-workers 8 --use-gpu
    python -m jobs.train --config coco --data s3://bucket/datasets/coco   # preset: jobs/presets/train/coco.yaml

Ends with one JSON line: val_mAP, epochs, mlflow_run_id, checkpoint, ...
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from jobs._config import parse_config
from jobs._runtime import init_ray, run_job, setup_logging
from mltr import tracking
from mltr.model import VARIANTS, MlTrConfig
from mltr.train import (
    EMA_FILE,
    MODEL_FILE,
    TRAIN_STATE,
    LoopContext,
    SplitDataConfig,
    TrainConfig,
    label_frequency_baseline,
    train_loop_per_worker,
)
from pipeline.dataset import load_manifest, read_split
from pipeline.ingest import IngestConfig, build_dataset, epoch_batches, multi_hot
from pipeline.storage import resolve

log = logging.getLogger("jobs.train")

VAL_CPUS = 1  # CPUs left free for the validation pass's Ray Data tasks beside the decode actors


def model_config(config: TrainConfig, num_classes: int) -> MlTrConfig:
    """The model the run will build, validated before any worker starts."""
    if config.model not in VARIANTS:
        raise ValueError(f"unknown model {config.model!r}; choose one of: {', '.join(VARIANTS)}")
    return dataclasses.replace(VARIANTS[config.model], **config.model_overrides(num_classes))


def train_cpus(config: TrainConfig) -> int:
    return math.ceil(config.num_workers * config.cpus_per_worker)


def local_cpus(config: TrainConfig) -> int:
    """Logical CPUs for a local Ray: the Train workers, a decode actor per core, and validation.

    More than the machine's cores on a small machine: the Train workers wait on each other and on
    their data, and an idle reservation would leave a core unused.
    """
    cores = os.cpu_count() or 1
    return max(cores, train_cpus(config) + (config.decode_actors or cores) + VAL_CPUS)


def decode_actors(config: TrainConfig, cluster_cpus: float) -> int:
    """``--decode-actors``, else every CPU the cluster has beside the Train workers and validation."""
    if config.decode_actors is not None:
        return config.decode_actors
    return max(1, math.floor(cluster_cpus) - train_cpus(config) - VAL_CPUS)


def check_resources(config: TrainConfig, actors: int) -> None:
    """Fail fast when the cluster cannot place the workers and the decode actors."""
    import ray

    total = ray.cluster_resources()
    need_cpu = train_cpus(config) + actors + VAL_CPUS
    if total.get("CPU", 0) < need_cpu:
        raise ValueError(
            f"the cluster has {total.get('CPU', 0):g} CPUs; {config.num_workers} workers x "
            f"{config.cpus_per_worker:g} CPUs, {actors} decode actors and {VAL_CPUS} CPU for validation "
            f"need {need_cpu:g}: lower --num-workers, --cpus-per-worker or --decode-actors, or add nodes"
        )
    if config.use_gpu and total.get("GPU", 0) < config.num_workers:
        raise ValueError(
            f"--use-gpu needs one GPU per worker: {config.num_workers} workers, the cluster has "
            f"{total.get('GPU', 0):g} GPUs; lower --num-workers or add GPU nodes"
        )


def frequency_baseline(uri: str, num_classes: int) -> float:
    """mAP of the label-frequency baseline on the dataset's val split (labels only are read)."""

    def split_targets(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = read_split(uri, split, columns=["labels", "ignore"]).take_all()
        return multi_hot([r["labels"] for r in rows], [r["ignore"] for r in rows], num_classes)

    train, _ = split_targets("train")
    val, val_ignore = split_targets("val")
    return label_frequency_baseline(train, val, val_ignore)


def log_final_model(client, run_id: str, checkpoint_dir: Path, classes: list[str], image_size: int) -> dict:
    """Log the best weights as an MLflow model (signature, input example, classes, thresholds) plus reports."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from mltr.checkpoint import load_model

    state = torch.load(checkpoint_dir / TRAIN_STATE, map_location="cpu", weights_only=False)
    weights_file = EMA_FILE if state["weights"] == "ema" else MODEL_FILE
    model = load_model(checkpoint_dir / weights_file)
    thresholds = state["thresholds"]  # calibrated on val for the chosen weights
    example = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    per_class = state["per_class_ap"][state["weights"]]
    tracking.log_table(
        client,
        run_id,
        [
            {"class_index": i, "class": name, "ap": per_class[i], "threshold": thresholds[i]}
            for i, name in enumerate(classes)
        ],
        "evaluation/per_class_ap.csv",
    )
    recall, precision = state["pr_curve"]
    tracking.log_pr_plot(
        client,
        run_id,
        {f"epoch {state['best']['epoch']} ({state['weights']})": (recall, precision)},
        "evaluation/precision_recall.png",
    )
    tracking.log_json(
        client, run_id, {"classes": classes, "thresholds": thresholds}, "model_info/classes.json"
    )
    with tracking.tracking_uri(client.tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            # Pickle keeps the batch dimension free (pt2 export specialises it to the example's);
            # loading needs the mltr package, which every stage that serves the model has.
            serialization_format="pickle",
            metadata={
                "classes": classes,
                "thresholds": thresholds,
                "image_size": image_size,
                "weights": state["weights"],
            },
        )
    return {"model_uri": info.model_uri, "weights": state["weights"], "best_epoch": state["best"]["epoch"]}


def run(config: TrainConfig) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    manifest = load_manifest(config.data)
    for split in ("train", "val"):
        manifest.rows(split)  # names the missing split
    model_cfg = model_config(config, manifest.num_classes)
    workdir = Path(config.workdir).resolve()
    try:  # the workers cut the training stream into epochs with it: refuse here what they would
        epoch_batches(manifest.rows("train"), config.num_workers, config.batch_size, 0)
    except ValueError as exc:
        raise ValueError(f"the train split: {exc}: lower --batch-size or --num-workers") from None
    init_ray(config.address, num_cpus=local_cpus(config))
    actors = decode_actors(config, ray.cluster_resources().get("CPU", 0))
    check_resources(config, actors)

    name = config.name or f"{manifest.name}-{config.model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    mlflow_uri = config.mlflow_uri or tracking.default_tracking_uri(workdir)
    client = MlflowClient(mlflow_uri)
    artifact_root = (workdir / "mlartifacts").as_uri() if mlflow_uri.startswith("sqlite:") else None
    experiment_id = tracking.ensure_experiment(client, config.experiment, artifact_root)
    params = {k: v for k, v in config.__dict__.items()} | {"resolved_image_size": model_cfg.image_size}
    tags = {
        "mltr.dataset": manifest.name,
        "mltr.dataset_uri": config.data,
        "mltr.dataset_fingerprint": manifest.fingerprint,
        "mltr.model": config.model,
    }
    run_id, resumed = tracking.start_or_resume_run(client, experiment_id, name, params, tags)
    log.info("MLflow run %s (%s) in %s", run_id, "resumed" if resumed else "new", mlflow_uri)

    storage = resolve(config.storage or str(workdir / "ray_results"))
    ctx = LoopContext(
        config=config,
        num_classes=manifest.num_classes,
        image_size=model_cfg.image_size,
        train_rows=manifest.rows("train"),
        mlflow_uri=mlflow_uri,
        mlflow_run_id=run_id,
    )
    datasets = {
        "train": build_dataset(
            config.data,
            "train",
            IngestConfig(
                num_classes=manifest.num_classes,
                image_size=model_cfg.image_size,
                train=True,
                randaugment=config.randaugment,
                crop_scale=(config.crop_min_scale, 1.0),
                erase_p=config.cutout_p,
            ),
            passes=config.epochs,
            decode_actors=actors,
        ),
        "val": build_dataset(
            config.data,
            "val",
            IngestConfig(num_classes=manifest.num_classes, image_size=model_cfg.image_size, train=False),
        ),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"ctx": ctx},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.fs if storage.scheme == "s3" else None,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_best_of_mAP", checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
        dataset_config=SplitDataConfig(equal=("train",)),
    )
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    best = result.get_best_checkpoint("val_best_of_mAP", "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    with best.as_directory() as folder:
        final = log_final_model(client, run_id, Path(folder), manifest.classes, model_cfg.image_size)
    metrics = result.metrics or {}
    baseline = frequency_baseline(config.data, manifest.num_classes)
    client.log_metric(run_id, "label_frequency_baseline_mAP", baseline)
    client.set_terminated(run_id, status="FINISHED")
    best_metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), metrics)
    return {
        "val_mAP": best_metrics.get("val_best_of_mAP"),
        "val_mAP_last": metrics.get("val_mAP"),
        "val_ema_mAP_last": metrics.get("val_ema_mAP"),
        "label_frequency_baseline_mAP": baseline,
        "epochs": (metrics.get("epoch", -1) + 1),
        "train_images_per_s_per_worker": metrics.get("train_images_per_s_per_worker"),
        "data_wait_s": metrics.get("data_wait_s"),
        "best_epoch": final["best_epoch"],
        "weights": final["weights"],
        "mlflow_run_id": run_id,
        "mlflow_uri": mlflow_uri,
        "model_uri": final["model_uri"],
        "checkpoint": f"{'s3://' if storage.scheme == 's3' else ''}{best.path}",
        "name": name,
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(TrainConfig, argv, prog="mltr train", job="train")
    return run_job("train", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
