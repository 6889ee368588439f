"""The logged model carries what a consumer needs: the selected weights, classes, thresholds, input contract."""

import ast
import json
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mltr import create_model, save_checkpoint, tracking
from mltr.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, Selection, TrainState
from mltr.errors import ConfigError
from mltr.train import rng_state
from tests.conftest import free_port

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def write_checkpoint(folder: Path, weights: str) -> dict[str, torch.nn.Module]:
    """A checkpoint folder as the loop writes it: model, EMA (different weights) and the training state."""
    torch.manual_seed(0)
    models = {
        "model": create_model(
            "mltr_tiny", num_classes=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
        ).eval(),
        "ema": create_model("mltr_tiny", num_classes=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval(),
    }
    save_checkpoint(models["model"], folder / MODEL_FILE)
    save_checkpoint(models["ema"], folder / EMA_FILE)
    TrainState(
        epoch=6,
        selection=Selection(
            weights=weights,
            calib_mAP=0.81,
            thresholds=[0.2, 0.4, 0.6],
            val={"mAP": 0.77, "CP": 0.7, "CR": 0.6, "CF1": 0.65, "OP": 0.7, "OR": 0.6, "OF1": 0.64},
            calib_per_class_ap=[0.8, 0.8, 0.83],
            val_per_class_ap=[0.7, 0.8, 0.81],
            val_pr_curve=([0.0, 0.5, 1.0], [1.0, 0.9, 0.4]),
        ),
        best_epoch=6,
        best_calib_mAP=0.81,
        history=[],
        rng=[rng_state()],
        ema={},
        optimizer={},
        scheduler={},
        scaler={},
    ).save(folder / STATE_FILE)
    return models


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_the_logged_model_is_the_selected_weights_with_classes_thresholds_and_input_contract(
    tmp_path, sqlite_store, weights
):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    models = write_checkpoint(folder, weights)
    uri = sqlite_store
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "t", (tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    final = tracking.log_final_model(
        client,
        run_id,
        folder,
        ["cat", "dog", "bird"],
        variant="mltr_tiny",
        dataset_fingerprint="abc123",
        stored_images={"max_side": 512, "quality": 90},
    )

    assert final["calib_mAP"] == 0.81 and final["val_mAP"] == 0.77 and final["best_epoch"] == 6
    metrics = client.get_run(run_id).data.metrics
    assert metrics["calib_mAP"] == 0.81 and metrics["val_mAP"] == 0.77 and metrics["val_CF1"] == 0.65
    with tracking.tracking_uri(uri):
        info = mlflow.models.get_model_info(final["model_uri"])
        loaded = mlflow.pyfunc.load_model(final["model_uri"])
    meta = info.metadata
    assert meta["classes"] == ["cat", "dog", "bird"] and meta["thresholds"] == [0.2, 0.4, 0.6]
    assert meta["input"] == {
        "image_size": 64,
        "resize": "squash",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "channels": "RGB",
        "layout": "NCHW float32, (uint8 / 255 - mean) / std",
        "stored": {"max_side": 512, "quality": 90},  # how the training data's images were stored
    }
    assert meta["variant"] == "mltr_tiny" and meta["dataset_fingerprint"] == "abc123"
    assert meta["model_config"]["stem"] == models[weights].config.stem and meta["weights"] == weights
    assert info.signature.inputs.input_names() == ["image", "path"]
    # The logged network is the selected one of the two: the pyfunc's scores are its sigmoid.
    network = loaded.unwrap_python_model().predictor.model
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(network(images), models[weights](images))
    classes = json.loads(Path(client.download_artifacts(run_id, "model_info/classes.json")).read_text())
    assert classes["input"]["mean"] == [0.5, 0.5, 0.5]


def test_mltr_does_not_import_pipeline_or_jobs():
    """The model and training side stands on its own: jobs/ composes it with pipeline/."""
    offenders = []
    for path in sorted((ROOT / "mltr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("pipeline", "jobs")]
    assert offenders == []


# --- runs found by name, refused resumes, outcomes ---------------------------------------------------


@pytest.fixture
def store(tmp_path, sqlite_store):
    client = MlflowClient(sqlite_store)
    return client, tracking.ensure_experiment(client, "e", (tmp_path / "artifacts").as_uri())


IDENTITY = tracking.RunIdentity(
    model_config={"window_size": 4, "stem": "conv"}, dataset_fingerprint="sha256:a", loss="asl"
)


def start(store, name, identity=IDENTITY, epochs=3):
    client, experiment = store
    return tracking.start_or_resume_run(client, experiment, name, {"epochs": epochs}, {}, identity, epochs)


@pytest.mark.parametrize("name", ["plain", "it's", 'say "hi"', "both ' and \"", "50%_off"])
def test_a_run_is_found_again_by_its_name_whatever_its_quotes(store, name):
    run_id, resumed = start(store, name)
    assert not resumed
    # A newer run whose name differs only where the quotes are: the LIKE pattern that finds a name
    # holding both kinds of quote matches it too, and only the exact comparison tells them apart.
    decoy = name.replace("'", "x").replace('"', "y")
    decoy = decoy if decoy != name else "other " + name
    decoy_id, _ = start(store, decoy)
    assert decoy_id != run_id
    assert start(store, name) == (run_id, True)
    assert start(store, decoy) == (decoy_id, True)


def test_resuming_with_another_model_dataset_or_loss_is_refused_naming_the_differences(store):
    client, _ = store
    run_id, _ = start(store, "r")
    other = tracking.RunIdentity({"window_size": 2, "stem": "conv"}, "sha256:b", "bce")
    with pytest.raises(ConfigError) as info:
        start(store, "r", identity=other)
    message = str(info.value)
    assert "model window_size 4 -> 2" in message and "dataset fingerprint sha256:a -> sha256:b" in message
    assert "loss asl -> bce" in message and "new --name" in message and run_id in message
    assert "stem" not in message  # only what differs


def test_resuming_with_other_settings_is_refused_but_where_it_runs_may_change(store):
    client, experiment = store

    def resume(**params):
        base = {"epochs": 3, "calib_fraction": 0.1, "lr": 2e-4, "address": None, "milestones": [1, 2]}
        return tracking.start_or_resume_run(
            client, experiment, "r", base | params, {}, IDENTITY, 3, resume_free={"address"}
        )

    run_id, _ = resume()
    # Another calibration fraction would select on rows the checkpointed epochs trained on; another
    # learning rate would be ignored (the optimizer's state comes from the checkpoint).
    with pytest.raises(ConfigError) as info:
        resume(calib_fraction=0.2, lr=1e-3)
    assert "calib_fraction 0.1 (now 0.2), lr 0.0002 (now 0.001)" in str(info.value)
    assert "resume it with the flags it started with, or start a new --name" in str(info.value)
    assert resume(address="ray://head:10001", epochs=5, since="a param the run never logged") == (
        run_id,
        True,
    )
    assert resume(milestones=(1, 2)) == (run_id, True)  # compared as logged (JSON)


def test_a_finished_run_is_reopened_only_to_extend_it_and_the_extension_is_recorded(store):
    client, _ = store
    run_id, _ = start(store, "done", epochs=3)
    client.set_terminated(run_id, status="FINISHED")
    with pytest.raises(
        ConfigError, match=r"already finished its 3 epochs: start a new --name, or pass --epochs above 3"
    ):
        start(store, "done", epochs=3)
    assert start(store, "done", epochs=5) == (run_id, True)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.params["epochs"] == "3"
    assert run.data.tags["mltr.epochs"] == "5" and run.data.tags["mltr.epochs_history"] == "3,5"
    with pytest.raises(ConfigError, match="would cut it short"):
        start(store, "done", epochs=4)


def test_a_run_that_logged_epochs_is_not_reopened_where_its_checkpoints_hold_none(store):
    client, experiment = store

    def resume(held: int):
        return tracking.start_or_resume_run(
            client, experiment, "r", {"epochs": 3, "storage": "s3://a/runs"}, {}, IDENTITY, 3,
            checkpoints=("s3://b/runs/r", held),
        )  # fmt: skip

    run_id, _ = resume(0)
    assert resume(0) == (run_id, True)  # nothing logged yet: nothing to mix with
    tracking.log_epoch(client, run_id, 0, {"loss": 1.0})
    tracking.log_epoch(client, run_id, 1, {"loss": 0.5})
    client.set_terminated(run_id, status="KILLED")
    with pytest.raises(ConfigError) as info:
        resume(0)
    assert "logged epochs 0-1, but s3://b/runs/r holds no checkpoint" in str(info.value)
    assert "the --storage it started with (s3://a/runs), or start a new --name" in str(info.value)
    assert client.get_run(run_id).info.status == "KILLED"  # not reopened
    assert resume(2) == (run_id, True)


@pytest.mark.parametrize(
    ("error", "status", "raised"),
    [
        (RuntimeError("after fit"), "FAILED", RuntimeError),
        (KeyboardInterrupt(), "KILLED", KeyboardInterrupt),
        (SystemExit(1), "KILLED", KeyboardInterrupt),  # how Ray Train's own SIGINT handler leaves fit()
    ],
)
def test_a_failure_or_ctrl_c_inside_the_run_marks_it(store, error, status, raised):
    client, _ = store
    run_id, _ = start(store, f"fails-{type(error).__name__}")
    with pytest.raises(raised), tracking.run_outcome(client, run_id):
        raise error
    assert client.get_run(run_id).info.status == status


def test_an_mlflow_server_that_does_not_answer_fails_fast_naming_it():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"http://127.0.0.1:{port} did not answer within 2 s"):
        tracking.check_reachable(f"http://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - started < 10
    tracking.check_reachable("sqlite:////nowhere/mlflow.db")  # a local store needs no server


def test_a_uri_that_is_no_mlflow_store_is_named_before_mlflow_is_asked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="foo://bar: not an MLflow tracking URI"):
        tracking.check_reachable("foo://bar")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a database")
    for uri in (f"sqlite:///{tmp_path / 'photo.jpg'}", "sqlite:///photo.jpg"):  # absolute, relative
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ConfigError, match="photo.jpg is not a SQLite database"):
            tracking.check_reachable(uri)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).search_experiments()  # a real store, created by MLflow
    for fine in (store, "postgresql://127.0.0.1/test", "sqlite:///new.db", "sqlite:///:memory:"):
        tracking.check_reachable(fine)
    tracking.check_reachable(store, existing=True)


def test_a_stage_that_reads_models_refuses_a_sqlite_store_that_is_not_there(tmp_path, capsys):
    """A mistyped store is named as such; MLflow would create an empty one and say the model or run
    is missing. A training run may start a new store (the embedded default)."""
    from jobs import export, register

    typo = tmp_path / "typo" / "mlflow.db"
    (tmp_path / "typo").mkdir()
    uri = f"sqlite:///{typo}"
    with pytest.raises(ConfigError, match=f"{uri}: no MLflow store at {typo} \\(no such file\\)"):
        tracking.check_reachable(uri, existing=True)
    tracking.check_reachable(uri)  # a stage that writes runs creates it
    model = "models:/mltr-coco@champion"
    for job, argv in [
        (register, ["--run-id", "0123", "--mlflow-uri", uri]),
        (export, ["--model", model, "--out", str(tmp_path / "m.onnx"), "--mlflow-uri", uri]),
        (register, ["--run-id", "0123", "--workdir", str(tmp_path / "typo")]),  # the embedded default
    ]:
        assert job.main(argv) == 2
        assert "no MLflow store at" in capsys.readouterr().err.splitlines()[-1]
    assert not typo.exists()  # nothing was created
