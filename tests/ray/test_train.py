"""Training on a local Ray: a 2-worker CPU run of mltr_tiny learns, selects honestly, is tracked, survives
Ctrl-C and a failure after training, and resumes."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from jobs import train as train_job
from jobs._config import from_flat, parse_config, replace_flat
from mltr import tracking
from mltr.checkpoint import CHECKPOINT_FILES, WEIGHT_FILES
from mltr.errors import ConfigError, TrainingDiverged
from mltr.metrics import mean_average_precision
from mltr.tracking import EPOCH_KEY, NAME_TAG, runs_tagged, tracking_uri
from mltr.train import SELECTION_METRIC, START_EPOCH_KEY
from mltr.trainer import build_trainer, fit
from pipeline.dataset import MANIFEST, load_manifest
from pipeline.synthetic import DEMO_CLASSES

pytestmark = pytest.mark.ray

EPOCHS = 20  # ~250 optimiser steps of 2 x 16 images: the tiny recipe ends near 0.7 val mAP (baseline 0.17)


@pytest.fixture
def dataset(demo_coco):
    return demo_coco


def untrained_val_map(manifest, seeds) -> list[float]:
    """Val mAP of freshly initialised mltr_tiny models: what the learning test's margin is over.

    The val images go through the transform the run's val dataset maps over them, here in this
    process: a Ray Data execution would start decode processes for 148 images (~15 s on 2 cores).
    """
    import torch

    from mltr.model import create_model, normalize
    from pipeline.ingest import INPUT_COLUMNS, IngestConfig, transform_batch

    cfg = IngestConfig(manifest.num_classes, image_size=64)
    batches = [
        {k: torch.from_numpy(v) for k, v in transform_batch(batch.to_pydict(), cfg).items()}
        for batch in manifest.iter_batches("val", INPUT_COLUMNS, batch_size=64)
    ]
    scores = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = create_model("mltr_tiny", num_classes=manifest.num_classes).eval()
        with torch.no_grad():
            logits = torch.cat([model(normalize(b["image"])) for b in batches])
        targets = torch.cat([b["targets"] for b in batches])
        ignore = torch.cat([b["ignore_mask"] for b in batches])
        scores.append(mean_average_precision(logits, targets, ignore)[0])
    return scores


def epochs_in_mlflow(uri: str, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, EPOCH_KEY))


def logged_epochs(uri: str, name: str) -> list[int]:
    """Epochs of the run named ``name`` in the store at ``uri`` (none while it has no run)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mltr")
    runs = runs_tagged(client, [experiment.experiment_id], NAME_TAG, name) if experiment else []
    return epochs_in_mlflow(uri, runs[0].info.run_id) if runs else []


def interrupt_after(
    command: list[str], uri: str, name: str, epochs: int, log: Path
) -> subprocess.CompletedProcess:
    """Run a job on its own local Ray, as a user does, and press Ctrl-C once ``epochs`` are in MLflow."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            deadline = time.monotonic() + 400
            while (
                len(logged_epochs(uri, name)) < epochs and proc.poll() is None and time.monotonic() < deadline
            ):
                time.sleep(0.5)
            assert proc.poll() is None, (
                f"the run ended before it could be interrupted: {log.read_text()[-3000:]}"
            )
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, log.read_text())


def test_two_workers_learn_select_on_calibration_and_an_interrupted_run_resumes(
    dataset, tmp_path, monkeypatch
):
    flags = ["--config", "tiny", "--data", dataset, "--epochs", str(EPOCHS), "--workdir", str(tmp_path)]
    flags += ["--name", "learns"]
    config = parse_config(train_job.TrainConfig, flags, job="train")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # `mltr train` on its own local Ray, stopped with Ctrl-C a few epochs in: one line, exit 130, the
    # run marked KILLED (not FAILED, not left RUNNING), no traceback of the job's own (Ray's actors
    # may log theirs, prefixed "(Actor pid=...)").
    stopped = interrupt_after(
        [sys.executable, "-m", "jobs.train", *flags], uri, "learns", 2, tmp_path / "first.log"
    )
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == "train: interrupted"  # after Ray's own lines
    tracebacks = [line for line in stopped.stderr.splitlines() if line.startswith("Traceback")]
    assert not tracebacks, stopped.stderr[-3000:]
    client = MlflowClient(uri)
    (killed,) = runs_tagged(client, [client.get_experiment_by_name("mltr").experiment_id], NAME_TAG, "learns")
    assert killed.info.status == "KILLED"
    done_before = len(epochs_in_mlflow(uri, killed.info.run_id))
    assert 2 <= done_before < EPOCHS

    # Resumed where its checkpoints are not (another --storage, or lost), it would train again from
    # epoch 0 under the first training's curves: refused, and the run is left as it was.
    elsewhere = [*flags, "--storage", str(tmp_path / "elsewhere")]
    with pytest.raises(ConfigError, match=r"logged epochs 0-\d+, but .*elsewhere/learns holds no checkpoint"):
        train_job.start(train_job.resolve(parse_config(train_job.TrainConfig, elsewhere, job="train")))
    assert client.get_run(killed.info.run_id).info.status == "KILLED"

    # The same name again resumes it from its checkpoint and trains to the end. The manifest is read
    # once, when the run is resolved: with the file gone afterwards the whole run (driver, Ray Data
    # tasks, workers) still goes through.
    resolved = train_job.resolve(config)
    manifest_file = Path(dataset) / MANIFEST
    hidden = manifest_file.with_name("hidden-manifest.json")
    manifest_file.rename(hidden)
    try:
        train_run, client = train_job.start(resolved)
        result = train_job.report(resolved, train_run, client, fit(build_trainer(train_run)))
    finally:
        hidden.rename(manifest_file)
    assert result["mlflow_run_id"] == killed.info.run_id
    assert result["epochs"] == EPOCHS
    # It started from a checkpoint, not from scratch (MLflow's bookkeeping alone would hide a restart
    # from zero: epochs already logged are not logged again).
    starts = sorted(
        (int(m.step), m.value) for m in client.get_metric_history(killed.info.run_id, START_EPOCH_KEY)
    )
    assert len(starts) == 2 and starts[0] == (0, 0.0), starts
    assert 1 <= starts[1][0] == starts[1][1] <= done_before, starts

    # A model that sees nothing scores the label frequencies; this one must do far better, on val,
    # with the epoch and weights chosen on the calibration split.
    baseline = result["label_frequency_baseline_mAP"]
    assert result["val_mAP"] >= 0.5 and result["val_mAP"] >= 3 * baseline, result
    # And far above what an untrained model scores on the same images by chance (best of 8 inits).
    untrained = untrained_val_map(load_manifest(dataset), seeds=range(8))
    assert result["val_mAP"] >= max(untrained) + 0.25, (untrained, result)
    assert result["calib_mAP"] >= 0.5, result
    assert result["best_epoch"] >= EPOCHS // 2, result  # it kept learning: the best epoch is late

    uri, run_id = result["mlflow_uri"], result["mlflow_run_id"]
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert epochs_in_mlflow(uri, run_id) == list(range(EPOCHS))
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["model"] == "mltr_tiny" and run.data.params["epochs"] == str(EPOCHS)
    assert run.data.tags["mltr.dataset_fingerprint"].startswith("sha256:")
    # The run's headline figures are the selected weights' (chosen on calibration, scored on val).
    assert run.data.metrics["calib_mAP"] == pytest.approx(result["calib_mAP"])
    assert run.data.metrics["val_mAP"] == pytest.approx(result["val_mAP"])
    assert run.data.metrics["best_epoch"] == result["best_epoch"]
    assert run.data.tags["mltr.selected_weights"] == result["weights"]
    selection = {int(m.step): m.value for m in client.get_metric_history(run_id, SELECTION_METRIC)}
    assert max(selection, key=selection.get) == result["best_epoch"]  # the calibration score chose it
    assert len(client.get_metric_history(run_id, "val_model_mAP")) == EPOCHS  # the val curve, for plots
    manifest = load_manifest(dataset)
    # Every val row and every calibration row was evaluated, though they do not split equally over 2 workers;
    # the calibration rows were held out of training.
    assert run.data.metrics["val_images"] == manifest.rows("val")
    assert run.data.metrics["calib_images"] == result["calib_rows"] > 0
    assert result["train_rows"] + result["calib_rows"] == manifest.rows("train")
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {"evaluation/per_class_ap.csv", "evaluation/precision_recall.png"}
    info = json.loads(Path(client.download_artifacts(run_id, "model_info/classes.json")).read_text())
    assert info["classes"] == list(manifest.classes) and len(info["thresholds"]) == 80
    assert all(0.0 < t < 1.0 for t in info["thresholds"])
    assert info["input"]["image_size"] == 64 and info["input"]["resize"] == "squash"
    assert info["input"]["stored"] == manifest.stored_images()  # served images are made so first
    # The reports say what the figures say: one row per class named as in the manifest, and the mean
    # AP over the classes with positives is the logged mAP of the selected weights.
    with open(client.download_artifacts(run_id, "evaluation/per_class_ap.csv")) as f:
        table = list(csv.DictReader(f))
    assert [row["class"] for row in table] == list(manifest.classes)
    assert [float(row["threshold"]) for row in table] == pytest.approx(info["thresholds"])
    for column, figure in (("val_ap", "val_mAP"), ("calib_ap", "calib_mAP")):
        present = [float(row[column]) for row in table if row[column] != "nan"]
        assert len(present) == DEMO_CLASSES and np.mean(present) == pytest.approx(result[figure]), column
    plot = Image.open(client.download_artifacts(run_id, "evaluation/precision_recall.png"))
    plot.load()
    assert plot.format == "PNG" and plot.size[0] > 100

    import mlflow.pyfunc
    import pandas as pd
    import torch

    # Every file a checkpoint holds loads without unpickling code (a bucket's files are not trusted).
    for name in CHECKPOINT_FILES:
        assert isinstance(torch.load(Path(result["checkpoint"]) / name, weights_only=True), dict)

    # The logged model is a pyfunc any MLflow client calls with encoded images.
    with tracking_uri(uri):
        model = mlflow.pyfunc.load_model(result["model_uri"])
    image = manifest.read_columns("val", ["image"])["image"][0].as_py()
    (row,) = model.predict(pd.DataFrame({"image": [image]})).itertuples()
    assert len(row.scores) == 80 and set(row.labels) <= set(manifest.classes)

    # --init-from: a new run from the selected weights, at a learning rate too small to move them,
    # scores what they scored (one epoch from scratch sits near the label-frequency baseline).
    # Logging its model fails once, after training: the run is marked FAILED, and the same name
    # again reopens it and finishes from its checkpoint without training again.
    warm_config = replace_flat(
        config,
        name="warm-start",
        epochs=1,
        lr=1e-9,
        init_from=str(Path(result["checkpoint"]) / WEIGHT_FILES[result["weights"]]),
    )

    def broken(*args, **kwargs):
        raise RuntimeError("the model could not be logged")

    monkeypatch.setattr(tracking, "log_final_model", broken)
    with pytest.raises(RuntimeError, match="could not be logged"):
        train_job.run(warm_config)
    (failed,) = runs_tagged(
        client, [client.get_experiment_by_name("mltr").experiment_id], NAME_TAG, "warm-start"
    )
    assert failed.info.status == "FAILED"
    monkeypatch.undo()

    # From here on its checkpoints hold every epoch: finishing it starts no Train worker group, so
    # it needs none of the workers' resources: here the GPUs it asks for, which this cluster lacks
    # (as when a GPU run's nodes have left), do not stop it.
    def no_workers(*args, **kwargs):
        raise AssertionError("a run whose checkpoints hold every epoch started Train workers")

    monkeypatch.setattr(train_job, "build_trainer", no_workers)
    warm = train_job.run(replace_flat(warm_config, use_gpu=True))
    assert warm["mlflow_run_id"] == failed.info.run_id != run_id and warm["epochs"] == 1
    assert client.get_run(failed.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(failed.info.run_id, START_EPOCH_KEY)] == [0, 1]
    assert warm["val_mAP"] == pytest.approx(result["val_mAP"], abs=0.02), (warm, result)
    # Finished: the same name is refused, saying what to do.
    with pytest.raises(
        ConfigError, match="already finished its 1 epochs: start a new --name, or pass --epochs above 1"
    ):
        train_job.run(warm_config)

    # The tracking store was lost (a new one): the run resumes from its checkpoint and replays the
    # epochs that checkpoint holds but the store does not, each exactly once.
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    replayed = train_job.run(replace_flat(warm_config, mlflow_uri=other_uri))
    other = MlflowClient(other_uri)
    assert replayed["mlflow_run_id"] != failed.info.run_id
    assert [m.step for m in other.get_metric_history(replayed["mlflow_run_id"], START_EPOCH_KEY)] == [1]
    for key in ("epoch", "train_loss", "selection_mAP", "val_model_mAP", "calib_ema_mAP"):
        assert [m.step for m in other.get_metric_history(replayed["mlflow_run_id"], key)] == [0], key


def test_bad_configuration_fails_fast_with_what_to_change(dataset, tmp_path):
    def run(**overrides):
        return train_job.run(
            from_flat(train_job.TrainConfig, {"data": dataset, "workdir": str(tmp_path), **overrides})
        )

    with pytest.raises(ValueError, match="unknown model 'mltr_huge'"):
        run(model="mltr_huge")
    with pytest.raises(ValueError, match="window_size=5 does not fit"):
        run(window_size=5)
    with pytest.raises(ValueError, match="need 10: lower --num-workers"):
        run(num_workers=4, cpus_per_worker=2)  # + 1 decode actor + 1 CPU for evaluation; 4 CPUs here
    # Told to wait for an autoscaler (this Ray has none), it waits, then says the wait was not enough.
    started = time.monotonic()
    with pytest.raises(ValueError, match="did not add them in --wait-for-resources 1s"):
        run(num_workers=4, cpus_per_worker=2, wait_for_resources=1)
    assert time.monotonic() - started >= 1
    rows = load_manifest(dataset).rows("train")
    with pytest.raises(
        ValueError, match=r"less its \d+ calibration rows: \d+ rows per epoch cannot fill one batch of"
    ):
        run(batch_size=rows)
    from pipeline.dataset import DatasetNotFound

    empty = tmp_path / "nothing"
    empty.mkdir()
    shutil.copytree(dataset, empty / "copy", ignore=shutil.ignore_patterns(MANIFEST))
    with pytest.raises(DatasetNotFound, match="_manifest.json"):
        run(data=str(empty / "copy"))


def test_a_run_that_diverges_stops_every_worker_at_once_and_is_not_retried(dataset, tmp_path):
    # A learning rate that leaves weights that are not numbers after the first step. Retrying from
    # the last checkpoint would only diverge again: --max-failures is for workers that die.
    config = from_flat(
        train_job.TrainConfig,
        {
            "data": dataset,
            "workdir": str(tmp_path),
            "name": "diverges",
            "epochs": 2,
            "lr": 1e30,
            "num_workers": 2,
            "max_failures": 1,
        },
    )
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(
        TrainingDiverged, match=r"^epoch 1 of 2, batch \d+, lr [\d.e+]+: the training loss is nan"
    ):
        train_job.run(config)
    # Ray Train's fit() installs a Ctrl-C handler that holds the run's controller; it is put back.
    assert signal.getsignal(signal.SIGINT) is before
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = runs_tagged(client, [client.get_experiment_by_name("mltr").experiment_id], NAME_TAG, "diverges")
    assert run.info.status == "FAILED"
    # The worker group started once: Ray Train did not restart it.
    assert [m.step for m in client.get_metric_history(run.info.run_id, START_EPOCH_KEY)] == [0]
    # A local Ray (started by jobs._runtime.init_ray, as this session's is) has no node to drain:
    # none of its runs started Ray Train's preemption watcher, alive or dead.
    import ray
    from ray.util.state import list_actors

    actors = list_actors(limit=10_000, raise_on_missing_output=False)
    assert {a.class_name for a in actors} >= {"TrainController", "RayTrainWorker"}
    watchers = [(a.job_id, a.pid, a.state) for a in actors if a.class_name == "PreemptionWatcher"]
    assert not watchers, (watchers, ray.get_runtime_context().get_job_id())

    # Nothing holds a finished run's controller any more: it exits, and with it the run's
    # DatasetManager and split coordinators, rather than living on in this driver.
    def lingering():
        return [
            (a.class_name, a.pid)
            for a in list_actors(
                filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False
            )
            if a.class_name in ("TrainController", "DatasetManager", "SplitCoordinator")
        ]

    deadline = time.monotonic() + 60
    while (alive := lingering()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, alive
