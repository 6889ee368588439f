"""Benchmark the training-time ingest: Ray Data over Parquet shards vs a DataLoader over JPEG files.

    python -m jobs.bench ingest --images 3000

Both sides deliver the same batches (uint8 images, multi-hot targets, ignore masks) from the
same stored JPEG bytes with the same per-image work (:func:`pipeline.ingest.decode_images` +
:func:`pipeline.ingest.make_transform`: decode, RandomResizedCrop, flip, RandAugment, cutout):

- Ray Data, as the training job reads it (``--mode stream``): one stream of all the epochs,
  ``build_dataset(<converted dataset>, "train", cfg, passes=1 + epochs, decode_actors=CPUs)
  .iter_torch_batches(...)``, cut into epochs by :func:`mltr.train.epoch_batches` (full
  batches only: 2240 of 2250 images at the defaults). ``--mode per-epoch``: one task-based
  execution per epoch, as a training loop that iterates ``get_dataset_shard`` per epoch would;
- baseline: ``torch.utils.data.DataLoader(num_workers=2, shuffle=True)`` over the converted
  dataset's JPEG bytes written out as one file per image (so the decode work is identical).

Each side has one warm-up epoch (workers and actors start, imports, caches). A running stream
keeps decoding into its buffer while nobody reads it, so the sides cannot take turns epoch by
epoch: the DataLoader's timed epochs run before and after Ray Data's (a change of load from other
work on a shared machine lands on both). Ray is started first and stays up (its idle daemons cost
the DataLoader a little), the DataLoader's workers are persistent. Two figures per side:

- whole epochs (``ratio``): images/s over the timed epochs, each epoch's start included;
- steady state (``ratio_steady``): images/s after the first ``--warmup-batches`` batches of
  every timed epoch. It flatters whichever side ran further ahead during those batches (both
  keep producing while the consumer waits), so it is reported, not the headline.

Ray's start-up is reported separately. Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from jobs._config import opt, parse_config, to_dict
from jobs._runtime import init_ray
from mltr.train import epoch_batches
from pipeline.convert import convert
from pipeline.dataset import Manifest, load_manifest
from pipeline.images import ImageSettings
from pipeline.ingest import (
    ROWS_PER_TASK,
    AugmentConfig,
    IngestConfig,
    build_dataset,
    decode_images,
    make_transform,
    multi_hot,
)
from pipeline.readers import read_index
from pipeline.synthetic import generate


@dataclass(frozen=True)
class BenchIngestConfig:
    """Training ingest throughput: Ray Data over Parquet vs a DataLoader over JPEG files."""

    images: int = opt(3000, "images generated (3/4 of them form the train split that is read)")
    image_size: int = opt(224, "side of the augmented output images")
    batch_size: int = opt(64, "batch size delivered to the training loop")
    epochs: int = opt(3, "timed epochs per side, after one warm-up epoch")
    warmup_batches: int = opt(8, "batches at the start of each timed epoch left out of the steady state")
    rows_per_task: int = opt(ROWS_PER_TASK, "rows per Ray Data read+decode task")
    num_workers: int = opt(2, "DataLoader worker processes")
    prefetch_batches: int = opt(2, "iter_torch_batches prefetch_batches (DataLoader: prefetch_factor)")
    max_side: int = opt(512, "longer side of the stored JPEGs (sources are 640x480)")
    rows_per_shard: int = opt(1000, "rows per Parquet shard, as in the preprocess job")
    num_cpus: int | None = opt(
        None, "logical CPUs for the local Ray, one decode actor each (default: this machine's cores)"
    )
    mode: Literal["stream", "per-epoch"] = opt(
        "stream",
        "Ray Data as training reads it (one stream, decode actors), or one task-based execution per epoch",
    )
    workdir: str | None = opt(
        None, "where to generate and write, kept for re-runs (default: a temporary folder)"
    )
    seed: int = opt(0, "seed of the generated images")


class JpegFiles(Dataset):
    """One JPEG file per image, with the same decode and transform as the Ray Data map."""

    def __init__(self, files: list[Path], labels: list, ignore: list, cfg: IngestConfig):
        self.files, self.labels, self.ignore, self.cfg = files, labels, ignore, cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path = self.files[i]
        (image,) = decode_images([path.read_bytes()], [path.stem])
        targets, mask = multi_hot([self.labels[i]], [self.ignore[i]], self.cfg.num_classes, [path.stem])
        return {
            "image": make_transform(self.cfg)(image),
            "targets": torch.from_numpy(targets[0]),
            "ignore_mask": torch.from_numpy(mask[0]),
        }


def write_jpeg_files(manifest: Manifest, split: str, out: Path) -> tuple[list[Path], list, list]:
    """Write the stored JPEG bytes of ``split`` as files; return them with their labels."""
    out.mkdir(parents=True, exist_ok=True)
    files, labels, ignore = [], [], []
    for shard in manifest.files(split):
        table = pq.read_table(
            shard, columns=["image_id", "image", "labels", "ignore"], filesystem=manifest.filesystem
        )
        for row in table.to_pylist():
            path = out / f"{row['image_id']}.jpg"
            path.write_bytes(row["image"])
            files.append(path)
            labels.append(row["labels"])
            ignore.append(row["ignore"])
    return files, labels, ignore


@dataclass
class Timing:
    """What one side measured over its timed epochs."""

    epoch_images: list[int] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    first_batch_s: list[float] = field(default_factory=list)  # from asking for the epoch to its first batch
    steady_images: int = 0  # after the warm-up batches of each epoch, summed over epochs
    steady_s: float = 0.0
    warmup_epoch_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return sum(self.epoch_images) / sum(self.epoch_s)

    @property
    def steady_images_per_s(self) -> float:
        return self.steady_images / self.steady_s


def time_epoch(make_iter, timing: Timing, label: str, warmup_batches: int, warmup_epoch: bool) -> None:
    """Run one epoch and add it to ``timing``; steady state leaves out the epoch's first batches."""
    start = time.perf_counter()
    count, first, steady_start, steady_count = 0, 0.0, None, 0
    for i, batch in enumerate(make_iter()):
        assert batch["image"].dtype == torch.uint8
        count += len(batch["image"])
        if i == 0:
            first = time.perf_counter() - start
        if i == warmup_batches - 1:
            steady_start, steady_count = time.perf_counter(), count
    seconds = time.perf_counter() - start
    print(
        f"  {label}: {count} images in {seconds:.2f} s ({count / seconds:.1f} images/s), "
        f"first batch after {first:.2f} s",
        flush=True,
    )
    if warmup_epoch:
        timing.warmup_epoch_s = seconds
        return
    if steady_start is None:
        raise ValueError(f"an epoch of {count} images has no more than --warmup-batches {warmup_batches}")
    timing.epoch_images.append(count)
    timing.epoch_s.append(seconds)
    timing.first_batch_s.append(first)
    timing.steady_images += count - steady_count
    timing.steady_s += start + seconds - steady_start


def operator_tasks(stats: str) -> dict[str, int]:
    """Tasks executed per operator, from ``ds.stats()`` (the last execution)."""
    found = re.findall(r"Operator \d+ (.+?): (\d+) tasks executed", stats)
    return {name: int(n) for name, n in found}


def run(config: BenchIngestConfig) -> dict:
    """Run the benchmark in ``--workdir`` (kept), or in a temporary folder removed afterwards."""
    if config.workdir:
        return run_in(config, Path(config.workdir))
    with tempfile.TemporaryDirectory(prefix="mltr-bench-ingest-") as work:
        return run_in(config, Path(work))


def run_in(config: BenchIngestConfig, work: Path) -> dict:
    import ray

    cpus = config.num_cpus or os.cpu_count() or 1
    root = work / f"src-{config.images}-{config.seed}"
    if not (root / "annotations").is_dir():
        print(f"generating {config.images} 640x480 JPEGs in {root} ...", flush=True)
        generate("coco", root, config.images, seed=config.seed, size=(640, 480), noise=12.0)
    out = work / f"converted-{config.images}-{config.seed}-{config.max_side}-{config.rows_per_shard}"
    uri = str(out / "coco")
    if not (out / "coco" / "_manifest.json").exists():
        print(f"converting to Parquet shards in {out} ...", flush=True)
        init_ray(num_cpus=cpus, log_to_driver=False)
        settings = ImageSettings(max_side=config.max_side)
        convert(read_index("coco", str(root)), str(out), settings, config.rows_per_shard)
        ray.shutdown()
    manifest = load_manifest(uri)
    files, labels, ignore = write_jpeg_files(manifest, "train", work / f"jpeg-{out.name}")
    cfg = IngestConfig(
        num_classes=manifest.num_classes, image_size=config.image_size, augment=AugmentConfig()
    )

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    init_ray(num_cpus=cpus, log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if config.mode == "stream":
        ds = build_dataset(
            manifest,
            "train",
            cfg,
            passes=config.epochs + 1,
            decode_actors=cpus,
            rows_per_task=config.rows_per_task,
        )
        stream = iter(
            ds.iter_torch_batches(batch_size=config.batch_size, prefetch_batches=config.prefetch_batches)
        )
        epochs_taken = iter(range(config.epochs + 1))

        def ray_epoch():
            return islice(stream, epoch_batches(len(files), 1, config.batch_size, next(epochs_taken)))

        ray_label = (
            f"Ray Data stream over {len(manifest.files('train'))} Parquet shards, {cpus} decode actors"
        )
    else:
        ds = build_dataset(manifest, "train", cfg, rows_per_task=config.rows_per_task)
        ray_epoch = partial(
            ds.iter_torch_batches, batch_size=config.batch_size, prefetch_batches=config.prefetch_batches
        )
        ray_label = f"Ray Data over {len(manifest.files('train'))} Parquet shards, {cpus} CPUs, per epoch"
    loader = DataLoader(
        JpegFiles(files, labels, ignore, cfg),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        prefetch_factor=config.prefetch_batches if config.num_workers > 0 else None,
    )
    baseline, ray_data = Timing(), Timing()
    dataloader = (
        f"DataLoader(num_workers={config.num_workers}) over {len(files)} JPEG files",
        loader.__iter__,
        baseline,
    )
    # A running stream keeps decoding into its buffer while it is not read, so the sides cannot
    # take turns epoch by epoch: the DataLoader runs its epochs before and after Ray Data's.
    rounds = [(dataloader, True), ((ray_label, ray_epoch, ray_data), True), (dataloader, False)]
    for (name, make_iter, timing), warm_up in rounds:
        for epoch in range(0 if warm_up else 1, config.epochs + 1):
            label = f"{name}, " + ("warm-up epoch" if epoch == 0 else f"epoch {epoch}")
            time_epoch(make_iter, timing, label, config.warmup_batches, warmup_epoch=epoch == 0)
        if config.mode == "stream" and timing is ray_data:
            stream.close()  # stops the stream's execution: its tail would compete with the DataLoader
    stats = ds.stats()
    ray.shutdown()
    full_batches = len(files) // config.batch_size * config.batch_size
    if set(baseline.epoch_images) != {len(files)} or not all(
        full_batches - config.batch_size < n <= len(files) for n in ray_data.epoch_images
    ):
        raise RuntimeError(
            f"epochs differ: {baseline.epoch_images} vs {ray_data.epoch_images} images, {len(files)} files"
        )

    ratio = ray_data.images_per_s / baseline.images_per_s
    ratio_steady = ray_data.steady_images_per_s / baseline.steady_images_per_s
    result = {
        "bench": "ingest",
        "images": len(files),
        "mode": config.mode,
        "ray_epoch_images": ray_data.epoch_images,
        "cpus": cpus,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "shards": len(manifest.files("train")),
        "dataloader_images_per_s": round(baseline.images_per_s, 1),
        "ray_images_per_s": round(ray_data.images_per_s, 1),
        "ratio": round(ratio, 3),
        "dataloader_steady_images_per_s": round(baseline.steady_images_per_s, 1),
        "ray_steady_images_per_s": round(ray_data.steady_images_per_s, 1),
        "ratio_steady": round(ratio_steady, 3),
        "dataloader_epoch_s": [round(s, 3) for s in baseline.epoch_s],
        "ray_epoch_s": [round(s, 3) for s in ray_data.epoch_s],
        "dataloader_first_batch_s": [round(s, 3) for s in baseline.first_batch_s],
        "ray_first_batch_s": [round(s, 3) for s in ray_data.first_batch_s],
        "dataloader_warmup_epoch_s": round(baseline.warmup_epoch_s, 2),
        "ray_warmup_epoch_s": round(ray_data.warmup_epoch_s, 2),
        "ray_init_s": round(ray_init_s, 2),
        "ray_tasks": operator_tasks(stats),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "config": to_dict(config),
    }
    print(f"\n{stats}\n", flush=True)
    print(
        f"whole epochs (each epoch's start included):\n"
        f"  DataLoader ({config.num_workers} workers): {baseline.images_per_s:8.1f} images/s\n"
        f"  Ray Data pipeline       : {ray_data.images_per_s:8.1f} images/s   ratio {ratio:.2f}x\n"
        f"steady state (after the first {config.warmup_batches} batches of each epoch):\n"
        f"  DataLoader ({config.num_workers} workers): {baseline.steady_images_per_s:8.1f} images/s\n"
        f"  Ray Data pipeline       : {ray_data.steady_images_per_s:8.1f} images/s   "
        f"ratio {ratio_steady:.2f}x\n"
        f"Ray start-up: {ray_init_s:.2f} s (in none of the figures above)\n",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchIngestConfig, argv, prog="python -m jobs.bench ingest")
    print(json.dumps(run(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
