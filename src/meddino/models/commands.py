"""Verbs of the models layer: ``meddino convert SRC DST``, any readable checkpoint (a sharded pretraining
checkpoint folder too: :mod:`meddino.models.checkpoints.dcp`) -> meddino export (safetensors + JSON); ``meddino export folder RUN``, a pretraining run -> a model folder timm and the Hugging
Face Hub load (:mod:`meddino.models.model_folder`)."""

from __future__ import annotations

from typing import Literal

from meddino.config import Schema
from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "convert",
        help="convert a checkpoint (official, timm, Hugging Face, seed, a sharded pretraining .dcp) to a meddino export",
        description="Read SRC in any supported format and write DST.safetensors + DST.json "
        "(timm key layout, loadable by meddino and plain timm).",
        schema="meddino.models.commands:ConvertConfig",
        run="meddino.models.commands:run_convert",
        source="convert",
        overrides_help="arch=NAME (the architecture it must match) img_size=N (resample position embeddings "
        "once to it) pos_embed_resample=dinov1|dinov2|dinov2_reg|timm num_heads=N key=teacher|student|...",
        args=(
            Arg("src", "src", help="checkpoint file or folder, e.g. a sharded pretraining checkpoint_N.dcp (read on "
                "this process alone; a trailing #key picks a wrapper entry, e.g. #student)"),
            Arg("dst", "dst", help="output path (.safetensors is added when missing)"),
            Arg("--arch", "arch", deprecated="arch=NAME", help="deprecated: use arch=NAME"),
            Arg("--img-size", "img_size", deprecated="img_size=N", help="deprecated: use img_size=N"),
            Arg("--pos-embed-resample", "pos_embed_resample", deprecated="pos_embed_resample=MODE",
                choices=("dinov1", "dinov2", "dinov2_reg", "timm"), help="deprecated: use pos_embed_resample=MODE"),
            Arg("--num-heads", "num_heads", deprecated="num_heads=N", help="deprecated: use num_heads=N"),
            Arg("--key", "key", deprecated="key=ENTRY", help="deprecated: use key=ENTRY"),
        ),
    ),
    Verb(
        "folder",
        group="export",
        help="a pretraining run as a model folder: model.safetensors, timm's config.json, a model card",
        description="Write RUN's teacher backbone as a folder that timm loads "
        "(timm.create_model('local-dir:OUT', pretrained=True)), the Hugging Face Hub takes as it is, and "
        "meddino reads as backbone=OUT: model.safetensors, model.json (meddino's sidecar), config.json (timm's "
        "architecture, model_args and pretrained_cfg) and README.md, a model card generated from the run "
        "(data, recipe and resolved config, iterations, kNN monitor, health at the end; license left to you).",
        schema="meddino.models.model_folder:ExportFolderConfig",
        run="meddino.models.model_folder:run_export_folder",
        source="export folder",
        run_folder="out",
        overrides_help="out=DIR (default RUN/model) name=NAME (the model's name in the card)",
        args=(Arg("run", "run", help="the folder `meddino pretrain` wrote (its out=)"),),
    ),
)


class ConvertConfig(Schema):
    src: str
    dst: str
    arch: str | None = None
    img_size: int | None = None
    pos_embed_resample: Literal["dinov1", "dinov2", "dinov2_reg", "timm"] | None = None
    num_heads: int | None = None
    key: str | None = None


def run_convert(cfg: ConvertConfig) -> int:
    from meddino.models import export_backbone, load_backbone  # torch: only once the verb runs

    extra = {"num_heads": cfg.num_heads} if cfg.num_heads else {}
    backbone = load_backbone(cfg.src, arch=cfg.arch, img_size=cfg.img_size, key=cfg.key,
                             pos_embed_resample=cfg.pos_embed_resample, resize_pos_embed=True, **extra)
    out = export_backbone(backbone, cfg.dst)
    print(backbone.load_report.summary())
    n_params = sum(p.numel() for p in backbone.parameters())
    print(f"wrote {out} and {out.with_suffix('.json')} ({backbone.arch['timm_name']}, "
          f"{backbone.version}, {n_params / 1e6:.2f} M parameters)")
    return 0
