"""The end-to-end demo on the embedded defaults (local Ray, local folders, SQLite MLflow), all state
under one work folder.

    python -m jobs.demo --workdir work/demo

1. generates a small COCO 2014-format dataset (with the faults real data holds) that a tiny
   model learns on 2 CPU cores in minutes: 12 classes, each drawn with a look of its own;
2. converts it to Parquet shards with Ray Data;
3. trains ``mltr_tiny`` with 2 Ray Train workers (the ``tiny`` preset), the epoch and weights
   chosen on a calibration split that val never informs;
4. sweeps window size x loss (2 x 2, short: ``tune``'s ``tiny`` preset, 3 epochs, two trials at a
   time) with Ray Tune and ASHA;
5. registers the best of the run and the trials, chosen on calibration mAP, as ``mltr-coco``;
6. promotes it to ``champion`` (gated: it must beat the champion on val);
7. predicts three val images with ``models:/mltr-coco@champion``, next to their true labels;
8. exports the champion to ONNX, checked against PyTorch with onnxruntime.

Stages 2, 3 and 4-6 are ``mltr pipeline``'s, so a second run reuses the dataset, the run, the
sweep, the version and the promotion that are there. One line per stage and a progress bar on
long work go to the terminal; Ray's, Ray Data's and the stages' own logs go to
``<workdir>/logs/demo.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from jobs import pipeline
from jobs._config import opt, parse_config
from jobs._runtime import init_ray, run_job, setup_logging
from pipeline.synthetic import DEMO_CLASSES, generate

log = logging.getLogger("jobs.demo")
STAGES = 8


@dataclass(frozen=True)
class DemoConfig:
    """Run the pipeline end to end on a tiny generated dataset, all state under one folder."""

    workdir: str = opt("work/demo", "folder for every artefact of the demo")
    images: int = opt(600, "images in the generated COCO-format dataset")
    classes: int = opt(DEMO_CLASSES, "classes drawn in the generated dataset (of COCO's 80)")
    seed: int = opt(0, "random seed of the generated dataset")
    epochs: int = opt(20, "training epochs")
    num_workers: int = opt(2, "Ray Train workers")
    sweep_epochs: int = opt(3, "epochs of each sweep trial (ASHA may stop one after 1)")


GENERATED = "generated.json"  # beside the generated dataset: the settings it was generated with


def generation(config: DemoConfig) -> dict[str, int]:
    return {"images": config.images, "classes": config.classes, "seed": config.seed}


def generated_as(source: Path) -> dict | None:
    """The settings the dataset in ``source`` was generated with; None if it was not (to the end)."""
    try:
        return json.loads((source / GENERATED).read_text())
    except (OSError, ValueError):
        return None


def generate_source(config: DemoConfig, source: Path) -> None:
    """Generate the demo's dataset into ``source``, from scratch (a dataset of other settings, or
    one whose generation stopped part way, is removed first), and record its settings."""
    if source.exists():
        shutil.rmtree(source)
    generate("coco", source, config.images, seed=config.seed, faults=True, classes=config.classes)
    (source / GENERATED).write_text(json.dumps(generation(config)))


class Terminal:
    """The user's terminal, kept while the process's stdout and stderr go to the log file."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def stage(self, number: int, text: str) -> None:
        self.say(f"[{number}/{STAGES}] {text}  ({time.monotonic() - self.started:4.0f} s)")


@contextlib.contextmanager
def output_to(log_file: Path) -> Iterator[Terminal]:
    """Send this process's stdout and stderr (Ray's and Ray Data's logs, progress dumps, the
    stages' own lines, and the output of every process it starts) to ``log_file``; yield the
    terminal they were."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_file, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield Terminal(terminal)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


@contextlib.contextmanager
def progress(term: Terminal, desc: str, total: int, count: Callable[[], int]) -> Iterator[None]:
    """A progress bar on the terminal, fed by ``count()`` (epochs in MLflow) once a second.

    On a terminal it is redrawn every second (its clock moves); elsewhere (a file, a CI log) only
    when the count moves, each redraw being one more line there.
    """
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="epoch", file=term.stream, leave=True, dynamic_ncols=True)
    done = threading.Event()
    tty = term.stream.isatty()

    def poll() -> None:
        while not done.wait(1.0):
            with contextlib.suppress(Exception):  # the run may not exist yet
                n = min(total, count())
                if tty or n != bar.n:
                    bar.n = n
                    bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(Exception):
            bar.n = min(total, count())
        bar.close()


def run_epochs(client, experiment: str, name: str) -> int:
    """Epochs the training run of this name has logged."""
    from mltr import tracking

    exp = client.get_experiment_by_name(experiment)
    runs = tracking.runs_tagged(client, [exp.experiment_id], tracking.NAME_TAG, name) if exp else []
    return len(tracking.logged_epochs(client, runs[0].info.run_id)) if runs else 0


def sweep_epochs(client, experiment: str, name: str, per_trial: int) -> int:
    """Epochs the trials of the sweep of this name have done, together: those they logged, and all
    ``per_trial`` of a trial ASHA stopped early (tagged so once the sweep closes its run), whose
    remaining epochs are saved, not missing: the bar ends full."""
    from jobs import tune
    from mltr import tracking

    exp = client.get_experiment_by_name(experiment)
    parents = tracking.runs_tagged(client, [exp.experiment_id], tune.SWEEP_TAG, name) if exp else []
    if not parents:
        return 0
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'", max_results=1000
    )
    return sum(
        per_trial
        if child.data.tags.get(tune.STOPPED_EARLY_TAG) == "true"
        else len(tracking.logged_epochs(client, child.info.run_id))
        for child in children
    )


def sweep_table(client, parent_run_id: str) -> str:
    """The sweep's results table, as the sweep logged it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent_run_id, "sweep/results.md", tmp)
        return Path(path).read_text().strip()


def three_val_images(datasets: Path, source: Path) -> list[tuple[str, list[str]]]:
    """Three val images of the converted dataset: their source files and true labels."""
    from pipeline.dataset import load_manifest

    manifest = load_manifest(str(datasets / "coco"))
    rows = manifest.read_columns("val", ["source_path", "labels"]).slice(0, 3).to_pylist()
    out = []
    for row in rows:
        path = Path(row["source_path"])
        path = path if path.is_absolute() else source / path
        out.append((str(path), [manifest.classes[i] for i in row["labels"]]))
    return out


def run(config: DemoConfig) -> dict:
    from mlflow.tracking import MlflowClient

    from jobs import export, predict
    from jobs._models import TrackingArgs
    from mltr import registry, tracking

    work = Path(config.workdir).resolve()
    source, datasets = work / "coco2014", work / "datasets"
    common = ["--dataset", "coco", "--root", str(source), "--out", str(datasets), "--rows-per-shard", "64"]
    common += ["--workdir", str(work), "--register-as", "mltr-coco"]
    # One decode actor per core: the local Ray is sized for the sweep's two trials at once, and
    # training's default (every logical CPU beside the workers) would oversubscribe the cores.
    cores = os.cpu_count() or 1
    training = pipeline.parse(
        [*common, "--config", "tiny", "--epochs", str(config.epochs)]
        + ["--num-workers", str(config.num_workers), "--decode-actors", str(cores)]
    )
    sweeping = pipeline.parse(
        [*common, "--config", "tiny", "--sweep", "--epochs", str(config.sweep_epochs), "--grace-epochs", "1"]
        + [
            "--window-sizes",
            "2,4",
            "--losses",
            "bce,asl",
            "--max-concurrent-trials",
            "2",
            "--decode-actors",
            "1",
        ]
    )
    log_file = work / "logs" / "demo.log"
    with output_to(log_file) as term:
        term.say(f"mltr demo: everything under {work}; Ray's and the stages' logs in {log_file}")
        if generated_as(source) == generation(config):
            term.stage(1, f"dataset: reusing the generated COCO 2014 layout in {source}")
        else:
            term.stage(1, f"dataset: generating {config.images} images of {config.classes} classes "
                          f"(COCO 2014 layout, with faulty files) in {source}")  # fmt: skip
            generate_source(config, source)
        # One local Ray for every stage, sized for the largest, its workers' output kept in Ray's logs.
        init_ray(
            num_cpus=max(pipeline.local_cpus(training), pipeline.local_cpus(sweeping)), log_to_driver=False
        )
        term.stage(2, "preprocess: Ray Data converts it to Parquet shards with a manifest")
        converted = pipeline.stage_preprocess(training, None)
        term.say(
            f"      {'reused' if converted['skipped'] else 'wrote'} {converted['uri']}: rows {converted['rows']}, "
            f"rejects {converted['rejects']} (listed in {converted['rejects_file']})"
        )
        mlflow_uri = tracking.default_tracking_uri(work)
        client = MlflowClient(mlflow_uri)
        run_name = pipeline.run_name(training, converted["fingerprint"])
        term.stage(3, f"train: mltr_tiny, {config.epochs} epochs on {config.num_workers} Ray Train workers")
        with progress(term, "      train", config.epochs, lambda: run_epochs(client, "mltr", run_name)):
            trained, run_id = pipeline.stage_train(training, converted["fingerprint"])
        sweep_name = pipeline.run_name(sweeping, converted["fingerprint"])
        term.stage(4, "tune: window size 2, 4 x loss bce, asl (ASHA, 2 trials at a time)")
        with progress(
            term,
            "      sweep",
            4 * config.sweep_epochs,
            lambda: sweep_epochs(client, "mltr", sweep_name, config.sweep_epochs),
        ):
            swept, best_trial_run = pipeline.stage_train(sweeping, converted["fingerprint"])
        best = swept["best"]
        # The best of the run and the sweep's best trial, chosen on calibration mAP (val only reports).
        chosen, chosen_run = (
            ("the training run", run_id)
            if trained["calib_mAP"] >= best["calib_mAP"]
            else (f"sweep trial {best.get('trial_id') or best['config']}", best_trial_run)
        )
        term.stage(5, f"register: {chosen} (the higher calibration mAP) as a version of mltr-coco")
        registered = pipeline.stage_register(training, chosen_run)
        term.stage(6, "promote: to champion, if it beats the champion on val")
        promoted = pipeline.stage_promote(training, registered)
        champion_uri = "models:/mltr-coco@champion"
        tracking_args = TrackingArgs(mlflow_uri=mlflow_uri, workdir=str(work))
        term.stage(7, f"predict: three val images with {champion_uri}")
        images = three_val_images(datasets, source)
        predictions_file = work / "predictions.jsonl"
        predict.run(
            predict.PredictConfig(
                model=champion_uri,
                inputs=tuple(p for p, _ in images),
                out=str(predictions_file),
                tracking=tracking_args,
            )
        )
        predicted = {row["path"]: row for row in map(json.loads, predictions_file.read_text().splitlines())}
        term.stage(8, "export: the champion to ONNX, checked against PyTorch with onnxruntime")
        exported = export.run(
            export.ExportConfig(
                model=champion_uri, out=str(work / "export" / "mltr-coco.onnx"), data=str(datasets / "coco"),
                tracking=tracking_args,
            )
        )  # fmt: skip
        table = sweep_table(client, swept["parent_run_id"])
        aliases = registry.aliases(client, "mltr-coco")
        import ray

        ray.shutdown()  # while the output still goes to the log: Ray reports its workers as it stops

    baseline = trained["label_frequency_baseline_mAP"]
    lines = [
        "",
        f"Dataset     {converted['uri']}  ({'reused' if converted['skipped'] else 'converted'})",
        f"            rows {converted['rows']}, rejects {converted['rejects']} (bad files skipped and listed in {converted['rejects_file']})",
        f"Training    run {run_name!r}{' (reused)' if trained['skipped'] else ''}",
        f"            label-frequency baseline val mAP {baseline:.3f}",
        f"            calib mAP {trained['calib_mAP']:.3f} (chooses epoch and weights), val mAP {trained['val_mAP']:.3f} "
        f"= {trained['val_mAP'] / baseline:.1f}x the baseline",
        f"Sweep       {sweep_name!r}{' (reused)' if swept['skipped'] else ''}; best by calib mAP: "
        f"{best['config']} calib {best['calib_mAP']:.3f}, val {best['val_mAP']:.3f}",
        *("            " + line for line in table.splitlines()),
        f"Registered  {registered['model_uri']}  ({chosen}){' (reused)' if registered['skipped'] else ''}",
        f"            promotion: {promoted['decision'] if promoted else 'none'}; aliases {aliases}",
        "Predictions (models:/mltr-coco@champion; labels at the calibrated thresholds)",
    ]
    for path, truth in images:
        row = predicted.get(path)
        got = row["labels"] if row else "unreadable"
        lines.append(f"            {Path(path).name}: predicted {got}  true {truth}")
    lines += [
        f"ONNX        {exported['out']}  (onnxruntime vs PyTorch: max abs difference {exported['max_abs_diff']:.1e})",
        f"Look        .venv/bin/mlflow ui --backend-store-uri {mlflow_uri}",
        f"            logs: {log_file}",
        "",
    ]
    print("\n".join(lines), flush=True)
    return {
        "dataset": converted["uri"],
        "rows": converted["rows"],
        "rejects": converted["rejects"],
        "label_frequency_baseline_mAP": baseline,
        "calib_mAP": trained["calib_mAP"],
        "val_mAP": trained["val_mAP"],
        "run_name": run_name,
        "sweep": sweep_name,
        "best_trial": best,
        "registered": registered["model_uri"],
        "promotion": promoted["decision"] if promoted else None,
        "aliases": aliases,
        "predictions": [
            {"path": p, "true": t, "predicted": (predicted.get(p) or {}).get("labels")} for p, t in images
        ],
        "onnx": exported["out"],
        "onnx_max_abs_diff": exported["max_abs_diff"],
        "mlflow_uri": mlflow_uri,
        "fingerprint": converted["fingerprint"].rpartition(":")[2][:8],
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(DemoConfig, argv, prog="mltr demo", job="demo")
    return run_job("demo", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
