"""End-to-end ``meddino eval seg`` on a generated MSD-style NIfTI layout (slice-by-slice, 3-D metrics in mm)
and ``meddino predict seg`` on a volume (NIfTI mask with the input's affine)."""

from __future__ import annotations

import numpy as np
import pytest
from test_seg_cli import TINY, _check_run
from test_seg_data import make_msd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("head", ["linear", "unet", "eomt"])
def test_eval_and_predict_msd_volumes(cli, tmp_path, head):
    import nibabel as nib

    root = make_msd(tmp_path / "msd", cases=3, shape=(4, 32, 32))
    out = tmp_path / "run"
    r = cli("eval", "seg", *TINY, "data.layout=msd", f"data.root={root}", f"head={head}", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    res, rows = _check_run(out, head, n_classes_reported=2, unit="mm")
    assert res["classes"] == ["background", "heart", "core"]
    # one row per volume and class: metrics are 3-D, not per slice
    assert sorted({r["image"] for r in rows}) == sorted(res["folds"][0]["test"])
    # a missed structure is counted with the image-diagonal penalty in mm: sqrt((4*3)^2 + (32*1.25)^2 + (32*1.5)^2)
    diag = float(np.sqrt((4 * 3.0) ** 2 + (32 * 1.25) ** 2 + (32 * 1.5) ** 2))
    for row in rows:
        if row["gt_present"] == "True" and row["pred_present"] == "False":
            assert float(row["hd95"]) == pytest.approx(diag) and float(row["dice"]) == 0.0
    saved = next((out / "predictions" / "masks" / "fold0").glob("*_mask.nii.gz"))
    ref = nib.load(root / "labelsTr" / saved.name.replace("_mask", ""))
    assert np.allclose(nib.load(saved).affine, ref.affine) and nib.load(saved).shape == ref.shape

    pred = tmp_path / "pred"
    r = cli("predict", "seg", root / "imagesTr" / "heart_000.nii.gz", f"model={out}", f"out={pred}")
    assert r.returncode == 0, r.stderr[-2000:]
    img = nib.load(pred / "heart_000_mask.nii.gz")
    ref = nib.load(root / "imagesTr" / "heart_000.nii.gz")
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}
