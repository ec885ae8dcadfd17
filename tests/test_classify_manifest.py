"""Labelled manifests: reading and validation, and the NIH / CheXpert / class-folder adapters."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddino.data.manifest import read_manifest
from meddino.data.manifest_builders import chexpert, image_folder, nih_chestxray14
from meddino.errors import DataError


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_single_label_classes_sorted_and_binary(tmp_path):
    for i in range(4):
        _png(tmp_path / f"i{i}.png")
    csv_path = _write(tmp_path / "m.csv", ["image", "label", "patient", "split"],
                      [["i0.png", "10", "a", "train"], ["i1.png", "2", "b", "Validation"],
                       ["i2.png", "2.0", "c", "test"], ["i3.png", "10", "d", "TEST"]])
    m = read_manifest(csv_path)
    assert m.task == "binary" and m.names == ["2", "10"]  # numeric sort, '2.0' is class '2'
    assert m.labels.tolist() == [1, 0, 0, 1]
    assert m.split.tolist() == ["train", "val", "test", "test"]
    assert m.paths[0] == (tmp_path / "i0.png").resolve() and m.dataset == "m"
    m2 = read_manifest(csv_path, positive_class="2")
    assert m2.names == ["10", "2"] and m2.labels.tolist() == [0, 1, 1, 0]


def test_multiclass_and_multilabel(tmp_path):
    for i in range(3):
        _png(tmp_path / f"i{i}.png")
    m = read_manifest(_write(tmp_path / "m.csv", ["image", "label", "patient"],
                             [["i0.png", "cyst", "a"], ["i1.png", "tumour", "b"], ["i2.png", "normal", "c"]]))
    assert m.task == "multiclass" and m.names == ["cyst", "normal", "tumour"] and m.labels.tolist() == [0, 2, 1]
    assert m.one_hot().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    m = read_manifest(_write(tmp_path / "ml.csv", ["image", "x", "y", "patient", "fold"],
                             [["i0.png", 1, 0, "a", 0], ["i1.png", 1, 1, "b", 1], ["i2.png", 0, 1, "c", 2]]),
                      label_columns=["x", "y"])
    assert m.task == "multilabel" and m.labels.tolist() == [[1, 0], [1, 1], [0, 1]] and m.fold.tolist() == [0, 1, 2]
    assert m.num_outputs == 2


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        ([["i0.png", "a", "p"], ["missing.png", "b", "q"]], {}, r"image not found: .*missing\.png"),
        ([["i0.png", "a", "p"], ["i1.png", "b", "q"]], {"label_columns": ["finding"]}, r"label column 'finding' not found"),
        ([["i0.png", "a", "p"], ["i1.png", "a", "q"]], {}, r"one class only"),
        ([["i0.png", "", "p"], ["i1.png", "b", "q"]], {}, r"row 2 has an empty label"),
    ],
)
def test_validation_errors_are_one_line(tmp_path, rows, kwargs, message):
    _png(tmp_path / "i0.png")
    _png(tmp_path / "i1.png")
    path = _write(tmp_path / "m.csv", ["image", "label", "patient"], rows)
    with pytest.raises(DataError, match=message) as err:
        read_manifest(path, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_split_and_multilabel_values(tmp_path):
    _png(tmp_path / "i0.png")
    _png(tmp_path / "i1.png")
    path = _write(tmp_path / "m.csv", ["image", "label", "patient", "split"],
                  [["i0.png", "a", "p", "train"], ["i1.png", "b", "q", "holdout"]])
    with pytest.raises(DataError, match="split values must be train/val/test, got 'holdout'"):
        read_manifest(path)
    path = _write(tmp_path / "m2.csv", ["image", "x", "y", "patient"], [["i0.png", 1, 2, "p"], ["i1.png", 0, 1, "q"]])
    with pytest.raises(DataError, match="column 'y': multi-label values must be 0 or 1"):
        read_manifest(path, label_columns=["x", "y"])


def test_nih_adapter(tmp_path):
    root = tmp_path / "nih"
    names = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
    for i, n in enumerate(names):
        _png(root / f"images_00{1 + i // 2}" / "images" / n)
    _write(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"],
           [[names[0], "Cardiomegaly|Effusion", 0, 1], [names[1], "No Finding", 1, 1],
            [names[2], "Hernia", 0, 2], [names[3], "Effusion", 0, 3]])
    (root / "train_val_list.txt").write_text(f"{names[0]}\n{names[1]}\n{names[2]}\n")
    (root / "test_list.txt").write_text(f"{names[3]}\n")
    out = nih_chestxray14(root / "Data_Entry_2017.csv", tmp_path / "nih.csv")
    m = read_manifest(out, label_columns=["Cardiomegaly", "Effusion", "Hernia"])
    assert m.labels.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert m.patients.tolist() == ["1", "1", "2", "3"] and m.split.tolist() == ["train", "train", "train", "test"]
    rows = list(csv.DictReader(open(out)))
    assert len(rows[0]) == 1 + 14 + 2 and rows[0]["Atelectasis"] == "0"
    # a test list that takes one image of a training patient (patient 1) is refused, and nothing is written
    (root / "test_list.txt").write_text(f"{names[1]}\n{names[3]}\n")
    with pytest.raises(DataError) as err:
        nih_chestxray14(root / "Data_Entry_2017.csv", tmp_path / "leak.csv")
    assert str(err.value) == (f"patient 1 is in both train and test (train_val_list {root / 'train_val_list.txt'} / "
                              f"test_list {root / 'test_list.txt'}: 00000001_000.png in train, 00000001_001.png in test)")
    assert not (tmp_path / "leak.csv").exists()


def test_chexpert_uncertainty_policies(tmp_path):
    base = tmp_path / "CheXpert-v1.0-small"
    rel = ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
           "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg",
           "CheXpert-v1.0-small/train/patient00002/study2/view1_lateral.jpg"]
    for r in rel:
        _png(tmp_path / r)
    csv_path = _write(base / "train.csv", ["Path", "Frontal/Lateral", "Edema", "Atelectasis"],
                      [[rel[0], "Frontal", "1.0", ""], [rel[1], "Frontal", "-1.0", "0.0"],
                       [rel[2], "Lateral", "0.0", "1.0"]])
    labels = ["Edema", "Atelectasis"]
    ones = read_manifest(chexpert(csv_path, tmp_path / "a.csv", labels=labels, uncertain="ones", split="train"),
                         label_columns=labels)
    assert ones.labels.tolist() == [[1, 0], [1, 0], [0, 1]]
    assert ones.patients.tolist() == ["patient00001", "patient00002", "patient00002"]
    assert ones.split.tolist() == ["train"] * 3
    zeros = read_manifest(chexpert(csv_path, tmp_path / "b.csv", labels=labels, uncertain="zeros"),
                          label_columns=labels)
    assert zeros.labels.tolist() == [[1, 0], [0, 0], [0, 1]]
    ignore = read_manifest(chexpert(csv_path, tmp_path / "c.csv", labels=labels, uncertain="ignore"),
                           label_columns=labels)
    assert ignore.labels.tolist() == [[1, 0], [0, 1]] and len(ignore) == 2
    frontal = chexpert(csv_path, tmp_path / "d.csv", labels=labels, frontal_only=True)
    assert len(list(csv.DictReader(open(frontal)))) == 2


def test_image_folder_adapter(tmp_path):
    root = tmp_path / "ds"
    _png(root / "benign" / "P1_a.png")
    _png(root / "benign" / "P1_b.png")
    _png(root / "malignant" / "P2_a.png")
    m = read_manifest(image_folder(root, tmp_path / "f.csv"))
    assert m.names == ["benign", "malignant"] and m.patients.tolist() == ["P1_a", "P1_b", "P2_a"]
    m = read_manifest(image_folder(root, tmp_path / "g.csv", patient_regex=r"(P\d+)_"))
    assert m.patients.tolist() == ["P1", "P1", "P2"] and m.split is None
    # split layout: ROOT/<split>/<class>/
    root2 = tmp_path / "ds2"
    _png(root2 / "train" / "a" / "1.png")
    _png(root2 / "train" / "b" / "2.png")
    _png(root2 / "test" / "a" / "3.png")
    m = read_manifest(image_folder(root2, tmp_path / "h.csv"))
    assert sorted(zip(m.split.tolist(), m.labels.tolist())) == [("test", 0), ("train", 0), ("train", 1)]
    # one patient in two split folders is refused, naming the files and how the patient was found
    _png(root2 / "test" / "b" / "7.png")
    _png(root2 / "train" / "a" / "7.png")
    with pytest.raises(DataError) as err:
        image_folder(root2, tmp_path / "i.csv")
    assert str(err.value) == (f"patient 7 is in both train and test (split folders of {root2}, patient = the file "
                              "name: train/a/7.png in train, test/b/7.png in test)")
    assert not (tmp_path / "i.csv").exists()


def test_data_manifest_verb(tmp_path, cli):
    _png(tmp_path / "ds" / "a" / "1.png")
    _png(tmp_path / "ds" / "b" / "2.png")
    proc = cli("data", "manifest", "folder", tmp_path / "ds", f"out={tmp_path / 'm.csv'}")
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(tmp_path / "m.csv")
    assert m.names == ["a", "b"] and len(m) == 2
    proc = cli("data", "manifest", "nih", tmp_path / "nope.csv", f"out={tmp_path / 'n.csv'}")
    assert proc.returncode == 2 and "NIH Data_Entry CSV not found" in proc.stderr
