"""Every metric training reports, for a registered model, a logged model or a checkpoint, on a split.

    mltr evaluate --model models:/mltr-coco@champion --data s3://bucket/datasets/coco [--split val] [--log]
    mltr evaluate --model ./work/ray_results/coco-mltr_tiny-.../checkpoint_... --data ./datasets/coco

mAP, CP/CR/CF1 and OP/OR/OF1 at the model's calibrated thresholds and for the top 3, and the
AP of every class: a table on the terminal, one JSON line last. ``--log`` records the figures as
tags of the model version (``mltr.eval.<split>.<metric>``), with the dataset's fingerprint.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass

from jobs._config import check_at_least, component, opt, parse_config
from jobs._models import (
    MODEL_URI_SCHEMES,
    CheckpointData,
    TrackingArgs,
    check_classes,
    load_predictor,
    score_split,
)
from jobs._runtime import run_job, setup_logging
from mltr.errors import ConfigError
from mltr.metrics import MetricAccumulator
from pipeline.dataset import load_manifest

log = logging.getLogger("jobs.evaluate")


@dataclass(frozen=True)
class EvaluateConfig:
    """Which model, on which data."""

    model: str | None = opt(
        None, "models:/NAME@alias, models:/NAME/N, runs:/ID/model, or a checkpoint folder"
    )
    data: str | None = opt(None, "a converted dataset: folder or s3://bucket/prefix/<dataset>")
    split: str = opt("val", "the split to evaluate on")
    batch_size: int = opt(32, "images per forward pass")
    top_k: int = opt(3, "k of the top-k figures")
    log_results: bool = opt(False, "record the figures as tags of the model version", flag="log")
    tracking: TrackingArgs = component(TrackingArgs)

    def __post_init__(self):
        check_at_least(self, 1, "batch_size", "top_k")


def evaluate(predictor, manifest, split: str, batch_size: int, k: int = 3) -> dict:
    logits, targets, ignore = score_split(predictor, manifest, split, batch_size)
    acc = MetricAccumulator()
    acc.update(logits, targets, ignore)
    result = acc.compute(list(predictor.info.thresholds), k=k)
    return {
        "images": int(result.num_samples),
        "metrics": result.as_dict(),
        "per_class_ap": {
            name: (None if math.isnan(ap) else float(ap))
            for name, ap in zip(manifest.classes, result.per_class_ap, strict=True)
        },
    }


def table(figures: dict) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.4f} |" for name, value in figures["metrics"].items()]
    lines += ["", "| class | AP |", "| --- | --- |"]
    lines += [f"| {c} | {'-' if ap is None else f'{ap:.4f}'} |" for c, ap in figures["per_class_ap"].items()]
    return "\n".join(lines)


def model_version(client, uri: str):
    """The registry version a ``models:/`` URI names, or None (a run's model, a checkpoint)."""
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        return None
    name, _, rest = uri.removeprefix("models:/").partition("@")
    try:
        if rest:
            return client.get_model_version_by_alias(name, rest)
        name, _, number = name.partition("/")
        return client.get_model_version(name, number) if number.isdigit() else None
    except MlflowException:
        return None


def run(config: EvaluateConfig) -> dict:
    if not config.model or not config.data:
        raise ConfigError("--model and --data are required")
    manifest = load_manifest(config.data)
    client = (
        config.tracking.client() if config.model.startswith(MODEL_URI_SCHEMES) or config.log_results else None
    )
    version = model_version(client, config.model) if config.log_results else None
    if config.log_results and version is None:
        raise ConfigError(
            f"--log needs a registered model (models:/NAME/N or models:/NAME@alias), not {config.model}"
        )
    # An alias is resolved once, before scoring: the figures go on the version that was scored,
    # even if a promotion moves the alias meanwhile.
    source = f"models:/{version.name}/{version.version}" if version is not None else config.model
    predictor = load_predictor(source, client, CheckpointData.of(manifest), config.batch_size)
    check_classes(predictor, manifest, config.model)
    if config.split == "train":
        log.warning(
            "the train split holds the rows the model was fit on and those its weights and thresholds "
            "were chosen on: its figures are not an estimate of how it does on new images"
        )
    figures = evaluate(predictor, manifest, config.split, config.batch_size, config.top_k)
    print(
        f"{config.model} on {manifest.uri} ({config.split}, {figures['images']} images)\n{table(figures)}",
        flush=True,
    )
    out = {"model": config.model, "data": manifest.uri, "split": config.split, **figures}
    if version is not None:
        prefix = f"mltr.eval.{config.split}"
        for name, value in {**figures["metrics"], "images": figures["images"]}.items():
            client.set_model_version_tag(version.name, version.version, f"{prefix}.{name}", f"{value:.6g}")
        client.set_model_version_tag(
            version.name, version.version, f"{prefix}.dataset_fingerprint", manifest.fingerprint
        )
        out["logged_on"] = f"models:/{version.name}/{version.version}"
    return out


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(EvaluateConfig, argv, prog="mltr evaluate", job="evaluate")
    return run_job("evaluate", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
