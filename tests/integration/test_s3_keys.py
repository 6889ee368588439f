"""The object-store keys infra/ makes reach their own bucket, and only it.

``infra/compose.yaml``'s ``createbuckets`` gives the cluster's key and the MLflow server's key the
policies in ``infra/minio/``. Here an S3-API server that enforces IAM policies (moto in server
mode, its authorisation switched on once the buckets and keys exist) holds both buckets and both
keys, with those very policy documents; the project's storage code (pyarrow, s3fs) goes through
the cluster's key and MLflow's S3 artifact store (what the tracking server runs) through the
server's.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mltr.errors import ConfigError
from pipeline.storage import Lease, resolve
from tests.conftest import free_port, moto_server

pytestmark = pytest.mark.integration

POLICIES = Path(__file__).resolve().parents[2] / "infra" / "minio"
# Each key of infra/compose.yaml: its policy file and the bucket it is for.
KEYS = {"cluster": ("mltr-cluster.json", "mltr"), "mlflow": ("mltr-mlflow.json", "mlflow")}


@pytest.fixture(scope="module")
def policed_s3(tmp_path_factory):
    """An S3-API server of its own (the session's accepts any key) with the buckets ``mltr`` and
    ``mlflow`` and one key per policy in infra/minio/; every request after setting them up is
    checked against the policies. Yields the endpoint and ``{name: (key id, secret)}``."""
    import boto3

    with moto_server(free_port(), tmp_path_factory.mktemp("moto-iam")) as endpoint:
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        admin |= {"aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        keys = {}
        for name, (policy, bucket) in KEYS.items():
            s3.create_bucket(Bucket=bucket)
            iam.create_user(UserName=name)
            document = (POLICIES / policy).read_text()
            iam.put_user_policy(UserName=name, PolicyName=policy, PolicyDocument=document)
            key = iam.create_access_key(UserName=name)["AccessKey"]
            keys[name] = (key["AccessKeyId"], key["SecretAccessKey"])
        # From here on, every request is authenticated and checked against the user's policies.
        urllib.request.urlopen(
            urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth",
                data=b"0",
                method="POST",
                headers={"Content-Type": "text/plain"},
            ),
            timeout=10,
        )
        yield endpoint, keys


def use_key(monkeypatch, endpoint: str, key: tuple[str, str]) -> None:
    """This process's S3 settings: the policed server and ``key`` (pyarrow and s3fs read them)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key[1])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def what_the_jobs_do(bucket: str, work: Path) -> None:
    """The kinds of object-store calls the stages make under ``s3://bucket``: whole objects (the
    manifest), a lease marker created exclusively (conditional PUT), listing, Parquet shards, a
    checkpoint folder copied up with a multipart upload (as Ray Train copies one), deleting."""
    base = resolve(f"s3://{bucket}/keys-check")
    manifest = base.join("ds", "_manifest.json")
    manifest.write_text('{"rows": 1}')
    assert manifest.read_text() == '{"rows": 1}' and manifest.is_file() and base.join("ds").is_dir()
    with Lease(base.join("ds"), "a keys check", ttl=60):
        assert base.join("ds", Lease.FILE).exists()
    assert not base.join("ds", Lease.FILE).exists()
    pq.write_table(
        pa.table({"image_id": [1, 2]}), f"{base.path}/ds/train/shard-0.parquet", filesystem=base.fs
    )
    assert pq.read_table(f"{base.path}/ds/train/shard-0.parquet", filesystem=base.fs)[
        "image_id"
    ].to_pylist() == [1, 2]
    checkpoint = work / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "model.pt").write_bytes(b"\0" * (12 * 2**20))  # past pyarrow's 10 MiB part size
    pafs.copy_files(str(checkpoint), f"{base.path}/ckpt", destination_filesystem=base.fs)
    assert base.fs.get_file_info(f"{base.path}/ckpt/model.pt").size == 12 * 2**20
    for path in base.list_files():
        resolve(f"s3://{path}").delete()
    assert base.list_files() == []


def test_the_clusters_key_does_what_the_jobs_do_in_its_bucket_and_nothing_in_the_artifacts(
    policed_s3, monkeypatch, tmp_path
):
    endpoint, keys = policed_s3
    use_key(monkeypatch, endpoint, keys["cluster"])
    what_the_jobs_do("mltr", tmp_path)
    # The registry's artifacts are out of its reach: neither read, listed, written nor leased.
    with pytest.raises(ConfigError, match=r"s3://mlflow/artifacts/model.pt: .* refused .*ACCESS_DENIED"):
        resolve("s3://mlflow/artifacts/model.pt").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"s3://mlflow/artifacts: .* refused .*ACCESS_DENIED"):
        resolve("s3://mlflow/artifacts").list_files()
    refused = r"s3://mlflow/artifacts/_lease.json: the object store at \S+ refused .*Access Denied"
    # The lease's exclusive create goes through s3fs: its refusal is named as pyarrow's are.
    with pytest.raises(ConfigError, match=refused), Lease(resolve("s3://mlflow/artifacts"), "a keys check"):
        pass


def test_the_mlflow_servers_key_stores_artifacts_and_reaches_nothing_else(policed_s3, monkeypatch, tmp_path):
    from boto3.exceptions import S3UploadFailedError
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    endpoint, keys = policed_s3
    use_key(monkeypatch, endpoint, keys["mlflow"])
    model = tmp_path / "MLmodel"
    model.write_text("flavors: {}\n")
    # What `mlflow server --artifacts-destination s3://mlflow/artifacts` runs for a client's upload,
    # listing and download.
    repo = S3ArtifactRepository("s3://mlflow/artifacts/1/models/m-1/artifacts")
    repo.log_artifact(str(model))
    assert [f.path for f in repo.list_artifacts()] == ["MLmodel"]
    (tmp_path / "back").mkdir()
    got = repo.download_artifacts("MLmodel", dst_path=str(tmp_path / "back"))
    assert Path(got).read_text() == "flavors: {}\n"
    repo.delete_artifacts()
    assert repo.list_artifacts() == []
    # The cluster's datasets and checkpoints are out of its reach.
    elsewhere = S3ArtifactRepository("s3://mltr/datasets")
    with pytest.raises(S3UploadFailedError, match="AccessDenied"):
        elsewhere.log_artifact(str(model))
    with pytest.raises(MlflowException, match="s3://mltr/datasets: Access Denied"):
        elsewhere.list_artifacts()
    with pytest.raises(ConfigError, match="ACCESS_DENIED"):
        resolve("s3://mltr/datasets/coco/_manifest.json").read_bytes()


def test_each_policy_names_one_bucket_of_compose():
    compose = (POLICIES.parent / "compose.yaml").read_text()
    for policy, bucket in KEYS.values():
        document = json.loads((POLICIES / policy).read_text())
        resources = {r for s in document["Statement"] for r in s["Resource"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, policy
        assert f"local/{bucket}" in compose and f"/policies/{policy}" in compose, policy
