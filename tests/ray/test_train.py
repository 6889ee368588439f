"""Training on a local Ray: a 2-worker CPU run of mltr_tiny learns, selects honestly, is tracked, and resumes."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from jobs import train as train_job
from jobs._config import from_flat, parse_config, replace_flat
from mltr.checkpoint import CHECKPOINT_FILES, WEIGHT_FILES
from mltr.metrics import mean_average_precision
from mltr.tracking import EPOCH_KEY, tracking_uri
from mltr.train import SELECTION_METRIC, START_EPOCH_KEY
from mltr.trainer import build_trainer
from pipeline.dataset import MANIFEST, load_manifest
from pipeline.synthetic import DEMO_CLASSES

pytestmark = pytest.mark.ray

EPOCHS = 20  # ~250 optimiser steps of 2 x 16 images: the tiny recipe ends near 0.7 val mAP (baseline 0.17)


@pytest.fixture
def dataset(demo_coco):
    return demo_coco


def untrained_val_map(manifest, seeds) -> list[float]:
    """Val mAP of freshly initialised mltr_tiny models: what the learning test's margin is over."""
    import torch

    from mltr.model import create_model, normalize
    from pipeline.ingest import IngestConfig, build_dataset

    cfg = IngestConfig(manifest.num_classes, image_size=64)
    batches = list(build_dataset(manifest, "val", cfg).iter_torch_batches(batch_size=64))
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


def test_two_workers_learn_select_on_calibration_and_a_second_start_resumes(dataset, tmp_path):
    config = parse_config(
        train_job.TrainConfig,
        [
            "--config",
            "tiny",
            "--data",
            dataset,
            "--epochs",
            str(EPOCHS),
            "--workdir",
            str(tmp_path),
            "--name",
            "learns",
        ],
        job="train",
    )
    result = train_job.run(config)
    assert result["epochs"] == EPOCHS
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

    # The same name again, with one more epoch: it resumes from the checkpoint, it does not start
    # over. The manifest is read once, when the run is resolved: with the file gone afterwards the
    # whole run (driver, Ray Data tasks, workers) still goes through.
    resolved = train_job.resolve(replace_flat(config, epochs=EPOCHS + 1))
    manifest_file = Path(dataset) / MANIFEST
    hidden = manifest_file.with_name("hidden-manifest.json")
    manifest_file.rename(hidden)
    try:
        train_run, client = train_job.start(resolved)
        resumed = train_job.report(resolved, train_run, client, build_trainer(train_run).fit())
    finally:
        hidden.rename(manifest_file)
    assert resumed["mlflow_run_id"] == run_id
    assert resumed["epochs"] == EPOCHS + 1
    assert epochs_in_mlflow(uri, run_id) == list(range(EPOCHS + 1))
    # It started from the checkpoint of its last epoch, not from scratch (MLflow's bookkeeping alone
    # would hide a restart from zero: epochs already logged are not logged again).
    starts = [(int(m.step), m.value) for m in client.get_metric_history(run_id, START_EPOCH_KEY)]
    assert sorted(starts) == [(0, 0.0), (EPOCHS, EPOCHS)]
    tags = client.get_run(run_id).data.tags
    assert tags["mltr.epochs"] == str(EPOCHS + 1) and tags["mltr.epochs_history"] == f"{EPOCHS},{EPOCHS + 1}"

    # --init-from: a new run from the selected weights, at a learning rate too small to move them,
    # scores what they scored (one epoch from scratch sits near the label-frequency baseline).
    warm = train_job.run(
        replace_flat(
            config,
            name="warm-start",
            epochs=1,
            lr=1e-9,
            init_from=str(Path(result["checkpoint"]) / WEIGHT_FILES[result["weights"]]),
        )
    )
    assert warm["mlflow_run_id"] != run_id and warm["epochs"] == 1
    assert warm["val_mAP"] == pytest.approx(result["val_mAP"], abs=0.02), (warm, result)


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


def test_a_failure_after_fit_marks_the_run_failed_and_a_finished_name_is_not_reopened(
    dataset, tmp_path, monkeypatch
):
    from mltr import tracking
    from mltr.errors import ConfigError

    config = from_flat(
        train_job.TrainConfig,
        {"data": dataset, "epochs": 1, "batch_size": 16, "workdir": str(tmp_path), "name": "fails-late"},
    )

    def broken(*args, **kwargs):
        raise RuntimeError("the model could not be logged")

    monkeypatch.setattr(tracking, "log_final_model", broken)
    with pytest.raises(RuntimeError, match="could not be logged"):
        train_job.run(config)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = tracking.runs_tagged(
        client, [client.get_experiment_by_name("mltr").experiment_id], "mltr.train_name", "fails-late"
    )
    assert run.info.status == "FAILED"

    # The failed run is reopened and finishes from its checkpoint, without training again.
    monkeypatch.undo()
    result = train_job.run(config)
    assert (
        result["mlflow_run_id"] == run.info.run_id
        and client.get_run(run.info.run_id).info.status == "FINISHED"
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, START_EPOCH_KEY)] == [0, 1]
    # Finished: the same name is refused, saying what to do.
    with pytest.raises(
        ConfigError, match="already finished its 1 epochs: start a new --name, or pass --epochs above 1"
    ):
        train_job.run(config)

    # The tracking store was lost (a new one): the run resumes from its checkpoint and replays the
    # epochs that checkpoint holds but the store does not, each exactly once.
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    replayed = train_job.run(replace_flat(config, mlflow_uri=other_uri))
    other = MlflowClient(other_uri)
    assert replayed["mlflow_run_id"] != run.info.run_id
    assert [m.step for m in other.get_metric_history(replayed["mlflow_run_id"], START_EPOCH_KEY)] == [1]
    for key in ("epoch", "train_loss", "selection_mAP", "val_model_mAP", "calib_ema_mAP"):
        assert [m.step for m in other.get_metric_history(replayed["mlflow_run_id"], key)] == [0], key
