"""Batch inference: Ray Data (the network in actors, decode in tasks or in the actors) vs a plain PyTorch loop.

    python -m jobs.bench predict                                # 512 images, mltr_s at 224 px, batch 32
    python -m jobs.bench predict --images 256 --variant mltr_tiny
    python -m jobs.bench predict --model-from checkpoint --images 16384   # a GPU machine: no MLflow needed
    python -m jobs.bench predict --model-from checkpoint --images 16384 --decode tasks

Both sides run the same model (``--variant``, random weights, logged as the project's pyfunc in
an embedded MLflow and loaded from there, or with ``--model-from checkpoint`` read from a
training checkpoint folder as ``mltr predict --model FOLDER`` does), the same decode
(``mltr.serving.decode_rows``: decode, resize by the input contract) and the same batch size, on
the same images read from Parquet: first a single-process loop (load the model, then read a
batch, decode it, run the network: torch's default threads), timed from the model's load;
then ``jobs.predict.batch_inference`` on a local Ray with one logical CPU per core this process
may run on (``taskset`` limits them) and one more, timed from the start of the execution to its
last row, actor start-up included (``ray_data_first_rows_s`` says how long the first batch took).
``--decode tasks`` (``mltr predict``'s default without GPUs) decodes in Ray tasks and runs the
network in ``--actors`` actors with ``--actor-threads`` torch threads each, by default one actor
using every core, as the loop does; ``--decode actor`` (its default with GPUs) decodes in the
model actors (on a GPU, ``--calls-per-actor`` calls at once, by default as
``jobs.predict.actor_layout`` sets them).
Where ``--images`` is more than the split holds, both sides read the split again, as often as
needed. On a GPU machine the model runs on the GPU on both sides (Ray Data: one actor per GPU).
Ends with one JSON line: images/s of each and ``ratio`` (Ray Data over the loop).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jobs._config import opt, parse_config, to_dict


@dataclass(frozen=True)
class BenchPredictConfig:
    """images/s of Ray Data batch inference over Parquet vs a single-process PyTorch loop."""

    images: int = opt(512, "images predicted by each side")
    variant: str = opt("mltr_s", "model variant (random weights: throughput only)")
    batch_size: int = opt(32, "images per batch, both sides")
    actors: int = opt(1, "Ray Data: model actors")
    actor_threads: int | None = opt(
        None, "torch threads of each actor (default: cores / actors; on a GPU, what jobs.predict sets)"
    )
    decode: Literal["auto", "tasks", "actor"] = opt(
        "auto", "Ray Data: decode in tasks or in the model actors (auto: as mltr predict, by the GPUs)"
    )
    calls_per_actor: int | None = opt(
        None, "Ray Data: calls each actor runs at once (default: jobs.predict's)"
    )
    model_from: Literal["mlflow", "checkpoint"] = opt(
        "mlflow", "load the model as the logged pyfunc (embedded MLflow) or from a checkpoint folder"
    )
    workdir: str | None = opt(None, "where the dataset, model and MLflow go (default: a temporary folder)")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchPredictConfig, argv, prog="python -m jobs.bench predict")
    print(json.dumps(run(config)), flush=True)
    return 0


def log_model(network, info, work: Path) -> tuple[str, str]:
    """``network`` logged as the project's pyfunc in an embedded MLflow: (model URI, tracking URI)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mltr import save_checkpoint, tracking
    from mltr.pyfunc import log_pyfunc_model

    save_checkpoint(network, work / "model.pt")
    uri = tracking.default_tracking_uri(work)
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "bench-predict", (work / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    with tracking.tracking_uri(uri), mlflow.start_run(run_id=run_id):
        return log_pyfunc_model(work / "model.pt", info).model_uri, uri


def run(config: BenchPredictConfig) -> dict:
    import ray
    import torch

    from jobs._models import CheckpointData, load_predictor
    from jobs._runtime import init_ray
    from jobs.predict import actor_layout, batch_inference
    from mltr import create_model
    from mltr.checkpoint import save_selected_model
    from mltr.serving import ModelInfo
    from pipeline.convert import convert
    from pipeline.dataset import load_manifest, read_split
    from pipeline.readers import read_index
    from pipeline.synthetic import generate

    work = Path(config.workdir or tempfile.mkdtemp(prefix="mltr-bench-predict-")).resolve()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    actors = config.actors
    # One logical CPU more than cores: the model actors hold one each, the decode tasks share.
    # No dashboard: nothing here needs it, and a machine with only Ray's core packages lacks its own.
    init_ray(num_cpus=cores + 1, log_to_driver=False, include_dashboard=False)
    dataset = work / "datasets" / "coco"
    if not (dataset / "_manifest.json").exists():  # kept in --workdir for the next run
        # COCO's layout puts about a third of the images in val: draw enough for --images there.
        # COCO's own size (640 x 480 JPEGs): decoding costs what it costs on real data.
        # Past 512 images the split is read again rather than generated: decoding costs the same.
        generate("coco", work / "src", max(64, int(min(config.images, 512) * 3.2)), seed=0, size=(640, 480))
        convert(read_index("coco", str(work / "src")), str(work / "datasets"), rows_per_shard=128)
    manifest = load_manifest(str(dataset))
    split = max(("train", "val"), key=manifest.rows)
    passes = math.ceil(config.images / manifest.rows(split))  # reads of the split each side makes

    torch.manual_seed(0)
    network = create_model(config.variant, num_classes=manifest.num_classes).eval()
    checkpoint = CheckpointData.of(manifest)
    contract = network.config.input_contract() | {"stored": manifest.stored_images()}
    info = ModelInfo(checkpoint.classes, (0.5,) * manifest.num_classes, contract)
    if config.model_from == "mlflow":
        model_uri, tracking_uri = log_model(network, info, work)
    else:
        model_uri, tracking_uri = (
            str(save_selected_model(network, info.thresholds, work / "checkpoint")),
            None,
        )
    size = network.config.image_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"{config.images} images of {split} ({passes} passes), {config.variant} at {size} px, "
        f"batch {config.batch_size}, {cores} cores, model on {device}",
        flush=True,
    )

    # The loop: read, decode, run, batch after batch, in this process.
    client = None
    if tracking_uri is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
    # Timed from the model's load, as Ray Data's figure includes its actors' start and load.
    started, done, decode_s = time.perf_counter(), 0, 0.0
    predictor = load_predictor(model_uri, client, checkpoint, batch_size=config.batch_size)
    load_s = time.perf_counter() - started
    batches = itertools.chain.from_iterable(
        manifest.iter_batches(split, ["image_id", "image"], config.batch_size) for _ in range(passes)
    )
    for batch in batches:
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
        f"(model load {load_s:.1f} s, decode {decode_s:.1f} s of {loop_s:.1f} s)",
        flush=True,
    )

    # Ray Data: the same model, decode and batch size; decode in tasks or in the model actor(s).
    threads = config.actor_threads or (None if device == "cuda" else max(1, cores // actors))
    layout = actor_layout(config.decode, ray.nodes(), config.calls_per_actor)
    source = read_split(manifest, split, columns=["image_id", "image"])
    if passes > 1:
        # The shards listed once per pass, read as read_split reads them (a union of passes
        # would sample every pass's files before the first row: 12 s more on 2 cores).
        context = ray.data.DataContext.get_current()
        context.use_datasource_v2 = False
        files = manifest.files(split) * passes
        source = ray.data.read_parquet(
            files,
            filesystem=manifest.filesystem,
            columns=["image_id", "image"],
            override_num_blocks=len(files),
        )
    predictions = batch_inference(
        source.limit(config.images),
        model_uri,
        info,
        tracking_uri,
        checkpoint,
        config.batch_size,
        actors,
        torch_threads=threads,
        decode=config.decode,
        calls_per_actor=config.calls_per_actor,
    )
    started, rows, first_s = time.perf_counter(), 0, None
    for batch in predictions.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
        if first_s is None:
            first_s = time.perf_counter() - started
    ray_s = time.perf_counter() - started
    print(
        f"Ray Data ({actors} actors x {threads or layout['torch_threads'] or 'default'} threads, "
        f"{layout['calls']} calls at once, decode in {layout['decode']}): {rows / ray_s:6.1f} images/s "
        f"(first rows after {first_s:.1f} s)",
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
        "loop_load_s": round(load_s, 1),
        "loop_decode_s": round(decode_s, 1),
        "ray_data_s": round(ray_s, 1),
        "ray_data_first_rows_s": round(first_s or 0.0, 1),
        "device": device,
        "model_from": config.model_from,
        "actors": actors,
        "actor_threads": threads or layout["torch_threads"],
        "decode": layout["decode"],
        "calls_per_actor": layout["calls"],
        "actor_cpus": layout["num_cpus"],
        "ratio": round(ray_ips / loop_ips, 3),
        "config": to_dict(config),
    }


if __name__ == "__main__":
    sys.exit(main())
