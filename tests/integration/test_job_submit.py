"""Every stage as a Ray job: `ray job submit` to a head node started with `ray start`, token auth on.

The jobs run as drivers the cluster starts (``RAY_ADDRESS`` set by the job manager), not in this
process: generate a dataset, convert it, train on it; a job given a dataset without a manifest
fails with a message that names the file.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from jobs._runtime import LOCAL_ONLY_ENV
from tests.conftest import free_port
from tests.listeners import external_listeners

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(aws_env):
    """A one-node cluster (`ray start --head --block`) with the dashboard's job API on loopback."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    # Loopback only: the node address, and Ray's local-only switch so it is not turned back into
    # the machine's external address (see jobs._runtime.local_only_ray).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, LOCAL_ONLY_ENV: "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--num-cpus=5",
            "--node-ip-address=127.0.0.1",
        ]
        + ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}"]
        + ["--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            probe = subprocess.run(
                [RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head node did not serve jobs at {address}: {probe.stderr[-2000:]}")
            time.sleep(1)
        assert external_listeners(process.pid) == set()
        yield address, env, process.pid
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # ray start --block and every process it started
        try:
            process.wait(timeout=5)  # it stops its node's processes first; whatever lingers is killed
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit -- python -m jobs.<job> ...`: blocks, prints the job's logs, exits 1 if it failed."""
    address, env, _ = head
    return subprocess.run(
        [RAY, "job", "submit", "--address", address, "--", sys.executable, "-m", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_json(output: str) -> dict:
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def test_each_stage_runs_as_a_submitted_job(head, tmp_path):
    raw, out, work = tmp_path / "raw", tmp_path / "datasets", tmp_path / "work"
    made = submit(head, "jobs.make_synthetic", "--format", "voc", "--out", str(raw), "--images", "160")
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]

    converted = submit(head, "jobs.preprocess", "--dataset", "voc", "--root", str(raw), "--out", str(out))
    assert converted.returncode == 0, converted.stdout[-3000:] + converted.stderr[-3000:]
    rows = last_json(converted.stdout)["rows"]
    assert sum(rows.values()) == 160 and rows["train"] > rows["val"] > 0

    trained = submit(
        head,
        "jobs.train",
        "--data",
        str(out / "voc"),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--workdir",
        str(work),
        "--name",
        "submitted",
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    result = last_json(trained.stdout)
    assert result["epochs"] == 2 and 0.0 <= result["val_mAP"] <= 1.0
    assert result["mlflow_uri"] == f"sqlite:///{work / 'mlflow.db'}"
    assert Path(result["checkpoint"], "model.pt").is_file()
    # The job joined the cluster it was submitted to (2 Train workers + decode actors on its 5 CPUs):
    # it did not start a Ray of its own.
    assert "Started a local Ray instance" not in trained.stdout + trained.stderr
    assert "Connecting to existing Ray cluster" in trained.stdout + trained.stderr
    assert external_listeners(head[2]) == set()  # nor did anything the jobs started open one


def test_a_failed_job_says_what_is_wrong(head, tmp_path):
    failed = submit(head, "jobs.train", "--data", str(tmp_path / "nothing"), "--workdir", str(tmp_path))
    output = failed.stdout + failed.stderr
    # A user error: the job exits 2 with a message naming the missing file, no traceback.
    assert failed.returncode == 1 and "failed with exit code 2" in output, output[-3000:]
    assert "_manifest.json" in output and "Traceback" not in output
