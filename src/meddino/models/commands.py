"""``meddino convert SRC DST``: any readable checkpoint -> meddino export (safetensors + JSON)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (official, timm, Hugging Face, seed) to a meddino export",
        description="Read SRC in any supported format and write DST.safetensors + DST.json "
        "(timm key layout, loadable by meddino and plain timm).",
    )
    p.add_argument("src", help="checkpoint file or folder (a trailing #key picks a wrapper entry, e.g. #student)")
    p.add_argument("dst", help="output path (.safetensors is added when missing)")
    p.add_argument("--arch", help="architecture the checkpoint must match (alias or timm name)")
    p.add_argument("--img-size", type=int, help="resample position embeddings once to this image size")
    p.add_argument("--pos-embed-resample", choices=("dinov1", "dinov2", "dinov2_reg", "timm"),
                   help="how position embeddings are resampled to other grids (default: the version's official mode)")
    p.add_argument("--num-heads", type=int, help="attention heads, for widths other than the standard S/B/L/g")
    p.add_argument("--key", help="wrapper entry to take (teacher, student, model, ...)")
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from meddino.models import export_backbone, load_backbone

    extra = {"num_heads": args.num_heads} if args.num_heads else {}
    backbone = load_backbone(args.src, arch=args.arch, img_size=args.img_size, key=args.key,
                             pos_embed_resample=args.pos_embed_resample, resize_pos_embed=True, **extra)
    out = export_backbone(backbone, args.dst)
    print(backbone.load_report.summary())
    n_params = sum(p.numel() for p in backbone.parameters())
    print(f"wrote {out} and {out.with_suffix('.json')} ({backbone.arch['timm_name']}, "
          f"{backbone.version}, {n_params / 1e6:.2f} M parameters)")
    return 0
