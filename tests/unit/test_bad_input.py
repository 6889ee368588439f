"""Untrusted annotations and files, tried as a new user would: each becomes a reject with a reason, never a hang or a crash."""

from __future__ import annotations

import json
import os
import threading
from pathlib import PureWindowsPath

import pytest

from pipeline.convert import process_batch
from pipeline.images import ImageRejected, ImageSettings, read_file
from pipeline.readers import AnnotationError, read_index
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


def test_coco_categories_must_name_each_class_once_and_a_bad_image_id_rejects_its_image(tmp_path):
    root = tmp_path / "coco"
    generate("coco", root, 8, seed=0)
    path = root / "annotations" / "instances_val2014.json"
    original = json.loads(path.read_text())
    first, second = original["categories"][:2]
    # A repeated id would move the first category's labels to the second (pycocotools keeps the last).
    for categories, problem in (
        ([first, {**second, "id": first["id"]}], f"category id {first['id']} is listed twice"),
        ([first, {**second, "name": first["name"]}], f"category name {first['name']!r} is listed twice"),
        ([first, {"id": second["id"]}], "category 2 of 'categories' .* has name None"),
        ([first, {**second, "id": "3"}], "category 2 of 'categories' has id '3'"),
    ):
        rewrite_coco(root, "val", lambda data, c=categories: data.update(categories=c))
        with pytest.raises(AnnotationError, match=problem) as info:
            read_index("coco", str(root), ("val",))
        assert info.value.path == str(path)
        path.write_text(json.dumps(original))

    def string_id(data):
        data["images"][0]["id"] = str(data["images"][0]["id"])

    rewrite_coco(root, "val", string_id)
    index = read_index("coco", str(root), ("val",))
    image = original["images"][0]
    (reject,) = [r for r in index.rejects if "of 'images'" in r.detail]
    assert (
        reject.reason == "bad_annotation" and f"image 1 of 'images' has id '{image['id']}'" in reject.detail
    )
    assert (reject.image_id, reject.source_path) == (str(image["id"]), image["file_name"])
    assert len(index.entries) >= len(original["images"]) - 2  # the others are read

    path.write_text("[" * 100_000 + "]" * 100_000)  # untrusted JSON, nested past Python's recursion limit
    with pytest.raises(AnnotationError, match="nested too deeply"):
        read_index("coco", str(root), ("val",))


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
    with pytest.raises(ImageRejected) as info:
        read_file(str(tmp_path))
    assert info.value.reason == "not_a_file" and "folder" in info.value.detail


def test_reads_are_capped(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    with pytest.raises(ImageRejected) as info:
        read_file(str(big), max_bytes=4096)
    assert info.value.reason == "too_large" and "5000 bytes" in info.value.detail


def test_the_conversion_step_turns_any_unreadable_path_into_a_reject_row_beside_the_good(tmp_path):
    import io

    import pyarrow as pa
    from PIL import Image

    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")  # a link to itself
    good = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(good, format="JPEG")
    (tmp_path / "good.jpg").write_bytes(good.getvalue())
    paths = {
        "fifo": str(tmp_path / "pipe.jpg"),
        "loop": str(tmp_path / "loop.jpg"),
        "long": str(tmp_path / ("x" * 300 + ".jpg")),  # over the file system's name limit
        "nul": str(tmp_path / "a\0b.jpg"),  # an annotation can put any character in a file_name
        "good": str(tmp_path / "good.jpg"),
    }
    batch = pa.Table.from_pylist(
        [
            {"image_id": k, "split": "train", "source_path": p, "labels": [0], "ignore": []}
            for k, p in paths.items()
        ]
    )
    out = process_batch(batch, ImageSettings()).to_pylist()
    assert [row["reject_reason"] for row in out] == [
        "not_a_file",
        "unreadable",
        "unreadable",
        "unreadable",
        None,
    ]
    assert "symbolic links" in out[1]["reject_detail"] and "loop.jpg" in out[1]["reject_detail"]
    assert "too long" in out[2]["reject_detail"] and "x" * 300 in out[2]["reject_detail"]
    assert out[3]["reject_detail"] == f"the path holds a NUL byte: {paths['nul']!r}"
    assert out[4]["image"] == good.getvalue() and (out[4]["width"], out[4]["height"]) == (20, 10)


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


def test_a_nuswide_csv_line_with_an_unknown_split_or_no_filename_rejects_that_line_alone(tmp_path):
    generate("nuswide", tmp_path, 12, seed=0, layout="csv")
    csv_path = tmp_path / "nus_wide.csv"
    lines = csv_path.read_text().splitlines()
    typo = lines[2].rsplit(",", 1)[0] + ",trian"
    filename = typo.split(",", 1)[0]
    lines[2], lines[-1] = typo, lines[-1].split(",", 1)[0]  # a typo, and a last line cut short
    lines[4] = "," + lines[4].split(",", 1)[1]  # no filename: not "outside the root"
    csv_path.write_text("\n".join(lines) + "\n")
    index = read_index("nuswide", str(tmp_path))
    bad = [r for r in index.rejects if r.reason == "bad_annotation"]
    assert [r.detail.split(": ", 1)[1] for r in bad] == [
        "unknown split 'trian' (expected train, val or test)", "no filename",
        "unknown split None (expected train, val or test)",
    ]  # fmt: skip
    assert "line 3: unknown split" in bad[0].detail and bad[0].source_path == filename
    assert "line 5: no filename" in bad[1].detail
    assert len(index.entries) + index.empty.get("train", 0) + index.empty.get("val", 0) == 12 - 3


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


def test_an_image_listed_twice_keeps_its_first_listing_and_never_leaks_into_val(tmp_path):
    generate("voc", tmp_path, 16, seed=0)
    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    train_ids = main.joinpath("trainval.txt").read_text().split()
    labelled = {e.image_id for e in read_index("voc", str(tmp_path)).entries}
    again, leaked = [i for i in train_ids if i in labelled][:2]
    main.joinpath("trainval.txt").write_text("\n".join([*train_ids, again]) + "\n")  # twice in train
    main.joinpath("test.txt").write_text(main.joinpath("test.txt").read_text() + leaked + "\n")  # and in val

    index = read_index("voc", str(tmp_path))
    ids = [e.image_id for e in index.entries]
    assert len(ids) == len(set(ids)) and {again, leaked} <= set(ids)
    assert {e.image_id: e.split for e in index.entries}[leaked] == "train"  # the first listing
    duplicates = {r.image_id: r for r in index.rejects if r.reason == "duplicate"}
    assert set(duplicates) == {again, leaked} and duplicates[leaked].split == "val"
    assert "is listed again in val; its first listing, in train" in duplicates[leaked].detail


def test_a_nuswide_image_in_both_lists_and_a_coco_id_listed_twice_are_duplicates(tmp_path):
    nus = tmp_path / "nus"
    generate("nuswide", nus, 12, seed=0)
    # The same image in the test list too (and a 1 for it in every Test label file).
    train_list, test_list = nus / "ImageList" / "TrainImagelist.txt", nus / "ImageList" / "TestImagelist.txt"
    labelled = {e.image_id for e in read_index("nuswide", str(nus)).entries}
    line = next(ln for ln in train_list.read_text().splitlines() if PureWindowsPath(ln).stem in labelled)
    test_list.write_text(test_list.read_text() + line + "\n")
    for labels in (nus / "Groundtruth" / "TrainTestLabels").glob("*_Test.txt"):
        labels.write_text(labels.read_text() + "1\n")
    (duplicate,) = [r for r in read_index("nuswide", str(nus)).rejects if r.reason == "duplicate"]
    assert duplicate.image_id == PureWindowsPath(line).stem and duplicate.split == "val"

    coco = tmp_path / "coco"
    generate("coco", coco, 8, seed=0)
    first = {}

    def repeat_an_image(data):
        image = next(
            im for im in data["images"] if any(a["image_id"] == im["id"] for a in data["annotations"])
        )
        first.update(image)
        data["images"].append({**image, "file_name": "COCO_train2014_999999999999.jpg"})

    rewrite_coco(coco, "train", repeat_an_image)
    index = read_index("coco", str(coco), ("train",))
    (duplicate,) = [r for r in index.rejects if r.reason == "duplicate"]
    assert duplicate.image_id == str(first["id"]) and "COCO_train2014_999999999999.jpg" in duplicate.detail
    (entry,) = [e for e in index.entries if e.image_id == str(first["id"])]
    assert entry.source_path.endswith(first["file_name"])  # pycocotools alone would keep the last


def test_a_coco_image_without_a_file_name_is_a_bad_annotation(tmp_path):
    generate("coco", tmp_path, 8, seed=0)
    dropped = {}

    def drop_a_file_name(data):
        image = next(
            im for im in data["images"] if any(a["image_id"] == im["id"] for a in data["annotations"])
        )
        dropped["id"] = image.pop("file_name") and image["id"]

    rewrite_coco(tmp_path, "train", drop_a_file_name)
    (reject,) = [
        r for r in read_index("coco", str(tmp_path), ("train",)).rejects if r.image_id == str(dropped["id"])
    ]
    assert reject.reason == "bad_annotation" and "has no file_name" in reject.detail


def test_text_annotations_that_are_not_utf8_name_the_file(tmp_path):
    generate("voc", tmp_path / "voc", 8, seed=0)
    trainval = tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt"
    trainval.write_bytes(trainval.read_bytes() + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(AnnotationError) as info:
        read_index("voc", str(tmp_path / "voc"))
    assert info.value.path == str(trainval) and "not UTF-8 text" in info.value.problem

    generate("nuswide", tmp_path / "nus", 8, seed=0)
    image_list = tmp_path / "nus" / "ImageList" / "TrainImagelist.txt"
    image_list.write_bytes("actor\\caf\u00e9.jpg\n".encode("latin-1") + image_list.read_bytes())
    with pytest.raises(AnnotationError) as info:
        read_index("nuswide", str(tmp_path / "nus"))
    assert info.value.path == str(image_list)


@pytest.mark.parametrize("fmt", ["voc", "nuswide"])
def test_a_byte_order_mark_in_an_image_list_is_not_part_of_the_first_image_id(tmp_path, fmt):
    generate(fmt, tmp_path, 12, seed=0)
    before = read_index(fmt, str(tmp_path))
    lists = {
        "voc": "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt",
        "nuswide": "ImageList/TrainImagelist.txt",
    }
    listed = tmp_path / lists[fmt]
    listed.write_bytes(b"\xef\xbb\xbf" + listed.read_bytes())  # as Notepad saves UTF-8
    after = read_index(fmt, str(tmp_path))
    assert after.entries == before.entries  # ids, labels and the paths the images are read from
    assert after.rejects == before.rejects


@pytest.mark.parametrize("value", ["2", "-1", "300", "yes"])
def test_a_nuswide_label_that_is_not_0_or_1_names_the_file_and_line(tmp_path, value):
    generate("nuswide", tmp_path, 8, seed=0)
    path = tmp_path / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Train.txt"
    values = path.read_text().split()
    values[2] = value
    path.write_text("\n".join(values) + "\n")
    with pytest.raises(AnnotationError) as info:
        read_index("nuswide", str(tmp_path))
    assert (
        info.value.path == str(path) and f"label 3 is {value!r}: labels must be 0 or 1" in info.value.problem
    )


def test_a_voc_annotation_that_cannot_be_read_rejects_its_image(tmp_path):
    generate("voc", tmp_path, 8, seed=0)
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    image_id = voc.joinpath("ImageSets", "Main", "trainval.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{image_id}.xml"
    xml.unlink()
    xml.mkdir()  # a folder where the XML should be
    (reject,) = [r for r in read_index("voc", str(tmp_path)).rejects if r.image_id == image_id]
    assert reject.reason == "bad_annotation" and f"unreadable {xml}" in reject.detail
