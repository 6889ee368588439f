import hashlib
from collections import Counter

import pytest

from pipeline.synthetic import FAULT_OUTCOMES, SHAPES, Truth, class_look, generate

pytestmark = pytest.mark.unit


def tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_writes_the_same_dataset(tmp_path):
    generate("voc", tmp_path / "a", 30, seed=5, faults=True)
    generate("voc", tmp_path / "b", 30, seed=5, faults=True)
    generate("voc", tmp_path / "c", 30, seed=6, faults=True)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != tree_digest(tmp_path / "c")


@pytest.mark.parametrize("num_classes", [20, 80, 81])
def test_every_class_has_its_own_look(num_classes):
    looks = [class_look(i, num_classes) for i in range(num_classes)]
    assert len(set(looks)) == num_classes
    assert {shape for shape, _ in looks} == set(SHAPES)


@pytest.mark.parametrize("fmt", ["coco", "voc", "nuswide"])
def test_faults_are_all_present_and_truth_round_trips(tmp_path, fmt):
    truth = generate(fmt, tmp_path, 40, seed=1, faults=True)
    faults = Counter(im.fault for im in truth.images if im.fault)
    expected = {k for k in FAULT_OUTCOMES if fmt == "voc" or k not in ("bad_xml", "xml_bomb")}
    assert set(faults) == expected and all(n == 1 for n in faults.values())
    missing = [im for im in truth.images if im.fault == "missing"]
    assert not (tmp_path / missing[0].file).exists()
    assert Truth.load(tmp_path) == truth


def test_labels_are_long_tailed_and_cooccur(tmp_path):
    truth = generate("coco", tmp_path, 400, seed=2, size=(64, 48), noise=0)
    counts = Counter(c for im in truth.images for c in im.labels)
    assert counts[0] > 3 * max(counts.get(70, 0), 1)
    with_0 = [im for im in truth.images if 0 in im.labels]
    # Class 1 is class 0's partner: it joins it far more often than its base rate.
    assert sum(1 in im.labels for im in with_0) / len(with_0) > 2 * counts[1] / len(truth.images)


def test_too_few_images_for_faults_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        generate("coco", tmp_path, 5, faults=True)
