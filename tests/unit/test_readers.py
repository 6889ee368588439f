import json

import pytest

from pipeline.readers import AnnotationError, LayoutError, read_index
from pipeline.readers.nuswide import NUS_CONCEPTS, parse_label_list
from pipeline.readers.voc import VOC_CLASSES, labels_from_objects, parse_objects
from pipeline.synthetic import COCO_CATEGORIES, generate

pytestmark = pytest.mark.unit

CASES = [("coco", "official"), ("voc", "official"), ("nuswide", "official"), ("nuswide", "csv")]


@pytest.mark.parametrize(("fmt", "layout"), CASES)
def test_reader_labels_match_what_the_generator_drew(synthetic_root, fmt, layout):
    root, truth = synthetic_root(fmt, layout)
    index = read_index(fmt, str(root))
    assert index.classes == truth.classes
    entries = {e.image_id: e for e in index.entries}
    annotation_rejects = {r.image_id: r.reason for r in index.rejects}
    for image in truth.images:
        if image.outcome == "empty":
            assert image.image_id not in entries
        elif image.outcome == "bad_annotation":
            assert annotation_rejects[image.image_id] == "bad_annotation"
            assert image.image_id not in entries
        else:
            # Rows and image-level rejects (found when decoding) are both in the index, with exact labels.
            entry = entries[image.image_id]
            assert list(entry.labels) == image.labels, image.image_id
            assert list(entry.ignore) == image.ignore, image.image_id
            assert entry.split == image.split
            assert entry.source_path == str(root / image.file)
    assert index.empty == {s: truth.empty(s) for s in ("train", "val")}
    assert set(entries) | set(annotation_rejects) == {
        im.image_id for im in truth.images if im.outcome != "empty"
    }
    assert index.fingerprint.startswith("sha256:")


def test_coco_classes_follow_ascending_category_ids(synthetic_root):
    root, _ = synthetic_root("coco")
    index = read_index("coco", str(root))
    assert len(index.classes) == 80
    assert index.classes == [name for _, name, _ in sorted(COCO_CATEGORIES)]
    assert index.classes[11] == "stop sign"  # id 13: ids 12 is unused, so index != id - 1


def test_coco_image_ids_are_coco_ids(synthetic_root):
    root, _ = synthetic_root("coco")
    data = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    ids = {str(im["id"]) for im in data["images"]}
    index = read_index("coco", str(root), ("val",))
    assert {e.image_id for e in index.entries} <= ids
    assert all(e.split == "val" for e in index.entries)


def test_voc_difficult_only_classes_are_ignored(synthetic_root):
    root, truth = synthetic_root("voc", images=120, seed=3)
    with_ignore = [im for im in truth.images if im.ignore and im.outcome == "row"]
    assert with_ignore, "the generator should draw difficult-only classes"
    entries = {e.image_id: e for e in read_index("voc", str(root)).entries}
    for image in with_ignore:
        assert list(entries[image.image_id].ignore) == image.ignore
        assert not set(entries[image.image_id].labels) & set(image.ignore)


def test_voc_objects_positive_wins_over_difficult():
    objects = [("dog", True), ("dog", False), ("cat", True), ("person", False)]
    labels, ignore = labels_from_objects(objects)
    assert labels == (VOC_CLASSES.index("dog"), VOC_CLASSES.index("person"))
    assert ignore == (VOC_CLASSES.index("cat"),)


def test_voc_xml_entity_expansion_is_refused():
    bomb = b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xx">]><annotation>&x;</annotation>'
    with pytest.raises(ValueError, match="unsafe XML"):
        parse_objects(bomb, "a.xml")
    external = b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>'
    with pytest.raises(ValueError, match="unsafe XML"):
        parse_objects(external, "b.xml")


def test_voc_unknown_class_is_a_bad_annotation():
    xml = b"<annotation><object><name>unicorn</name><difficult>0</difficult></object></annotation>"
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        parse_objects(xml, "c.xml")


def test_voc_accepts_devkit_or_voc2007_folder_as_root(synthetic_root):
    root, truth = synthetic_root("voc")
    full = read_index("voc", str(root))
    for sub in (root / "VOCdevkit", root / "VOCdevkit" / "VOC2007"):
        assert [e.image_id for e in read_index("voc", str(sub)).entries] == [e.image_id for e in full.entries]


def test_nuswide_label_lists():
    assert parse_label_list("['sky', 'clouds']") == ["sky", "clouds"]
    assert parse_label_list("sky|clouds") == ["sky", "clouds"]
    assert parse_label_list("") == []
    with pytest.raises(ValueError):
        parse_label_list("[1, 2]")
    assert len(NUS_CONCEPTS) == 81


def test_nuswide_unknown_concept_in_csv_is_a_bad_annotation(tmp_path):
    generate("nuswide", tmp_path, 4, seed=0, layout="csv")
    csv = tmp_path / "nus_wide.csv"
    csv.write_text(csv.read_text() + "images/9999_1.jpg,\"['sky', 'dragons']\",train\n")
    index = read_index("nuswide", str(tmp_path))
    assert [(r.image_id, r.reason) for r in index.rejects] == [("9999_1", "bad_annotation")]
    assert "dragons" in index.rejects[0].detail


def test_nuswide_label_file_of_wrong_length_names_the_file(tmp_path):
    generate("nuswide", tmp_path, 8, seed=0)
    bad = tmp_path / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Train.txt"
    bad.write_text("0\n1\n")
    with pytest.raises(AnnotationError) as info:
        read_index("nuswide", str(tmp_path))
    assert info.value.path == str(bad) and "2 labels for 6 images" in str(info.value)


@pytest.mark.parametrize("fmt", ["coco", "voc", "nuswide"])
def test_missing_root_is_a_layout_error(tmp_path, fmt):
    with pytest.raises(LayoutError, match="does not exist"):
        read_index(fmt, str(tmp_path / "absent"))


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("coco", "annotations/instances_train2014.json"),
        ("voc", "VOCdevkit/VOC2007/"),
        ("nuswide", "ImageList/"),
    ],
)
def test_wrong_layout_names_what_was_expected_where(tmp_path, fmt, expected):
    (tmp_path / "random.txt").write_text("not a dataset")
    with pytest.raises(LayoutError) as info:
        read_index(fmt, str(tmp_path))
    assert expected in str(info.value) and str(tmp_path) in str(info.value)


def test_malformed_coco_json_names_file_and_parse_error(tmp_path):
    generate("coco", tmp_path, 4, seed=0)
    path = tmp_path / "annotations" / "instances_train2014.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(AnnotationError) as info:
        read_index("coco", str(tmp_path))
    assert info.value.path == str(path)
    assert "line 2 column" in info.value.problem


def test_coco_json_without_categories_is_named(tmp_path):
    generate("coco", tmp_path, 4, seed=0)
    path = tmp_path / "annotations" / "instances_val2014.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(AnnotationError, match="'categories'"):
        read_index("coco", str(tmp_path), ("val",))


def test_unknown_split_is_refused(synthetic_root):
    root, _ = synthetic_root("coco")
    with pytest.raises(ValueError, match="splits"):
        read_index("coco", str(root), ("test",))
    with pytest.raises(ValueError, match=r"each once, got \('train', 'train'\)"):  # every row twice
        read_index("coco", str(root), ("train", "train"))


@pytest.mark.parametrize("fmt", ["coco", "voc", "nuswide"])
def test_fingerprint_does_not_depend_on_how_the_root_is_written(tmp_path, monkeypatch, fmt):
    generate(fmt, tmp_path / "data" / fmt, 6, seed=0)
    absolute = read_index(fmt, str(tmp_path / "data" / fmt)).fingerprint
    monkeypatch.chdir(tmp_path)
    assert read_index(fmt, f"data/{fmt}").fingerprint == absolute
    assert read_index(fmt, f"./data/../data/{fmt}").fingerprint == absolute


def test_fingerprint_changes_with_annotations(tmp_path):
    generate("coco", tmp_path, 6, seed=0)
    before = read_index("coco", str(tmp_path)).fingerprint
    assert read_index("coco", str(tmp_path)).fingerprint == before
    path = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][:-1]
    path.write_text(json.dumps(data))
    assert read_index("coco", str(tmp_path)).fingerprint != before
