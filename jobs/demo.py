"""The end-to-end demo on the embedded defaults: a tiny COCO-format dataset, converted with Ray Data.

    python -m jobs.demo --workdir work/demo

Everything lands under the work folder: the source dataset, the Parquet dataset and its manifest.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs import preprocess
from jobs._config import opt, parse_config
from jobs._runtime import run_job, setup_logging
from pipeline.dataset import load_manifest
from pipeline.synthetic import generate

log = logging.getLogger("jobs.demo")


@dataclass(frozen=True)
class DemoConfig:
    """Run the pipeline end to end on a tiny generated dataset, all state under one folder."""

    workdir: str = opt("work/demo", "folder for every artefact of the demo")
    images: int = opt(300, "images in the generated COCO-format dataset")
    seed: int = opt(0, "random seed of the generated dataset")


def run(config: DemoConfig) -> dict:
    work = Path(config.workdir).resolve()
    source, datasets = work / "coco2014", work / "datasets"
    log.info("1/2 generating a %d-image COCO 2014 dataset (with faulty files) in %s", config.images, source)
    generate("coco", source, config.images, seed=config.seed, faults=True)
    log.info("2/2 converting it to Parquet with Ray Data into %s", datasets)
    result = preprocess.run(
        preprocess.PreprocessConfig(dataset="coco", root=str(source), out=str(datasets), rows_per_shard=64)
    )
    manifest = load_manifest(result["uri"])
    print(
        f"\nDemo dataset: {manifest.location.uri}\n"
        f"  rows: {result['rows']}  rejects: {result['rejects']}  empty: {result['empty']}\n"
        f"  manifest: {manifest.location.join('_manifest.json').uri}\n"
        f"  {result['images_per_second']:.0f} images/s\n",
        flush=True,
    )
    return {"dataset": manifest.location.uri, "rows": result["rows"], "rejects": result["rejects"]}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(DemoConfig, argv, prog="mltr demo")
    return run_job("demo", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
