"""A training run on an autoscaling cluster that starts smaller than the run: with
``--wait-for-resources`` it asks the autoscaler for what it needs, waits until the nodes are there,
and withdraws the request, so the nodes can leave once nothing uses them.

The cluster is Ray's fake multi-node autoscaler, the one Ray tests its autoscaler with: a
`ray start --head` whose autoscaler launches worker nodes as processes on this machine.
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
import uuid
from pathlib import Path

import pytest

from jobs._runtime import LOCAL_ONLY_ENV
from tests.conftest import free_port, ray_agent_ports
from tests.listeners import descendants, external_listeners

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[2]

# Ray's provider for tests (ray/autoscaler/_private/fake_multi_node): nodes are local processes.
PROVIDER = {
    "type": "fake_multinode",
    "use_node_id_as_ip": True,
    "disable_node_updaters": True,
    "disable_launch_config_check": True,
}
EMPTY = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
EMPTY += ("head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude")
EMPTY += ("rsync_filter",)


def nodes_alive(env: dict) -> int:
    script = "import ray; ray.init(log_to_driver=False); print('alive', sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("alive ")]
    return int(line.split()[1])


def head_failure(gcs: str, process: subprocess.Popen, log: Path, temp_dir: Path) -> str:
    """Why the head is not up, for the error: its exit status, the tail of `ray start`'s output
    and of its processes' error logs (the temporary folder is removed after the error)."""
    status = "still running" if process.poll() is None else f"exited with status {process.returncode}"
    parts = [
        f"the autoscaling head did not start at {gcs} ({status})",
        f"ray start: {log.read_text()[-2000:]}",
    ]
    for err in sorted(temp_dir.glob("session_latest/logs/*.err")):
        text = err.read_text(errors="replace").strip()
        if text:
            parts.append(f"{err.name}: {text[-1000:]}")
    return "\n".join(parts)


@pytest.fixture
def autoscaling_head(tmp_path):
    """A head of 1 CPU whose autoscaler may add up to two nodes of 2 CPUs, removing idle ones after 6 s."""
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs = f"127.0.0.1:{free_port()}"
    config = {
        "cluster_name": f"mltr-{uuid.uuid4().hex[:6]}",
        "max_workers": 2,
        "provider": {**PROVIDER, "gcs_address": gcs},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu2": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in EMPTY},
    }
    (tmp_path / "autoscaler.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        LOCAL_ONLY_ENV: "0",  # every node, the autoscaler's included, on loopback
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "head.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={gcs.rsplit(':', 1)[1]}", "--num-cpus=1"]
            + ["--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
            + [f"--autoscaling-config={tmp_path / 'autoscaler.json'}", "--disable-usage-stats", *ray_agent_ports()],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    env = {**env, "RAY_ADDRESS": gcs}
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if nodes_alive(env) == 1:
                    break
            except (ValueError, subprocess.TimeoutExpired):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(head_failure(gcs, process, log, Path(temp_dir)))
            time.sleep(1)
        yield env, process
    finally:
        tree = descendants(process.pid)  # the autoscaler's nodes among them
        with contextlib.suppress(ProcessLookupError):  # a head that exited left no group to signal
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in tree - {process.pid}:  # whatever outlived the process group's SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


# `mltr train` as run() runs it, but stopped where training would begin: the run has started
# (resources waited for, datasets planned, its MLflow run open), and holds on past the autoscaler's
# idle timeout, as a slower start would, before it prints the cluster's resources.
START = """
import json, sys, time
import ray
from jobs import train
from jobs._config import parse_config
from jobs._runtime import setup_logging

class Started(Exception):
    pass

def instead_of_training(train_run, **kwargs):
    time.sleep(10)
    print("resources", json.dumps(ray.cluster_resources()), flush=True)
    raise Started

setup_logging()
train.build_trainer = instead_of_training
try:
    train.run(parse_config(train.TrainConfig, sys.argv[1:], job="train"))
except Started:
    pass
"""


def test_a_run_waits_for_the_autoscaler_to_add_what_it_needs_then_lets_it_go(
    autoscaling_head, demo_coco, tmp_path
):
    env, head = autoscaling_head
    # 2 workers of 1 CPU, 1 decode actor, 1 CPU for evaluation: 4 CPUs, on a cluster of 1.
    flags = ["--data", demo_coco, "--num-workers", "2", "--decode-actors", "1", "--workdir", str(tmp_path)]
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.train", *flags],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (
        "the cluster has 1 CPUs" in refused.stderr and "pass --wait-for-resources SECONDS" in refused.stderr
    )

    started = subprocess.run(
        [sys.executable, "-c", START, *flags, "--wait-for-resources", "240"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-3000:]
    assert "waiting up to 240s for its autoscaler" in started.stderr
    # Added by the autoscaler (2-CPU nodes), and kept while the run held its request.
    (line,) = [line for line in started.stdout.splitlines() if line.startswith("resources ")]
    resources = json.loads(line.split(" ", 1)[1])
    assert resources["CPU"] >= 4, resources
    assert external_listeners(head.pid) == set()

    # The run withdrew its request when it ended: with nothing running, the nodes leave.
    deadline = time.monotonic() + 120
    while nodes_alive(env) > 1:
        assert time.monotonic() < deadline, "the autoscaler kept the nodes after the run"
        time.sleep(2)
