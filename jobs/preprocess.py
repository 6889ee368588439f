"""Convert COCO 2014, VOC 2007 or NUS-WIDE from its official layout to sharded Parquet with a manifest.

python -m jobs.preprocess --dataset coco --root /data/coco --out s3://bucket/datasets
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Literal

from jobs._config import check_at_least, component, opt, parse_config, to_dict
from jobs._runtime import init_ray, run_job, setup_logging
from mltr.errors import ConfigError
from pipeline.convert import convert, output_root
from pipeline.images import MIN_SIDE, ImageSettings
from pipeline.readers import read_index

log = logging.getLogger("jobs.preprocess")


@dataclass(frozen=True)
class ConversionArgs:
    """Which dataset to convert, from where, to where, and how its images are stored."""

    dataset: Literal["coco", "voc", "nuswide"] = opt("coco", "which dataset layout to read")
    root: str = opt("", "folder holding the dataset in its official layout")
    out: str = opt("", "output folder or s3://bucket/prefix; the dataset lands in <out>/<dataset>/")
    max_side: int = opt(512, "longer side of stored images; larger images are downscaled")
    quality: int = opt(90, "JPEG quality of re-encoded images")
    rows_per_shard: int = opt(1000, "maximum rows per Parquet file")
    lease_wait: float = opt(
        0.0,
        "seconds to wait for another conversion into --out (or its lease, once its node died: "
        "stale after 600 s) instead of being refused; a retried job's setting",
    )

    def __post_init__(self):
        if not self.root:
            raise ConfigError("--root is required: the folder holding the dataset")
        if not self.out:
            raise ConfigError("--out is required: a folder or s3://bucket/prefix")
        if self.rows_per_shard < 1:
            raise ConfigError(f"--rows-per-shard must be positive, got {self.rows_per_shard}")
        if self.lease_wait < 0:
            raise ConfigError(f"--lease-wait must be 0 or more seconds, got {self.lease_wait:g}")
        # Checked here, naming the flags, before Ray starts; ImageSettings checks its fields again.
        check_at_least(self, MIN_SIDE, "max_side")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality must be in 1..100 (a JPEG quality), got {self.quality}")

    @property
    def uri(self) -> str:
        """Where the converted dataset lands: ``<out>/<dataset>``."""
        return f"{self.out.rstrip('/')}/{self.dataset}"

    def image_settings(self) -> ImageSettings:
        return ImageSettings(max_side=self.max_side, quality=self.quality)


@dataclass(frozen=True)
class PreprocessConfig:
    """Convert a dataset in its official layout to sharded Parquet with a manifest."""

    conversion: ConversionArgs = component(ConversionArgs)
    splits: tuple[str, ...] = opt(
        ("train", "val"), "comma-separated splits to convert; a dataset already there keeps its other splits"
    )
    allow_shrink: bool = opt(
        False,
        "replace a committed dataset even if this conversion has under half of its rows (of these splits)",
    )
    address: str | None = opt(None, "Ray address (default: RAY_ADDRESS, else a local Ray)")


def run(config: PreprocessConfig) -> dict:
    conversion = config.conversion
    output_root(conversion.out)  # a bad --out or an unreachable store: refused before anything is read
    index = read_index(conversion.dataset, conversion.root, config.splits)
    counts = index.count()
    log.info(
        "%s (%s): %d classes; %s images to convert; %d annotation rejects; empty %s",
        conversion.dataset,
        index.layout,
        len(index.classes),
        counts,
        len(index.rejects),
        index.empty,
    )
    init_ray(config.address)
    summary = convert(
        index,
        conversion.out,
        conversion.image_settings(),
        rows_per_shard=conversion.rows_per_shard,
        allow_shrink=config.allow_shrink,
        lease_wait=conversion.lease_wait,
    )
    for reject in summary.reject_examples:
        log.warning("rejected %s: %s (%s)", reject["source_path"], reject["reason"], reject["detail"])
    total_rejects = sum(summary.rejects.values())
    if total_rejects > len(summary.reject_examples):
        log.warning("... and %d more rejects", total_rejects - len(summary.reject_examples))
    log.info(
        "wrote %s: rows %s, rejects %s (listed in %s), empty %s, %.1f images/s",
        summary.uri,
        summary.rows,
        summary.rejects or "none",
        summary.rejects_file,
        summary.empty,
        summary.images_per_second,
    )
    for split, rows in summary.rows.items():
        if rows == 0:  # written as an empty split, as asked; training refuses it
            log.warning("split %s has no rows: every image it lists was rejected or has no label", split)
    result = summary.as_dict()
    del result["reject_examples"]
    return {**result, "config": to_dict(config)}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(PreprocessConfig, argv, prog="mltr preprocess", job="preprocess")
    return run_job("preprocess", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
