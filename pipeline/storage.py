"""Storage URIs: a local path, ``file://path`` or ``s3://bucket/prefix``, as pyarrow filesystems.

The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO or any S3-API
store) and credentials from the standard AWS chain. pyarrow's ``S3FileSystem()`` ignores
``AWS_ENDPOINT_URL``, so it is passed explicitly as ``endpoint_override``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from mltr.errors import ConfigError
from mltr.paths import fsync, local_path, replace_durably

log = logging.getLogger(__name__)


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
        # pyarrow names the S3 error code; s3fs (the exclusive creates) raises PermissionError for
        # AccessDenied, InvalidAccessKeyId, ExpiredToken and the like, and says only "Access Denied".
        refused = isinstance(exc, PermissionError) or any(code in text for code in _USER_S3_ERRORS)
        if uri.startswith("s3://") and refused:
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
        with storage_errors(self.uri), self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write a whole object. Local files appear atomically and durably (temp file, synced, then
        renamed); an S3 PUT is atomic."""
        with storage_errors(self.uri):
            self._write_bytes(data)

    def _write_bytes(self, data: bytes) -> None:
        parent = self.path.rsplit("/", 1)[0]
        if self.scheme == "file":
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            replace_durably(tmp, self.path)
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
        with storage_errors(self.uri):
            infos = self.fs.get_file_info(selector)
        return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def resolve(uri: str) -> Location:
    """Turn a storage URI into a :class:`Location`."""
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise ConfigError(f"{uri!r}: an s3:// URI needs a bucket")
        return Location(_s3_filesystem(), path, "s3")
    if uri.startswith("file://"):
        uri = local_path(uri)
    elif "://" in uri:
        raise ConfigError(f"{uri!r}: unsupported storage scheme (use a local path, file:// or s3://)")
    return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), "file")


def _create_exclusive(location: Location, data: bytes) -> bool:
    """Write ``data`` only if nothing is at ``location``; returns whether it was written (atomic).

    Local files: ``O_CREAT | O_EXCL``. S3: a conditional PUT (``If-None-Match: *``) through s3fs.
    """
    if location.scheme == "file":
        os.makedirs(os.path.dirname(location.path), exist_ok=True)
        try:
            fd = os.open(location.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync(os.path.dirname(location.path))
        return True
    import s3fs

    endpoint = s3_endpoint()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {})
    try:
        with storage_errors(location.uri):
            fs.pipe_file(location.path, data, mode="create")
    except FileExistsError:
        return False
    return True


MAX_CLAIMS = 32  # takeover claims tried for one stale marker


class LeaseHeld(ConfigError):
    """Another live process holds the lease."""


class LeaseLost(ConfigError):
    """This holder's lease was taken over (it went stale): what it did must not be committed."""


class Lease:
    """An exclusive, self-expiring claim on a storage location, held for a block: ``with Lease(loc, ...):``.

    The marker (``<location>/_lease.json``) records its holder (host, pid), purpose and start time,
    and is refreshed every ``ttl / 4`` seconds by a background thread. Another process asking for it
    is refused with :class:`LeaseHeld` naming the holder, unless the lease is stale: not refreshed
    for ``ttl`` seconds, or held by a process of this host that no longer exists. A stale lease is
    taken over by one taker only: each first creates a claim named after the stale marker's
    contents (``_lease.takeover-<digest>.json``, created exclusively, as the marker is), and only
    the one that created it writes the marker. A refresh that fails (the store unreachable for a
    moment) is retried at the next period; a holder whose marker another took over is told by
    :meth:`check`, which the caller runs before it commits. The marker is removed on leaving the
    block, if it is still ours.
    """

    FILE = "_lease.json"

    def __init__(
        self, location: Location, purpose: str, ttl: float = 600.0, wait: float = 0.0, poll: float = 5.0
    ):
        self.location = location
        self.wait = wait  # seconds to wait for a live holder to leave (or go stale) before refusing
        self.poll = poll
        self.marker = location.join(self.FILE)
        self.purpose = purpose
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._claim: Location | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "holder": f"{socket.gethostname()}:{os.getpid()}",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "purpose": self.purpose,
                "started_at": self.started_at,
                "refreshed_at": time.time(),
                "ttl_s": self.ttl,
                "token": self.token,
            }
        ).encode()

    def _raw(self) -> bytes | None:
        try:
            return self.marker.read_bytes()
        except FileNotFoundError:
            return None

    def _holder(self, raw: bytes | None = None) -> dict | None:
        try:
            record = json.loads(self._raw() if raw is None else raw)
        except (TypeError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def _stale(self, holder: dict) -> bool:
        if time.time() - float(holder.get("refreshed_at", 0)) > float(holder.get("ttl_s", self.ttl)):
            return True
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError):
                pass
        return False

    def __enter__(self) -> Lease:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self._acquire()
                break
            except LeaseHeld as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.info(
                    "%s; waiting up to %.0f s more", str(exc).removesuffix(" Wait for it to finish."), left
                )
                time.sleep(min(self.poll, left))
        self._thread = threading.Thread(target=self._refresh, name="lease-refresh", daemon=True)
        self._thread.start()
        return self

    def _acquire(self) -> None:
        if not _create_exclusive(self.marker, self._record()):
            raw = self._raw()
            holder = self._holder(raw)
            if holder is not None and not self._stale(holder):
                age = time.time() - float(holder.get("refreshed_at", 0))
                raise LeaseHeld(
                    f"{self.marker.uri.rsplit('/', 1)[0]} is in use: {holder.get('purpose', 'a job')} by "
                    f"{holder.get('holder', '?')} since {holder.get('started_at', '?')} (lease refreshed "
                    f"{age:.0f} s ago; taken over once stale for {holder.get('ttl_s', self.ttl):g} s, or if that "
                    f"process is gone). Wait for it to finish."
                )
            if raw is not None:
                self._take_over(raw, holder)
            elif not _create_exclusive(self.marker, self._record()):  # released meanwhile; taken again
                raise LeaseHeld(f"{self.marker.uri}: another process took the lease as it was released")

    def _take_over(self, raw: bytes, holder: dict | None) -> None:
        """Replace the stale marker ``raw``, if this process is the one that claims it.

        Claims are numbered: a claim whose taker died before it wrote the marker goes stale as a
        marker does, and the next taker creates the next number (exclusively: one wins), so a
        crashed taker cannot block the lease for good. Nothing is deleted but by its owner."""
        digest = hashlib.sha256(raw).hexdigest()[:16]
        taken = f"{self.marker.uri}: another process took over the stale lease first"
        abandoned: list[Location] = []
        for number in range(MAX_CLAIMS):
            claim = self.location.join(f"_lease.takeover-{digest}{f'-{number}' if number else ''}.json")
            if _create_exclusive(claim, self._record()):
                break
            try:
                other = self._holder(claim.read_bytes())
            except FileNotFoundError:  # its owner took the lease and released it meanwhile
                raise LeaseHeld(taken) from None
            if other is not None and not self._stale(other):
                raise LeaseHeld(taken)
            abandoned.append(claim)
        else:
            raise LeaseHeld(f"{self.marker.uri}: {MAX_CLAIMS} abandoned takeover claims; remove them")
        self._claim = claim
        if self._raw() != raw:  # replaced since it was read (a taker that already left): not stale
            raise LeaseHeld(taken)
        log.warning(
            "taking over the stale lease %s held by %s", self.marker.uri, (holder or {}).get("holder")
        )
        self.marker.write_bytes(self._record())
        for old in abandoned:  # named after a marker that is gone: nobody reads them again
            with contextlib.suppress(Exception):  # left behind, harmless
                old.delete()

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self._holder()
                if (current or {}).get("token") != self.token:
                    self._lost = (
                        f"{self.marker.uri}: the lease is held by {(current or {}).get('holder')} now"
                    )
                    log.error("lost the lease %s to another process", self.marker.uri)
                    return
                self.marker.write_bytes(self._record())
            except Exception as exc:  # the store unreachable for a moment: try again next period
                log.warning("could not refresh the lease %s: %s", self.marker.uri, exc)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this holder's token is still the marker's."""
        current = self._holder()
        if self._lost or (current or {}).get("token") != self.token:
            raise LeaseLost(
                (self._lost or f"{self.marker.uri}: the lease is held by {(current or {}).get('holder')} now")
                + ": another process took it over while this one ran (it looked stale); nothing was committed"
            )

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._holder() or {}).get("token") == self.token:
                self.marker.delete()
                if self._claim is not None:
                    self._claim.delete()
        except Exception as exc:  # the block's own error, if any, is the one to see; the lease goes stale
            log.warning("could not release the lease %s (it expires by itself): %s", self.marker.uri, exc)
