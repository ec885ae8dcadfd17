"""``meddino viz pca IMAGES --backbone CKPT [--backbone CKPT ...] out=DIR``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    viz = sub.add_parser("viz", help="feature visualisations (PCA maps, attention maps)")
    viz_sub = viz.add_subparsers(dest="viz_command", metavar="KIND")
    p = viz_sub.add_parser(
        "pca",
        help="first three PCA components of patch features as RGB, side by side for several backbones",
        description="PCA fitted jointly over the images of the set (per backbone); optional background "
        "removal by a threshold on the first component and a refit on the foreground (seed 001). Also "
        "writes the last block's CLS attention maps.",
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--backbone", action="append", required=True, help="backbone spec (repeatable)")
    p.add_argument("--label", action="append", help="display name per --backbone, in order")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="out=DIR img_size=N threshold=T invert=true max_images=N")
    p.set_defaults(handler=_pca)
    viz.set_defaults(handler=lambda _a: viz.print_help() or 2)


def _pca(args: argparse.Namespace) -> int:
    from meddino.config import load_config
    from meddino.viz.run import VizConfig, run_pca

    # positional IMAGES and key=value overrides share argv: split them
    images = [a for a in args.images if "=" not in a]
    overrides = [a for a in args.images if "=" in a] + list(args.overrides)
    cfg = load_config(VizConfig, None, overrides)
    cfg.images = images
    cfg.backbones = list(args.backbone)
    cfg.labels = list(args.label or [])
    out = run_pca(cfg)
    print(f"wrote {out}")
    return 0
