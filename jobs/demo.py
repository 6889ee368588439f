"""The end-to-end demo on the embedded defaults, all state under one work folder.

    python -m jobs.demo --workdir work/demo

1. generates a small COCO 2014-format dataset (with the faults real data holds) that a tiny
   model can learn on 2 CPU cores in a few minutes: 12 classes, each drawn with a look of its own,
2. converts it to Parquet shards with Ray Data,
3. trains ``mltr_tiny`` with 2 Ray Train workers on a local Ray with the ``tiny`` preset, tracked
   in an embedded SQLite MLflow store, and prints its calibration and val mAP beside the
   label-frequency baseline (the epoch and weights are chosen on the calibration split).
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
from pipeline.synthetic import DEMO_CLASSES, generate

log = logging.getLogger("jobs.demo")


@dataclass(frozen=True)
class DemoConfig:
    """Run the pipeline end to end on a tiny generated dataset, all state under one folder."""

    workdir: str = opt("work/demo", "folder for every artefact of the demo")
    images: int = opt(600, "images in the generated COCO-format dataset")
    classes: int = opt(DEMO_CLASSES, "classes drawn in the generated dataset (of COCO's 80)")
    seed: int = opt(0, "random seed of the generated dataset")
    epochs: int = opt(30, "training epochs")
    num_workers: int = opt(2, "Ray Train workers")


def run(config: DemoConfig) -> dict:
    work = Path(config.workdir).resolve()
    source, datasets = work / "coco2014", work / "datasets"
    log.info(
        "1/3 generating a %d-image COCO 2014 dataset of %d classes (with faulty files) in %s",
        config.images,
        config.classes,
        source,
    )
    generate("coco", source, config.images, seed=config.seed, faults=True, classes=config.classes)
    # The tiny preset (jobs/presets/train/tiny.yaml): mltr_tiny's CPU recipe, docs/tiny-model.md.
    # The run's name is <dataset>-<model>-<time>: each demo is a new MLflow run.
    training = parse_config(
        train_job.TrainConfig,
        ["--config", "tiny", "--data", str(datasets / "coco"), "--epochs", str(config.epochs)]
        + ["--num-workers", str(config.num_workers), "--workdir", str(work)],
        job="train",
    )
    # One local Ray for both stages, sized for the training one (Train workers plus Ray Data).
    init_ray(num_cpus=train_job.local_cpus(training))
    log.info("2/3 converting it to Parquet with Ray Data into %s", datasets)
    converted = preprocess.run(
        preprocess.PreprocessConfig(dataset="coco", root=str(source), out=str(datasets), rows_per_shard=64)
    )
    log.info("3/3 training mltr_tiny with %d Ray Train workers", config.num_workers)
    trained = train_job.run(training)
    baseline = trained["label_frequency_baseline_mAP"]
    print(
        f"\nDataset    {converted['uri']}\n"
        f"           rows {converted['rows']}, rejects {converted['rejects']}, empty {converted['empty']}\n"
        f"Model      mltr_tiny, {trained['epochs']} epochs, {config.num_workers} workers; "
        f"{trained['train_rows']} images trained on, {trained['calib_rows']} held out for calibration\n"
        f"Selected   epoch {trained['best_epoch']} ({trained['weights']} weights), chosen on the calibration split\n"
        f"calib mAP  {trained['calib_mAP']:.3f}\n"
        f"val mAP    {trained['val_mAP']:.3f}   ({trained['val_mAP'] / baseline:.1f}x the label-frequency "
        f"baseline {baseline:.3f}); CF1 {trained['val_CF1']:.3f}, OF1 {trained['val_OF1']:.3f} at the calibrated thresholds\n"
        f"MLflow     run {trained['mlflow_run_id']} in {trained['mlflow_uri']}\n"
        f"           look at it: .venv/bin/mlflow ui --backend-store-uri {trained['mlflow_uri']}\n"
        f"Checkpoint {trained['checkpoint']}\n",
        flush=True,
    )
    return {
        "dataset": converted["uri"],
        "rows": converted["rows"],
        "rejects": converted["rejects"],
        "calib_mAP": trained["calib_mAP"],
        "val_mAP": trained["val_mAP"],
        "best_epoch": trained["best_epoch"],
        "epochs": trained["epochs"],
        "label_frequency_baseline_mAP": baseline,
        "mlflow_run_id": trained["mlflow_run_id"],
        "mlflow_uri": trained["mlflow_uri"],
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(DemoConfig, argv, prog="mltr demo")
    return run_job("demo", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
