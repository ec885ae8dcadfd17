"""The classification recipes against their seeds: every recipe states its headline level (seed 001 and 002
report image-level AUROC) and results.json says which level it used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from meddino.config import load_config, recipes_root
from meddino.tasks.classify.config import ClassifyConfig


def _classify_recipes():
    return [(path.stem, path) for path in sorted((recipes_root() / "classify").glob("*.yaml"))]


def test_every_classify_recipe_states_its_level_in_its_yaml():
    """Read the YAML itself: a level left to the schema default (patient) does not count as stated."""
    recipes = _classify_recipes()
    assert len(recipes) >= 11
    levels = {}
    for name, path in recipes:
        raw = yaml.safe_load(open(path).read()) or {}
        assert "level" in raw, f"{name} ({path}) does not state its level"
        assert raw["level"] in ("image", "patient"), name
        levels[name] = raw["level"]
        assert load_config(ClassifyConfig, name, group="classify").level == raw["level"]
    for name in levels:
        if name.startswith(("seed001_", "seed002_")):
            assert levels[name] == "image", name  # both seeds report image-level AUROC


@pytest.mark.parametrize("level", ["image", "patient"])
def test_results_json_names_the_level_its_metrics_are_at(tmp_path, level):
    from test_classify_frozen import _cache

    from meddino.tasks.classify.frozen import run_knn

    emb = _cache(tmp_path)
    cfg = ClassifyConfig.model_validate({"embeddings": str(emb), "out": str(tmp_path / "knn"), "level": level,
                                         "knn": {"k": [3], "primary_k": 3}})
    run_knn(cfg)
    res = json.loads((tmp_path / "knn/results.json").read_text())
    assert res["level"] == level
    assert res["metrics"] == res[f"metrics_{level}"]
    other = "patient" if level == "image" else "image"
    assert res["metrics"]["n"] != res[f"metrics_{other}"]["n"]  # 2 images per patient: the levels differ


def test_results_json_falls_back_to_image_level_and_says_so(tmp_path):
    """A patient whose images carry different labels has no patient label: the run reports image level."""
    import torch

    from meddino.data.manifest import Manifest
    from meddino.tasks.classify.embed import save_cache
    from meddino.tasks.classify.frozen import run_knn

    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i:02d}" for i in range(12)], 2)
    labels = np.tile([0, 1], 12)  # the two images of every patient disagree
    feats = {k: torch.tensor(np.eye(8)[labels] * 4 + rng.normal(scale=0.3, size=(24, 8)), dtype=torch.float32)
             for k in ("cls", "mean_patch", "cls_blocks", "mean_patch_blocks")}
    split = np.where(np.arange(24) < 12, "train", np.where(np.arange(24) < 18, "val", "test"))
    m = Manifest(images=[f"{i}.png" for i in range(24)], paths=[tmp_path / f"{i}.png" for i in range(24)],
                 patients=patients, labels=labels, task="binary", names=["a", "b"], label_columns=["label"],
                 split=split, dataset="toy")
    emb = save_cache(tmp_path / "emb", feats, m, {"backbone": "random:toy", "model": "toy"})
    cfg = ClassifyConfig.model_validate({"embeddings": str(emb), "out": str(tmp_path / "knn"), "level": "patient",
                                         "knn": {"k": [3], "primary_k": 3}})
    run_knn(cfg)
    res = json.loads((tmp_path / "knn/results.json").read_text())
    assert res["level"] == "image" and res["metrics_patient"] is None
    assert res["metrics"] == res["metrics_image"]
