"""The registry against a team's services: a real `mlflow server` (PostgreSQL backend store, artifacts
in the S3-API server), data in S3. Two versions trained to differ (one epoch at a learning rate too
small to move the weights, and the sweep's best trial) are registered, evaluated, promoted only
when better, rolled back, and promoted by two processes at once."""

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from jobs import evaluate, export, predict, promote, register
from jobs import train as train_job
from jobs._config import parse_config
from mltr import registry
from pipeline.dataset import load_manifest
from pipeline.storage import resolve as resolve_storage
from tests.conftest import free_port, wait_for_http

pytestmark = pytest.mark.integration

DECISION = "mltr.promotion.decision"


def aliases(client, name):
    return registry.aliases(client, name)


def test_register_evaluate_promote_the_better_refuse_the_worse_roll_back_and_serialise(
    s3_sweep, mlflow_server, tmp_path
):
    uri, data, bucket = mlflow_server["uri"], s3_sweep["data"], s3_sweep["bucket"]
    assert s3_sweep["summary"] is not None, s3_sweep["proc"].stderr[-3000:]
    tracking = ["--mlflow-uri", uri, "--workdir", str(tmp_path)]
    weak_run = train_job.run(
        parse_config(
            train_job.TrainConfig,
            [
                "--config",
                "tiny",
                "--data",
                data,
                "--epochs",
                "1",
                "--lr",
                "1e-9",
                "--num-workers",
                "1",
                "--decode-actors",
                "1",
                "--name",
                "weak",
                "--experiment",
                "registry",
                "--storage",
                f"s3://{bucket}/runs",
                *tracking,
            ],  # fmt: skip
            job="train",
        )
    )["mlflow_run_id"]
    real_run = s3_sweep["summary"]["best"]["mlflow_run_id"]

    # Registered under the dataset's name, each new version the challenger.
    versions = {}
    for label, run_id in (("weak", weak_run), ("real", real_run)):
        out = register.run(parse_config(register.RegisterConfig, ["--run-id", run_id, *tracking]))
        assert out["name"] == "mltr-coco" and out["aliases"]["challenger"] == str(out["version"])
        assert out["tags"]["dataset"] == data and out["tags"]["variant"] == "mltr_tiny"
        assert {"dataset_fingerprint", "window_size", "loss", "calib_mAP", "val_mAP"} <= set(out["tags"])
        if label == "weak":  # trained in this process, from this checkout: the commit is known
            assert len(out["tags"]["git_commit"]) == 40
        versions[label] = str(out["version"])
    name = "mltr-coco"
    client = MlflowClient(uri)

    # Evaluated from the registered models, every figure training reports.
    figures = {}
    for label, version in versions.items():
        out = evaluate.run(
            parse_config(
                evaluate.EvaluateConfig, ["--model", f"models:/{name}/{version}", "--data", data, *tracking]
            )
        )
        assert {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CF1_top3", "OF1_top3"} <= set(out["metrics"])
        assert len(out["per_class_ap"]) == 80 and out["images"] > 0
        figures[label] = out["metrics"]["mAP"]
    worse, better = sorted(
        versions.values(), key=lambda v: figures[next(k for k in versions if versions[k] == v)]
    )
    assert figures["weak"] != figures["real"]

    def promote_args(*args):
        return parse_config(
            promote.PromoteConfig,
            [
                "--name",
                name,
                "--data",
                data,
                "--resamples",
                "200",
                "--lease-settle-s",
                "0.5",
                *args,
                *tracking,
            ],
        )

    first = promote.run(promote_args("--version", worse))
    assert first["decision"] == "first-champion" and aliases(client, name)["champion"] == worse
    # Scored like any candidate (its classes checked against the data), its figure on record.
    assert first["candidate_mAP"] == pytest.approx(min(figures.values()), abs=1e-6)
    recorded = client.get_model_version(name, worse).tags["mltr.promotion.candidate_mAP"]
    assert recorded == f"{first['candidate_mAP']:.6f}"
    # challenger (the last registered, the real run) leaves a version once it is the champion.
    challenger = None if worse == versions["real"] else versions["real"]
    assert aliases(client, name).get("challenger") == challenger

    won = promote.run(promote_args("--version", better))
    assert won["decision"] == "promoted" and won["gain"] > 0 and won["gain_ci95"][0] <= won["gain"]
    # Scored from the registered models, not copied from what training logged.
    assert won["candidate_mAP"] == pytest.approx(max(figures.values()), abs=1e-6)
    assert won["champion_mAP"] == pytest.approx(min(figures.values()), abs=1e-6)
    now = aliases(client, name)
    assert now["champion"] == better and now["previous-champion"] == worse
    # ... so now it is gone: the real run is either the first champion or the one that won.
    assert "challenger" not in now
    # The decision, both scores and the interval on both versions: the candidate's side and the
    # side of the champion it was judged against.
    for version, side in ((better, "mltr.promotion."), (worse, "mltr.challenge.")):
        tags = client.get_model_version(name, version).tags
        assert tags[side + "decision"] == "promoted" and tags[side + "gain"] == f"{won['gain']:.6f}"
        assert tags[side + "candidate"] == better and tags[side + "champion"] == worse
        assert tags[side + "gain_ci95"].startswith("[") and float(tags[side + "champion_mAP"]) > 0

    lost = promote.run(promote_args("--version", worse))
    assert lost["decision"] == "refused" and lost["gain"] < 0
    assert aliases(client, name)["champion"] == better
    assert client.get_model_version(name, worse).tags[DECISION] == "refused"
    defended = client.get_model_version(name, better).tags
    assert defended["mltr.challenge.decision"] == "refused" and defended[DECISION] == "promoted"

    back = promote.run(
        parse_config(
            promote.PromoteConfig, ["--name", name, "--rollback", "--lease-settle-s", "0.5", *tracking]
        )
    )
    assert back["champion"] == worse and aliases(client, name)["previous-champion"] == better
    # (the champion is now the worse model, as a rollback asks)

    # Two promotions at once, of two versions that both beat the champion by the same margin (the
    # better version and the same run registered again): serialised, the second compares with the
    # first and is refused.
    runs = {versions["weak"]: weak_run, versions["real"]: real_run}
    twin = register.run(parse_config(register.RegisterConfig, ["--run-id", runs[better], *tracking]))[
        "version"
    ]
    command = [
        sys.executable, "-m", "jobs.promote", "--name", name, "--data", data, "--resamples", "50",
        "--min-gain", "1e-4", *tracking,
    ]  # fmt: skip
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [*command, "--version", v], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for v in (better, str(twin))
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    decisions = sorted(r["decision"] for r in results)
    assert decisions == ["promoted", "refused"], results
    winner = next(r for r in results if r["decision"] == "promoted")
    loser = next(r for r in results if r["decision"] == "refused")
    final = aliases(client, name)
    assert final["champion"] == winner["candidate"] and final["previous-champion"] == worse
    assert loser["champion"] == winner["candidate"]  # it was judged against the new champion
    assert loser["gain"] == pytest.approx(0.0, abs=1e-9)
    winner_tags = client.get_model_version(name, winner["candidate"]).tags
    loser_tags = client.get_model_version(name, loser["candidate"]).tags
    # The champion's own decision won; the loser's was against it, under another lease.
    assert winner_tags[DECISION] == "promoted" and loser_tags[DECISION] == "refused"
    assert winner_tags["mltr.challenge.candidate"] == loser["candidate"]
    assert winner_tags["mltr.promotion.lease"] != loser_tags["mltr.promotion.lease"]
    assert registry.LEASE_TAG not in client.get_registered_model(name).tags  # released

    # evaluate --log records the champion's figures on its version.
    logged = evaluate.run(
        parse_config(
            evaluate.EvaluateConfig,
            ["--model", f"models:/{name}@champion", "--data", data, "--log", *tracking],
        )
    )
    tags = client.get_model_version(name, final["champion"]).tags
    assert logged["logged_on"] == f"models:/{name}/{final['champion']}"
    assert float(tags["mltr.eval.val.mAP"]) == pytest.approx(logged["metrics"]["mAP"], rel=1e-5)

    # The champion as its users call it. predict on files: one JSON line per image, the unreadable
    # one reported and skipped.
    champion = f"models:/{name}@champion"
    jpgs = sorted(Path(s3_sweep["src"]).rglob("*.jpg"))[:3]
    folder = tmp_path / "images"
    folder.mkdir()
    for jpg in jpgs:
        shutil.copy(jpg, folder / jpg.name)
    (folder / "unreadable.jpg").write_bytes(b"not an image")
    lines_file = tmp_path / "predictions.jsonl"
    files = predict.run(
        parse_config(
            predict.PredictConfig, ["--model", champion, str(folder), "--out", str(lines_file), *tracking]
        )
    )
    lines = {Path(r["path"]).name: r for r in map(json.loads, lines_file.read_text().splitlines())}
    assert set(lines) == {jpg.name for jpg in jpgs} and files["images"] == 3
    assert [Path(s["path"]).name for s in files["skipped"]] == ["unreadable.jpg"]
    assert "not a decodable JPEG or PNG image" in files["skipped"][0]["error"]
    first = lines[jpgs[0].name]
    assert len(first["scores"]) == 80 and set(first["labels"]) <= set(first["scores"])

    # predict on Parquet: Ray Data batch inference over the val split, written back to S3.
    manifest = load_manifest(data)
    table = predict.run(
        parse_config(
            predict.PredictConfig,
            [
                "--model",
                champion,
                "--data",
                data,
                "--parquet-out",
                f"s3://{bucket}/predictions/val",
                *tracking,
            ],
        )
    )
    assert table["rows"] == manifest.rows("val") and table["errors"] == 0
    written = pq.read_table(f"{bucket}/predictions/val", filesystem=resolve_storage(data).fs)
    assert set(written.column_names) == {"id", "labels", "scores", "error"}
    assert all(len(s) == 80 for s in written.column("scores").to_pylist())

    # mlflow models serve, answering a plain HTTP client that posts one JPEG: predict's labels.
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [
            str(bin_dir / "mlflow"),
            "models",
            "serve",
            "-m",
            champion,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_for_http(
            f"http://127.0.0.1:{port}/ping", server, 120, lambda: (tmp_path / "serve.log").read_text()[-3000:]
        )
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(jpgs[0].read_bytes()).decode()]],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            (served,) = json.loads(response.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
    assert served["labels"] == first["labels"]
    assert served["scores"] == pytest.approx(list(first["scores"].values()), abs=1e-5)

    # ONNX: exported from the registry, checked against PyTorch on the dataset's images.
    exported = export.run(
        parse_config(
            export.ExportConfig,
            ["--model", champion, "--out", str(tmp_path / "m.onnx"), "--data", data, *tracking],
        )
    )
    assert exported["max_abs_diff"] <= 1e-4 and exported["check_images"] >= 2
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(["logits"], {"images": np.zeros((3, 3, 64, 64), np.float32)})[0].shape == (3, 80)
