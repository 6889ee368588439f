"""Batch inference: Ray Data (decode in tasks, the network in actors) vs a plain PyTorch loop.

    python -m jobs.bench predict                                # 512 images, mltr_s at 224 px, batch 32
    python -m jobs.bench predict --images 256 --variant mltr_tiny

Both sides run the same model (``--variant``, random weights, logged as the project's pyfunc in
an embedded MLflow and loaded from there), the same decode (``mltr.serving.decode_rows``: decode,
resize by the input contract) and the same batch size, on the same images read from Parquet:
first a single-process loop (read a batch, decode it, run the network: torch's default threads);
then ``jobs.predict.batch_inference`` on a local Ray with one logical CPU per core and one more
(decode in Ray tasks; the network in ``--actors`` actors with ``--actor-threads`` torch threads
each, by default one actor using every core, as the loop does), timed from the start of the execution to its last row,
actor start-up included. Ends with one JSON line:
images/s of each and ``ratio`` (Ray Data over the loop).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from jobs._config import opt, parse_config, to_dict


@dataclass(frozen=True)
class BenchPredictConfig:
    """images/s of Ray Data batch inference over Parquet vs a single-process PyTorch loop."""

    images: int = opt(512, "images predicted by each side")
    variant: str = opt("mltr_s", "model variant (random weights: throughput only)")
    batch_size: int = opt(32, "images per batch, both sides")
    actors: int = opt(1, "Ray Data: model actors")
    actor_threads: int | None = opt(None, "torch threads of each actor (default: cores / actors)")
    workdir: str | None = opt(None, "where the dataset, model and MLflow go (default: a temporary folder)")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchPredictConfig, argv, prog="python -m jobs.bench predict")
    print(json.dumps(run(config)), flush=True)
    return 0


def run(config: BenchPredictConfig) -> dict:
    import mlflow
    import ray
    import torch
    from mlflow.tracking import MlflowClient

    from jobs._models import load_predictor
    from jobs._runtime import init_ray
    from jobs.predict import batch_inference
    from mltr import create_model, save_checkpoint, tracking
    from mltr.pyfunc import log_pyfunc_model
    from mltr.serving import ModelInfo
    from pipeline.convert import convert
    from pipeline.dataset import load_manifest, read_split
    from pipeline.readers import read_index
    from pipeline.synthetic import generate

    work = Path(config.workdir or tempfile.mkdtemp(prefix="mltr-bench-predict-")).resolve()
    cores = os.cpu_count() or 1
    actors = config.actors
    # One logical CPU more than cores: the model actors hold one each, the decode tasks share.
    init_ray(num_cpus=cores + 1, log_to_driver=False)
    dataset = work / "datasets" / "coco"
    if not (dataset / "_manifest.json").exists():  # kept in --workdir for the next run
        # COCO's layout puts about a third of the images in val: draw enough for --images there.
        # COCO's own size (640 x 480 JPEGs): decoding costs what it costs on real data.
        generate("coco", work / "src", max(64, int(config.images * 3.2)), seed=0, size=(640, 480))
        convert(read_index("coco", str(work / "src")), str(work / "datasets"), rows_per_shard=128)
    manifest = load_manifest(str(dataset))
    split = max(("train", "val"), key=manifest.rows)
    if manifest.rows(split) < config.images:
        raise SystemExit(
            f"{dataset}: {manifest.rows(split)} rows in {split}, fewer than --images {config.images}"
        )

    torch.manual_seed(0)
    network = create_model(config.variant, num_classes=manifest.num_classes).eval()
    save_checkpoint(network, work / "model.pt")
    info = ModelInfo(tuple(manifest.classes), (0.5,) * manifest.num_classes, network.config.input_contract())
    uri = tracking.default_tracking_uri(work)
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "bench-predict", (work / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    with tracking.tracking_uri(uri), mlflow.start_run(run_id=run_id):
        model_uri = log_pyfunc_model(work / "model.pt", info).model_uri
    size = network.config.image_size
    print(
        f"{config.images} images of {split}, {config.variant} at {size} px, batch {config.batch_size}, {cores} cores",
        flush=True,
    )

    # The loop: read, decode, run, batch after batch, in this process.
    predictor = load_predictor(model_uri, client, batch_size=config.batch_size)
    started, done, decode_s = time.perf_counter(), 0, 0.0
    for batch in manifest.iter_batches(split, ["image_id", "image"], config.batch_size):
        rows = batch.to_pydict()
        take = min(len(rows["image_id"]), config.images - done)
        decoding = time.perf_counter()
        pixels, errors = predictor.decode(
            (str(i), d, None) for i, d in zip(rows["image_id"][:take], rows["image"][:take], strict=True)
        )
        decode_s += time.perf_counter() - decoding
        out = predictor.predict_pixels(pixels, errors)
        done += sum(r["error"] is None for r in out)
        if done >= config.images:
            break
    loop_s = time.perf_counter() - started
    print(
        f"plain loop ({torch.get_num_threads()} torch threads): {done / loop_s:6.1f} images/s "
        f"(decode {decode_s:.1f} s of {loop_s:.1f} s)",
        flush=True,
    )

    # Ray Data: the same model, decode and batch size; decode tasks beside the model actor(s).
    threads = config.actor_threads or max(1, cores // actors)
    source = read_split(manifest, split, columns=["image_id", "image"]).limit(config.images)
    predictions = batch_inference(
        source, model_uri, info, uri, None, config.batch_size, actors, torch_threads=threads
    )
    started = time.perf_counter()
    rows = sum(1 for _ in predictions.iter_rows())
    ray_s = time.perf_counter() - started
    print(
        f"Ray Data ({actors} actors x {threads} threads + decode tasks): {rows / ray_s:6.1f} images/s",
        flush=True,
    )
    ray.shutdown()
    if rows != config.images or done != config.images:
        raise RuntimeError(f"predicted {done} (loop) and {rows} (Ray Data) of {config.images} images")
    loop_ips, ray_ips = done / loop_s, rows / ray_s
    return {
        "bench": "predict",
        "images": config.images,
        "variant": config.variant,
        "image_size": size,
        "batch_size": config.batch_size,
        "cores": cores,
        "loop_images_per_s": round(loop_ips, 2),
        "ray_data_images_per_s": round(ray_ips, 2),
        "loop_s": round(loop_s, 1),
        "loop_decode_s": round(decode_s, 1),
        "ray_data_s": round(ray_s, 1),
        "actors": actors,
        "actor_threads": threads,
        "ratio": round(ray_ips / loop_ips, 3),
        "config": to_dict(config),
    }


if __name__ == "__main__":
    sys.exit(main())
