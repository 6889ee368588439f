"""Shared fixtures: generated datasets, a local Ray, a real S3-API server (moto) on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.synthetic import generate


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, why) -> None:
    """Wait until ``url`` answers; if ``proc`` exits or ``timeout`` passes, kill it and raise ``why()``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(why()) from None
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_agent_ports() -> list[str]:
    """Ports of a node's own agents, free ones: Ray's defaults (52365 for the dashboard agent, which
    serves the job API's submissions) are taken by any other Ray on this machine, such as the
    session's local Ray, and a node whose agent cannot bind them accepts no job."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


@pytest.fixture(scope="session")
def _mlflow_store_template(tmp_path_factory) -> Path:
    """An empty embedded MLflow store, made once: MLflow builds a new one by running every schema
    migration (~2 s of CPU), which tests about runs and models need not each pay."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture
def sqlite_store(_mlflow_store_template, tmp_path) -> str:
    """The URI of a new, empty embedded MLflow store at ``tmp_path / "mlflow.db"`` (a copy of one
    made once a session). Tests of how a store is created make theirs themselves."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_store_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def aws_env():
    """Static test credentials and a loopback S3 endpoint, set before any Ray worker starts."""
    port = free_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def moto_server(port: int, folder: Path) -> Iterator[str]:
    """A moto S3-API server (server mode) on 127.0.0.1:``port``, logging to ``folder/moto.log``,
    for the block: its endpoint."""
    endpoint = f"http://127.0.0.1:{port}"
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    with open(folder / "moto.log", "wb") as log:
        proc = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_http(
                f"{endpoint}/moto-api/", proc, 30, lambda: f"moto_server did not start on {endpoint}"
            )
            yield endpoint
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(aws_env, tmp_path_factory):
    """A real S3-API server (moto in server mode) on loopback, reached over HTTP."""
    port = int(aws_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with moto_server(port, tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the S3-API server, created through s3fs; yields its name."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    name = f"test-{time.time_ns()}"
    fs.mkdir(name)
    yield name


@pytest.fixture(scope="session")
def ray_local(aws_env):
    """One local Ray for the session, with more logical CPUs than this machine's cores.

    Started the way a job starts its own (``jobs._runtime.init_ray``): a new instance, on the
    loopback address only, its dashboard on 127.0.0.1 (Train cleans up dead runs through it).
    """
    import ray

    from jobs._runtime import init_ray

    init_ray(num_cpus=4, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Build (once per session) a generated dataset with faults: synthetic_root(fmt, layout) -> (root, truth)."""
    cache: dict = {}

    def make(fmt: str, layout: str = "official", images: int = 48, seed: int = 7):
        key = (fmt, layout, images, seed)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{fmt}-{layout}")
            cache[key] = (root, generate(fmt, root, images, seed=seed, faults=True, layout=layout))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def postgres_db(tmp_path_factory):
    """A fresh PostgreSQL database for the session, as a SQLAlchemy URI; dropped at the end.

    On the PostgreSQL server at 127.0.0.1:5432 (trust auth) when one answers there, else on a
    throwaway server from the ``pgserver`` package (a Unix socket in a temporary folder), so the
    suite passes on a machine without PostgreSQL too.
    """
    import psycopg

    name = f"mltr_test_{os.getpid()}_{time.time_ns()}"
    try:
        admin = psycopg.connect(
            host="127.0.0.1", port=5432, dbname="test", connect_timeout=3, autocommit=True
        )
    except psycopg.OperationalError:
        admin = None
    if admin is not None:
        user = admin.info.user
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        return
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgserver") / "data", cleanup_mode="stop")
    server.psql(f'CREATE DATABASE "{name}";')
    yield server.get_uri(name)
    server.cleanup()


@pytest.fixture(scope="session")
def demo_coco(ray_local, tmp_path_factory) -> str:
    """The demo's kind of COCO-layout dataset (600 images, 12 learnable classes, faulty files), as
    Parquet: its dataset URI. Shared by the session; a test that changes it puts it back."""
    from pipeline.convert import convert
    from pipeline.readers import read_index
    from pipeline.synthetic import DEMO_CLASSES

    root = tmp_path_factory.mktemp("demo-coco")
    generate("coco", root / "src", 600, seed=1, faults=True, classes=DEMO_CLASSES)
    convert(read_index("coco", str(root / "src")), str(root / "ds"), rows_per_shard=64)
    return str(root / "ds" / "coco")


@pytest.fixture(scope="session")
def mlflow_server(s3_server, postgres_db, tmp_path_factory):
    """A real `mlflow server` process as a team runs it: a PostgreSQL backend store (trials of a
    sweep write at once), artifacts proxied into the S3-API server."""
    import s3fs

    bucket = "mlflow-artifacts"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    # Without MLflow's job runner, as infra/compose.yaml runs the server (mltr uses none of the GenAI
    # features it serves): 8 fewer processes, and ~20 s less CPU to start on a 2-core VM.
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(folder / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--backend-store-uri",
            postgres_db,
            "--artifacts-destination",
            f"s3://{bucket}/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(
        f"{uri}/health",
        proc,
        90,
        lambda: f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}",
    )
    yield {"uri": uri, "bucket": bucket}
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture(scope="session")
def s3_sweep(ray_local, s3_server, mlflow_server, tmp_path_factory) -> dict:
    """`mltr tune` of a 2 x 2 grid (window 2, 4 x loss bce, asl; 1 epoch) on a dataset in the S3-API
    server, trials' checkpoints in S3, tracked by the real mlflow server: two trials at a time (one
    Train worker each), so two write to the PostgreSQL-backed server at once. Trials are expensive:
    the sweep tests and the registry tests (whose "real run" is its best trial) share one sweep."""
    import json

    import s3fs

    from pipeline.convert import convert
    from pipeline.readers import read_index
    from pipeline.synthetic import DEMO_CLASSES

    tmp = tmp_path_factory.mktemp("s3-sweep")
    bucket = f"sweep-{time.time_ns()}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    generate("coco", tmp / "src", 240, seed=3, faults=True, classes=DEMO_CLASSES)
    convert(read_index("coco", str(tmp / "src")), f"s3://{bucket}/datasets", rows_per_shard=64)
    data = f"s3://{bucket}/datasets/coco"
    command = [
        sys.executable, "-m", "jobs.tune", "--config", "tiny", "--data", data,
        "--window-sizes", "2,4", "--losses", "bce,asl", "--lrs", "5e-4", "--epochs", "1", "--scheduler", "fifo",
        "--workers-per-trial", "1", "--decode-actors", "1", "--max-concurrent-trials", "2",
        "--storage", f"s3://{bucket}/sweeps", "--name", "grid",
        "--mlflow-uri", mlflow_server["uri"], "--experiment", "sweeps", "--workdir", str(tmp / "work"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the S3 settings included
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    summary = json.loads(last) if proc.returncode == 0 and last.startswith("{") else None
    return {"proc": proc, "summary": summary, "bucket": bucket, "data": data, "src": str(tmp / "src")}
