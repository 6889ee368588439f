"""Benchmark the conversion: a plain single-process loop vs the Ray Data pipeline, same run.

    python -m jobs.bench preprocess --images 2000

Both convert the same generated 640x480 photo-like JPEGs with the same per-image work (read,
fully decode, validate, resize to ``--max-side``, JPEG-encode, write Parquet shards). The Ray
pipeline is timed on a started local Ray after a small warm-up conversion (a cluster is
long-lived; Ray's own start-up is reported separately). The driver's peak resident memory is
sampled during a conversion of ``--memory-images`` and of ``--images`` images, to show it does
not grow with the dataset. Ends with one JSON line holding every figure and ``ratio``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs._config import opt, parse_config, to_dict
from jobs._runtime import init_ray
from pipeline.convert import ROW_GROUP_SIZE, convert, process_batch, split_processed
from pipeline.images import ImageSettings
from pipeline.readers import read_index
from pipeline.synthetic import generate


@dataclass(frozen=True)
class BenchPreprocessConfig:
    """Conversion throughput: single-process loop vs Ray Data pipeline."""

    images: int = opt(2000, "images in the main comparison")
    memory_images: int = opt(500, "a smaller conversion, to show driver memory does not grow with images")
    max_side: int = opt(448, "resize target (every 640x480 source is resized)")
    rows_per_shard: int = opt(1000, "rows per Parquet shard, as in the preprocess job")
    num_cpus: int | None = opt(None, "logical CPUs for the local Ray (default: this machine's cores)")
    workdir: str | None = opt(None, "where to generate and write (default: a temporary folder)")
    seed: int = opt(0, "seed of the generated images")


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` after ``with``."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.current_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def baseline_loop(index, out: Path, settings: ImageSettings, rows_per_shard: int) -> float:
    """The same per-image work in one process, shard by shard; returns seconds."""
    rows = [e.as_row() for e in index.entries]
    start = time.perf_counter()
    for i in range(0, len(rows), rows_per_shard):
        parts, _ = split_processed(
            process_batch(pa.Table.from_pylist(rows[i : i + rows_per_shard]), settings)
        )
        for split, table in parts.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out / split / f"part-{i:06d}.parquet", row_group_size=ROW_GROUP_SIZE)
    return time.perf_counter() - start


def run(config: BenchPreprocessConfig) -> dict:
    import ray

    work = Path(config.workdir or tempfile.mkdtemp(prefix="mltr-bench-"))
    settings = ImageSettings(max_side=config.max_side)
    sources = {}
    for n in sorted({config.images, config.memory_images, 64}):
        root = work / f"src-{n}"
        if not (root / "annotations").is_dir():
            print(f"generating {n} 640x480 JPEGs in {root} ...", flush=True)
            generate("coco", root, n, seed=config.seed, size=(640, 480), noise=12.0)
        sources[n] = read_index("coco", str(root))
    index = sources[config.images]
    n_images = len(index.entries)

    print(f"baseline: single-process loop over {n_images} images ...", flush=True)
    base_s = baseline_loop(index, work / "out-baseline", settings, config.rows_per_shard)

    start = time.perf_counter()
    init_ray(num_cpus=config.num_cpus or os.cpu_count(), log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    convert(sources[64], str(work / "out-warmup"), settings, config.rows_per_shard)  # start the workers

    peaks = {}
    for n in sorted({config.memory_images, config.images}):
        with PeakRSS() as rss:
            summary = convert(sources[n], str(work / f"out-ray-{n}"), settings, config.rows_per_shard)
        peaks[n] = rss.peak_mb
        if n == config.images:
            ray_s = summary.seconds
            rows = sum(summary.rows.values())
    ray.shutdown()

    base_ips, ray_ips = n_images / base_s, n_images / ray_s
    result = {
        "bench": "preprocess",
        "images": n_images,
        "rows": rows,
        "cpus": config.num_cpus or os.cpu_count(),
        "baseline_images_per_s": round(base_ips, 1),
        "ray_images_per_s": round(ray_ips, 1),
        "ratio": round(ray_ips / base_ips, 3),
        "ray_init_s": round(ray_init_s, 2),
        "driver_peak_rss_mb": {str(n): round(mb, 1) for n, mb in peaks.items()},
        "driver_rss_growth_mb": round(peaks[config.images] - peaks[config.memory_images], 1),
        "config": to_dict(config),
    }
    print(
        f"\nbaseline (1 process): {base_ips:8.1f} images/s\n"
        f"Ray Data pipeline   : {ray_ips:8.1f} images/s   ratio {ray_ips / base_ips:.2f}x\n"
        f"driver peak RSS     : " + ", ".join(f"{mb:.0f} MB at {n} images" for n, mb in peaks.items()) + "\n",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchPreprocessConfig, argv, prog="python -m jobs.bench preprocess")
    print(json.dumps(run(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
