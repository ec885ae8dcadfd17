"""Verb of the deploy layer: ``meddino export onnx SRC OUT`` (see docs/deploy.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meddino.config import Schema
from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "onnx",
        group="export",
        help="ONNX graph of a backbone, a trained segmentation model or the phase frame model, checked with "
        "onnxruntime",
        description="Write OUT/model.onnx (input size fixed at export, position embeddings and RoPE baked in, "
        "dynamic batch) and OUT/model.json (opset, input size, normalisation, outputs, the check). The file is "
        "run with onnxruntime on CPU and compared with PyTorch before it is kept: the largest absolute "
        "difference is printed, and one above max_abs_diff (1e-4, fp32) refuses the export.",
        schema="meddino.deploy.commands:ExportOnnxConfig",
        run="meddino.deploy.onnx:run_export_onnx",
        source="export onnx",
        run_folder="out",
        args=(
            Arg("src", "src", help="a backbone (checkpoint, random:<arch>, timm:<name>) or a run folder of "
                "`meddino eval seg` / `meddino eval phase`"),
            Arg("out", "out", help="output folder (model.onnx + model.json)"),
        ),
        overrides_help="img_size=N (a backbone's fixed input size; trained models keep theirs) fold=K (seg) "
        "opset=18 exporter=torchscript|dynamo max_abs_diff=1e-4",
    ),
)


class ExportOnnxConfig(Schema):
    src: str
    out: str
    img_size: int | None = Field(None, ge=8)  # backbones only (default: the backbone's own)
    fold: int | None = Field(None, ge=0)  # segmentation run: which fold (default: best validation Dice)
    opset: int = Field(18, ge=17)
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    max_abs_diff: float = Field(1e-4, gt=0)  # onnxruntime vs PyTorch, fp32; refused above
