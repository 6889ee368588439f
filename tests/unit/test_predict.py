"""`mltr predict` on files: folders walked, globs expanded, a bad image reported and skipped."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.predict import PredictConfig, actor_layout, expand_inputs, predict_files, run
from mltr import create_model
from mltr.errors import ConfigError
from mltr.serving import ModelInfo, Predictor

pytestmark = pytest.mark.unit


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_inputs_expand_and_every_image_gets_a_line_or_a_reason(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "one.jpg").write_bytes(jpeg(1))
    (tmp_path / "a" / "nested" / "two.JPG").write_bytes(jpeg(2))
    (tmp_path / "a" / "notes.txt").write_text("not an image, not an input")
    (tmp_path / "b-1.jpg").write_bytes(jpeg(3))
    (tmp_path / "b-2.jpg").write_bytes(b"\xff\xd8 truncated")
    paths = list(expand_inputs((str(tmp_path / "a"), str(tmp_path / "b-*.jpg"), str(tmp_path / "gone.jpg"))))
    assert [p.removeprefix(str(tmp_path)) for p in paths] == [
        "/a/nested/two.JPG", "/a/one.jpg", "/b-1.jpg", "/b-2.jpg", "/gone.jpg",
    ]  # fmt: skip

    torch.manual_seed(0)
    network = create_model("mltr_tiny", num_classes=2).eval()
    predictor = Predictor(
        network, ModelInfo(("x", "y"), (0.0, 1.01), network.config.input_contract()), batch_size=2
    )
    out = io.StringIO()
    summary = predict_files(predictor, paths, out, batch_size=2)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["path"] for line in lines] == paths[:3] and summary["images"] == 3
    assert all(line["labels"] == ["x"] and set(line["scores"]) == {"x", "y"} for line in lines)
    assert [s["path"] for s in summary["skipped"]] == paths[3:]
    assert "gone.jpg: no such file" in summary["skipped"][1]["error"]
    assert "skipped" in capsys.readouterr().err


def test_each_image_is_predicted_once_and_an_existing_name_is_never_a_glob(tmp_path):
    for name in (
        "a/one.jpg",
        "a/sub/two.jpg",
        "a/notes.txt",
        "lit/photo[1].jpg",
        "lit/photo1.jpg",
        "s [1]/x.jpg",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")

    def expand(*specs: str) -> list[str]:
        return [p.removeprefix(str(tmp_path)) for p in expand_inputs(tuple(str(tmp_path / s) for s in specs))]

    # A folder and a file in it, and a ** glob (which matches the folders as well as their files).
    assert expand("a", "a/one.jpg") == ["/a/gone.jpg", "/a/one.jpg", "/a/sub/two.jpg"]
    assert expand("a/**") == ["/a/gone.jpg", "/a/one.jpg", "/a/sub/two.jpg", "/a/notes.txt"]
    # Names that hold glob characters and exist are what they name.
    assert expand("lit/photo[1].jpg", "s [1]") == ["/lit/photo[1].jpg", "/s [1]/x.jpg"]
    assert expand("lit/photo[0-9].jpg") == ["/lit/photo1.jpg"]  # one that does not exist is a glob
    # An unset shell variable is not the current folder.
    with pytest.raises(ConfigError, match="an input is empty"):
        list(expand_inputs(("",)))
    with pytest.raises(ConfigError, match="an input is empty"):  # before any model is looked for
        run(PredictConfig(model=str(tmp_path / "no-such-model"), inputs=(str(tmp_path / "a"), " ")))

    import fsspec

    memory = fsspec.filesystem("memory")
    for name in ("x/a.jpg", "x/sub/b.jpg", "y/c[1].jpg", "y/c1.jpg"):
        memory.pipe(f"/dedup/{name}", b"x")
    try:
        assert list(expand_inputs(("memory://dedup/x/**", "memory://dedup/x", "memory://dedup/y/c[1].jpg"))) == [
            "memory:///dedup/x/a.jpg", "memory:///dedup/x/sub/b.jpg", "memory:///dedup/y/c[1].jpg",
        ]  # fmt: skip
    finally:
        memory.rm("/dedup", recursive=True)


def test_a_folder_without_images_is_said_not_silently_nothing(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    specs = tuple(str(tmp_path / name) for name in ("empty", "notes", "photos"))
    with caplog.at_level("WARNING", logger="jobs.predict"):
        assert list(expand_inputs(specs)) == [str(tmp_path / "photos" / "a.jpg")]
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{tmp_path / name}: no .jpg, .jpeg, .png images in it" for name in ("empty", "notes")]


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_model_actors_take_a_gpu_each_and_decoding_in_them_takes_the_cpus_but_one():
    cpu_only = [node(16), node(16)]
    tasks = {"decode": "tasks", "num_cpus": 1, "num_gpus": 0, "calls": 1, "torch_threads": None}
    assert actor_layout("auto", cpu_only) == actor_layout("tasks", cpu_only) == tasks
    assert actor_layout("actor", cpu_only) == {**tasks, "decode": "actor"}
    one_gpu = [node(3, 1)]  # jobs.bench predict's Ray on 2 cores
    in_actor = {"decode": "actor", "num_cpus": 2, "num_gpus": 1, "calls": 3, "torch_threads": 1}
    assert actor_layout("auto", one_gpu) == actor_layout("actor", one_gpu) == in_actor
    assert actor_layout("tasks", one_gpu) == {
        "decode": "tasks", "num_cpus": 0, "num_gpus": 1, "calls": 1, "torch_threads": None,
    }  # fmt: skip
    # The smallest share of a GPU node's CPUs decides, dead nodes aside; calls are capped.
    mixed = [node(64), node(96, 8), node(17, 1), node(2, 4, alive=False)]
    assert actor_layout("auto", mixed) == {**in_actor, "num_cpus": 11, "calls": 8}
    assert actor_layout("actor", [node(1, 2)])["num_cpus"] == 1  # never less than one
    assert actor_layout("actor", one_gpu, calls_per_actor=2)["calls"] == 2
    with pytest.raises(ConfigError, match="decode must be"):
        actor_layout("threads", one_gpu)


def test_remote_globs_expand_to_every_match_and_one_that_matches_nothing_is_reported():
    import fsspec

    memory = fsspec.filesystem("memory")
    for name in ("a.jpg", "b.jpg", "c.jpg", "notes.txt"):
        memory.pipe(f"/incoming/{name}", b"x")
    try:
        assert list(expand_inputs(("memory://incoming/*.jpg", "memory://incoming/*.png"))) == [
            "memory:///incoming/a.jpg", "memory:///incoming/b.jpg", "memory:///incoming/c.jpg",
            "memory://incoming/*.png",  # matched nothing: it is reported as missing, not dropped
        ]  # fmt: skip
    finally:
        memory.rm("/incoming", recursive=True)


def test_a_model_is_run_on_a_dataset_only_if_it_predicts_that_datasets_classes(tmp_path, monkeypatch):
    import types

    import pipeline.dataset
    from jobs import predict
    from jobs._config import parse_config
    from mltr.checkpoint import save_selected_model

    network = create_model("mltr_tiny", num_classes=3).eval()
    folder = save_selected_model(network, (0.5, 0.5, 0.5), tmp_path / "checkpoint")
    manifests = {
        "/data/animals": types.SimpleNamespace(
            uri="/data/animals", classes=("cat", "dog", "bird"), num_classes=3, stored_images=dict
        ),
        "/data/streets": types.SimpleNamespace(
            uri="/data/streets", classes=("car", "bus", "sign"), num_classes=3
        ),
    }
    monkeypatch.setattr(pipeline.dataset, "load_manifest", lambda uri: manifests[uri])
    config = parse_config(
        predict.PredictConfig,
        ["--model", str(folder), "--classes-from", "/data/animals", "--data", "/data/streets"],
    )
    with pytest.raises(ConfigError, match="predicts 3 classes that are not the dataset's /data/streets"):
        predict.run(config)  # refused before Ray starts; its scores would carry the wrong names


def test_out_is_replaced_only_when_every_image_is_done(tmp_path, caplog):
    from jobs.predict import json_lines

    paths = []
    for seed in range(4):
        paths.append(str(tmp_path / f"{seed}.jpg"))
        (tmp_path / f"{seed}.jpg").write_bytes(jpeg(seed))
    network = create_model("mltr_tiny", num_classes=2).eval()
    predictor = Predictor(
        network, ModelInfo(("x", "y"), (0.5, 0.5), network.config.input_contract()), batch_size=2
    )
    out_file = tmp_path / "out" / "predictions.jsonl"
    out_file.parent.mkdir()
    out_file.write_text('{"path": "an earlier run"}\n')

    batches = predictor.predict_encoded

    def fails_on_the_second_batch(rows, calls=[]):  # noqa: B006 - counts the calls
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return batches(rows)

    predictor.predict_encoded = fails_on_the_second_batch
    with pytest.raises(RuntimeError, match="went away"), json_lines(str(out_file)) as out:
        predict_files(predictor, paths, out, batch_size=2)
    assert out_file.read_text() == '{"path": "an earlier run"}\n'  # untouched by the failed run
    partial = out_file.with_name("predictions.jsonl.partial")
    assert [json.loads(line)["path"] for line in partial.read_text().splitlines()] == paths[:2]
    assert str(partial) in caplog.text

    predictor.predict_encoded = batches
    with json_lines(f"file://{out_file}") as out:
        predict_files(predictor, paths, out, batch_size=2)
    assert [json.loads(line)["path"] for line in out_file.read_text().splitlines()] == paths
    assert not partial.exists()

    with pytest.raises(ConfigError, match="--parquet-out"), json_lines("s3://bucket/p.jsonl"):
        pass
    with pytest.raises(ConfigError, match="is a folder"), json_lines(str(tmp_path)):
        pass
