"""Labels and scores of images, from a registered model, a logged model or a checkpoint.

    mltr predict --model models:/mltr-coco@champion cat.jpg photos/ 'shots/*.png' s3://bucket/incoming/
    mltr predict --model models:/mltr-coco@champion photos/ --out predictions.jsonl
    mltr predict --model models:/mltr-coco@champion --data s3://bucket/datasets/coco --split val \\
                 --parquet-out s3://bucket/predictions/coco-val

On files (images, folders, globs, ``s3://`` prefixes) it runs in this process: one JSON line per
image (``path``, ``labels``, ``scores`` by class name), a progress bar on long inputs, and an
unreadable image reported on stderr and skipped. With ``--data`` (a converted dataset's split) or
``--parquet-out`` it runs as Ray Data batch inference: a pool of model actors
(``map_batches`` with ``compute=ActorPoolStrategy``; one GPU each where the cluster has GPUs)
fed by Ray Data's reads, writing Parquet. Images are decoded in Ray tasks beside the actors
(``--decode tasks``: decoding spreads over every CPU of the cluster) or in the actors themselves
(``--decode actor``: on a GPU node, several calls at once per actor, one batch's decode beside
another's network; no decoded pixels go through the object store). By default (``auto``) the
actors decode where the cluster has GPUs, tasks where it has none. The last line is one JSON
summary.
"""

from __future__ import annotations

import glob as globlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np

from jobs._config import check_at_least, component, opt, parse_config
from jobs._models import (
    MODEL_URI_SCHEMES,
    CheckpointData,
    TrackingArgs,
    check_class_names,
    checkpoint_data,
    load_predictor,
)
from jobs._runtime import init_ray, run_job, setup_logging
from mltr.errors import ConfigError
from mltr.paths import check_out_file, file_under_a_file, local_path, replace_durably
from mltr.serving import Predictor, decode_rows

if TYPE_CHECKING:
    from pipeline.dataset import Manifest

log = logging.getLogger("jobs.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DecodeIn = Literal["auto", "tasks", "actor"]
MAX_CALLS_PER_ACTOR = 8  # past this the decoding threads of one actor wait on each other's GIL


@dataclass(frozen=True)
class PredictConfig:
    """What to predict, with which model, where the predictions go."""

    model: str | None = opt(
        None, "models:/NAME@alias, models:/NAME/N, runs:/ID/model, or a checkpoint folder"
    )
    inputs: tuple[str, ...] = opt((), "images, folders, globs or s3:// prefixes", positional=True)
    out: str | None = opt(
        None, "write JSON lines to this local file (replaced only when every image is done) instead of stdout"
    )
    data: str | None = opt(None, "a converted dataset (Parquet): predict its --split with Ray Data")
    split: str = opt("val", "the split of --data")
    parquet_out: str | None = opt(
        None, "write predictions as Parquet here (a folder or s3:// prefix), with Ray Data"
    )
    classes_from: str | None = opt(None, "a converted dataset whose classes a checkpoint folder predicts")
    batch_size: int = opt(32, "images per forward pass (and per Ray Data batch)")
    actors: int = opt(1, "Ray Data: model actors (each holds the model; one GPU each where there are GPUs)")
    decode: DecodeIn = opt(
        "auto",
        "Ray Data: decode in tasks beside the actors (every CPU of the cluster) or in the model actors "
        "(their GPU node's CPUs); auto: in the actors where there are GPUs",
    )
    address: str | None = opt(None, "Ray address (default: RAY_ADDRESS, else a local Ray)")
    tracking: TrackingArgs = component(TrackingArgs)

    def __post_init__(self):
        check_at_least(self, 1, "batch_size", "actors")


def check_inputs(inputs: tuple[str, ...]) -> None:
    """Refuse an empty input (an unset shell variable): as a path it would be the current folder."""
    for spec in inputs:
        if not spec.strip():
            raise ConfigError(f"an input is empty ({spec!r}): give an image, a folder, a glob or a prefix")


def expand_inputs(inputs: tuple[str, ...]) -> Iterator[str]:
    """Image paths and URIs, each once in the order first met: files as given, folders and
    ``s3://`` prefixes walked, globs expanded.

    A path that exists is taken as it is, whatever ``[`` or ``*`` its name holds; only one that
    does not is a glob. A file inside a walked folder is yielded if its suffix is an image's,
    whatever it is (a broken link is then reported as missing, not left out); one given or
    matched by a glob is yielded whatever its suffix, and reported if it is not an image.
    """
    check_inputs(inputs)
    seen: set[str] = set()
    for spec in inputs:
        if "://" in spec and not spec.startswith("file://"):
            import fsspec

            fs, root = fsspec.core.url_to_fs(spec)
            protocol = spec.split("://", 1)[0]
            found = sorted(fs.glob(root)) if globlib.has_magic(root) and not fs.exists(root) else [root]
            walked = (
                [f"{protocol}://{p}" for p in sorted(fs.find(path)) if p.lower().endswith(IMAGE_SUFFIXES)]
                if fs.isdir(path)
                else [f"{protocol}://{path}"]
                for path in found
            )
        else:
            spec = local_path(spec)
            found = (
                sorted(globlib.glob(spec, recursive=True))
                if globlib.has_magic(spec) and not os.path.lexists(spec)
                else [spec]
            )
            walked = (
                [
                    str(p)
                    for p in sorted(Path(path).rglob("*"))
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
                ]
                if Path(path).is_dir()
                else [path]
                for path in found
            )
        missing = [] if found else [spec]  # reported as missing, not silently dropped
        images = 0
        for path in itertools.chain(missing, *walked):
            images += 1
            if path not in seen:  # a folder and a file in it, or a ** glob's folders and their files
                seen.add(path)
                yield path
        if not images:  # only folders, none holding an image: said, not silently nothing
            log.warning("%s: no %s images in it", spec, ", ".join(IMAGE_SUFFIXES))


def _record(path: str, row: dict[str, Any], classes: tuple[str, ...]) -> dict[str, Any]:
    return {"path": path, "labels": row["labels"], "scores": dict(zip(classes, row["scores"], strict=True))}


def out_path(out: str | None) -> Path | None:
    """The local file ``--out`` names (a ``file://`` URI taken as its path); remote URIs are refused."""
    if out is None:
        return None
    return check_out_file(
        out, "--out", "JSON lines go to a local file; write to object storage with --parquet-out"
    )


def parquet_out_location(uri: str):
    """``--parquet-out``, checked: a new or empty folder (or s3:// prefix), not a file nor below one."""
    from pipeline.storage import resolve as resolve_storage

    location = resolve_storage(uri)
    blocked = file_under_a_file(location.path) if location.scheme == "file" else None
    if blocked is not None:
        raise ConfigError(f"--parquet-out {uri}: {blocked} is a file, not a folder")
    if location.is_file():
        raise ConfigError(f"--parquet-out {uri} is a file: predictions go into a new folder")
    if location.exists() and location.list_files():
        raise ConfigError(f"--parquet-out {uri} already holds files: predictions go into a new folder")
    return location


@contextmanager
def json_lines(out: str | None) -> Iterator[TextIO]:
    """stdout, or the ``--out`` file written whole: lines go to ``FILE.partial`` and replace ``FILE``
    only once every image is done, so a run that fails leaves an earlier ``FILE`` as it was (and
    the lines it did write in ``FILE.partial``)."""
    path = out_path(out)
    if path is None:
        yield sys.stdout
        return
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w") as stream:
        try:
            yield stream
        except BaseException:
            log.error("predict stopped: the lines it wrote are in %s; %s is as it was", partial, path)
            raise
    replace_durably(partial, path)


def predict_files(predictor: Predictor, paths: list[str], out, batch_size: int) -> dict:
    """Score ``paths`` batch by batch; write a JSON line per good image to ``out``; report the others."""
    from tqdm import tqdm

    written, skipped = 0, []
    classes = predictor.info.classes
    bar = tqdm(
        total=len(paths), unit="img", file=sys.stderr, disable=len(paths) <= batch_size, desc="predict"
    )
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        for path, row in zip(chunk, predictor.predict_encoded((p, None, p) for p in chunk), strict=True):
            if row["error"]:
                skipped.append({"path": path, "error": row["error"]})
                print(f"predict: skipped {row['error']}", file=sys.stderr, flush=True)
                continue
            out.write(json.dumps(_record(path, row, classes)) + "\n")
            written += 1
        out.flush()
        bar.update(len(chunk))
    bar.close()
    return {"images": written, "skipped": skipped}


def decode_batch(batch: dict, contract: dict[str, Any]) -> dict:
    """Ray Data task: ``image`` bytes (or ``path``) -> ``pixels`` uint8 (B, 3, S, S) and ``error`` per row."""
    ids = batch["image_id"] if "image_id" in batch else batch["path"]
    data, paths = batch.get("image"), batch.get("path")
    pixels, errors = decode_rows(
        (
            (str(ids[i]), None if data is None else data[i], None if paths is None else str(paths[i]))
            for i in range(len(ids))
        ),
        contract,
    )
    return {
        "id": np.asarray([str(i) for i in ids], dtype=object),
        "pixels": pixels,
        "error": np.asarray(["" if e is None else e for e in errors], dtype=object),
    }


class PredictActor:
    """Ray Data model actor: decoded ``pixels`` (or the rows :func:`decode_batch` takes, decoded
    here) in; ``labels``, ``scores`` and ``error`` out. Safe to call from several threads at once."""

    def __init__(
        self,
        model: str,
        tracking_uri: str | None,
        checkpoint: CheckpointData | None,
        batch_size: int,
        torch_threads: int | None = None,
    ):
        if torch_threads:  # Ray gives an actor one thread per CPU it reserves; decode tasks share the cores
            import torch

            torch.set_num_threads(torch_threads)
        client = None
        if model.startswith(MODEL_URI_SCHEMES):
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
        self.predictor = load_predictor(model, client, checkpoint, batch_size)

    def __call__(self, batch: dict) -> Any:
        import pyarrow as pa

        if "pixels" not in batch:  # --decode actor: the batch holds encoded images
            batch = decode_batch(batch, self.predictor.info.input)
        errors = [str(e) if e else None for e in batch["error"]]
        rows = self.predictor.predict_pixels(batch["pixels"], errors)
        return pa.table(
            {
                "id": [str(i) for i in batch["id"]],
                "labels": pa.array([r["labels"] for r in rows], type=pa.list_(pa.string())),
                "scores": pa.array([r["scores"] for r in rows], type=pa.list_(pa.float32())),
                "error": pa.array([r["error"] for r in rows], type=pa.string()),
            }
        )


def actor_layout(
    decode: DecodeIn, nodes: list[dict[str, Any]], calls_per_actor: int | None = None
) -> dict[str, Any]:
    """Where images are decoded (``decode``, ``auto`` resolved), and each model actor's resources
    and concurrency, from the cluster's ``nodes`` (``ray.nodes()``).

    ``auto`` decodes in the actors where the cluster has GPUs (measured on one GPU node, 2 and 16
    cores: docs/benchmarks.md), in tasks where it has none. With GPUs: one GPU per actor.
    Decoding in tasks, the actor holds no CPU (the tasks use them all). Decoding in the actor, it
    holds its share of its GPU node's CPUs but one (left to the reads) and runs that many calls
    plus one at once (at most :data:`MAX_CALLS_PER_ACTOR`), each decoding on one torch thread,
    so that some decode while one runs the network. Without GPUs: one CPU per actor and one call
    at a time (the network takes the cores through torch's own threads; a second call at once
    would only contend with it).
    """
    gpu_nodes = [n["Resources"] for n in nodes if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
    if decode not in ("auto", "tasks", "actor"):
        raise ConfigError(f"decode must be 'auto', 'tasks' or 'actor', not {decode!r}")
    if decode == "auto":
        decode = "actor" if gpu_nodes else "tasks"
    if decode == "tasks" or not gpu_nodes:
        return {
            "decode": decode,
            "num_cpus": 0 if gpu_nodes else 1,
            "num_gpus": 1 if gpu_nodes else 0,
            "calls": calls_per_actor or 1,
            "torch_threads": None,
        }
    per_gpu = min(int(r.get("CPU", 0) // r["GPU"]) for r in gpu_nodes)
    cpus = max(1, per_gpu - 1)
    calls = calls_per_actor or min(MAX_CALLS_PER_ACTOR, cpus + 1)
    return {"decode": decode, "num_cpus": cpus, "num_gpus": 1, "calls": calls, "torch_threads": 1}


def batch_inference(
    source,
    model: str,
    info,
    tracking_uri: str | None,
    checkpoint: CheckpointData | None,
    batch_size: int,
    actors: int,
    torch_threads: int | None = None,
    decode: DecodeIn = "auto",
    calls_per_actor: int | None = None,
):
    """``source`` rows (``image_id`` + ``image``, or ``path``) -> predictions (``id``, ``labels``,
    ``scores``, ``error``): the network in a pool of actors (one GPU each where the cluster has
    GPUs), images decoded in Ray tasks beside them or in the actors (:func:`actor_layout`: several
    calls at once on a GPU)."""
    import ray

    layout = actor_layout(decode, ray.nodes(), calls_per_actor)
    if layout["decode"] == "tasks":
        # Decode tasks ask for half a CPU: two share a core (decoding waits on reads), and remote
        # args unlike the actors' keep Ray Data from fusing the decode into the actors, where it
        # would run in turn with the network instead of beside it.
        source = source.map_batches(
            decode_batch,
            fn_kwargs={"contract": info.input},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=0.5,
        )
    calls = layout["calls"]
    return source.map_batches(
        PredictActor,
        fn_constructor_kwargs={
            "model": model,
            "tracking_uri": tracking_uri,
            "checkpoint": checkpoint,
            "batch_size": batch_size,
            "torch_threads": torch_threads or layout["torch_threads"],
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=1,
            max_size=max(1, actors),
            max_concurrent_calls_per_actor=calls,
            enable_true_multi_threading=calls > 1,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=layout["num_gpus"],
        num_cpus=layout["num_cpus"],
    )


def in_input_order(dataset):
    """``dataset`` yielding its rows in the order of its source rows (Ray Data's streaming executor
    otherwise yields blocks as they finish: several actors, or calls at once, reorder them), so
    that JSON lines follow the inputs, as on files, and a re-run writes the same file."""
    dataset.context.execution_options.preserve_order = True  # the dataset's own copy of the context
    return dataset


def predict_ray(
    config: PredictConfig,
    info,
    checkpoint: CheckpointData | None,
    tracking_uri: str | None,
    manifest: Manifest | None = None,
) -> dict:
    """Ray Data batch inference over ``manifest`` (the ``--data`` dataset, loaded and checked by
    :func:`run`) or over ``config.inputs``."""
    import ray
    import ray.data
    from ray.data.expressions import col

    from pipeline.dataset import read_split

    init_ray(config.address, log_to_driver=False)
    if manifest is not None:
        source = read_split(manifest, config.split, columns=["image_id", "image"])
    else:
        paths = list(expand_inputs(config.inputs))
        if not paths:
            raise ConfigError("nothing to predict: give INPUTS or --data")
        source = ray.data.from_items([{"path": p} for p in paths])
    predictions = batch_inference(
        source,
        config.model,
        info,
        tracking_uri,
        checkpoint,
        config.batch_size,
        config.actors,
        decode=config.decode,
    )
    summary: dict[str, Any] = {"model": config.model, "source": config.data or list(config.inputs)}
    if config.parquet_out:
        location = parquet_out_location(config.parquet_out)
        predictions.write_parquet(
            location.uri if location.scheme == "s3" else location.path, filesystem=location.fs
        )
        written = ray.data.read_parquet(
            location.uri if location.scheme == "s3" else location.path, filesystem=location.fs
        )
        errors = written.filter(expr=col("error").is_not_null()).count()  # Arrow-native, no Python per row
        summary.update({"parquet_out": config.parquet_out, "rows": written.count(), "errors": errors})
        return summary
    written, skipped = 0, []
    with json_lines(config.out) as out:
        for row in in_input_order(predictions).iter_rows():
            ident = row["id"]
            if row["error"]:
                skipped.append({"path": ident, "error": row["error"]})
                print(f"predict: skipped {row['error']}", file=sys.stderr, flush=True)
                continue
            rec = {"path": ident, "labels": list(row["labels"]), "scores": list(map(float, row["scores"]))}
            rec["scores"] = dict(zip(info.classes, rec["scores"], strict=True))  # the model's classes
            out.write(json.dumps(rec) + "\n")
            written += 1
    summary.update({"images": written, "skipped": skipped, "out": config.out})
    return summary


def run(config: PredictConfig) -> dict:
    if not config.model:
        raise ConfigError("--model is required")
    if not config.inputs and not config.data:
        raise ConfigError(
            "nothing to predict: give INPUTS (images, folders, globs, s3:// prefixes) or --data"
        )
    check_inputs(config.inputs)  # as a bad --out is, before the model loads
    out_path(config.out)
    client = config.tracking.client() if config.model.startswith(MODEL_URI_SCHEMES) else None
    checkpoint = checkpoint_data(config.model, config.classes_from or config.data, "--classes-from")
    tracking_uri = client.tracking_uri if client else None
    predictor = load_predictor(config.model, client, checkpoint, config.batch_size)
    manifest = None
    if config.data:  # the model must predict the dataset's classes: checked before Ray starts
        from pipeline.dataset import load_manifest

        manifest = load_manifest(config.data)
        check_class_names(predictor.info.classes, manifest, config.model)
        manifest.verify((config.split,))  # a missing or cut shard is named here, not inside Ray Data
    if config.parquet_out:
        parquet_out_location(config.parquet_out)  # before Ray starts
    if config.data or config.parquet_out:
        return predict_ray(config, predictor.info, checkpoint, tracking_uri, manifest)
    paths = list(expand_inputs(config.inputs))
    with json_lines(config.out) as out:
        summary = predict_files(predictor, paths, out, config.batch_size)
    log.info("predicted %d images, skipped %d", summary["images"], len(summary["skipped"]))
    return {"model": config.model, "out": config.out, **summary}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(PredictConfig, argv, prog="mltr predict", job="predict")
    return run_job("predict", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
