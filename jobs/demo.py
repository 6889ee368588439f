"""The end-to-end demo on the embedded defaults, all state under one work folder.

    python -m jobs.demo --workdir work/demo

1. generates a small COCO 2014-format dataset (with the faults real data holds),
2. converts it to Parquet shards with Ray Data,
3. trains ``mltr_tiny`` with 2 Ray Train workers on a local Ray, tracked in an embedded
   SQLite MLflow store, and prints its val mAP beside the label-frequency baseline.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs import preprocess
from jobs import train as train_job
from jobs._config import opt, parse_config
from jobs._runtime import init_ray, run_job, setup_logging
from mltr.train import TrainConfig
from pipeline.synthetic import generate

log = logging.getLogger("jobs.demo")


@dataclass(frozen=True)
class DemoConfig:
    """Run the pipeline end to end on a tiny generated dataset, all state under one folder."""

    workdir: str = opt("work/demo", "folder for every artefact of the demo")
    images: int = opt(600, "images in the generated COCO-format dataset")
    seed: int = opt(0, "random seed of the generated dataset")
    epochs: int = opt(8, "training epochs")
    num_workers: int = opt(2, "Ray Train workers")


def run(config: DemoConfig) -> dict:
    work = Path(config.workdir).resolve()
    source, datasets = work / "coco2014", work / "datasets"
    log.info("1/3 generating a %d-image COCO 2014 dataset (with faulty files) in %s", config.images, source)
    generate("coco", source, config.images, seed=config.seed, faults=True)
    training = TrainConfig(
        data=str(datasets / "coco"),
        model="mltr_tiny",
        epochs=config.epochs,
        batch_size=16,
        lr=5e-4,
        randaugment=False,
        crop_min_scale=1.0,
        cutout_p=0.0,
        num_workers=config.num_workers,
        workdir=str(work),  # the run's name is <dataset>-<model>-<time>: each demo is a new MLflow run
    )
    # One local Ray for both stages, sized for the training one (Train workers plus Ray Data).
    init_ray(num_cpus=train_job.local_cpus(training))
    log.info("2/3 converting it to Parquet with Ray Data into %s", datasets)
    converted = preprocess.run(
        preprocess.PreprocessConfig(dataset="coco", root=str(source), out=str(datasets), rows_per_shard=64)
    )
    log.info("3/3 training mltr_tiny with %d Ray Train workers", config.num_workers)
    trained = train_job.run(training)
    print(
        f"\nDataset   {converted['uri']}\n"
        f"          rows {converted['rows']}, rejects {converted['rejects']}, empty {converted['empty']}\n"
        f"Model     mltr_tiny, {trained['epochs']} epochs, {config.num_workers} workers\n"
        f"val mAP   {trained['val_mAP']:.3f}   (label-frequency baseline {trained['label_frequency_baseline_mAP']:.3f})\n"
        f"MLflow    run {trained['mlflow_run_id']} in {trained['mlflow_uri']}\n"
        f"          look at it: .venv/bin/mlflow ui --backend-store-uri {trained['mlflow_uri']}\n"
        f"Checkpoint {trained['checkpoint']}\n",
        flush=True,
    )
    return {
        "dataset": converted["uri"],
        "rows": converted["rows"],
        "rejects": converted["rejects"],
        "val_mAP": trained["val_mAP"],
        "label_frequency_baseline_mAP": trained["label_frequency_baseline_mAP"],
        "mlflow_run_id": trained["mlflow_run_id"],
        "mlflow_uri": trained["mlflow_uri"],
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(DemoConfig, argv, prog="mltr demo")
    return run_job("demo", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
