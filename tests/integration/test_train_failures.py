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

from mltr.tracking import EPOCH_KEY, NAME_TAG
from pipeline.convert import convert
from pipeline.readers import read_index
from pipeline.synthetic import generate

pytestmark = pytest.mark.integration

EPOCHS = 3


@pytest.fixture
def two_node_cluster():
    """A head node and a worker node (more logical CPUs than cores: Train workers plus Ray Data)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
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
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{NAME_TAG}` = '{name}'")
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
