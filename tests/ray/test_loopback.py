"""Every server the tests and the jobs start listens on the loopback address only."""

import os
import subprocess
import sys

import pytest

from tests.listeners import descendants, external_listeners, listeners

pytestmark = pytest.mark.ray


def test_the_session_ray_and_every_server_the_tests_started_listen_on_loopback_only(ray_local):
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    assert len(listeners(descendants(os.getpid()))) > 3  # GCS, raylet, dashboard, ... are there
    assert external_listeners(os.getpid()) == set()


def test_a_jobs_own_local_ray_listens_on_loopback_only():
    """What `python -m jobs.train` (no --address) starts: checked from inside that process."""
    script = (
        "import os, sys, ray; sys.path.insert(0, os.getcwd()); "
        "from jobs._runtime import init_ray; from tests.listeners import external_listeners; "
        "init_ray(num_cpus=1, log_to_driver=False); "
        "ray.get(ray.remote(lambda: 1).remote()); "
        "print('node', ray.util.get_node_ip_address(), 'dashboard', ray.get_runtime_context().gcs_address); "
        "print('external', sorted(external_listeners(os.getpid())))"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "node 127.0.0.1" in proc.stdout and "external []" in proc.stdout, proc.stdout
