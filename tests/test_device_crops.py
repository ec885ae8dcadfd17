"""The device data path (``crops.device``): worker encodes, training process decodes and crops. Run here on
CPU tensors only (torchvision's CPU JPEG decoder); the CUDA branch is the same code with another device."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.data.device_crops import DeviceCrops, encode
from meddino.data.multicrop import MultiCropAugmentation, sample_generator
from meddino.data.sources import Skipped

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from data_pipeline import compare_stats, make_frames, per_sample_stats  # noqa: E402


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((4, 5, 3))
    img = np.kron(base, np.ones((h // 4 + 1, w // 5 + 1, 1)))[:h, :w]
    return (255 * np.clip(img + 0.08 * rng.standard_normal((h, w, 3)), 0, 1)).astype(np.uint8)


def _assert_rate(hits: int, n: int, p: float) -> None:
    """Binomial bound: 4.5 standard deviations (exact for p in {0, 1})."""
    if p in (0.0, 1.0):
        assert hits == int(p * n), (hits, n, p)
        return
    assert abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (hits, n, p)


def test_device_path_renders_the_cpu_paths_views(tmp_path):
    """Same params, same decoder output -> the same pixels: RGB/grey JPEG (device decoder), PNG, CMYK JPEG and
    arrays (worker decode); a truncated JPEG (its header reads) is a skipped sample naming the file."""
    img = _photo(70, 90, 0)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=92)
    Image.fromarray(img[..., 1]).save(tmp_path / "grey.jpg", quality=92)
    Image.fromarray(img).save(tmp_path / "b.png")
    Image.fromarray(img).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=92)
    good = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    inputs = [tmp_path / "a.jpg", tmp_path / "grey.jpg", tmp_path / "b.png", tmp_path / "cmyk.jpg", img,
              tmp_path / "cut.jpg"]
    aug = MultiCropAugmentation("v2", 32, 16, n_local=3)
    enc = [encode(aug, x, sample_generator(4, 1, i), where=f"#{i} x") for i, x in enumerate(inputs)]
    assert [e.jpeg for e in enc] == [True, True, False, False, False, True]
    out, kept, skipped = DeviceCrops(aug, "cpu")(enc)
    assert kept == [0, 1, 2, 3, 4] and len(skipped) == 1
    assert isinstance(skipped[0], Skipped) and skipped[0].path == "#5 x" and "truncated" in skipped[0].reason
    assert out["global"].shape == (2, 5, 3, 32, 32) and out["local"].shape == (3, 5, 3, 16, 16)
    for i in kept:
        ref = aug(inputs[i], sample_generator(4, 1, i))
        torch.testing.assert_close(out["global"][:, i], ref["global"], rtol=0, atol=1e-6)
        torch.testing.assert_close(out["local"][:, i], ref["local"], rtol=0, atol=1e-6)


def test_full_decode_matches_the_reduced_decode_in_distribution(tmp_path):
    """Large JPEGs: the CPU path decodes at 1/2 or 1/4 DCT scale where the crops allow, the device path at
    full size. Paired (same params): within ~3 grey levels on average; unpaired (other seeds): the data
    benchmark's per-channel z-scores of per-image mean/std stay within 4."""
    paths = make_frames(tmp_path, 12, width=320, height=240)
    aug = MultiCropAugmentation("v2", 48, 24, n_local=4)
    crops = DeviceCrops(aug, "cpu")
    n, ours, cpu, reduced, diffs = 96, [], [], 0, []
    for i in range(n):
        p = paths[i % len(paths)]
        enc = encode(aug, p, sample_generator(0, 1, i))
        reduced += aug.max_reduction(enc.views) >= 2
        out, _, _ = crops([enc])
        ours.append({k: v[:, 0] for k, v in out.items()})
        same = aug(p, sample_generator(0, 1, i))
        diffs.append(float((same["global"] - ours[-1]["global"]).abs().mean()))
        cpu.append(aug(p, sample_generator(0, 2, i)))
    assert reduced >= n // 4  # the reduced decode is really exercised
    assert np.mean(diffs) < 0.05  # normalised units
    check = compare_stats(per_sample_stats(cpu), per_sample_stats(ours))
    assert check["ok"], check


@pytest.mark.parametrize("version, quirk, blur", [("v1", False, (1.0, 0.1, 0.5)), ("v2", True, (0.0, 0.9, 0.5)),
                                                  ("v3", False, (1.0, 0.1, 0.5))])
def test_each_op_is_applied_at_the_recipes_rate(version, quirk, blur, tmp_path):
    """Counted from the ops the device path actually applied (its trace), per view: flip 0.5, jitter 0.8
    (brightness, contrast, saturation, hue together, in the view's drawn order), grayscale 0.2, blur per
    view (v2's quirk 0.0 / 0.9 / 0.5), solarise 0.2 on global crop 2 only; greyed views have equal channels."""
    Image.fromarray(_photo(40, 48, 1)).save(tmp_path / "x.jpg", quality=90)
    aug = MultiCropAugmentation(version, 16, 8, n_local=2, blur_quirk=quirk, mean=(0, 0, 0), std=(1, 1, 1))
    crops = DeviceCrops(aug, "cpu")
    n, chunk = 1200, 200
    applied: dict[tuple[int, int], list[str]] = {}
    grey_equal = 0
    for start in range(0, n, chunk):
        enc = [encode(aug, tmp_path / "x.jpg", sample_generator(7, 0, start + j)) for j in range(chunk)]
        trace: list[tuple[int, int, str]] = []
        out, _, _ = crops(enc, trace)
        for s, v, op in trace:
            applied.setdefault((start + s, v), []).append(op)
        for j, e in enumerate(enc):  # the trace follows the drawn params, op for op, in order
            for v, p in enumerate(e.views):
                ops = applied.get((start + j, v), [])
                jitter = [("brightness", "contrast", "saturation", "hue")[k] for k in p.order] if p.jitter else []
                want = (["flip"] if p.flip else []) + jitter + (["gray"] if p.gray else []) + (
                    ["blur"] if p.blur_sigma else []) + (["solarize"] if p.solarize else [])
                assert ops == want, (j, v, ops, want)
                x = (out["global"][v, j] if v < 2 else out["local"][v - 2, j])
                equal = bool(torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))
                assert equal == p.gray
                grey_equal += equal
    views = [(k, v) for k in range(n) for v in range(4)]
    has = lambda op, sel: sum(op in applied.get(kv, []) for kv in sel)  # noqa: E731
    _assert_rate(has("flip", views), len(views), 0.5)
    for op in ("brightness", "contrast", "saturation", "hue"):
        _assert_rate(has(op, views), len(views), 0.8)
    _assert_rate(has("gray", views), len(views), 0.2)
    assert grey_equal == has("gray", views)
    g1, g2 = [kv for kv in views if kv[1] == 0], [kv for kv in views if kv[1] == 1]
    loc = [kv for kv in views if kv[1] >= 2]
    _assert_rate(has("blur", g1), n, blur[0])
    _assert_rate(has("blur", g2), n, blur[1])
    _assert_rate(has("blur", loc), 2 * n, blur[2])
    _assert_rate(has("solarize", g2), n, 0.2)
    assert has("solarize", g1) == has("solarize", loc) == 0


def test_contrast_mean_as_a_device_tensor_matches_the_float_form():
    """The GPU form of contrast's mean luma (a 0-dim tensor, no host round trip) against the CPU's float."""
    from meddino.data import augment_ops as ops

    x = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))
    as_float = ops._mean_luma(x, True)
    as_tensor = ops._mean_luma(x, False)
    ref = float(0.299 * x[0].double().mean() + 0.587 * x[1].double().mean() + 0.114 * x[2].double().mean())
    assert abs(as_float - ref) < 1e-6 and abs(float(as_tensor) - ref) < 1e-6 and as_tensor.dim() == 0


def test_training_on_the_device_path_equals_the_loader_path_and_resumes(tmp_path):
    """crops.device=cpu (the device path's code on CPU tensors) trains to the very weights of the workers'
    path, with 2 workers and a kill/resume against 0 workers straight, a truncated JPEG skipped alike."""
    from meddino.config import load_config
    from meddino.pretrain.checkpoint import load_checkpoint
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.engine import run_pretrain
    from meddino.runlog import read_metrics

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(10):
        Image.fromarray(_photo(40 + 2 * i, 48, i)).save(data / f"{i}.{'jpg' if i % 2 else 'png'}", quality=90)
    good = (data / "1.jpg").read_bytes()
    (data / "cut.jpg").write_bytes(good[: len(good) // 2])

    def cfg(out: str, *extra: str) -> PretrainConfig:
        return load_config(PretrainConfig, "dinov2_tiny", [f"data.path={data}", f"out={tmp_path / out}",
                           "train.iterations=6", "train.checkpoint_every=3", "data.batch_size=4", *extra],
                           "pretrain")

    run_pretrain(cfg("loader", "data.num_workers=0"))
    run_pretrain(cfg("device", "crops.device=cpu", "data.num_workers=2", "train.stop_at=3"))
    run_pretrain(cfg("device", "crops.device=cpu", "data.num_workers=2", "resume=auto"))
    a = load_checkpoint(tmp_path / "loader" / "checkpoints" / "checkpoint_00000006.pt")
    b = load_checkpoint(tmp_path / "device" / "checkpoints" / "checkpoint_00000006.pt")
    assert a["student"].keys() == b["student"].keys()
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert read_metrics(tmp_path / "loader")[-1]["skipped_files"] == read_metrics(tmp_path / "device")[-1][
        "skipped_files"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_crops_on_cuda_without_a_gpu_is_one_line(tmp_path, cli):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(2):
        Image.fromarray(_photo(40, 48, i)).save(data / f"{i}.jpg")
    res = cli("pretrain", "--config", "dinov2_tiny", f"data.path={data}", f"out={tmp_path / 'run'}",
              "train.iterations=2", "data.batch_size=2", "data.num_workers=0", "crops.device=cuda")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("meddino: error: ")
    assert "crops.device=cuda: no CUDA GPU is available here" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_the_float_resize_for_gpus_matches_the_uint8_kernel():
    """On a GPU the crop is resized in float32 and rounded (torch has no uint8 antialiased resize there):
    against the CPU's uint8 kernel on the same crops (down- and upscaling, sharp edges), at most one grey
    level apart and nearly always equal (a single 2-D float pass is up to 6 levels off here)."""
    from meddino.data import augment_ops as ops

    src = torch.from_numpy(_photo(90, 120, 3)).permute(2, 0, 1)
    worst, equal, total = 0, 0, 0
    for box, size in (((0, 0, 90, 120), 32), ((10, 20, 50, 40), 24), ((5, 7, 20, 30), 48)):
        top, left, h, w = box
        ref = ops.resized_crop_uint8(src, box, size)
        ours = ops._resize_via_float(src[:, top : top + h, left : left + w].unsqueeze(0), size)
        d = (ref.int() - ours.int()).abs()
        worst, equal, total = max(worst, int(d.max())), equal + int((d == 0).sum()), total + d.numel()
    assert worst <= 1 and equal / total > 0.99


def test_the_gpu_forms_render_the_same_views_on_cpu_tensors(tmp_path, monkeypatch):
    """The whole device path with the kernels' GPU forms (float two-pass resize, contrast's mean as a
    tensor) forced on CPU tensors: within a few grey levels of the CPU forms at worst, view for view, and
    different at all (so the forms really ran)."""
    from meddino.data import augment_ops as ops

    Image.fromarray(_photo(70, 90, 5)).save(tmp_path / "a.jpg", quality=92)
    aug = MultiCropAugmentation("v2", 32, 16, n_local=3, mean=(0, 0, 0), std=(1, 1, 1))
    enc = [encode(aug, tmp_path / "a.jpg", sample_generator(2, 0, i)) for i in range(16)]
    cpu, _, _ = DeviceCrops(aug, "cpu")(enc)
    monkeypatch.setattr(ops, "FORCE_GPU_FORMS", True)
    gpu, _, _ = DeviceCrops(aug, "cpu")(enc)
    for key in ("global", "local"):
        d = (cpu[key] - gpu[key]).abs()
        # measured: mean 0.003-0.005, max 1.6-2.3 grey levels (a level off in the resize, then blur/jitter)
        assert 0 < float(d.max()) < 3.0 / 255 and float(d.mean()) < 0.05 / 255, (key, float(d.mean()), float(d.max()))


@pytest.mark.parametrize("kind", ["420", "444", "progressive", "grey"])
def test_torchvision_jpeg_decode_gives_pils_pixels(kind, tmp_path):
    """The CPU path decodes full-size RGB/grey JPEGs with torchvision (faster): the very pixels of PIL's
    decode (chroma 4:2:0 and 4:4:4, progressive, greyscale); CMYK stays with PIL."""
    from meddino.data import io

    img = _photo(61, 83, 2)
    path = tmp_path / "x.jpg"
    opts = {"420": {}, "444": {"subsampling": 0}, "progressive": {"progressive": True}, "grey": {}}[kind]
    Image.fromarray(img[..., 0] if kind == "grey" else img).save(path, quality=90, **opts)
    ref = io.read_image(path)
    ours = io.decode_jpeg_torch(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
    assert ours.stride()[0] == 1  # channels-last, as the resize kernel prefers
    np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), ref)


def test_the_render_keeps_to_the_device_and_never_reads_back():
    """On the 'meta' device (shapes, no data) the whole render runs: no host tensor enters a device op, and
    nothing is read back to the host (a .tolist(), float() or .item() on a meta tensor raises), which on a
    GPU would wait for it once per view."""
    aug = MultiCropAugmentation("v2", 32, 16, n_local=3)
    enc = [encode(aug, _photo(70, 90, i), sample_generator(0, 0, i)) for i in range(6)]
    out, kept, skipped = DeviceCrops(aug, "meta")(enc)
    assert kept == list(range(6)) and not skipped
    assert out["global"].device.type == "meta" and out["global"].shape == (2, 6, 3, 32, 32)
    assert out["local"].device.type == "meta" and out["local"].shape == (3, 6, 3, 16, 16)


def test_jitter_batched_by_position_equals_each_views_ops_in_its_order():
    """The GPU form of colour jitter (views grouped by the op at each position of their random order, at
    most 16 batched ops) against the functional kernels (each tested against torchvision) applied view by
    view in the view's own order."""
    from meddino.data import augment_ops as ops
    from meddino.data.multicrop import _jitter_by_position

    aug = MultiCropAugmentation("v2", 16, 8, n_local=6)
    views = [v for i in range(6) for v in aug.sample_params(40, 48, sample_generator(9, 0, i)) if v.jitter]
    assert len({v.order for v in views}) > 6  # many different orders in one batch
    x = torch.rand(len(views), 3, 12, 14, generator=torch.Generator().manual_seed(1))
    fns = (ops.adjust_brightness, ops.adjust_contrast, ops.adjust_saturation, ops.adjust_hue)
    want = []
    for j, v in enumerate(views):
        y = x[j]
        for op in v.order:
            y = fns[op](y, v.jitter[op])
        want.append(y)
    got = x.clone()
    trace: list[tuple[int, str]] = []
    _jitter_by_position(got, views, list(range(len(views))), trace)
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=2e-6)
    names = ("brightness", "contrast", "saturation", "hue")
    for j, v in enumerate(views):
        assert [op for r, op in trace if r == j] == [names[k] for k in v.order]
