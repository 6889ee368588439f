"""The job entrypoints as a user runs them: bad input exits 2 with a message that names the problem."""

import json
import os
import re
import subprocess
import sys

import pytest

from jobs import cli
from pipeline.synthetic import generate

pytestmark = pytest.mark.unit


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_missing_root_exits_2_naming_it(tmp_path):
    proc = run(
        "jobs.preprocess", "--dataset", "voc", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2
    assert f"{tmp_path / 'nope'} does not exist" in proc.stderr


def test_wrong_layout_exits_2_naming_the_expected_file(tmp_path):
    proc = run("jobs.preprocess", "--dataset", "coco", "--root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert str(tmp_path / "annotations" / "instances_train2014.json") in proc.stderr


def test_malformed_coco_json_exits_2_naming_file_and_error(tmp_path):
    generate("coco", tmp_path, 4)
    path = tmp_path / "annotations" / "instances_val2014.json"
    path.write_text("{ not json")
    proc = run("jobs.preprocess", "--dataset", "coco", "--root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "invalid JSON at line 1" in proc.stderr


def test_required_flags_are_named(tmp_path):
    proc = run("jobs.preprocess", "--dataset", "coco")
    assert proc.returncode == 2 and "--root is required" in proc.stderr


def test_make_synthetic_cli_writes_official_layout(tmp_path):
    proc = run(
        "jobs.make_synthetic", "--format", "nuswide", "--out", str(tmp_path), "--images", "30", "--faults"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layout"] == "nuswide-official" and result["outcomes"]["missing"] == 1
    assert (tmp_path / "ConceptsList" / "Concepts81.txt").is_file()
    assert "\\" in (tmp_path / "ImageList" / "TrainImagelist.txt").read_text()


def test_console_script_dispatches_to_jobs(tmp_path, capsys):
    assert cli.main(["make-synthetic", "--format", "voc", "--out", str(tmp_path), "--images", "4"]) == 0
    assert (tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").is_file()
    assert cli.main(["no-such-job"]) == 2
    assert "unknown job" in capsys.readouterr().err


def test_the_job_list_says_what_each_job_does_without_importing_them(capsys):
    assert cli.main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines[lines.index("jobs:") + 1 :]}
    assert list(listed) == list(cli.JOBS)
    assert listed["train"] == "Train MlTr on a converted dataset across a Ray cluster, tracked in MLflow"
    assert listed["bench"].startswith("Benchmarks of the stages")  # the package's __main__
    assert all(listed.values()) and not any("``" in text for text in listed.values())
    assert cli.main([]) == 2 and "jobs:" in capsys.readouterr().err  # no job: usage, as an error
    # Listing them loads none of the jobs' heavy imports (the console script answers at once).
    probe = "import sys; from jobs import cli; cli.usage(); print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    )


def test_the_last_line_is_strict_json_when_a_figure_is_nan(capsys):
    import numpy as np

    from jobs._runtime import run_job

    figures = {"mAP": float("nan"), "gain_ci95": [np.float64("nan"), 0.5], "per_class": {"a": float("inf")}}
    assert run_job("evaluate", lambda: figures) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(last, parse_constant=refuse) == {
        "mAP": None,
        "gain_ci95": [None, 0.5],
        "per_class": {"a": None},
    }


def test_user_errors_are_one_line_and_exit_2_while_bugs_keep_their_traceback(capsys):
    from jobs._runtime import run_job
    from mltr.errors import ConfigError
    from pipeline.dataset import SplitNotFound

    def raises(error):
        def body():
            raise error

        return body

    assert run_job("train", raises(ConfigError("--epochs must be at least 1, got 0"))) == 2
    assert capsys.readouterr().err == "train: error: --epochs must be at least 1, got 0\n"
    assert run_job("train", raises(SplitNotFound("dataset /d has no split 'val'; it has ['train']"))) == 2
    assert capsys.readouterr().err == "train: error: dataset /d has no split 'val'; it has ['train']\n"
    assert run_job("train", raises(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "train: interrupted\n"
    # A ValueError that is not the project's error is a bug: it propagates (Python prints it, exit 1).
    with pytest.raises(ValueError, match="a bug"):
        run_job("train", raises(ValueError("a bug")))


def test_an_out_that_is_a_file_or_an_unreachable_object_store_is_one_line(tmp_path):
    generate("voc", tmp_path / "src", 8)
    (tmp_path / "file").write_text("x")
    proc = run(
        "jobs.preprocess",
        "--dataset",
        "voc",
        "--root",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "file"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--out {tmp_path / 'file'} is a file" in proc.stderr
    assert "Ray" not in proc.stderr  # refused before a local Ray was started for the conversion

    from tests.conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.preprocess", "--dataset", "voc", "--root", str(tmp_path / "src"),
         "--out", "s3://bucket/datasets"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"the object store at {endpoint} refused or could not be reached" in proc.stderr
    assert "Ray" not in proc.stderr
    # The whole pipeline, whose first stage converts there: refused the same way, before its Ray.
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--dataset", "voc", "--root", str(tmp_path / "src"),
         "--out", "s3://bucket/datasets", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"the object store at {endpoint} refused or could not be reached" in proc.stderr
    assert "Ray" not in proc.stderr


def test_a_model_that_is_neither_a_uri_nor_a_checkpoint_folder_is_named_as_such(tmp_path):
    from jobs import export, predict
    from jobs._config import parse_config
    from mltr.errors import ConfigError

    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    for missing, what in ((tmp_path / "nope", "no such folder"), (tmp_path / "model.pt", "not a folder")):
        expected = (
            f"{missing}: {what}: --model takes a model URI (models:/, runs:/) or a training checkpoint folder"
        )
        with pytest.raises(ConfigError) as info:  # not "needs --classes-from": the flag is not what is wrong
            predict.run(parse_config(predict.PredictConfig, ["--model", str(missing), str(image)]))
        assert str(info.value) == expected
        out = str(tmp_path / "m.onnx")
        with pytest.raises(ConfigError) as info:
            export.run(parse_config(export.ExportConfig, ["--model", str(missing), "--out", out]))
        assert str(info.value) == expected
    # A folder that exists: what it lacks is the dataset its classes come from.
    with pytest.raises(ConfigError, match="a checkpoint folder needs --classes-from DATASET for its classes"):
        predict.run(parse_config(predict.PredictConfig, ["--model", str(tmp_path), str(image)]))


@pytest.mark.parametrize(
    ("job", "argv", "says"),
    [
        ("predict", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("predict", ["--batch-size=-3"], "--batch-size must be at least 1, got -3"),
        ("predict", ["--actors", "0"], "--actors must be at least 1, got 0"),
        ("evaluate", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("evaluate", ["--top-k", "0"], "--top-k must be at least 1, got 0"),
        ("export", ["--check-images", "0"], "--check-images must be at least 1, got 0"),
        ("export", ["--atol=-1"], "--atol must be at least 0, got -1"),
        ("promote", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("promote", ["--resamples", "0"], "--resamples must be at least 20, got 0"),
        ("promote", ["--lease-settle-s=-1"], "--lease-settle-s must be at least 0, got -1"),
        ("promote", ["--lease-ttl-s", "1"], "--lease-ttl-s must be more than --lease-settle-s (2), got 1"),
        ("train", ["--weight-decay=-1"], "--weight-decay must be 0 or more, got -1"),
        ("train", ["--grad-clip=-1"], "--grad-clip must be 0 (off) or more, got -1"),
        (
            "preprocess",
            ["--root=/src", "--out=/o", "--max-side", "8"],
            "--max-side must be at least 16, got 8",
        ),
        ("preprocess", ["--root=/src", "--out=/o", "--quality", "0"], "--quality must be in 1..100"),
        ("pipeline", ["--root=/src", "--out=/o", "--quality", "101"], "--quality must be in 1..100"),
    ],
)
def test_a_number_no_run_can_use_is_refused_before_anything_runs(job, argv, says, capsys):
    import importlib

    module = importlib.import_module(f"jobs.{job}")
    with pytest.raises(SystemExit) as exited:
        module.main(argv)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_an_out_that_is_a_folder_or_below_a_file_is_refused_before_any_work(tmp_path):
    from jobs import export as export_job
    from jobs import predict as predict_job
    from mltr.errors import ConfigError
    from pipeline.convert import output_root

    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    below = str(tmp_path / "a.jpg" / "sub")
    for refused, says in [
        (lambda: predict_job.out_path(str(tmp_path / "folder")), f"--out {tmp_path / 'folder'} is a folder"),
        (lambda: predict_job.out_path(below + "/x.jsonl"), f"{tmp_path / 'a.jpg'} is a file, not a folder"),
        (lambda: predict_job.parquet_out_location(str(tmp_path / "a.jpg")), "is a file: predictions go into"),
        (lambda: predict_job.parquet_out_location(below), f"{tmp_path / 'a.jpg'} is a file, not a folder"),
        (lambda: output_root(below), f"--out {below}: {tmp_path / 'a.jpg'} is a file, not a folder"),
        # export refuses it before it loads the model (there is none here) or exports anything
        (
            lambda: export_job.run(
                export_job.ExportConfig(model="nowhere", out=str(tmp_path / "folder") + "/")
            ),
            "is a folder",
        ),
        (
            lambda: export_job.run(export_job.ExportConfig(model="nowhere", out=below + "/m.onnx")),
            "is a file, not a folder",
        ),
        (  # not a local folder named "s3:"
            lambda: export_job.run(export_job.ExportConfig(model="nowhere", out="s3://bucket/m.onnx")),
            "--out s3://bucket/m.onnx: the ONNX file is written to a local path",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            refused()
    assert predict_job.out_path(str(tmp_path / "new" / "x.jsonl")) == tmp_path / "new" / "x.jsonl"
