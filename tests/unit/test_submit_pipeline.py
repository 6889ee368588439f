"""`mltr submit` and `mltr pipeline` as far as they go without a cluster: what is sent, what is skipped."""

import shlex

import pytest

from jobs import cli, pipeline, submit
from mltr.errors import ConfigError

pytestmark = pytest.mark.unit


def test_submit_runs_the_stage_with_its_own_flags_and_forwards_settings_only_through_the_env(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("TEAM_SETTING", "x")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    job = submit.parse(
        [
            "train",
            "--address",
            "http://head:8265",
            "--working-dir",
            str(tmp_path),
            "--env",
            "TEAM_SETTING",
            "--",
        ]
        + ["--data", "s3://b/datasets/coco", "--name", "it's mine"]
    )
    assert shlex.split(job.entrypoint) == [
        "python",
        "-m",
        "jobs.train",
        "--data",
        "s3://b/datasets/coco",
        "--name",
        "it's mine",
    ]
    env = job.runtime_env()
    assert env["env_vars"] == {
        "AWS_SECRET_ACCESS_KEY": "s3cr3t", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "TEAM_SETTING": "x",
    } | {k: v for k, v in env["env_vars"].items() if k.startswith("AWS_") and k != "AWS_SECRET_ACCESS_KEY"}  # fmt: skip
    assert "s3cr3t" not in job.entrypoint  # never on the command line the cluster's job list shows
    assert env["working_dir"] == str(tmp_path) and {".venv", "work/", ".git"} <= set(env["excludes"])
    assert submit.parse(["make-synthetic"]).entrypoint == "python -m jobs.make_synthetic"


def test_submit_refuses_an_unknown_stage_and_an_unset_variable(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        submit.parse(["demo"])
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(ConfigError, match="--env NOT_SET_HERE: not set"):
        submit.parse(["train", "--env", "NOT_SET_HERE"])
    assert set(submit.STAGES) <= set(cli.JOBS)  # every stage it submits is a job of the CLI


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1), ("STOPPED", None, 1)],
)
def test_submit_exits_with_the_jobs_status(status, code, expected):
    class Info:
        def __init__(self):
            from ray.job_submission import JobStatus

            self.status, self.driver_exit_code = JobStatus(status), code

    assert submit.exit_status(Info()) == expected


def test_pipeline_reads_the_dataset_from_out_and_presets_of_train_or_tune(capsys):
    config = pipeline.parse(["--dataset", "voc", "--root", "/raw", "--out", "s3://b/ds/", "--config", "tiny"])
    assert config.train.data.uri == "s3://b/ds/voc" and config.train.optim.epochs == 30  # train/tiny
    swept = pipeline.parse(
        ["--dataset", "voc", "--root", "/raw", "--out", "s3://b/ds", "--config", "tiny", "--sweep"]
    )
    assert swept.sweep.window_sizes == (2, 4) and swept.train.optim.epochs == 6  # tune/tiny
    with pytest.raises(SystemExit) as exited:
        pipeline.parse(["--dataset", "voc", "--root", "/raw", "--out", "/ds", "--data", "/elsewhere/voc"])
    assert exited.value.code == 2
    assert "--data is <out>/<dataset> in a pipeline (/ds/voc), got /elsewhere/voc" in capsys.readouterr().err


def test_pipeline_run_name_changes_with_what_is_trained_not_where():
    base = ["--dataset", "voc", "--root", "/raw", "--out", "/ds", "--config", "tiny"]
    digest = pipeline.flags_digest(pipeline.parse(base))
    assert (
        pipeline.flags_digest(pipeline.parse(base + ["--workdir", "/elsewhere", "--max-failures", "2"]))
        == digest
    )
    assert pipeline.flags_digest(pipeline.parse(base + ["--lr", "1e-3"])) != digest
    assert pipeline.flags_digest(
        pipeline.parse(base + ["--sweep", "--losses", "bce"])
    ) != pipeline.flags_digest(pipeline.parse(base + ["--sweep", "--losses", "asl"]))
