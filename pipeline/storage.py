"""Storage URIs: a local path, ``file://path`` or ``s3://bucket/prefix``, as pyarrow filesystems.

The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO or any S3-API
store) and credentials from the standard AWS chain. pyarrow's ``S3FileSystem()`` ignores
``AWS_ENDPOINT_URL``, so it is passed explicitly as ``endpoint_override``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from mltr.errors import ConfigError


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = s3_endpoint()
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


# pyarrow's messages for object-store failures a user fixes (endpoint, credentials, bucket).
_USER_S3_ERRORS = (
    "NETWORK_CONNECTION",
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "NO_SUCH_BUCKET",
)


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn an unreachable object store, refused credentials or a missing bucket into one line naming them."""
    try:
        yield
    except OSError as exc:
        text = str(exc)
        if uri.startswith("s3://") and any(code in text for code in _USER_S3_ERRORS):
            endpoint = s3_endpoint() or "the AWS default endpoint"
            raise ConfigError(
                f"{uri}: the object store at {endpoint} refused or could not be reached: {text}"
            ) from None
        raise


@dataclass(frozen=True)
class Location:
    """A resolved storage URI: a pyarrow filesystem and a path on it (no scheme)."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "s3" or "file"

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts)])
        return Location(self.fs, path, self.scheme)

    def exists(self) -> bool:
        with storage_errors(self.uri):
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        with storage_errors(self.uri):
            return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def is_file(self) -> bool:
        with storage_errors(self.uri):
            return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write a whole object. Local files appear atomically (temp file + rename); an S3 PUT is atomic."""
        parent = self.path.rsplit("/", 1)[0]
        if self.scheme == "file":
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        if self.exists():
            self.fs.delete_file(self.path)

    def makedirs(self) -> None:
        if self.scheme == "file":
            self.fs.create_dir(self.path, recursive=True)

    def list_files(self) -> list[str]:
        """Paths of all files below this location (recursive); empty if it does not exist."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        return sorted(
            info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File
        )


def resolve(uri: str) -> Location:
    """Turn a storage URI into a :class:`Location`."""
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise ConfigError(f"{uri!r}: an s3:// URI needs a bucket")
        return Location(_s3_filesystem(), path, "s3")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise ConfigError(f"{uri!r}: unsupported storage scheme (use a local path, file:// or s3://)")
    return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), "file")
