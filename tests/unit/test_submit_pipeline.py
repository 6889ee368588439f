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


def test_submit_forwards_only_the_named_settings_with_no_forward_env_and_never_a_profile(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mine")
    monkeypatch.setenv("AWS_PROFILE", "my-sso")  # a profile of this machine's ~/.aws files
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert "AWS_PROFILE" not in submit.parse(["train"]).forwarded
    assert submit.parse(["train", "--env", "AWS_PROFILE"]).forwarded["AWS_PROFILE"] == "my-sso"
    job = submit.parse(["train", "--no-forward-env", "--env", "MLFLOW_TRACKING_URI"])
    assert job.runtime_env()["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert submit.parse(["train", "--no-forward-env"]).runtime_env()["env_vars"] == {}


def test_a_loopback_setting_sent_to_a_cluster_elsewhere_is_named():
    here = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "MLFLOW_TRACKING_URI": "http://localhost:5000",
            "MLFLOW_S3_ENDPOINT_URL": "http://minio.internal:9000", "AWS_SECRET_ACCESS_KEY": "127.0.0.1"}  # fmt: skip
    assert submit.loopback_settings(here, "http://head:8265") == ["AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"]
    assert submit.loopback_settings(here, "http://10.0.0.5:8265") == [
        "AWS_ENDPOINT_URL",
        "MLFLOW_TRACKING_URI",
    ]
    assert (
        submit.loopback_settings(here, "http://127.0.0.1:8265") == []
    )  # the same machine, or a port-forward
    assert submit.loopback_settings({"AWS_ENDPOINT_URL": "http://[::1]:9000"}, "http://head:8265") == [
        "AWS_ENDPOINT_URL"
    ]


def test_submit_refuses_an_unknown_stage_and_an_unset_variable(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        submit.parse(["demo"])
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(ConfigError, match="--env NOT_SET_HERE: not set"):
        submit.parse(["train", "--env", "NOT_SET_HERE"])
    assert set(submit.STAGES) <= set(cli.JOBS)  # every stage it submits is a job of the CLI


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1), ("STOPPED", None, 1), ("FAILED", -9, 137)],
)
def test_submit_exits_with_the_jobs_status(status, code, expected):
    class Info:
        def __init__(self):
            from ray.job_submission import JobStatus

            self.status, self.driver_exit_code = JobStatus(status), code

    assert submit.exit_status(Info()) == expected


def test_submit_goes_to_the_address_given_whatever_the_shell_names(monkeypatch):
    import os

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:3")
    with pytest.raises(ConfigError) as refused:  # nothing listens there: the error names where it went
        submit.client_for("http://127.0.0.1:2")
    assert str(refused.value).startswith("no Ray job server answers at http://127.0.0.1:2: ")
    assert "http://127.0.0.1:1" not in str(refused.value) and "http://127.0.0.1:3" not in str(refused.value)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"  # the shell's settings are left as they were
    assert submit.job_server(None) == "http://127.0.0.1:3"  # without --address: Ray's order
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert submit.job_server(None) == "http://127.0.0.1:1"
    monkeypatch.delenv("RAY_ADDRESS")
    assert submit.job_server(None) == "http://127.0.0.1:8265"


def test_pipeline_reads_the_dataset_from_out_and_presets_of_train_or_tune(capsys):
    config = pipeline.parse(["--dataset", "voc", "--root", "/raw", "--out", "s3://b/ds/", "--config", "tiny"])
    assert config.train.data.uri == "s3://b/ds/voc" and config.train.optim.epochs == 30  # train/tiny
    swept = pipeline.parse(
        ["--dataset", "voc", "--root", "/raw", "--out", "s3://b/ds", "--config", "tiny", "--sweep"]
    )
    assert swept.sweep.window_sizes == (2, 4) and swept.train.optim.epochs == 6  # tune/tiny
    with pytest.raises(SystemExit) as exited:  # a sweep flag without --sweep would be ignored
        pipeline.parse(["--dataset", "voc", "--root", "/raw", "--out", "/ds", "--losses", "bce,asl"])
    assert (
        exited.value.code == 2 and "--losses: sweep flags, which only --sweep uses" in capsys.readouterr().err
    )
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
    assert (
        pipeline.flags_digest(
            pipeline.parse(base + ["--wait-for-resources", "600", "--cpus-per-worker", "2", "--use-gpu"])
        )
        == digest
    )  # where the run happens, as mltr train resumes it
    sweep = pipeline.flags_digest(pipeline.parse(base + ["--sweep"]))
    # A sweep of the same name is restarted by mltr tune under these only; others name another sweep.
    assert pipeline.flags_digest(pipeline.parse(base + ["--sweep", "--wait-for-resources", "600"])) == sweep
    assert pipeline.flags_digest(pipeline.parse(base + ["--sweep", "--max-concurrent-trials", "2"])) == sweep
    assert pipeline.flags_digest(pipeline.parse(base + ["--sweep", "--decode-actors", "3"])) != sweep
    assert pipeline.flags_digest(pipeline.parse(base + ["--max-side", "256"])) != digest  # other images
    assert pipeline.flags_digest(pipeline.parse(base + ["--quality", "50"])) != digest


PIPELINE = ["--dataset", "voc", "--root", "/raw", "--out", "/ds", "--config", "tiny"]


def finished_run(client, config, name, fingerprint, **changed):
    """A FINISHED run of ``name`` as mltr train leaves it, trained with ``config``'s flags but ``changed``."""
    from jobs._config import to_dict
    from mltr import tracking

    experiment = client.get_experiment_by_name("mltr") or client.get_experiment(
        client.create_experiment("mltr")
    )
    params = {**to_dict(config.train), **changed}
    tags = {tracking.NAME_TAG: name, tracking.EPOCHS_TAG: str(config.train.optim.epochs),
            "mltr.dataset_fingerprint": fingerprint}  # fmt: skip
    run = client.create_run(experiment.experiment_id, run_name=name, tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, tracking.param_value(value))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_a_finished_run_of_the_name_is_reused_only_if_trained_with_these_flags_on_this_data(sqlite_store):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store
    client = MlflowClient(uri)
    config = pipeline.parse([*PIPELINE, "--mlflow-uri", uri, "--name", "mine"])
    run_id = finished_run(client, config, "mine", "sha256:aa")
    assert pipeline.finished_training(client, config.train, "mine", "sha256:aa")["mlflow_run_id"] == run_id
    # Where it runs is free, as for mltr train's resume.
    placed = pipeline.parse([*PIPELINE, "--mlflow-uri", uri, "--name", "mine", "--wait-for-resources", "60"])
    assert pipeline.finished_training(client, placed.train, "mine", "sha256:aa")["mlflow_run_id"] == run_id
    with pytest.raises(ConfigError, match=r"dataset fingerprint sha256:aa \(now sha256:bb\)"):
        pipeline.finished_training(client, config.train, "mine", "sha256:bb")

    other = pipeline.parse([*PIPELINE, "--mlflow-uri", uri, "--name", "mine", "--lr", "0.5"])
    with pytest.raises(
        ConfigError, match=r"run 'mine' .* finished with other flags or data: --lr .* \(now 0.5\)"
    ):
        pipeline.finished_training(client, other.train, "mine", "sha256:aa")


def test_the_pipeline_trains_into_a_new_embedded_store(tmp_path, monkeypatch):
    # The registry jobs refuse a SQLite store that is not there; the pipeline looks for a finished
    # run before it trains, in the store that training then creates.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = pipeline.parse([*PIPELINE, "--workdir", str(tmp_path / "new"), "--name", "mine"])
    client = pipeline._client(config.train)
    assert pipeline.finished_training(client, config.train, "mine", "sha256:aa") is None
    assert (tmp_path / "new" / "mlflow.db").is_file()


def test_a_run_is_registered_again_once_it_logged_a_new_model(tmp_path, sqlite_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the registry looks a version's model up there
    client = MlflowClient(uri)
    config = pipeline.parse([*PIPELINE, "--mlflow-uri", uri, "--register-as", "mltr-voc"])
    run_id = finished_run(client, config, "r", "sha256:aa")
    experiment_id = client.get_run(run_id).info.experiment_id
    first, second = (client.create_logged_model(experiment_id, source_run_id=run_id) for _ in range(2))
    client.set_tag(run_id, "mltr.model_uri", f"models:/{first.model_id}")
    client.create_registered_model("mltr-voc")
    client.create_model_version("mltr-voc", f"models:/{first.model_id}", run_id=run_id)
    registered = []

    def register(c):
        registered.append(c.run_id)
        return {"name": c.name, "version": 2}

    monkeypatch.setattr(pipeline.register_job, "run", register)
    assert pipeline.stage_register(config, run_id)["skipped"] and not registered
    # Extended by more epochs, the run logged a new model: that one is registered.
    client.set_tag(run_id, "mltr.model_uri", f"models:/{second.model_id}")
    assert not pipeline.stage_register(config, run_id)["skipped"] and registered == [run_id]


def test_the_pipeline_passes_allow_shrink_to_its_conversion(tmp_path, monkeypatch):
    # What the conversion's refusal to shrink a dataset tells a user to pass is a pipeline flag too.
    config = pipeline.parse([*PIPELINE[:4], "--out", str(tmp_path), "--allow-shrink"])
    asked = []

    def preprocess(c):
        asked.append(c)
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline.preprocess_job, "run", preprocess)
    with pytest.raises(RuntimeError, match="stop here"):
        pipeline.stage_preprocess(config, None)
    assert asked[0].allow_shrink and asked[0].conversion == config.conversion
