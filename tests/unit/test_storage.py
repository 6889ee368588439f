"""Storage leases: one holder at a time, named when refused, taken over when stale, released on exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.storage import Lease, LeaseHeld, LeaseLost, Location, resolve

pytestmark = pytest.mark.unit


def marker(tmp_path) -> dict:
    return json.loads((tmp_path / "ds" / Lease.FILE).read_text())


def test_a_held_lease_refuses_a_second_holder_naming_the_first(tmp_path):
    location = resolve(str(tmp_path / "ds"))
    with Lease(location, "converting coco from /data/coco"):
        holder = marker(tmp_path)
        with pytest.raises(LeaseHeld) as info, Lease(location, "converting coco from /elsewhere"):
            pass
        message = str(info.value)
        assert "converting coco from /data/coco" in message and holder["holder"] in message
        assert holder["started_at"] in message
    assert not (tmp_path / "ds" / Lease.FILE).exists()  # released
    with Lease(location, "a later conversion"):  # and free again
        pass


def test_a_lease_of_a_process_that_is_gone_is_taken_over(tmp_path):
    location = resolve(str(tmp_path / "ds"))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    with Lease(location, "first"):
        record = marker(tmp_path)
    (tmp_path / "ds" / Lease.FILE).write_text(json.dumps({**record, "pid": dead_pid, "token": "theirs"}))
    with Lease(location, "second") as lease:
        assert marker(tmp_path)["token"] == lease.token and marker(tmp_path)["purpose"] == "second"


def stale_marker() -> dict:
    """A lease of another host's process ("first"), last refreshed 30 s ago with a 10 s ttl."""
    return {"holder": "elsewhere:1", "host": "elsewhere", "pid": 1, "purpose": "first", "started_at": "t",
            "refreshed_at": time.time() - 30, "ttl_s": 10, "token": "theirs"}  # fmt: skip


def test_a_lease_not_refreshed_within_its_ttl_is_taken_over(tmp_path):
    location = resolve(str(tmp_path / "ds"))
    (tmp_path / "ds").mkdir()
    other_host = stale_marker()
    (tmp_path / "ds" / Lease.FILE).write_text(json.dumps(other_host))
    with Lease(location, "second") as lease:
        assert marker(tmp_path)["token"] == lease.token
    (tmp_path / "ds" / Lease.FILE).write_text(json.dumps({**other_host, "refreshed_at": time.time()}))
    with pytest.raises(LeaseHeld, match="first by elsewhere:1"), Lease(location, "third"):
        pass


def test_a_held_lease_is_refreshed_and_not_removed_once_lost(tmp_path):
    location = resolve(str(tmp_path / "ds"))
    with Lease(location, "long", ttl=0.4) as lease:
        first = marker(tmp_path)["refreshed_at"]
        time.sleep(0.35)
        assert marker(tmp_path)["refreshed_at"] > first  # refreshed every ttl / 4
        # Another process took it over (this one looked dead): leaving must not remove theirs.
        (tmp_path / "ds" / Lease.FILE).write_text(json.dumps({**marker(tmp_path), "token": "theirs"}))
        assert lease.token != "theirs"
        with pytest.raises(
            LeaseLost, match="nothing was committed"
        ):  # what the holder checks before it commits
            lease.check()
        time.sleep(0.15)
        with pytest.raises(LeaseLost):  # and its refresher saw it too, and stopped writing
            lease.check()
        assert marker(tmp_path)["token"] == "theirs"
    assert marker(tmp_path)["token"] == "theirs"


def test_of_two_takers_of_one_stale_lease_only_one_takes_it(tmp_path):
    location = resolve(str(tmp_path / "ds"))
    (tmp_path / "ds").mkdir()
    stale = stale_marker()
    (tmp_path / "ds" / Lease.FILE).write_text(json.dumps(stale))
    raw = (tmp_path / "ds" / Lease.FILE).read_bytes()
    # Both found it stale; the first takes it over and holds it; the second, slower, comes after.
    with Lease(location, "first taker") as first:
        second = Lease(location, "second taker")
        with pytest.raises(LeaseHeld, match="took over the stale lease first"):
            second._take_over(raw, stale)
        assert marker(tmp_path)["token"] == first.token
        first.check()
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == []  # the marker and the claim are gone


def test_a_takeover_claim_left_by_a_taker_that_died_does_not_block_the_lease_for_good(tmp_path):
    import hashlib

    location = resolve(str(tmp_path / "ds"))
    (tmp_path / "ds").mkdir()
    stale = json.dumps(stale_marker())
    (tmp_path / "ds" / Lease.FILE).write_text(stale)
    digest = hashlib.sha256(stale.encode()).hexdigest()[:16]
    claim = tmp_path / "ds" / f"_lease.takeover-{digest}.json"
    # A taker claimed the stale marker, then died before it wrote its own marker.
    claim.write_text(json.dumps({**stale_marker(), "purpose": "a taker that died", "token": "dead"}))
    with Lease(location, "next") as lease:
        assert marker(tmp_path)["token"] == lease.token
        assert not claim.exists()  # named after a marker that is gone: removed
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == []
    # A live taker's claim still wins: the second is refused.
    (tmp_path / "ds" / Lease.FILE).write_text(stale)  # the same stale marker again
    claim.write_text(json.dumps({**stale_marker(), "refreshed_at": time.time(), "token": "alive"}))
    with pytest.raises(LeaseHeld, match="took over the stale lease first"), Lease(location, "late"):
        pass


def test_a_lease_asked_to_wait_gets_it_once_the_holder_leaves(tmp_path):
    import threading

    location = resolve(str(tmp_path / "ds"))
    with (
        Lease(location, "first"),
        pytest.raises(LeaseHeld, match="is in use"),
        Lease(location, "impatient", wait=0.3, poll=0.1),
    ):
        pass  # the holder stays past the wait: refused, as without one
    holder = Lease(location, "first again").__enter__()
    threading.Timer(0.4, holder.__exit__, (None, None, None)).start()
    started = time.monotonic()
    with Lease(location, "patient", wait=10, poll=0.1) as lease:
        assert marker(tmp_path)["token"] == lease.token and 0.3 < time.monotonic() - started < 5


def test_a_refresh_that_fails_is_tried_again(tmp_path, monkeypatch):
    location = resolve(str(tmp_path / "ds"))
    write, failures = Location.write_bytes, []

    def flaky(self, data):
        if self.path.endswith(Lease.FILE) and not failures:
            failures.append(1)
            raise OSError("the store did not answer")
        write(self, data)

    with Lease(location, "long", ttl=0.4) as lease:
        first = marker(tmp_path)["refreshed_at"]
        monkeypatch.setattr(Location, "write_bytes", flaky)
        time.sleep(0.35)  # three periods: one failed write, then refreshes again
        assert failures and marker(tmp_path)["refreshed_at"] > first
        lease.check()


def test_file_uris_name_the_local_paths_they_encode(tmp_path):
    from mltr.errors import ConfigError

    folder = tmp_path / "my data"
    folder.mkdir()
    assert folder.as_uri().endswith("/my%20data")
    for uri in (folder.as_uri(), f"file://localhost{folder}", str(folder)):
        location = resolve(uri)
        assert location.path == str(folder) and location.is_dir(), uri
    with pytest.raises(ConfigError, match="not one on host 'elsewhere'"):
        resolve("file://elsewhere/data")


def test_a_release_that_fails_does_not_hide_the_blocks_own_error(tmp_path, monkeypatch):
    location = resolve(str(tmp_path / "ds"))

    def unreachable(self):
        raise OSError("the store did not answer")

    with pytest.raises(ValueError, match="the conversion's own error"), Lease(location, "x"):
        monkeypatch.setattr(Location, "read_bytes", unreachable)
        raise ValueError("the conversion's own error")


def test_a_store_that_cannot_be_reached_mid_run_is_named_in_one_line(monkeypatch):
    from mltr.errors import ConfigError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    location = resolve("s3://bucket/datasets/coco")
    for call in (location.join("_manifest.json").read_bytes, location.list_files):
        with pytest.raises(
            ConfigError, match=r"^s3://bucket/datasets/coco.*: the object store at http://127.0.0.1:1"
        ):
            call()
    with pytest.raises(ConfigError, match="the object store at http://127.0.0.1:1"):
        location.join("_lease.json").write_bytes(b"{}")


@pytest.fixture
def disk_events(monkeypatch):
    """What reached the disk, in order: ``("fsync", path)`` and ``("replace", src, dst)``."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_replaced_durably(events, target):
    """``target`` was renamed into place from a file synced before, and its folder synced after."""
    target = os.path.realpath(target)
    (at,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == target]
    assert ("fsync", events[at][1]) in events[:at], f"{target}: renamed before its contents were synced"
    assert ("fsync", os.path.dirname(target)) in events[at + 1 :], f"{target}: the rename was not synced"


def test_local_commits_reach_the_disk_before_they_are_visible(tmp_path, disk_events):
    from jobs.predict import json_lines
    from mltr import create_model
    from mltr.checkpoint import save_checkpoint

    resolve(str(tmp_path / "ds")).join("_manifest.json").write_text("{}")
    assert_replaced_durably(disk_events, tmp_path / "ds" / "_manifest.json")
    save_checkpoint(create_model("mltr_tiny", num_classes=3), tmp_path / "model.pt")
    assert_replaced_durably(disk_events, tmp_path / "model.pt")
    with json_lines(str(tmp_path / "out.jsonl")) as out:
        out.write("{}\n")
    assert_replaced_durably(disk_events, tmp_path / "out.jsonl")


def test_a_local_shard_is_on_disk_before_the_manifest_can_list_it(tmp_path, disk_events):
    from types import SimpleNamespace

    import pyarrow as pa

    from pipeline.convert import PROCESSED_SCHEMA, ShardSink

    row = {name: None for name in PROCESSED_SCHEMA.names}
    row |= {
        "image_id": "a",
        "split": "train",
        "image": b"x",
        "width": 1,
        "height": 1,
        "labels": [0],
        "ignore": [],
        "source_path": "a.jpg",
    }
    block = pa.Table.from_pylist([row], schema=PROCESSED_SCHEMA)
    sink = ShardSink(resolve(str(tmp_path / "ds")), "run", rows_per_shard=8)
    (shard,) = sink.write([block], SimpleNamespace(task_idx=0))["files"]
    path = os.path.realpath(tmp_path / "ds" / shard["path"])
    assert disk_events == [("fsync", path), ("fsync", os.path.dirname(path))]
