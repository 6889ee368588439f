"""`mltr tune` against a team's services: data, trials' checkpoints and MLflow artifacts in the S3-API
server, trials tracked by a real `mlflow server` whose backend store is PostgreSQL.

Each trial is a `jobs.train` run: this is also the test of training from S3 with checkpoints in
S3, tracked by a server whose artifacts are in S3 (one sweep serves both: trials are expensive).
"""

import csv
import io
import json
from pathlib import Path

import pytest
import s3fs
from mlflow.tracking import MlflowClient

from mltr.checkpoint import CHECKPOINT_FILES
from mltr.tracking import EPOCH_KEY, tracking_uri
from mltr.train import SELECTION_METRIC

pytestmark = pytest.mark.integration


def test_a_sweep_of_window_sizes_and_losses_is_one_parent_run_with_a_child_per_trial(
    s3_sweep, s3_server, mlflow_server, tmp_path
):
    proc, s3_bucket = s3_sweep["proc"], s3_sweep["bucket"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("{"), proc.stdout[-3000:]  # the last line is the result, as JSON
    summary = json.loads(last)
    assert "[sweep]" in proc.stdout and "done 4/4" in proc.stdout  # progress while it runs

    client = MlflowClient(mlflow_server["uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mltr.sweep_name"] == "grid"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    grid = {(int(r.data.params["window_size"]), r.data.params["loss"]) for r in children}
    assert grid == {(2, "bce"), (2, "asl"), (4, "bce"), (4, "asl")}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    for child in children:  # each trial logged exactly as a jobs.train run
        assert child.info.status == "FINISHED"
        assert [int(m.step) for m in client.get_metric_history(child.info.run_id, EPOCH_KEY)] == [0]
        assert {"calib_mAP", "val_mAP", SELECTION_METRIC} <= set(child.data.metrics)
        assert child.data.tags["mltr.dataset_uri"] == f"s3://{s3_bucket}/datasets/coco"
        checkpoint = child.data.tags["mltr.checkpoint"]
        assert checkpoint.startswith(f"s3://{s3_bucket}/sweeps/grid-trials/grid-")
        # The trial's Train run checkpointed its epoch into S3, every file a resume reads.
        assert {p.rsplit("/", 1)[-1] for p in fs.ls(checkpoint.removeprefix("s3://"))} >= set(
            CHECKPOINT_FILES
        )
        assert child.data.tags["mltr.model_uri"].startswith("models:/")

    # The best trial is the one with the best calibration mAP: the figure that selects, never val.
    chosen = max(children, key=lambda r: r.data.metrics["calib_mAP"])
    assert summary["best"]["mlflow_run_id"] == chosen.info.run_id
    assert summary["best"]["calib_mAP"] == pytest.approx(chosen.data.metrics["calib_mAP"])
    assert parent.data.tags["mltr.best_run_id"] == chosen.info.run_id
    assert parent.data.tags["mltr.best_model_uri"] == chosen.data.tags["mltr.model_uri"]
    assert json.loads(parent.data.tags["mltr.best_config"])["loss"] == chosen.data.params["loss"]
    assert parent.data.metrics["best_calib_mAP"] == pytest.approx(chosen.data.metrics["calib_mAP"])

    # The results table, the plot and the best config sit on the parent, the trials' evaluation
    # artifacts on each child: all through the server into the S3-API store.
    # (The server is the session's: only this sweep's experiment counts.)
    stored = fs.find(f"{mlflow_server['bucket']}/artifacts/{parent.info.experiment_id}")
    names = {p.rsplit("/", 1)[-1] for p in stored if "/sweep/" in p}
    assert names >= {"results.csv", "results.md", "map_by_window_and_loss.png", "best.json"}
    assert sum(p.endswith("evaluation/per_class_ap.csv") for p in stored) == 4
    assert sum(p.endswith("evaluation/precision_recall.png") for p in stored) == 4
    table = client.download_artifacts(parent.info.run_id, "sweep/results.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert rows[0]["mlflow_run_id"] == chosen.info.run_id and len(rows) == 4
    scores = [float(r["calib_mAP"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # Ray Tune's own experiment state is in the sweep's storage too: what a restart resumes from.
    assert fs.exists(f"{s3_bucket}/sweeps/grid/tuner.pkl")

    # The best model loads from the server (its artifacts in S3) and scores an encoded image.
    import mlflow.pyfunc
    import pandas as pd

    with tracking_uri(mlflow_server["uri"]):
        model = mlflow.pyfunc.load_model(summary["best"]["model_uri"])
    image = next(Path(s3_sweep["src"]).rglob("*.jpg")).read_bytes()
    assert len(model.predict(pd.DataFrame({"image": [image]})).loc[0, "scores"]) == 80
