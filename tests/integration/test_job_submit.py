"""Stages as Ray jobs, submitted with `mltr submit` to a cluster started with `ray start`, token auth on.

The jobs run as drivers the cluster starts (``RAY_ADDRESS`` set by the job manager), not in this
process. The cluster's nodes know nothing of the object store or MLflow: `mltr submit` forwards
those settings from the submitting shell. The pipeline (preprocess -> train -> register) runs on a
head and a worker node; the worker node is killed, raylet and every process, during training,
and the run resumes from its checkpoint on the head. A job given a dataset without a manifest
fails with a message that names the file, and `mltr submit` exits with the job's status.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs._runtime import LOCAL_ONLY_ENV
from tests.conftest import free_port, ray_agent_ports
from tests.listeners import descendants, external_listeners

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3


@dataclass(frozen=True)
class Head:
    address: str  # the dashboard's job API
    env: dict  # the submitting shell's: the cluster's token, the object store's settings
    pid: int  # `ray start --head --block`
    gcs: str  # where worker nodes join
    node_env: dict  # what the nodes run with: no object-store or MLflow settings


@pytest.fixture(scope="module")
def head(aws_env):
    """A one-node cluster (`ray start --head --block`) with the dashboard's job API on loopback."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    # Loopback only: the node address, and Ray's local-only switch so it is not turned back into
    # the machine's external address (see jobs._runtime.local_only_ray).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, LOCAL_ONLY_ENV: "0"}
    env.pop("RAY_ADDRESS", None)
    # The nodes get no object-store or MLflow settings: what a job needs of them, it is given.
    node_env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    gcs = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs.rsplit(':', 1)[1]}",
            "--num-cpus=5",
            "--node-ip-address=127.0.0.1",
        ]
        + ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}"]
        + ray_agent_ports()
        + ["--disable-usage-stats"],
        env=node_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                api(address, env, "/api/jobs/")
                break
            except (OSError, ValueError) as exc:  # not up yet, or an answer that is not the job list
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the head node did not serve jobs at {address}: {exc}") from None
            time.sleep(0.5)
        assert external_listeners(process.pid) == set()
        yield Head(address, env, process.pid, gcs, node_env)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # ray start --block and every process it started
        try:
            process.wait(timeout=5)  # it stops its node's processes first; whatever lingers is killed
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(
    head: Head, stage: str, *args: str, env: dict | None = None, submit_args=(), **popen
) -> subprocess.Popen:
    """`mltr submit STAGE --address ... -- ARGS` from this checkout, as a user runs it."""
    command = [sys.executable, "-m", "jobs.cli", "submit", stage, "--address", head.address, *submit_args]
    command += ["--python", sys.executable, "--working-dir", str(REPO), "--", *args]
    return subprocess.Popen(
        command,
        env=env or head.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def api(address: str, env: dict, path: str):
    """GET ``path`` of the head's dashboard with the cluster's token: what the ``ray job`` and
    ``ray list`` commands ask, without starting a Python process that imports Ray once a second
    while the nodes start on the same two cores."""
    request = urllib.request.Request(
        address + path, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_for_nodes(head: Head, alive: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:  # the State API's node list, as `ray list nodes` reads it
            listed = api(head.address, head.env, "/api/v0/nodes?limit=1000&detail=1")
            nodes = listed["data"]["result"]["result"]
        except (OSError, ValueError, KeyError) as exc:
            listed, nodes = repr(exc), []
        if sum(n["state"] == "ALIVE" for n in nodes) == alive:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not reach {alive} alive nodes: {str(listed)[-2000:]}")
        time.sleep(1)


@pytest.fixture
def worker_node(head):
    """A second node joining the head (`ray start --address ... --block`, on loopback: tests.ray_node),
    with a temp dir of its own, as a node on another machine has (its session, logs and the jobs'
    unpacked working dirs)."""
    temp_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.ray_node", f"--address={head.gcs}", "--block", "--num-cpus=3"]
        + ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ray_agent_ports()],
        env=head.node_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_nodes(head, alive=2)
        assert external_listeners(process.pid) == set()
        yield process
    finally:
        for pid in descendants(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def train_workers_on(node_pid: int) -> list[int]:
    """Ray Train worker processes of the node whose `ray start --block` is ``node_pid``."""
    out = []
    for pid in descendants(node_pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                out.append(pid)
    return out


def test_pipeline_submitted_to_two_nodes_survives_losing_one(
    head, worker_node, s3_bucket, mlflow_server, tmp_path
):
    import s3fs
    from mlflow.tracking import MlflowClient

    from mltr.tracking import EPOCH_KEY, NAME_TAG, runs_tagged
    from pipeline.synthetic import generate

    generate("voc", tmp_path / "raw", 360, seed=5)
    env = {**head.env, "MLFLOW_TRACKING_URI": mlflow_server["uri"], "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    name, model = f"two-node-{uuid.uuid4().hex[:6]}", f"mltr-two-node-{uuid.uuid4().hex[:6]}"
    job = submit(
        head, "pipeline",
        "--dataset", "voc", "--root", str(tmp_path / "raw"), "--out", f"s3://{s3_bucket}/datasets",
        "--rows-per-shard", "60", "--epochs", str(EPOCHS), "--batch-size", "8", "--num-workers", "2",
        "--placement-strategy", "SPREAD", "--max-failures", "1", "--decode-actors", "1",
        "--storage", f"s3://{s3_bucket}/ray_results", "--workdir", str(tmp_path / "work"),
        "--name", name, "--register-as", model,
        env=env, submit_args=("--env", "RAY_DATA_DISABLE_PROGRESS_BARS"),
    )  # fmt: skip
    client = MlflowClient(mlflow_server["uri"])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    snapshot = f"{s3_bucket}/ray_results/{name}/checkpoint_manager_snapshot.json"

    def epochs_logged() -> list[int]:
        experiment = client.get_experiment_by_name("mltr")
        runs = runs_tagged(client, [experiment.experiment_id], NAME_TAG, name) if experiment else []
        return (
            sorted(int(m.step) for m in client.get_metric_history(runs[0].info.run_id, EPOCH_KEY))
            if runs
            else []
        )

    killed: set[int] = set()
    deadline = time.monotonic() + 400
    while not killed and job.poll() is None and time.monotonic() < deadline:
        # Epoch 0 is in MLflow and its checkpoint registered with the controller (in the object
        # store), and a Train worker runs on the worker node: kill that node, raylet and all.
        if 0 in epochs_logged() and fs.exists(snapshot) and train_workers_on(worker_node.pid):
            fs.invalidate_cache()
            killed = descendants(worker_node.pid)
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    out, err = job.communicate(timeout=600)
    (tmp_path / "job.log").write_text(out + err)
    problems = "\n".join(line for line in (out + err).splitlines() if "Error" in line or "Traceback" in line)
    assert killed, "the pipeline ended before the worker node could be killed:\n" + problems[-6000:]
    assert job.returncode == 0, problems[-6000:] or out[-6000:]
    worker_node.wait(timeout=10)
    alive = {pid for pid in killed if Path(f"/proc/{pid}").exists()}
    assert not alive, f"processes of the killed node still run: {alive}"

    # The job's driver ran on the cluster (not a Ray of its own), and the run resumed on the head
    # from the checkpoint instead of starting over; every epoch is in MLflow once.
    assert "Started a local Ray instance" not in out and "Connecting to existing Ray cluster" in out
    assert "resuming from the checkpoint of epoch" in out
    pipeline, summary = [line for line in json_lines(out) if "preprocess" in line or "submission_id" in line][
        -2:
    ]
    assert summary["status"] == "SUCCEEDED" and summary["driver_exit_code"] == 0
    # The object store's and MLflow's settings reached the job from the submitting shell only
    # (the nodes have none), as runtime-env variables, never on the job's command line.
    assert {"AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} <= set(
        summary["forwarded_env"]
    )
    assert env["AWS_SECRET_ACCESS_KEY"] not in summary["entrypoint"]
    assert pipeline["preprocess"]["uri"] == f"s3://{s3_bucket}/datasets/voc"
    trained = pipeline["train"]
    assert trained["epochs"] == EPOCHS and not trained["skipped"]
    assert epochs_logged() == list(range(EPOCHS))
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    starts = sorted(int(m.value) for m in client.get_metric_history(run.info.run_id, "start_epoch"))
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 1
    assert "FailurePolicy] RETRY" in out  # Ray Train restarted the worker group, within --max-failures
    # Every metric, not only the epoch marker, holds each epoch exactly once across the two starts.
    per_epoch_prefixes = ("epoch", "lr", "data_wait", "train_", "val_model_", "val_ema_", "val_selected_",
                          "val_images", "calib_model_", "calib_ema_", "calib_images", "selection_")  # fmt: skip
    per_epoch = [key for key in run.data.metrics if key.startswith(per_epoch_prefixes)]
    assert {"train_loss", "val_model_mAP", "selection_mAP"} <= set(per_epoch)
    for key in per_epoch:
        steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), (key, steps)
    version = client.get_model_version(model, str(pipeline["register"]["version"]))
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias(model, "challenger").version == version.version
    wait_for_nodes(head, alive=1)
    assert external_listeners(head.pid) == set()


def test_a_failed_job_says_what_is_wrong_and_submit_exits_with_its_status(head, tmp_path):
    job = submit(head, "train", "--data", str(tmp_path / "nothing"), "--workdir", str(tmp_path))
    out, err = job.communicate(timeout=300)
    # A user error: the job's driver exits 2 with one line naming the missing file, no traceback,
    # and `mltr submit` exits 2 too.
    assert job.returncode == 2, (out + err)[-3000:]
    assert "_manifest.json" in out and "Traceback" not in out
    summary = json_lines(out)[-1]
    assert summary["status"] == "FAILED" and summary["driver_exit_code"] == 2


def test_submit_names_a_bad_token_in_one_line(head):
    job = submit(head, "train", env={**head.env, "RAY_AUTH_TOKEN": "not-the-token"})
    out, err = job.communicate(timeout=120)
    assert job.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"submit: {head.address}: Authentication failed")
    assert "Traceback" not in err
