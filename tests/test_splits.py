"""Patient-level splits: folds keep patients whole, are stratified and seeded; leaks are refused."""

from __future__ import annotations

import numpy as np
import pytest

from meddino.data.manifest import Manifest
from meddino.data.splits import check_no_leak, patient_holdout, patient_kfold, stratification_key
from meddino.errors import DataError
from meddino.tasks.classify.units import make_units


def _toy(n_patients: int = 30, per: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], per)
    # class of a patient: 2/3 class 0, 1/3 class 1 (imbalanced, so stratification matters)
    pclass = (np.arange(n_patients) % 3 == 0).astype(int)
    labels = np.repeat(pclass, per)
    order = rng.permutation(patients.size)  # rows shuffled: folds must not depend on row order tricks
    return patients[order], labels[order]


def test_kfold_keeps_patients_whole_and_covers_all():
    patients, labels = _toy()
    folds = patient_kfold(patients, labels, k=5, seed=0)
    assert folds.shape == patients.shape and set(folds.tolist()) == set(range(5))
    for pid in np.unique(patients):
        assert np.unique(folds[patients == pid]).size == 1, pid
    # every fold holds 6 of the 30 patients and, stratified, 2 of the 10 class-1 patients
    for f in range(5):
        fold_patients = np.unique(patients[folds == f])
        assert fold_patients.size == 6
        pos = np.unique(patients[(folds == f) & (labels == 1)])
        assert pos.size == 2


def test_kfold_is_seeded():
    patients, labels = _toy()
    a = patient_kfold(patients, labels, k=5, seed=3)
    b = patient_kfold(patients, labels, k=5, seed=3)
    c = patient_kfold(patients, labels, k=5, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_kfold_too_few_patients():
    with pytest.raises(DataError, match="3 patients"):
        patient_kfold(["a", "b", "c", "a"], None, k=5)


def test_stratification_key_multilabel_rarest_positive():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 0]])
    # frequencies: 4, 2, 1 -> rarest positive label, "none" = 3
    assert stratification_key(y).tolist() == [0, 1, 3, 2, 1]


def test_holdout_is_patient_level():
    patients, labels = _toy()
    held = patient_holdout(patients, labels, fraction=0.2, seed=0)
    assert 0 < held.sum() < held.size
    assert not set(patients[held]) & set(patients[~held])


def test_leak_check_names_the_patient():
    check_no_leak({"train": ["a", "b", "b"], "val": ["c"], "test": ["d", "d"]}, where="w")
    with pytest.raises(DataError, match=r"^patient b is in both train and test \(w\)$"):
        check_no_leak({"train": ["a", "b"], "val": ["c"], "test": ["b"]}, where="w")
    with pytest.raises(DataError, match=r"patient c is in both val and test"):
        check_no_leak({"train": ["a"], "val": ["c"], "test": ["c"]}, where="w")


def test_leak_check_names_the_entries_folds_and_counts_the_rest():
    sides = {"fold 0": ["x", "y", "q"], "fold 1": [], "fold 2": ["z", "y", "q"]}
    with pytest.raises(DataError) as err:
        check_no_leak(sides, where="data.fold_column 'fold' in m.csv", name_of=lambda s, j: f"row {s}/{j}")
    assert str(err.value) == ("patient y is in both fold 0 and fold 2 (data.fold_column 'fold' in m.csv: "
                              "row fold 0/1 in fold 0, row fold 2/1 in fold 2); 1 more patient(s) are on two sides too")


def test_leak_check_is_vectorised_and_exact_on_a_large_split():
    patients = np.array([f"p{i}" for i in range(200_000)], dtype=object)
    check_no_leak({"train": patients[:150_000], "test": patients[150_000:]}, where="w")
    with pytest.raises(DataError, match="patient p149999 is in both train and test"):
        check_no_leak({"train": patients[:150_000], "test": patients[149_999:]}, where="w")


def _manifest(patients, labels, split=None, fold=None) -> Manifest:
    n = len(patients)
    return Manifest(images=[f"{i}.png" for i in range(n)], paths=[], patients=np.asarray(patients, dtype=str),
                    labels=np.asarray(labels), task="binary", names=["0", "1"], label_columns=["label"],
                    split=None if split is None else np.asarray(split, dtype=str),
                    fold=None if fold is None else np.asarray(fold))


def test_units_refuse_a_shared_patient():
    m = _manifest(["a", "b", "c", "b"], [0, 1, 0, 1], split=["train", "train", "test", "test"])
    with pytest.raises(DataError, match=r"patient b is in both train and test \(column 'split' in manifest: "
                                        r"CSV line 3 in train, CSV line 5 in test\)"):
        make_units(m, need_val=False)


def test_units_refuse_a_patient_in_two_folds():
    m = _manifest(["a", "b", "c", "d", "b"], [0, 1, 0, 1, 1], fold=[0, 1, 2, 2, 2])
    with pytest.raises(DataError, match=r"patient b is in both fold 1 and fold 2 \(column 'fold' in manifest: "
                                        r"CSV line 3 in fold 1, CSV line 6 in fold 2\)"):
        make_units(m, need_val=True)
    m = _manifest(["a", "b", "c", "d", "b"], [0, 1, 0, 1, 1], fold=[0, 1, 2, 2, 1])
    assert [u.name for u in make_units(m, need_val=True)] == ["fold0", "fold1", "fold2"]


def test_units_empty_split_and_carved_validation():
    m = _manifest(["a", "b", "c"], [0, 1, 0], split=["train", "train", "val"])
    with pytest.raises(DataError, match="split 'test' is empty"):
        make_units(m, need_val=False)
    patients = [f"p{i}" for i in range(10)] + ["t1", "t2"]
    labels = [i % 2 for i in range(10)] + [0, 1]
    m = _manifest(patients, labels, split=["train"] * 10 + ["test"] * 2)
    (unit,) = make_units(m, need_val=True, val_fraction=0.2)
    assert unit.val.size == 2 and unit.train.size == 8 and unit.test.tolist() == [10, 11]
    assert not set(unit.val.tolist()) & set(unit.train.tolist())


def test_units_from_folds_rotate_validation():
    patients = [f"p{i}" for i in range(8)]
    m = _manifest(patients, [i % 2 for i in range(8)], fold=[0, 0, 1, 1, 2, 2, 3, 3])
    units = make_units(m, need_val=True)
    assert [u.name for u in units] == ["fold0", "fold1", "fold2", "fold3"]
    u = units[3]
    assert u.test.tolist() == [6, 7] and u.val.tolist() == [0, 1] and u.train.tolist() == [2, 3, 4, 5]
    # without validation need, the "next" fold stays in training
    assert make_units(m, need_val=False)[0].train.tolist() == [2, 3, 4, 5, 6, 7]
