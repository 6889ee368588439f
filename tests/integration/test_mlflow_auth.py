"""infra/'s MLflow server as compose runs it: `mlflow server --app-name basic-auth` with
infra/mlflow-auth.ini, installed from `mltr[server]`. The environment's admin creates the
cluster's user as infra/README does. Clients sign in through MLflow's standard variables: the
project's reachability check, a tracked run and the registry work, and a stranger is refused."""

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from mltr import tracking
from tests.conftest import free_port, wait_for_http

pytestmark = [
    pytest.mark.integration,
    # mlflow.server (get_app_client, as infra/README calls it) imports Starlette's deprecated WSGI middleware.
    pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def auth_server(tmp_path):
    # The compose file mounts the ini as it is; only its database lives on a volume there.
    ini = (REPO / "infra" / "mlflow-auth.ini").read_text()
    assert "database_uri = sqlite:////var/lib/mlflow-auth/basic_auth.db" in ini
    config = tmp_path / "basic_auth.ini"
    config.write_text(ini.replace("/var/lib/mlflow-auth/", f"{tmp_path}/"))
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # as compose sets it
    }
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [mlflow, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(
            f"{uri}/health",
            proc,
            90,
            lambda: f"the server did not start: {(tmp_path / 'server.log').read_text()[-3000:]}",
        )
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_infras_basic_auth_server_serves_its_users_and_refuses_strangers(auth_server, monkeypatch):
    uri = auth_server
    with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401

    # infra/README: the admin makes the cluster's user.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-password-1")
    get_app_client("basic-auth", tracking_uri=uri).create_user("mltr-cluster", "cluster-password-1")

    # The jobs' way in, as that user: the reachability check, an experiment, a run, the registry.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "mltr-cluster")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "cluster-password-1")
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, "mltr", None)
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "val_mAP", 0.5)
    client.create_registered_model("mltr-coco")
    assert client.get_run(run.info.run_id).data.metrics == {"val_mAP": 0.5}

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(uri).get_experiment(experiment_id)
