"""Training from S3 with checkpoints in S3, tracked by a real `mlflow server` (artifacts in S3)."""

import pytest
import s3fs
from mlflow.tracking import MlflowClient

from jobs import train as train_job
from jobs._config import from_flat
from mltr.tracking import EPOCH_KEY, tracking_uri
from mltr.train import CHECKPOINT_FILES
from pipeline.convert import convert
from pipeline.readers import read_index
from pipeline.synthetic import generate

pytestmark = pytest.mark.integration


def test_train_from_s3_with_checkpoints_in_s3_and_mlflow_server(
    ray_local, s3_bucket, s3_server, mlflow_server, tmp_path
):
    generate("voc", tmp_path / "src", 48, seed=4)
    convert(read_index("voc", str(tmp_path / "src")), f"s3://{s3_bucket}/datasets", rows_per_shard=12)
    config = from_flat(
        train_job.TrainConfig,
        {
            "data": f"s3://{s3_bucket}/datasets/voc",
            "epochs": 2,
            "batch_size": 8,
            "num_workers": 2,
            "workdir": str(tmp_path / "work"),
            "storage": f"s3://{s3_bucket}/runs",
            "name": "from-s3",
            "mlflow_uri": mlflow_server["uri"],
            "experiment": "s3-test",
            # 48 images: 35 train rows; a larger calibration share keeps a few for selection.
            "calib_fraction": 0.2,
        },
    )
    result = train_job.run(config)
    assert result["epochs"] == 2 and result["checkpoint"].startswith(f"s3://{s3_bucket}/runs/from-s3/")

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    checkpoints = fs.ls(f"{s3_bucket}/runs/from-s3")
    saved = [c for c in checkpoints if c.rsplit("/", 1)[-1].startswith("checkpoint_") and fs.isdir(c)]
    assert len(saved) == 2
    for checkpoint in saved:
        assert {p.rsplit("/", 1)[-1] for p in fs.ls(checkpoint)} >= set(CHECKPOINT_FILES)

    client = MlflowClient(mlflow_server["uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [int(m.step) for m in client.get_metric_history(run.info.run_id, EPOCH_KEY)] == [0, 1]
    assert run.data.tags["mltr.dataset_uri"] == config.data.uri
    # Artifacts went through the server into the S3-API store.
    stored = fs.find(f"{mlflow_server['bucket']}/artifacts")
    assert any(p.endswith("evaluation/per_class_ap.csv") for p in stored)
    assert any(p.endswith("evaluation/precision_recall.png") for p in stored)

    import mlflow.pytorch
    import torch

    with tracking_uri(mlflow_server["uri"]):
        model = mlflow.pytorch.load_model(result["model_uri"])
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 20)
