"""Untrusted annotations and files, tried as a new user would: each becomes a reject with a reason, never a hang or a crash."""

from __future__ import annotations

import json
import os
import threading

import pytest

from pipeline.convert import process_batch
from pipeline.images import ImageRejected, ImageSettings, read_file
from pipeline.readers import read_index
from pipeline.readers.nuswide import MAX_LABEL_CELL
from pipeline.synthetic import generate

pytestmark = pytest.mark.unit


def rewrite_coco(root, split: str, edit) -> None:
    path = root / "annotations" / f"instances_{split}2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_coco_file_name_outside_the_root_is_rejected_not_read(tmp_path):
    root = tmp_path / "coco"
    generate("coco", root, 8, seed=0)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((root / next(root.glob("train2014/*.jpg")).relative_to(root)).read_bytes())

    def escape(data):
        data["images"][0]["file_name"] = "../../secret.jpg"
        data["images"][1]["file_name"] = str(secret)

    rewrite_coco(root, "train", escape)
    index = read_index("coco", str(root))
    outside = {r.image_id: r for r in index.rejects if r.reason == "outside_root"}
    assert len(outside) == 2 and all("outside" in r.detail for r in outside.values())
    assert not any(str(secret) == e.source_path or "secret" in e.source_path for e in index.entries)
    assert all(e.source_path.startswith(str(root)) for e in index.entries)


def test_a_coco_annotation_of_an_unknown_image_is_rejected_not_dropped(tmp_path):
    root = tmp_path / "coco"
    generate("coco", root, 8, seed=0)

    def orphan(data):
        data["annotations"].append({**data["annotations"][0], "id": 999999, "image_id": 123456789})

    rewrite_coco(root, "val", orphan)
    index = read_index("coco", str(root))
    (reject,) = [r for r in index.rejects if r.image_id == "123456789"]
    assert reject.reason == "bad_annotation" and "999999" in reject.detail and reject.split == "val"


def test_a_fifo_or_a_folder_is_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "image.jpg"
    os.mkfifo(fifo)
    outcome = {}

    def read():
        try:
            read_file(str(fifo))
        except ImageRejected as exc:
            outcome["reject"] = exc

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert outcome["reject"].reason == "not_a_file" and "FIFO" in outcome["reject"].detail


def test_reads_are_capped(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    with pytest.raises(ImageRejected) as info:
        read_file(str(big), max_bytes=4096)
    assert info.value.reason == "too_large" and "5000 bytes" in info.value.detail


def test_the_conversion_step_turns_a_fifo_into_a_reject_row(tmp_path):
    import pyarrow as pa

    os.mkfifo(tmp_path / "pipe.jpg")
    batch = pa.Table.from_pylist(
        [
            {
                "image_id": "1",
                "split": "train",
                "source_path": str(tmp_path / "pipe.jpg"),
                "labels": [0],
                "ignore": [],
            }
        ]
    )
    out = process_batch(batch, ImageSettings())
    assert out["reject_reason"].to_pylist() == ["not_a_file"]


def test_a_huge_nuswide_label_cell_rejects_its_line_and_the_rest_converts(tmp_path):
    generate("nuswide", tmp_path, 12, seed=0, layout="csv")
    csv_path = tmp_path / "nus_wide.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].split(",", 1)[0] + ',"[' + "-" * 100_000 + '1]",train'
    lines[3] = lines[3].split(",", 1)[0] + ',"[' + "-" * 200_000 + '1]",train'  # over csv's own field limit
    csv_path.write_text("\n".join(lines) + "\n")
    index = read_index("nuswide", str(tmp_path))
    bad = [r for r in index.rejects if r.reason == "bad_annotation"]
    assert len(bad) == 2
    assert any(f"at most {MAX_LABEL_CELL}" in r.detail for r in bad)
    assert len(index.entries) + index.empty.get("train", 0) + index.empty.get("val", 0) == 12 - 2


def test_a_nuswide_csv_filename_outside_the_root_is_rejected(tmp_path):
    generate("nuswide", tmp_path, 12, seed=0, layout="csv")
    csv_path = tmp_path / "nus_wide.csv"
    lines = csv_path.read_text().splitlines()
    lines[1] = "../outside.jpg," + lines[1].split(",", 1)[1]
    csv_path.write_text("\n".join(lines) + "\n")
    index = read_index("nuswide", str(tmp_path))
    assert [r.reason for r in index.rejects] == ["outside_root"]


def test_a_voc_image_id_that_leaves_the_root_is_rejected(tmp_path):
    generate("voc", tmp_path, 12, seed=0)
    trainval = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt"
    trainval.write_text("../../../etc/passwd\n" + trainval.read_text())
    index = read_index("voc", str(tmp_path))
    (reject,) = [r for r in index.rejects if r.reason == "outside_root"]
    assert reject.image_id == "../../../etc/passwd"
