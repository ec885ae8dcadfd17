"""The pretraining data stream: a resumable, rank-sharded batch order and per-sample seeded multi-crops.

Reproducibility contract (what ``resume=auto`` relies on): the order of the data is a pure function of
(seed, data epoch) -- one ``randperm`` of the whole source per epoch -- and iteration ``it`` of a run with
global batch ``GB`` takes positions ``[step * GB, (step + 1) * GB)`` of that permutation (``step = it mod
steps_per_epoch``, incomplete last batches are dropped); rank ``r`` takes the ``r``-th contiguous slice
of ``GB / world_size``. Each sample's augmentation generator is seeded from (seed, epoch, position) by
:func:`meddino.data.multicrop.sample_generator`, so crops do not depend on the worker that made them, on
the number of workers, or on the number of processes: a 2-process run sees exactly the crops of a
1-process run with the same global batch, and a resumed run the crops of an uninterrupted one. The
sampler starts at any iteration, mid-epoch included.

Unreadable files (corrupt, truncated, empty) are not fatal: the sample comes back as a :class:`Skipped`
record, the collate drops it from the batch, and the engine counts the distinct files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from meddino.data import index as dx
from meddino.data import io
from meddino.data.device_crops import DeviceCrops, encode
from meddino.data.multicrop import MultiCropAugmentation, collate_multicrop, sample_generator
from meddino.data.sources import KIND_NAMES, PretrainSource, Skipped
from meddino import errors
from meddino.errors import ConfigError, DataError, UserError, first_line
from meddino.pretrain.config import PretrainConfig


def build_source(cfg: PretrainConfig, out: str | Path | None = None, is_main: bool = True) -> Any:
    """:class:`meddino.data.sources.PretrainSource` over ``data.path`` (image/DICOM folders, CSV manifests,
    videos sampled at ``data.fps``, volumes sliced along ``data.volume_axes``, or an index file). The
    multi-crop is applied here (not by the source) so that the per-sample seed can follow the sampler's
    positions. The index follows ``data.index`` (:func:`shared_index`)."""
    if not cfg.data.path:
        raise ConfigError("data.path: give a folder of images/videos/DICOM/volumes or a manifest CSV")
    root = Path(cfg.data.path).expanduser()
    if not root.exists():
        raise DataError(f"data.path not found: {root}")
    d = cfg.data
    window = tuple(d.window) if isinstance(d.window, (list, tuple)) else d.window
    io.resolve_window(window, "data.window")
    index = shared_index(cfg, out, is_main)
    if index is None:
        source = PretrainSource(root, transform=None, fps=d.fps, axes=tuple(d.volume_axes), window=window,
                                seed=cfg.train.seed)
    else:
        source = PretrainSource.from_index(index, window=window, seed=cfg.train.seed)
    if len(source) == 0:
        raise DataError(f"data.path: no images, videos, DICOM files or volumes found in {root}")
    if d.kind != "auto":
        sample_kind = {"image": "image", "dicom": "dicom", "video": "frame", "volume": "slice"}[d.kind]

        keep = np.flatnonzero(np.asarray(source.kinds) == KIND_NAMES.index(sample_kind))
        if not len(keep):
            raise DataError(f"data.kind={d.kind}: none found in {root} (found: {source.counts()})")
        if len(keep) < len(source):
            source = _KindSubset(source, keep)
    return source


def shared_index(cfg: PretrainConfig, out: str | Path | None = None, is_main: bool = True) -> Any:
    """The memory-mapped :class:`~meddino.data.index.SampleIndex` ``data.index`` asks for, or None (index
    in memory: ``data.index=off``, or ``auto`` without an index beside the data and without a run folder).

    Rank 0 alone checks, builds or rebuilds the file (a stale one with one line saying why); the other
    ranks wait in a broadcast that also carries rank 0's error, so a refusal ends every rank alike.
    """
    from meddino.pretrain.distributed import broadcast_object  # why: torch.distributed only here

    d = cfg.data
    root = Path(d.path).expanduser()
    mode = d.index
    if mode == "off" and not dx.is_index_file(root):
        return None
    result: tuple[str, str] | None = None
    if is_main:
        try:
            built = _ensure_index(cfg, root, out)
            result = ("", str(built) if built else "")
        except UserError as exc:
            result = (type(exc).__name__, str(exc))
    error, value = broadcast_object(result)
    if error:  # the same refusal on every rank, of the same class
        raise getattr(errors, error, DataError)(value)
    return dx.open_index(value) if value else None


def _ensure_index(cfg: PretrainConfig, root: Path, out: str | Path | None) -> Path | None:
    """Rank 0: the path of a valid index for ``data.path`` (checked, built or rebuilt), or None."""
    d = cfg.data
    params = dx.index_params(d.fps, d.volume_axes, None, None, True)
    if dx.is_index_file(root):  # data.path is an index: its source and parameters
        index = dx.open_index(root)
        wrong = dx.params_mismatch(index, params)
        if wrong:
            raise ConfigError(f"data.path: the index {root} was {wrong}; set the index's value "
                              f"or rebuild it with meddino data index {index.header['source']} out={root}")
        return _fresh_or_rebuilt(index, root, params)
    source = os.path.abspath(root)
    if d.index == "auto":
        beside = dx.default_index_path(root)
        fallback = Path(out) / "data.mdidx" if out else None
        if beside.is_file():
            index = dx.open_index(beside)
            if index.header.get("source") == source and not dx.params_mismatch(index, params):
                return _fresh_or_rebuilt(index, beside, params, fallback)
        if fallback is None:
            return None
        target = fallback
    else:
        target = Path(d.index).expanduser()
    if target.is_file():
        index = dx.open_index(target)
        if index.header.get("source") != source:
            raise ConfigError(f"data.index: {target} indexes {index.header.get('source')}, not data.path "
                              f"{source}; give another file or data.index=auto")
        wrong = dx.params_mismatch(index, params)
        if wrong:
            dx.say(f"meddino: the index {target} was {wrong}; rebuilding it")
            return _build(root, target, params)
        return _fresh_or_rebuilt(index, target, params)
    if target.exists():
        raise ConfigError(f"data.index: {target} is not a file")
    return _build(root, target, params)


def _fresh_or_rebuilt(index: Any, path: Path, params: dict[str, Any], fallback: Path | None = None) -> Path:
    reason = dx.stale_reason(index)
    if reason is None:
        return path
    source = Path(index.header["source"])
    try:
        dx.say(f"meddino: the index {path} is stale ({reason}); rebuilding it")
        return _build(source, path, params)
    except PermissionError:
        if fallback is None:
            raise
        dx.say(f"meddino: {path} is not writable; the rebuilt index goes to {fallback}")
        return _build(source, fallback, params)


def _build(source: Path, target: Path, params: dict[str, Any]) -> Path:
    index = dx.build_index(source, fps=params["fps"], axes=params["axes"], progress=True, absolute=True)
    return dx.write_index(index, target)


def require_full_batch(source: Any, global_batch: int, root: str | Path) -> None:
    """Refuse a source smaller than one global batch before the model is built, saying why: indexing
    opens no image, so a folder of corrupt files looks like a small one until its files are read (a
    source this small is read whole)."""
    n = len(source)
    if n >= global_batch:
        return
    skipped = list(getattr(source, "index_skipped", []))
    readable = 0
    for index in range(n):
        try:
            sample = source.load(index)
            if isinstance(sample, str):  # ordinary images are decoded by the augmentation
                io.read_image(sample)
            readable += 1
        except (DataError, OSError, ValueError, EOFError, MemoryError) as exc:
            skipped.append(Skipped(source.describe(index)["path"], first_line(exc, 300)))
    if not readable:
        raise DataError(f"{root}: no readable images ({describe_skipped(skipped, root)})")
    raise DataError(
        f"data: {n} inputs but a global batch of {global_batch} (data.batch_size x processes)"
        + (f", {describe_skipped(skipped, root)}" if skipped else "")
        + "; use more data or a smaller data.batch_size"
    )


def describe_skipped(skipped: list[Skipped], root: str | Path | None = None, show: int = 2) -> str:
    """'N file(s) skipped: NAME: REASON; ...' for the distinct files of ``skipped`` (a CropDataset's
    ``#index `` prefix dropped), named relative to ``root`` when under it."""
    by_file: dict[str, str] = {}
    for item in skipped:
        path = item.path.split(" ", 1)[1] if item.path.startswith("#") and " " in item.path else item.path
        by_file.setdefault(path, item.reason)
    parts = []
    for path, reason in list(by_file.items())[:show]:
        name = _relative(path, root)
        parts.append(str(Skipped(name, reason.replace(path, name))))  # the name once, as every skip line
    more = "; ..." if len(by_file) > show else ""
    return f"{len(by_file)} file{'s' if len(by_file) != 1 else ''} skipped: {'; '.join(parts)}{more}"


def _relative(path: str, root: str | Path | None) -> str:
    if root is None or Path(root).is_file():
        return path
    try:
        return str(Path(path).relative_to(Path(root)))
    except ValueError:
        return path


class _KindSubset:
    """The samples of one kind of a source (``data.kind``), with the source's ``load``/``describe``."""

    def __init__(self, source: Any, indices: np.ndarray):
        self.source, self.indices = source, indices
        self.index_skipped = getattr(source, "index_skipped", [])

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Any:
        return self.source.load(int(self.indices[index]))

    def describe(self, index: int) -> dict[str, Any]:
        return self.source.describe(int(self.indices[index]))

    def counts(self) -> dict[str, int]:
        kinds = np.asarray(self.source.kinds)[self.indices]
        values, n = np.unique(kinds, return_counts=True)
        return {KIND_NAMES[int(v)]: int(c) for v, c in zip(values, n)}

    def n_files(self) -> int:
        return len(set(np.asarray(self.source.file_index)[self.indices].tolist()))


def data_summary(cfg: PretrainConfig, source: Any, skipped: dict[str, str], keep: int = 20) -> dict[str, Any]:
    """What a run trains on, written to the run folder as ``data_summary.json`` for whatever describes the
    run later (``meddino export folder``'s model card): samples by kind, files, and the unreadable files
    (found at indexing or when read), the first ``keep`` of them with their reasons."""
    n_files = source.n_files() if hasattr(source, "n_files") else len(getattr(source, "files", []))
    return {
        "path": str(Path(cfg.data.path).expanduser()) if cfg.data.path else None,
        "kind": cfg.data.kind,
        "samples": len(source),
        "by_kind": source.counts(),
        "files": n_files,
        "skipped_files": len(skipped),
        # a CropDataset's skip names its sample ("#12 PATH: ..."): the file is what the reader wants
        "skipped": [t.split(" ", 1)[1] if t.startswith("#") and " " in t else t for t in skipped.values()][:keep],
    }


def build_augmentation(cfg: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiCropAugmentation:
    c = cfg.crops
    return MultiCropAugmentation(
        version=cfg.method.version,
        global_size=c.global_size,
        local_size=c.local_size,
        n_local=c.n_local,
        global_scale=c.global_scale,
        local_scale=c.local_scale,
        blur_quirk=bool(c.blur_quirk),
        mean=mean,
        std=std,
    )


class CropDataset(Dataset):
    """Map-style dataset whose keys are ``(epoch, slot, position, index)`` from :class:`StepBatchSampler`.

    An unreadable sample comes back as a :class:`meddino.data.sources.Skipped` sentinel (with
    ``#index`` prefixed to its reason so that the engine counts distinct samples), never an exception.
    ``encoded=True`` (``crops.device`` cuda/cpu): the sample is an
    :class:`~meddino.data.device_crops.EncodedSample` (bytes or pixels, and its views drawn from the same
    generator), made into crops by :func:`device_batch` in the training process.
    """

    def __init__(self, source: Any, augment: MultiCropAugmentation, seed: int, encoded: bool = False):
        self.source, self.augment, self.seed, self.encoded = source, augment, int(seed), bool(encoded)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int, int]) -> Any:
        epoch, slot, position, index = key
        gen = sample_generator(self.seed, epoch, position)
        try:
            if self.encoded:
                where = f"#{index} {self.source.describe(index)['path']}"
                return {"encoded": encode(self.augment, self.source.load(index), gen, where), "slot": int(slot)}
            out = self.augment(self.source.load(index), gen)
        except (DataError, OSError, ValueError, EOFError, MemoryError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return Skipped(f"#{index} {self.source.describe(index)['path']}", reason)
        out["slot"] = int(slot)
        return out


class StepBatchSampler(Sampler[list[tuple[int, int, int, int]]]):
    """Batches of keys for iterations ``start .. end-1`` on one rank (see the module docstring)."""

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, seed: int, start: int, end: int):
        if n < global_batch:
            raise DataError(
                f"data: {n} inputs but a global batch of {global_batch} (data.batch_size x processes); "
                "use more data or a smaller data.batch_size"
            )
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world_size
        self.local = global_batch // world_size
        self.seed, self.start, self.end = int(seed), int(start), int(end)
        self.steps_per_epoch = n // global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 1) % (2**62))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return self._perm[1]

    def keys(self, iteration: int) -> list[tuple[int, int, int, int]]:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        perm = self.permutation(epoch)
        first_slot = self.rank * self.local
        out = []
        for slot in range(first_slot, first_slot + self.local):
            pos = step * self.gb + slot
            out.append((epoch, slot, pos, int(perm[pos])))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        for it in range(self.start, self.end):
            yield self.keys(it)


def collate(batch: list[Any]) -> dict[str, Any]:
    return collate_multicrop(batch)


def collate_encoded(batch: list[Any]) -> dict[str, Any]:
    """The device path's batch: the encoded samples and their slots (crops are made by :func:`device_batch`)."""
    kept = [item for item in batch if isinstance(item, dict)]
    return {"encoded": [item["encoded"] for item in kept], "slot": [item["slot"] for item in kept],
            "skipped": [item for item in batch if not isinstance(item, dict)]}


def device_batch(batch: dict[str, Any], crops: DeviceCrops) -> dict[str, Any]:
    """An encoded batch -> the batch :func:`collate` makes (crop-major views on the crops' device, slots,
    skipped samples, size), decode failures added to the skipped."""
    views, kept, failed = crops(batch["encoded"])
    out: dict[str, Any] = {"skipped": list(batch["skipped"]) + failed, "size": len(kept)}
    if not kept:
        return {**out, "global": None, "local": None}
    return {**out, **views, "slot": torch.tensor([batch["slot"][i] for i in kept])}


def make_loader(
    dataset: CropDataset, sampler: StepBatchSampler, num_workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_encoded if getattr(dataset, "encoded", False) else collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: creating the loader's iterator must not draw from the global torch RNG,
        # which drives drop path and is restored on resume
        generator=torch.Generator().manual_seed(0),
    )
