"""A short real training run of ``mltr_s`` on a lent GPU machine: images/s per GPU and data-loader stall.

    python -m jobs.bench train-gpu                 # one call on the GPU machine, a few minutes

Generates a COCO 2014-format dataset of 640x480 photo-like JPEGs, converts it with Ray Data
(``max_side`` 256), then trains ``mltr_s`` at 224 px with bf16 autocast for ``--epochs`` epochs
with one Ray Train worker per GPU, Ray Data decoding and augmenting on the machine's CPUs.
Ends with one JSON line: images/s per GPU and the seconds each epoch waited for data.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jobs._config import opt, parse_config, to_dict


@dataclass(frozen=True)
class BenchTrainGpuConfig:
    """Short mltr_s training run on GPUs: images/s per GPU and data stall."""

    images: int = opt(3000, "generated images (3/4 train)")
    epochs: int = opt(2, "epochs (the first includes compilation and warm-up)")
    batch_size: int = opt(64, "images per GPU per step")
    num_workers: int | None = opt(None, "GPUs / Train workers (default: all visible GPUs)")
    workdir: str | None = opt(None, "where to write (default: a temporary folder)")


def run(config: BenchTrainGpuConfig) -> dict:
    import torch

    from jobs import train as train_job
    from jobs._config import from_flat
    from jobs._runtime import init_ray
    from pipeline.convert import convert
    from pipeline.images import ImageSettings
    from pipeline.readers import read_index
    from pipeline.synthetic import generate

    if not torch.cuda.is_available():
        print("train-gpu: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        raise SystemExit(2)
    gpus = config.num_workers or torch.cuda.device_count()
    work = Path(config.workdir or tempfile.mkdtemp(prefix="mltr-train-gpu-"))
    print(f"generating {config.images} images in {work} ...", flush=True)
    generate("coco", work / "src", config.images, seed=0, size=(640, 480), noise=12.0)
    cpus = os.cpu_count() or 1
    init_ray(num_cpus=cpus, num_gpus=gpus)
    convert(
        read_index("coco", str(work / "src")),
        str(work / "ds"),
        ImageSettings(max_side=256),
        rows_per_shard=500,
    )
    cpus_per_worker = max(1.0, (cpus - 2) / gpus / 4)  # most CPUs stay with Ray Data's decode/augment
    result = train_job.run(
        from_flat(
            train_job.TrainConfig,
            {
                "data": str(work / "ds" / "coco"),
                "model": "mltr_s",
                "epochs": config.epochs,
                "batch_size": config.batch_size,
                "lr": 1e-4,
                "num_workers": gpus,
                "use_gpu": True,
                "cpus_per_worker": cpus_per_worker,
                "workdir": str(work / "work"),
                "name": "train-gpu",
            },
        )
    )
    figures = {
        "bench": "train-gpu",
        "device": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "images_per_s_per_gpu": result["train_images_per_s_per_worker"],
        "data_wait_s_last_epoch": result["data_wait_s"],
        "val_mAP": result["val_mAP"],
        "config": to_dict(config),
    }
    return figures


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchTrainGpuConfig, argv, prog="python -m jobs.bench train-gpu")
    print(json.dumps(run(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
