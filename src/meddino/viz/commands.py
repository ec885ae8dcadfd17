"""Verb of the viz layer: ``meddino viz pca IMAGES --backbone CKPT [--backbone CKPT ...] out=DIR``."""

from __future__ import annotations

from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "pca",
        group="viz",
        help="first three PCA components of patch features as RGB, side by side for several backbones",
        description="PCA fitted jointly over the images of the set (per backbone); optional background "
        "removal by a threshold on the first component and a refit on the foreground (seed 001). Also "
        "writes the last block's CLS attention maps.",
        schema="meddino.viz.run:VizConfig",
        run="meddino.viz.commands:run",
        run_folder="out",
        args=(
            Arg("images", "images", nargs="+", help="image files or folders"),
            Arg("--backbone", "backbones", repeat=True, deprecated="backbones=[SPEC, ...]",
                help="deprecated: use backbones=[SPEC, ...]"),
            Arg("--label", "labels", repeat=True, deprecated="labels=[NAME, ...]",
                help="deprecated: use labels=[NAME, ...]"),
        ),
        overrides_help="backbones=[SPEC, ...] labels=[NAME, ...] (one display name per backbone) out=DIR img_size=N "
        "threshold=T invert=true max_images=N",
    ),
)


def run(cfg) -> int:  # noqa: ANN001 - VizConfig, imported when the verb runs
    from meddino.viz.run import run_pca

    print(f"wrote {run_pca(cfg)}")
    return 0
