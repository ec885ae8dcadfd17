"""Bad input to the classification verbs ends with ONE line on stderr and exit code 2 (real CLI)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _dataset(root: Path, rows: list[dict[str, str]], header: list[str]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 50 * i, dtype=np.uint8)).save(root / "images" / f"{i}.png")
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def _row(i: int, label: str, split: str) -> dict[str, str]:
    return {"image": f"images/{i}.png", "label": label, "patient": f"P{i}", "split": split}


GOOD = [_row(0, "a", "train"), _row(1, "b", "train"), _row(2, "a", "test"), _row(3, "b", "test")]


@pytest.mark.parametrize(
    "rows, header, extra, expected",
    [
        ([*GOOD[:3], {**GOOD[3], "image": "images/nope.png"}], ["image", "label", "patient", "split"], [],
         "image not found: "),
        (GOOD, ["image", "label", "patient", "split"], ["data.label_columns=[finding]"],
         "label column 'finding' not found"),
        ([{**r, "label": "a"} for r in GOOD], ["image", "label", "patient", "split"], [], "one class only"),
        ([{**r, "split": "train"} for r in GOOD], ["image", "label", "patient", "split"], [],
         "split 'test' is empty"),
        ([*GOOD[:3], {**GOOD[3], "patient": "P0"}], ["image", "label", "patient", "split"], [],
         "patient P0 is in both train and test (column 'split' in manifest "),
    ],
    ids=["missing-image", "no-label-column", "one-class", "empty-split", "shared-patient"],
)
def test_bad_input_one_line_exit_2(tmp_path, cli, rows, header, extra, expected):
    manifest = _dataset(tmp_path, rows, header)
    proc = cli("eval", "knn", "--config", "knn_tiny", f"data.manifest={manifest}", "backbone=random:dinov2_tiny",
               f"out={tmp_path / 'run'}", *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("meddino: error: ") and expected in lines[0], lines[0]
    if "image not found" in expected:
        assert "nope.png" in lines[0]


def test_a_patient_on_two_sides_is_refused_by_every_protocol(tmp_path, cli):
    """The few-shot draw and the fold scheme go through the same check as kNN: one line naming the patient,
    the two sides and the rows, exit 2, before any model loads and before a run folder exists."""

    def run(verb, column, values):
        rows = [{k: x for k, x in _row(i, "ab"[i % 2], "").items() if k != "split"} | {column: v}
                for i, v in enumerate(values)]
        rows[3]["patient"] = "P0"
        manifest = _dataset(tmp_path, rows, ["image", "label", "patient", column])
        proc = cli("eval", verb, "--config", f"{verb}_tiny", f"data.manifest={manifest}",
                   "backbone=random:dinov2_tiny", f"out={tmp_path / 'run'}")
        assert proc.returncode == 2, proc.stderr
        assert not (tmp_path / "run").exists()
        return proc.stderr.strip().splitlines(), manifest.resolve()

    lines, m = run("fewshot", "split", ["train", "train", "test", "test"])
    assert lines == [f"meddino: error: patient P0 is in both train and test (column 'split' in manifest {m}: "
                     "CSV line 2 in train, CSV line 5 in test)"], lines
    lines, m = run("finetune", "fold", ["0", "1", "2", "2"])
    assert lines == [f"meddino: error: patient P0 is in both fold 0 and fold 2 (column 'fold' in manifest {m}: "
                     "CSV line 2 in fold 0, CSV line 5 in fold 2)"], lines


def test_shipped_recipes_validate():
    from meddino.config import list_recipes, load_config
    from meddino.tasks.classify.config import ClassifyConfig

    names = [n for n, _ in list_recipes()["classify"]]
    assert {"seed001_knn", "seed001_linear", "seed001_fewshot", "seed001_lora", "seed001_bitfit", "seed001_finetune",
            "seed002_binary_cv", "knn_tiny", "linear_tiny", "fewshot_tiny", "finetune_tiny"} <= set(names)
    for name in names:
        load_config(ClassifyConfig, name, group="classify")
    lora = load_config(ClassifyConfig, "seed001_lora", group="classify").finetune
    assert (lora.mode, lora.lora_r, lora.lora_alpha, lora.lora_targets) == ("lora", 48, 16.0, ["qkv", "fc1", "fc2"])
    cv = load_config(ClassifyConfig, "seed002_binary_cv", group="classify").finetune
    assert (cv.lrs, cv.batch_sizes, cv.epochs, cv.head) == ([1e-5, 1e-6], [8, 16, 32], 30, "mlp")


def test_unknown_key_is_one_line(tmp_path, cli):
    proc = cli("eval", "linear", "--config", "linear_tiny", "linear.lr=0.1", f"out={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "linear.lr" in proc.stderr
