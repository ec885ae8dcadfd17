"""Multi-crop on the training device (``crops.device=cuda``): the loader workers only read bytes and draw
the views; the training process decodes the batch's JPEGs there and renders every view there.

Split of the work:

- Worker (:func:`encode`): for a JPEG file in RGB or greyscale, only the header is parsed (its size) and the
  file's bytes are read; every view's parameters are drawn from that size with the sample's own generator,
  exactly as :meth:`MultiCropAugmentation.__call__` draws them (the same first draw of the same
  generator), so a resumed run and any worker count see the same boxes, flips and colour parameters as the
  CPU path. Everything else (PNG, TIFF, DICOM, video frames, volume slices, CMYK JPEGs) is decoded on the
  worker's CPU as today, JPEGs of other modes at the reduced DCT scale the crops allow, and travels as a
  uint8 ``[3, h, w]`` tensor.
- Training process (:class:`DeviceCrops`): one ``torchvision.io.decode_jpeg(list, device=...)`` call per
  batch (nvJPEG on a GPU, libjpeg on a CPU), then all global views of the batch in one
  :meth:`MultiCropAugmentation.render` call and all local views in another: the same kernels
  (:mod:`meddino.data.augment_ops`), on the device's tensors.

Differences from the CPU path: a JPEG is always decoded at full size (torchvision's decoders have no DCT
scaling), so crops are resampled from the full image, as the official pipeline does; the CPU path's reduced
decode differs from it by about a grey level. On a GPU the kernels take their GPU forms (the resize in
float32 as two rounded passes, within a grey level of the uint8 kernel; contrast's mean luma as a device
tensor; jitter batched by position in the random order). A file whose bytes do not decode is a
:class:`~meddino.data.sources.Skipped` sample, as on the CPU path.

``crops.device=cpu`` runs this same code with ``device="cpu"`` in the training process: slower than the
workers' path, it exists so that the device path is exercised (and tested) without a GPU. The suite runs it
on CPU tensors only; the CUDA branch has not been run on a GPU in this project yet.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meddino.data import io
from meddino.data.multicrop import MultiCropAugmentation, ViewParams
from meddino.data.sources import Skipped
from meddino.errors import DataError

#: PIL modes of a JPEG sent to the device decoder (decoded there to RGB; greyscale repeated on 3 channels,
#: as :func:`meddino.data.io.pil_to_rgb` does); CMYK/YCCK JPEGs are decoded on the worker by PIL.
DEVICE_JPEG_MODES = io.TORCH_JPEG_MODES


@dataclass
class EncodedSample:
    """One sample as a worker hands it on: JPEG bytes (``jpeg``, uint8 1-D) or a decoded uint8
    ``[3, h, w]`` image that may be a reduced decode of the ``full_size`` (h, w) the views were drawn for."""

    data: torch.Tensor
    jpeg: bool
    views: list[ViewParams]
    full_size: tuple[int, int]
    where: str  # "#index path", the name of a Skipped line

    def pin_memory(self) -> EncodedSample:
        """What the DataLoader's pin thread calls: decoded pixels pinned (their copy to the GPU then does
        not block); JPEG bytes stay as they are (the decoder reads them on the host)."""
        return self if self.jpeg else dataclasses.replace(self, data=self.data.pin_memory())


def encode(aug: MultiCropAugmentation, image: Any, generator: torch.Generator, where: str = "") -> EncodedSample:
    """The worker's part: views drawn from the image size (the header, for a JPEG) and the bytes or pixels."""
    if isinstance(image, (str, os.PathLike)) and not io.is_dicom_file(Path(image)):
        path = Path(image)
        im = io.open_image(path)
        try:
            if im.format == "JPEG" and im.mode in DEVICE_JPEG_MODES:
                width, height = im.size
                views = aug.sample_params(height, width, generator)
                try:
                    raw = path.read_bytes()
                except OSError as exc:
                    raise DataError(f"unreadable image {path}: {exc.strerror or exc}") from None
                data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                return EncodedSample(data, True, views, (height, width), where or str(path))
        finally:
            im.close()
    src, views, full = aug._load(image, generator)
    return EncodedSample(src.contiguous(), False, views, full, where or type(image).__name__)


class DeviceCrops:
    """The training process's part: a list of :class:`EncodedSample` -> crop-major
    ``{"global": [2, B, 3, G, G], "local": [n, B, 3, L, L]}`` on ``device``, the samples kept, the skips."""

    def __init__(self, aug: MultiCropAugmentation, device: str | torch.device = "cpu"):
        self.aug, self.device = aug, torch.device(device)

    def decode(self, samples: Sequence[EncodedSample]) -> list[torch.Tensor | Skipped]:
        """Each sample's uint8 [3, h, w] image on the device (all JPEGs in one decoder call), or Skipped."""
        out: list[torch.Tensor | Skipped] = [None] * len(samples)  # type: ignore[list-item]
        jpegs = [i for i, s in enumerate(samples) if s.jpeg]
        if jpegs:
            data = [samples[i].data for i in jpegs]
            try:
                images = io.decode_jpeg_torch(data, self.device)
            except RuntimeError:  # one bad file fails the batch call: decode one by one to name it
                images = []
                for i, d in zip(jpegs, data):
                    try:
                        images.append(io.decode_jpeg_torch(d, self.device))
                    except RuntimeError as exc:
                        images.append(Skipped(samples[i].where, f"JPEG decoder: {io.decoder_reason(exc)}"))
            for i, image in zip(jpegs, images):
                out[i] = image
        for i, s in enumerate(samples):
            if not s.jpeg:
                out[i] = s.data.to(self.device, non_blocking=True)
        return out

    def __call__(self, samples: Sequence[EncodedSample], trace: list[tuple[int, int, str]] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], list[int], list[Skipped]]:
        """``trace`` (tests only): gets ``(sample, view, op)`` for every op applied (see
        :meth:`MultiCropAugmentation.render`)."""
        decoded = self.decode(samples)
        kept = [i for i, d in enumerate(decoded) if not isinstance(d, Skipped)]
        skipped = [d for d in decoded if isinstance(d, Skipped)]
        aug = self.aug
        b = len(kept)
        items: dict[str, list[tuple[torch.Tensor, ViewParams, float, float]]] = {"global": [], "local": []}
        for v in range(2 + aug.n_local):  # crop-major: view v of every kept sample, then view v + 1
            key = "global" if v < 2 else "local"
            for i in kept:
                src, s = decoded[i], samples[i]
                sy, sx = src.shape[1] / s.full_size[0], src.shape[2] / s.full_size[1]  # type: ignore[union-attr]
                items[key].append((src, s.views[v], sy, sx))  # type: ignore[arg-type]
        rows: dict[str, list[tuple[int, str]] | None] = {"global": [], "local": []} if trace is not None else {
            "global": None, "local": None}
        g = aug.render(items["global"], aug.global_size, rows["global"])
        loc = aug.render(items["local"], aug.local_size, rows["local"])
        if trace is not None:
            for first, key in ((0, "global"), (2, "local")):
                trace.extend((kept[r % b], first + r // b, op) for r, op in rows[key])  # type: ignore[union-attr]
        g = g.view(2, b, 3, aug.global_size, aug.global_size)
        loc = loc.view(aug.n_local, b, 3, aug.local_size, aug.local_size)
        return {"global": g, "local": loc}, kept, skipped

