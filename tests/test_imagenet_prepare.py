"""Issue 28: `gpctl data prepare imagenet` resizes every image once into uint8 shards (App. A.2), and the
stream reads from them the same crops, flips and labels the JPEG path decodes, on the same seeds."""
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.data import build_stream
from engine.errors import DataMissing
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()
CPU = torch.device("cpu")
CLASSES = ("n01440764", "n01443537", "n02102040")


def _jpegs(root, per_class=(4, 2)):
    """A tiny ImageNet: real JPEGs of several sizes (and one PNG, one grayscale, as ILSVRC has) in
    train/ and val/ class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = 30 + 7 * i + c, 41 + 5 * i
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                if (split, c, i) == ("train", 1, 2):
                    img.convert("L").save(d / f"{cls}_{i}.JPEG", quality=90)
                elif (split, c, i) == ("train", 2, 0):
                    img.save(d / f"{cls}_{i}.png")
                else:
                    img.save(d / f"{cls}_{i}.JPEG", quality=90)
    return root


def _prepare(src, out, *extra):
    return runner.invoke(app, ["data", "prepare", "imagenet", "--path", str(src), "--out", str(out), "--size", "20",
                               "--shard-images", "5", "--workers", "2", *extra])


def _cfg(path, *extra):
    return tiny(TINY_IMAGES, 'data.source="imagenet"', f'data.path="{path}"', "data.image_size=16", "data.resize=20",
                "data.crop_padding=0", 'data.augment=["crop", "flip"]', "data.eval_samples=4", "data.workers=2",
                *extra)


def test_prepared_shards_hold_the_resized_images_and_stream_the_jpeg_paths_crops(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import resize

    src, out = _jpegs(tmp_path / "imagenet"), tmp_path / "imagenet-20"
    res = _prepare(src, out)
    assert res.exit_code == 0, res.output
    assert "train: 12 images of 3 classes in 3 shard(s)" in res.output
    assert "val: 6 images of 3 classes in 2 shard(s)" in res.output
    assert "--set data.resize=20" in res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["size"] == 20
    assert meta["splits"]["train"]["shards"] == ["train_000000.npy", "train_000001.npy", "train_000002.npy"]
    assert not (out / "prepare.json").exists()

    # the shards against torchvision's own ImageFolder order and resize, image by image
    ref = ImageFolder(str(src / "train"))
    shards = np.concatenate([np.load(out / f, allow_pickle=False) for f in meta["splits"]["train"]["shards"]])
    assert shards.shape == (12, 20, 20, 3) and shards.dtype == np.uint8
    assert np.load(out / "train_labels.npy").tolist() == ref.targets
    for k, (path, _) in enumerate(ref.samples):
        want = np.asarray(resize(Image.open(path).convert("RGB"), [20, 20]))
        assert np.array_equal(shards[k], want), path

    # the stream: the same batches from the JPEG folders and from the shards, across a batch-size change
    # and a resume, and the same held-out set
    a, b = build_stream(_cfg(src), CPU), build_stream(_cfg(out), CPU)
    assert type(b.source).__name__ == "PreparedImages" and type(a.source).__name__ == "ImageFolderSource"
    for n in (4, 4, 7, 3):
        (xa, ya), (xb, yb) = a.next_batch(n), b.next_batch(n)
        assert xa.shape == (n, 3, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    resumed = build_stream(_cfg(out), CPU)
    resumed.load_state_dict(json.loads(json.dumps(b.state_dict())))
    (xa, ya), (xr, yr) = a.next_batch(5), resumed.next_batch(5)
    assert torch.equal(xa, xr) and torch.equal(ya, yr)
    ea, eb = list(a.eval_batches(3)), list(b.eval_batches(3))
    assert len(ea) == len(eb) == 2
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ea, eb))
    # offline mode draws the same class-balanced subset from either
    oa = build_stream(_cfg(src, 'data.mode="offline"', "data.offline_size=6"), CPU)
    ob = build_stream(_cfg(out, 'data.mode="offline"', "data.offline_size=6"), CPU)
    assert all(torch.equal(p, q) for p, q in zip(oa.next_batch(9), ob.next_batch(9)))

    # negative control: one changed pixel in a shard and the streams no longer agree
    first = np.load(out / "train_000000.npy", mmap_mode="r+")
    first[:, 8, 8, 0] ^= 0xFF
    first.flush()
    del first
    a2, b2 = build_stream(_cfg(src), CPU), build_stream(_cfg(out), CPU)
    assert not torch.equal(a2.next_batch(12)[0], b2.next_batch(12)[0])


def test_the_plan_counts_the_prepared_images_and_a_wrong_resize_is_one_line(tmp_path):
    from engine.data import preflight
    from engine.plan import plan

    src, out = _jpegs(tmp_path / "imagenet"), tmp_path / "prep"
    assert _prepare(src, out).exit_code == 0
    pl = plan(_cfg(out))
    assert (pl.data_size, pl.data_note) == (12, "the prepared train shards")
    preflight(_cfg(out))
    res = runner.invoke(app, ["data", "check", str(out)])
    assert res.exit_code == 0 and res.output.strip() == (f"{out / 'meta.json'}: prepared ImageNet 20×20, 3 classes: "
                                                         "train 12 images, val 6 images")
    with pytest.raises(DataMissing, match=r"prep: prepared at 20×20 but data.resize = 24 \(set data.resize=20\)$"):
        preflight(_cfg(out, "data.resize=24"))
    with pytest.raises(DataMissing, match=r"prepared at 20×20 but data.resize = 24"):
        build_stream(_cfg(out, "data.resize=24"), CPU)
    os.remove(out / "train_000001.npy")            # a shard gone: named, before anything trains
    res = runner.invoke(app, ["data", "check", str(out)])
    assert res.exit_code == 1 and "train_000001.npy: a shard of the prepared ImageNet cannot be read" in res.output
    with pytest.raises(DataMissing, match=r"train_000001.npy: a shard of the prepared ImageNet cannot be read"):
        build_stream(_cfg(out), CPU)


def test_an_interrupted_prepare_resumes_shard_by_shard(tmp_path):
    from engine.data.prepared_images import prepare_images

    src, out = _jpegs(tmp_path / "imagenet"), tmp_path / "prep"

    class Stop(Exception):
        pass

    def stop_after_first(split, done, total):
        raise Stop

    with pytest.raises(Stop):
        prepare_images(src, out, size=20, shard_images=5, workers=1, progress=stop_after_first)
    assert not (out / "meta.json").exists() and (out / "prepare.json").exists()
    assert not list(out.glob("*.tmp"))
    # the state a kill leaves: some shards whole, one half-written under its temporary name
    (out / "train_000001.npy").rename(out / "train_000001.npy.tmp")
    (out / "val_000001.npy").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*_0*.npy")}
    assert len(kept) == 3
    meta = prepare_images(src, out, size=20, shard_images=5, workers=2)
    assert sum(e["count"] for e in meta["splits"].values()) == 18
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept      # not written again
    assert len(list(out.glob("*_0*.npy"))) == 5 and not list(out.glob("*.tmp"))
    # equal to a preparation that was never interrupted
    whole = tmp_path / "whole"
    prepare_images(src, whole, size=20, shard_images=5, workers=2)
    for f in sorted(p.name for p in whole.glob("*.npy")):
        assert np.array_equal(np.load(out / f), np.load(whole / f)), f


def test_prepare_refuses_in_one_line_and_keeps_what_it_has(tmp_path):
    src, out = _jpegs(tmp_path / "imagenet"), tmp_path / "prep"
    bad = src / "train" / CLASSES[2] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    res = _prepare(src, out)
    assert res.exit_code == 2 and not (out / "meta.json").exists()
    lines = res.output.strip().splitlines()     # a JPEG header and then garbage: PIL says "Truncated File Read"
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: not an image PIL can read (")
    assert not list(out.glob("*.tmp"))
    bad.unlink()                                   # the listing changed: the half-done folder is not reused
    res = _prepare(src, out)
    assert res.exit_code == 2
    assert res.output.strip() == (f"error: {out}: holds an unfinished preparation of other images or another size "
                                  f"({out / 'prepare.json'}); choose another --out, or remove it to start again")
    assert _prepare(src, tmp_path / "fresh").exit_code == 0
    res = _prepare(src, tmp_path / "fresh")
    assert res.exit_code == 2 and "already holds a prepared data set (meta.json)" in res.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    res = _prepare(src, tmp_path / "other")
    assert res.exit_code == 2 and "not empty and not a preparation gpctl started" in res.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    res = _prepare(tmp_path / "nowhere", tmp_path / "x")
    assert res.exit_code == 2 and res.output.strip() == f"error: {tmp_path / 'nowhere' / 'train'}: no such folder " \
                                                        "(ImageNet's train/ of class folders)"
    res = runner.invoke(app, ["data", "prepare", "imagenet", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "imagenet needs --path" in res.output
