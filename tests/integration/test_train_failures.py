"""A worker process killed in the middle of training, on a two-node Ray cluster on this machine."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from jobs._runtime import local_only_ray
from mltr.tracking import EPOCH_KEY, NAME_TAG, runs_tagged
from pipeline.convert import convert
from pipeline.readers import read_index
from pipeline.synthetic import generate
from tests.conftest import free_port
from tests.listeners import external_listeners

pytestmark = pytest.mark.integration

EPOCHS = 3


@pytest.fixture
def two_node_cluster():
    """A head node and a worker node (more logical CPUs than cores: Train workers plus Ray Data)."""
    # Loopback only (as the jobs' own local Ray): both nodes at 127.0.0.1; the dashboard there too,
    # which Train needs to clean up the placement groups of a run that dies.
    local_only_ray()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),  # the session's own local Ray may hold Ray's default
        },
    )
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    assert {node.node_ip_address for node in cluster.list_all_nodes()} == {"127.0.0.1"}
    assert external_listeners(os.getpid()) == set()
    yield cluster
    cluster.shutdown()


def train_worker_pids(cluster: Cluster) -> list[int]:
    """Ray Train worker processes of this cluster only: children of its nodes' raylets."""
    raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    pids = []
    for pid in (int(p) for p in out.split()):
        parent = subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True).stdout
        if parent.strip() and int(parent) in raylets:
            pids.append(pid)
    return sorted(pids)


def logged_epochs(uri: str, name: str) -> list[int]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mltr")
    if experiment is None:
        return []
    runs = runs_tagged(client, [experiment.experiment_id], NAME_TAG, name)
    if not runs:
        return []
    return sorted(int(m.step) for m in client.get_metric_history(runs[0].info.run_id, EPOCH_KEY))


def registered_epochs(run_dir) -> set[int]:
    """Epochs whose checkpoint Ray Train's controller has registered (it can then resume from them)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return set()
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (json.JSONDecodeError, KeyError):
        return set()
    return {int(r["metrics"]["epoch"]) for r in results}


def test_killed_worker_is_survived_and_every_epoch_is_logged_once(ray_local, two_node_cluster, tmp_path):
    generate("voc", tmp_path / "src", 600, seed=5)
    convert(read_index("voc", str(tmp_path / "src")), str(tmp_path / "ds"), rows_per_shard=75)
    work = tmp_path / "work"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "jobs.train",
        "--data", str(tmp_path / "ds" / "voc"),
        "--address", two_node_cluster.address,
        "--epochs", str(EPOCHS), "--batch-size", "8", "--num-workers", "2",
        "--max-failures", "1", "--workdir", str(work), "--name", "survives",
    ]  # fmt: skip
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    killed = None
    deadline = time.monotonic() + 400
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        # Epoch 0 is logged once its checkpoint is reported, and the controller has registered that
        # checkpoint: the workers are now in the second epoch.
        ready = 0 in logged_epochs(uri, "survives") and 0 in registered_epochs(
            work / "ray_results" / "survives"
        )
        workers = train_worker_pids(two_node_cluster) if ready else []
        if workers:
            killed = workers[-1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    log.close()
    assert killed is not None, "training ended before a worker could be killed"
    log_text = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, log_text[-4000:]
    # The worker group was restarted and resumed from the checkpoint instead of starting over.
    assert (
        "resuming from the checkpoint of epoch 0" in log_text
        or "resuming from the checkpoint of epoch 1" in log_text
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epochs"] == EPOCHS
    assert logged_epochs(uri, "survives") == list(range(EPOCHS))
    assert killed not in train_worker_pids(two_node_cluster)
    assert "FailurePolicy] RETRY" in log_text
    # Every metric, not only the epoch marker, holds each epoch exactly once; the loop started twice,
    # the second time from a checkpoint (not from scratch).
    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    per_epoch_prefixes = ("epoch", "lr", "data_wait", "train_", "val_model_", "val_ema_", "val_selected_",
                          "val_images", "calib_model_", "calib_ema_", "calib_images", "selection_")  # fmt: skip
    per_epoch = [key for key in run.data.metrics if key.startswith(per_epoch_prefixes)]
    assert "train_loss" in per_epoch and "val_model_mAP" in per_epoch and "selection_mAP" in per_epoch
    for key in per_epoch:
        steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), (key, steps)
    starts = sorted(int(m.value) for m in client.get_metric_history(run.info.run_id, "start_epoch"))
    assert starts[0] == 0 and len(starts) == 2 and starts[1] in (1, 2)


def test_ctrl_c_stops_a_local_run_in_one_line_and_marks_it_killed(demo_coco, tmp_path):
    """`mltr train` on its own local Ray, interrupted once training is under way, as a user would."""
    work = tmp_path / "work"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "jobs.train", "--data", demo_coco, "--epochs", "30",
        "--batch-size", "8", "--workdir", str(work), "--name", "interrupted",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not logged_epochs(uri, "interrupted") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "train: interrupted" in err
    # No traceback of the job's own (Ray's actors may log theirs, prefixed "(Actor pid=...)").
    assert not [line for line in err.splitlines() if line.startswith("Traceback")], err[-3000:]
    client = MlflowClient(uri)
    (run,) = runs_tagged(
        client, [client.get_experiment_by_name("mltr").experiment_id], NAME_TAG, "interrupted"
    )
    assert run.info.status == "KILLED"
