"""`mltr evaluate --log` on a registry, with the model's scoring stubbed (the integration test scores real models)."""

import types

import pytest
from mlflow.tracking import MlflowClient

from jobs import evaluate
from jobs._config import parse_config

pytestmark = pytest.mark.unit


def test_log_records_the_figures_on_the_version_scored_even_if_the_alias_moves_meanwhile(
    tmp_path, sqlite_store, monkeypatch, caplog
):
    uri = sqlite_store
    client = MlflowClient(uri)
    client.create_registered_model("m")
    first, second = (client.create_model_version("m", source=str(tmp_path)).version for _ in range(2))
    client.set_registered_model_alias("m", "champion", first)
    manifest = types.SimpleNamespace(
        uri="file:///data/coco",
        fingerprint="sha256:x",
        classes=("a",),
        stored_images=lambda: {"max_side": 512},
    )
    loaded = []

    def load_predictor(model, client, classes, batch_size):
        loaded.append(model)
        client.set_registered_model_alias("m", "champion", second)  # a promotion, while this one scores
        return types.SimpleNamespace(info=types.SimpleNamespace(classes=("a",)))

    monkeypatch.setattr(evaluate, "load_manifest", lambda uri: manifest)
    monkeypatch.setattr(evaluate, "load_predictor", load_predictor)
    monkeypatch.setattr(evaluate, "check_classes", lambda *args: None)
    figures = {"images": 3, "metrics": {"mAP": 0.75}, "per_class_ap": {"a": 0.75}}
    monkeypatch.setattr(evaluate, "evaluate", lambda *args: figures)

    out = evaluate.run(
        parse_config(
            evaluate.EvaluateConfig,
            ["--model", "models:/m@champion", "--data", "/data/coco", "--log", "--mlflow-uri", uri],
        )
    )
    assert loaded == [f"models:/m/{first}"] and out["logged_on"] == f"models:/m/{first}"
    assert client.get_model_version("m", first).tags["mltr.eval.val.mAP"] == "0.75"
    assert "mltr.eval.val.mAP" not in client.get_model_version("m", second).tags

    assert "not an estimate" not in caplog.text
    # Figures on the train split are the fitted and calibrated rows': said so.
    evaluate.run(
        parse_config(
            evaluate.EvaluateConfig,
            ["--model", "models:/m/2", "--data", "/data/coco", "--split", "train", "--mlflow-uri", uri],
        )
    )
    assert "train split holds the rows the model was fit on" in caplog.text
