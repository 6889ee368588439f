"""Write a tiny dataset in an official layout (COCO 2014, VOC 2007, NUS-WIDE) for tests and demos.

python -m jobs.make_synthetic --format voc --out /tmp/voc --images 200 --seed 0 --faults
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from jobs._config import opt, parse_config
from jobs._runtime import run_job
from mltr.errors import ConfigError
from pipeline.synthetic import generate


@dataclass(frozen=True)
class SyntheticConfig:
    """Write a tiny dataset of drawn scenes in an official layout."""

    format: Literal["coco", "voc", "nuswide"] = opt("coco", "dataset layout to write")
    out: str = opt("", "folder to write the dataset root into")
    images: int = opt(200, "number of images (about 3/4 train, 1/4 val)")
    seed: int = opt(0, "random seed: the same seed writes the same dataset")
    faults: bool = opt(False, "add corrupt, truncated, missing, grayscale, CMYK and PNG files, and bad XML")
    layout: Literal["official", "csv"] = opt("official", "NUS-WIDE only: 'csv' writes filename,label,split")
    classes: int | None = opt(
        None, "draw only this many classes, each with a look of its own: a set a tiny model learns in minutes"
    )

    def __post_init__(self):
        if not self.out:
            raise ConfigError("--out is required")


def run(config: SyntheticConfig) -> dict:
    truth = generate(
        config.format,
        config.out,
        config.images,
        config.seed,
        config.faults,
        config.layout,
        classes=config.classes,
    )
    outcomes = Counter(im.outcome for im in truth.images)
    return {"format": truth.format, "layout": truth.layout, "root": config.out, "outcomes": dict(outcomes)}


def main(argv: list[str] | None = None) -> int:
    config = parse_config(SyntheticConfig, argv, prog="mltr make-synthetic", job="make-synthetic")
    return run_job("make-synthetic", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
