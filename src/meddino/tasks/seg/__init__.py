"""Segmentation evaluation (``meddino eval seg`` / ``meddino predict seg``).

Linear and U-Net decoders on a frozen or trainable encoder (seed 001), EoMT (seed 000), MONAI's U-Net and
timm CNN encoders as baselines, all through the same data layouts (:mod:`meddino.data.seg_layouts`, read by
:mod:`.data`; folds in :mod:`.folds`), head registry (:mod:`.heads`), training loop
(:mod:`.train`) and metrics (:mod:`meddino.metrics.segmentation`). Kept light: nothing heavy is imported
here, so the CLI's ``--help`` stays fast.
"""
