"""Conversion into a real S3-API server (moto in server mode on loopback) and reading it back."""

import json

import pyarrow.parquet as pq
import pytest
import s3fs

from jobs import preprocess
from jobs._config import from_flat
from pipeline.dataset import load_manifest, read_split
from pipeline.storage import resolve

pytestmark = pytest.mark.integration


def test_preprocess_to_s3_and_read_back(ray_local, s3_bucket, s3_server, synthetic_root):
    root, truth = synthetic_root("voc")
    out = f"s3://{s3_bucket}/datasets"
    config = from_flat(
        preprocess.PreprocessConfig,
        {"dataset": "voc", "root": str(root), "out": out, "rows_per_shard": 10, "max_side": 160},
    )
    result = preprocess.run(config)
    assert result["rows"] == {"train": len(truth.rows("train")), "val": len(truth.rows("val"))}

    # Read back over HTTP through s3fs, independently of the code that wrote it.
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    keys = fs.find(f"{s3_bucket}/datasets/voc")
    manifest = json.loads(fs.cat(f"{s3_bucket}/datasets/voc/_manifest.json"))
    listed = {
        f"{s3_bucket}/datasets/voc/{f['path']}" for s in manifest["splits"].values() for f in s["files"]
    }
    assert {k for k in keys if k.endswith(".parquet")} == listed
    with fs.open(sorted(listed)[0], "rb") as f:
        assert pq.read_table(f).schema.names == manifest["columns"]
    rejects_file = f"{s3_bucket}/datasets/voc/{manifest['rejects']['file']}"
    assert {k for k in keys if "_rejects" in k} == {rejects_file}  # the manifest names the only one
    rejects = [json.loads(line) for line in fs.cat(rejects_file).decode().splitlines()]
    assert not fs.exists(f"{s3_bucket}/datasets/voc/_lease.json")  # released
    assert {r["image_id"]: r["reason"] for r in rejects} == truth.rejects()

    # And through the library API the next stages use (pyarrow's S3 filesystem, Ray Data).
    uri = f"{out}/voc"
    rows = {r["image_id"]: r for r in read_split(uri, "val").take_all()}
    assert {i: (r["labels"], r["ignore"]) for i, r in rows.items()} == {
        im.image_id: (im.labels, im.ignore) for im in truth.rows("val")
    }
    assert load_manifest(uri).location.scheme == "s3"

    # A re-run into the same prefix leaves exactly one copy.
    preprocess.run(config)
    fs.invalidate_cache()
    parquet = [k for k in fs.find(f"{s3_bucket}/datasets/voc") if k.endswith(".parquet")]
    assert len(parquet) == len(listed) and set(parquet).isdisjoint(listed)
    assert read_split(uri, "train").count() == len(truth.rows("train"))


def test_storage_uri_resolution(aws_env):
    loc = resolve("s3://bucket/some/prefix/")
    assert (loc.scheme, loc.path, loc.uri) == ("s3", "bucket/some/prefix", "s3://bucket/some/prefix")
    assert loc.join("a", "b.parquet").uri == "s3://bucket/some/prefix/a/b.parquet"
    assert resolve("file:///tmp/x").path == "/tmp/x"
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        resolve("gs://bucket")
