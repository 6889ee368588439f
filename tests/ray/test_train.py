"""Training on a local Ray: a 2-worker CPU run of mltr_tiny learns, is tracked, and resumes by name."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs import train as train_job
from mltr.tracking import EPOCH_KEY, tracking_uri
from mltr.train import EMA_FILE, MODEL_FILE, TrainConfig
from pipeline.convert import convert
from pipeline.dataset import load_manifest
from pipeline.readers import read_index
from pipeline.synthetic import generate

pytestmark = pytest.mark.ray

EPOCHS = 16


@pytest.fixture(scope="module")
def voc_dataset(ray_local, tmp_path_factory):
    """A learnable VOC-format dataset (20 classes), converted to Parquet: 183 train, 61 val rows."""
    root = tmp_path_factory.mktemp("voc-train")
    generate("voc", root / "src", 244, seed=1)
    convert(read_index("voc", str(root / "src")), str(root / "ds"), rows_per_shard=40)
    return str(root / "ds" / "voc")


def epochs_in_mlflow(uri: str, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, EPOCH_KEY))


def test_two_workers_learn_and_a_second_start_resumes(voc_dataset, tmp_path):
    config = TrainConfig(
        data=voc_dataset,
        model="mltr_tiny",
        epochs=EPOCHS,
        batch_size=16,
        lr=5e-4,
        # Light augmentation: a crop or a cutout can remove a small object whose label stays positive.
        randaugment=False,
        crop_min_scale=1.0,
        cutout_p=0.0,
        num_workers=2,
        workdir=str(tmp_path),
        name="learns",
    )
    result = train_job.run(config)
    assert result["epochs"] == EPOCHS
    # A model that sees nothing scores the label frequencies; this one must do far better.
    assert result["val_mAP"] > 1.5 * result["label_frequency_baseline_mAP"], result
    assert result["val_mAP"] > result["label_frequency_baseline_mAP"] + 0.08, result

    uri, run_id = result["mlflow_uri"], result["mlflow_run_id"]
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert epochs_in_mlflow(uri, run_id) == list(range(EPOCHS))
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["model"] == "mltr_tiny" and run.data.params["epochs"] == str(EPOCHS)
    assert run.data.tags["mltr.dataset_fingerprint"].startswith("sha256:")
    assert len(client.get_metric_history(run_id, "val_mAP")) == EPOCHS
    # Every val row was evaluated, though 61 rows do not split equally over 2 workers.
    assert run.data.metrics["val_images"] == load_manifest(voc_dataset).rows("val") == 61
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {"evaluation/per_class_ap.csv", "evaluation/precision_recall.png"}
    classes = json.loads(Path(client.download_artifacts(run_id, "model_info/classes.json")).read_text())
    assert classes["classes"][0] == "aeroplane" and len(classes["thresholds"]) == 20

    import mlflow.pytorch
    import torch

    with tracking_uri(uri):
        model = mlflow.pytorch.load_model(result["model_uri"])
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 20)

    # The same name again, with one more epoch: it resumes from the checkpoint, it does not start over.
    resumed = train_job.run(TrainConfig(**{**config.__dict__, "epochs": EPOCHS + 1}))
    assert resumed["mlflow_run_id"] == run_id
    assert resumed["epochs"] == EPOCHS + 1
    assert epochs_in_mlflow(uri, run_id) == list(range(EPOCHS + 1))

    # --init-from: a new run from the best weights, at a learning rate too small to move them,
    # scores what they scored (one epoch from scratch sits near the label-frequency baseline).
    weights = EMA_FILE if result["weights"] == "ema" else MODEL_FILE
    warm = train_job.run(
        TrainConfig(
            **{
                **config.__dict__,
                "name": "warm-start",
                "epochs": 1,
                "lr": 1e-9,
                "init_from": str(Path(result["checkpoint"]) / weights),
            }
        )
    )
    assert warm["mlflow_run_id"] != run_id and warm["epochs"] == 1
    assert warm["val_mAP"] == pytest.approx(result["val_mAP"], abs=0.02), (warm, result)


def test_bad_configuration_fails_fast_with_what_to_change(voc_dataset, tmp_path):
    def run(**overrides):
        return train_job.run(TrainConfig(**{"data": voc_dataset, "workdir": str(tmp_path), **overrides}))

    with pytest.raises(ValueError, match="unknown model 'mltr_huge'"):
        run(model="mltr_huge")
    with pytest.raises(ValueError, match="window_size=5 does not fit"):
        run(window_size=5)
    with pytest.raises(ValueError, match="need 10: lower --num-workers"):
        run(num_workers=4, cpus_per_worker=2)  # + 1 decode actor + 1 CPU for validation; 4 CPUs here
    with pytest.raises(
        ValueError, match="183 rows per epoch cannot fill one batch of 128 on each of 2 workers"
    ):
        run(batch_size=128)
    from pipeline.dataset import DatasetNotFound

    with pytest.raises(DatasetNotFound, match="_manifest.json"):
        run(data=str(tmp_path / "nothing"))
