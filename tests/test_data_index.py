"""The sample index built once (``meddino data index``), memory-mapped by pretraining, rebuilt when stale."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddino.config import load_config
from meddino.data import index as dx
from meddino.data.sources import PretrainSource
from meddino.errors import ConfigError, DataError
from meddino.pretrain.config import PretrainConfig
from meddino.pretrain.data import build_source, shared_index


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def _tree(root: Path) -> Path:
    """Nested folders, hidden entries and non-samples, names chosen so that sorting matters."""
    for i, rel in enumerate(["b.png", "a.png", "z/c.png", "z/b/d.png", "y/e.jpg", "y/10.png", "y/9.png",
                             ".hidden/x.png", "y/.h.png"]):
        _png(root / rel, i)
    (root / "notes.txt").write_text("not an image")
    return root


def _reference_walk(root: str) -> list[str]:
    """The plain sorted depth-first walk (a folder's files, then its subfolders) the index must match."""
    out, subdirs = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        (subdirs if entry.is_dir() else out).append(entry.path)
    for d in subdirs:
        out += _reference_walk(d)
    return out


def _cfg(data, out, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, "dinov2_tiny", [f"data.path={data}", f"out={out}", *extra], "pretrain")


def test_threaded_walk_keeps_the_sorted_depth_first_order_and_the_file_round_trips(tmp_path):
    root = _tree(tmp_path / "data")
    walked, dirs = dx.walk_folder(str(root), threads=4)
    assert [os.path.join(root, f) for f in walked] == _reference_walk(str(root))
    images = [p for p in _reference_walk(str(root)) if p.endswith((".png", ".jpg"))]
    assert sorted(d for d, _ in dirs) == ["", "y", "z", "z/b"]

    index = dx.build_index(root, threads=4, absolute=True)
    assert list(index.files) == images and len(index) == 7
    out = dx.write_index(index, tmp_path / "data.mdidx")
    mapped = dx.open_index(out)
    assert isinstance(mapped.kinds, np.memmap) or isinstance(mapped.kinds.base, np.memmap)
    assert list(mapped.files) == images and mapped.counts() == {"image": 7}
    assert dx.stale_reason(mapped) is None
    # in memory, PretrainSource gives the same samples in the same order as from the mapped file
    memory, from_file = PretrainSource(root), PretrainSource.from_index(mapped)
    assert [memory.describe(i) for i in range(len(memory))] == [from_file.describe(i) for i in range(7)]
    # a written index crosses to worker processes as its file name, not as its arrays
    assert len(pickle.dumps(mapped)) < 200 and list(pickle.loads(pickle.dumps(mapped)).files) == images


def test_a_symlink_loop_is_skipped_in_one_line_and_other_symlinked_folders_are_followed(tmp_path, capsys):
    root = _tree(tmp_path / "data")
    plain = _reference_walk(str(root))
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "far.png")
    (root / "z" / "b" / "up").symlink_to(root, target_is_directory=True)  # back to an enclosing folder
    (root / "linked").symlink_to(other, target_is_directory=True)
    walked, dirs = dx.walk_folder(str(root), threads=4)
    assert "linked/far.png" in walked and not any(f.startswith("z/b/up/") for f in walked)
    assert [os.path.join(root, f) for f in walked if not f.startswith("linked/")] == plain
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"data: skipped {root / 'z' / 'b' / 'up'}: a symlink loop (it is one of its enclosing folders)"]
    assert "linked/far.png" not in dx.walk_folder(str(root), follow_symlinks=False)[0]


def test_manifest_rows_patients_and_dropped_rows(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", 1)
    (tmp_path / "img" / "c.txt").write_text("x")
    csv = tmp_path / "m.csv"
    csv.write_text("image,patient\nimg/a.png,P1\n,P9\nimg/c.txt,P2\n./img//b.png,P3\n" f"{tmp_path / 'img/a.png'},\n")
    index = dx.build_index(csv)
    src = PretrainSource(csv)
    assert len(index) == 3 == len(src)
    assert [src.describe(i)["patient"] for i in range(3)] == ["P1", "P3", None]
    assert src.describe(1)["path"] == str(tmp_path / "img" / "b.png")
    assert index.header["key"]["type"] == "manifest"


def _read(csv: Path, fast: bool) -> dict:
    builder = dx._Builder()
    dx._read_manifest(csv, builder, None, fast=fast)
    blob = b"".join(builder.blobs)
    ends = np.cumsum(np.concatenate(builder.lengths)) if builder.lengths else np.zeros(0, np.int64)
    names = [blob[a:b].decode("utf-8", "surrogateescape") for a, b in zip(np.concatenate(([0], ends[:-1])), ends)]
    inv = {v: k for k, v in builder.patient_ids.items()}
    codes = np.concatenate(builder.patient_codes) if builder.patient_codes else np.zeros(0, np.int32)
    return {"names": names, "cats": np.concatenate(builder.cats).tolist() if builder.cats else [],
            "patients": [inv.get(int(c)) for c in codes], "ids": builder.patient_ids}


_PLAIN = "".join(f"/d/v{i % 7}/f{i:04d}.{'png' if i % 5 else 'JPG'},{'P%d' % (i % 3) if i % 4 else ''}\n"
                 for i in range(40))
_AWKWARD = {
    "crlf_bom": "\ufeffimage,patient\r\n" + _PLAIN.replace("\n", "\r\n"),
    "quoted_comma_late": "image,patient\n" + _PLAIN + '"/d/a,b.png",P1\n"/d/q""x.png","P, 2"\n' + _PLAIN,
    "quoted_newline": "image,patient\n" + _PLAIN + '"/d/two\nlines.png",P7\n' + _PLAIN,
    "ragged_extra_columns": "site,image,patient,extra\nA,/d/a.png,P1,x\nB,/d/b.png\nC,/d/c.png,P2,y,z\n"
                            + "".join(f"S,{row},e\n" for row in _PLAIN.splitlines()),
    "unicode_long_patients": "image,patient\n" + _PLAIN + "/d/\u00e9t\u00e9.png,P\u00e9\n"
                             + "".join(f"/d/l{i}.png,{'patient-' * (i % 12)}{i % 2}\n" for i in range(30)),
    "no_trailing_newline_lone_cr": "image\n/d/a.png\n/d/b\rpng\n/d/c.png",
    "single_column": "image\n" + "".join(f"/d/{i}.dcm\n" for i in range(20)) + "\n/d/last.png\n",
    "long_suffix": "image\n/d/a." + "x" * 40 + "\n/d/b.png\n",
}


# rows the array path must hand to the csv module (or read exactly), each tried alone among plain rows
_ODD_ROWS = ["./img/a.png,P1", "img//b.png,", "img/./c.png,P2", "img/d/,P3", "img/d/.,P3", " padded.png ,P4",
             "padded.png\t,P4", ",P9", "", ".hidden.png,P5", "d/.hidden.png,P5", "d/.png,P5", "..png,P5", "noext,P6", "scan.000123,P6",
             "v.nii.gz,P6", "V.NII.GZ,", "x.gz,P6", "clip.MP4,P6", "~/home.png,P6", "/d/a." + "x" * 40 + ",P1",
             "/d/a.png,P1,extra", "/d/a.png", "/d/\u00e9.png,P1", "/d/a\rb.png,P1", "/d/a.png,P\x1f",
             "/d/a.png," + "p" * 70, "/d/a.png,pat-long-9", "//d/a.png,P1", "/d/a.png,P//1"]
_AWKWARD.update({f"odd_{i}": "image,patient\n" + _PLAIN + row + "\n" + _PLAIN for i, row in enumerate(_ODD_ROWS)})


@pytest.mark.parametrize("case", sorted(_AWKWARD))
def test_the_fast_manifest_reader_gives_what_the_csv_module_reader_gives(tmp_path, monkeypatch, case):
    csv = tmp_path / "m.csv"
    csv.write_bytes(_AWKWARD[case].encode("utf-8"))
    monkeypatch.setattr(dx, "_BLOCK", 300)  # many blocks: the switch to the csv module happens mid-file
    calls = []
    real = dx._fast_block
    monkeypatch.setattr(dx, "_fast_block", lambda *a: calls.append(real(*a)) or calls[-1])
    fast, slow = _read(csv, True), _read(csv, False)
    assert fast == slow
    if not case.startswith(("no_trailing", "long_suffix")):
        assert any(calls), "the array path never ran"


def test_the_manifest_readers_agree_with_a_hand_reading():
    """Independent of both readers: what the rows mean, written out by hand."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "m.csv"
        csv.write_bytes(b'\xef\xbb\xbfimage,patient\r\n/d/a.PNG,P1\r\n"/d/b,c.jpg",\r\n./d//e.dcm,P2\r\n'
                        b" /d/f.nii.gz ,P1\r\n,P3\r\n")
        for fast in (True, False):
            got = _read(csv, fast)
            assert got["names"] == ["/d/a.PNG", "/d/b,c.jpg", "d/e.dcm", "/d/f.nii.gz"]
            assert got["patients"] == ["P1", None, "P2", "P1"] and got["ids"] == {"P1": 0, "P2": 1}
            assert got["cats"] == [dx._CAT_IMAGE, dx._CAT_IMAGE, dx._CAT_DICOM, dx._CAT_VOLUME]


def test_stale_indexes_say_why_and_a_vanished_source_is_refused(tmp_path):
    root = _tree(tmp_path / "data")
    mapped = dx.open_index(dx.write_index(dx.build_index(root, absolute=True), tmp_path / "i.mdidx"))
    _png(root / "z" / "b" / "new.png")
    assert "1 folder(s) under" in dx.stale_reason(mapped)

    csv = tmp_path / "m.csv"
    csv.write_text("image\ndata/a.png\n")
    by_csv = dx.open_index(dx.write_index(dx.build_index(csv, absolute=True), tmp_path / "m.mdidx"))
    assert dx.stale_reason(by_csv) is None
    csv.write_text("image\ndata/a.png\ndata/b.png\n")
    assert "changed since the index was built" in dx.stale_reason(by_csv)
    assert dx.params_mismatch(by_csv, dx.index_params(2.0, [0], None, None, True)) == \
        "built with fps=1.0, this run asks fps=2.0"

    csv.unlink()
    with pytest.raises(DataError, match="which no longer exists"):
        dx.stale_reason(by_csv)


@pytest.mark.parametrize("damage", ["magic", "truncated", "header"])
def test_a_corrupt_index_is_one_data_error(tmp_path, damage):
    root = _tree(tmp_path / "data")
    path = dx.write_index(dx.build_index(root, absolute=True), tmp_path / "i.mdidx")
    raw = path.read_bytes()
    if damage == "magic":
        path.write_bytes(os.urandom(64))
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) - 200])
    else:
        path.write_bytes(raw[:24] + b"{nope" + raw[29:])
    with pytest.raises(DataError, match="meddino index") as err:
        dx.open_index(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_pretrain_builds_once_into_the_run_folder_reuses_it_and_rebuilds_a_stale_one(tmp_path, capsys):
    root = _tree(tmp_path / "data")
    run = tmp_path / "run"
    cfg = _cfg(root, run)
    source = build_source(cfg, out=run)
    target = run / "data.mdidx"
    assert target.is_file() and len(source) == 7 and source.index.path == str(target)
    built_at = target.stat().st_mtime_ns
    time.sleep(0.01)
    again = build_source(cfg, out=run)
    assert target.stat().st_mtime_ns == built_at and len(again) == 7
    assert "stale" not in capsys.readouterr().err

    _png(root / "y" / "new.png")
    rebuilt = build_source(cfg, out=run)
    err = capsys.readouterr().err
    assert "is stale (1 folder(s) under" in err and "rebuilding it" in err and len(rebuilt) == 8

    # off: today's in-memory index, nothing written
    off_run = tmp_path / "off"
    assert len(build_source(_cfg(root, off_run, "data.index=off"), out=off_run)) == 8
    assert not off_run.exists()
    # the index beside the data (meddino data index) is used in place of building one
    beside = dx.write_index(dx.build_index(root, absolute=True), dx.default_index_path(root))
    other = tmp_path / "run2"
    assert shared_index(_cfg(root, other), out=other).path == str(beside) and not other.exists()


def test_an_index_of_other_data_or_parameters_is_refused_not_overwritten(tmp_path):
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    idx = dx.write_index(dx.build_index(a, absolute=True), tmp_path / "a.mdidx")
    with pytest.raises(ConfigError, match="indexes .* not data.path"):
        build_source(_cfg(b, tmp_path / "run", f"data.index={idx}"))
    with pytest.raises(ConfigError, match="was built with fps=1.0, this run asks fps=2.0"):
        build_source(_cfg(idx, tmp_path / "run", "data.fps=2"))
    assert len(build_source(_cfg(idx, tmp_path / "run"))) == 7  # data.path may be the index itself


def test_cli_index_verb_and_refusals(tmp_path, cli):
    root = _tree(tmp_path / "data")
    res = cli("data", "index", root)
    assert res.returncode == 0, res.stderr
    assert "indexed 7 samples (7 image) of 7 files" in res.stdout and dx.default_index_path(root).is_file()
    mine = tmp_path / "mine.txt"
    mine.write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a meddino index"):
        dx.run_index(dx.IndexConfig(path=str(root), out=str(mine)))
    assert mine.read_text() == "keep me"
    with pytest.raises(DataError, match="inside the folder it indexes"):
        dx.run_index(dx.IndexConfig(path=str(root), out=str(root / "i.mdidx")))

    bad = tmp_path / "bad.mdidx"
    bad.write_bytes(os.urandom(100))
    res = cli("pretrain", "--config", "dinov2_tiny", f"out={tmp_path / 'run'}", f"data.path={bad}")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "not a meddino index file (wrong magic bytes)" in lines[0]
    assert not (tmp_path / "run").exists()


def _gloo_rank(rank: int, port: int, root: str, run: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MEDDINO_QUIET="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = _cfg(root, run)
        source = build_source(cfg, out=run, is_main=rank == 0)
        queue.put((rank, len(source), source.index.path, Path(run, "data.mdidx").stat().st_mtime_ns))
    finally:
        dist.destroy_process_group()


def test_rank_zero_builds_while_the_other_rank_waits_then_both_map_it(tmp_path):
    import socket

    import torch.multiprocessing as mp

    root = _tree(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, str(root), str(tmp_path / "run"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    got = sorted(queue.get(timeout=5) for _ in procs)
    assert [g[1] for g in got] == [7, 7] and got[0][2] == got[1][2] == str(tmp_path / "run" / "data.mdidx")
    assert got[0][3] == got[1][3]  # one file, written once
