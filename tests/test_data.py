import gzip
import json
import math

import numpy as np
import pytest
import torch

from engine.config import DataConfig
from engine.data import build_stream
from engine.data.stream import DataMissing, InMemory, Stream, augment, balanced_subset
from engine.data.synthetic import MarkovTokens, TeacherImages
from tests.conftest import GPT2_TOKENIZER, TINY_IMAGES, TINY_LM, tiny

CPU = torch.device("cpu")


class Labeled(InMemory):
    kind = "image"

    def __init__(self, n, classes=4):
        x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
        super().__init__(x, torch.arange(n) % classes)
        self.eval_set = InMemory(x[:4], self.y[:4])


def _ids(x):  # the sample id encoded in each image
    return x[:, 0, 0, 0].long().tolist()


def test_online_never_repeats_within_a_pass_offline_repeats_its_subset():
    src = Labeled(100)
    online = Stream(src, DataConfig(mode="online", normalize=False), seed=3, device=CPU)
    seen = sum((_ids(online.next_batch(n)[0]) for n in (7, 13, 30, 50)), [])
    assert sorted(seen) == list(range(100))          # one pass: every sample exactly once
    offline = Stream(src, DataConfig(mode="offline", offline_size=20, normalize=False), seed=3, device=CPU)
    epochs = [_ids(offline.next_batch(20)[0]) for _ in range(3)]
    assert len(set(epochs[0])) == 20 and set(epochs[0]) == set(epochs[1]) == set(epochs[2])
    assert epochs[0] != epochs[1]                    # reshuffled each epoch
    assert offline.unique_seen == 20 and offline.epoch == 3
    labels = torch.tensor(epochs[0]) % 4
    assert torch.bincount(labels).tolist() == [5, 5, 5, 5]   # class-balanced


def test_balanced_subset_counts_per_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = balanced_subset(labels, 100, 30, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [10, 10, 10]
    with pytest.raises(ValueError, match="class 2 has only 20 samples"):
        balanced_subset(labels, 100, 75, seed=0)


def test_synthetic_images_are_fresh_reproducible_and_floored():
    dc = DataConfig(image_size=8, eval_samples=256, teacher_width=8)
    a, b = TeacherImages(dc, 10, data_seed=0), TeacherImages(dc, 10, data_seed=0)
    x1, y1 = a.read(1000, 50)
    x2, y2 = b.read(1000, 50)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)          # any position reproducible
    xa, _ = a.read(0, 2048)
    assert len({tuple(r.tolist()) for r in xa.flatten(1)[:, :8]}) == 2048   # never the same sample
    assert 0 < a.bayes_loss < math.log(10)
    flat = TeacherImages(DataConfig(image_size=8, eval_samples=64, teacher_width=8, teacher_sharpness=0.0), 10, 0)
    assert flat.bayes_loss == pytest.approx(math.log(10), rel=1e-6)      # uniform labels: log C


def test_markov_tokens_entropy_rate():
    dc = DataConfig(vocab_size=32, seq_len=12, eval_samples=16, teacher_sharpness=0.0)
    assert MarkovTokens(dc, 0).bayes_loss == pytest.approx(math.log(32), rel=1e-6)
    sharp = MarkovTokens(DataConfig(vocab_size=32, seq_len=12, eval_samples=16, teacher_sharpness=3.0), 0)
    assert 0 < sharp.bayes_loss < math.log(32) - 0.5
    x, y = sharp.read(0, 5)
    assert x.shape == (5, 12) and y is None and int(x.max()) < 32


def test_augment_crop_and_flip_move_pixels_exactly():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    flipped = augment(x, ["flip"], 0, seed=1)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    cropped = augment(x, ["crop"], 1, seed=5)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):  # each crop is some 4x4 window of the zero-padded image
        windows = [padded[i, :, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        assert any(torch.equal(cropped[i], w) for w in windows)
    assert torch.equal(augment(x, ["crop", "flip"], 1, seed=9), augment(x, ["crop", "flip"], 1, seed=9))


def test_stream_position_round_trips():
    cfg = tiny(TINY_IMAGES)
    s1 = build_stream(cfg, CPU)
    s1.next_batch(10)
    state = s1.state_dict()
    expect = s1.next_batch(6)
    s2 = build_stream(cfg, CPU)
    s2.load_state_dict(state)
    got = s2.next_batch(6)
    assert torch.equal(expect[0], got[0]) and torch.equal(expect[1], got[1])


def _cifar5m_parts(folder, sizes=(30, 20)):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate(sizes):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        x[:, 0, 0, 0] = np.arange(n) + 100 * i                  # an id in the first pixel
        np.savez(folder / f"part{i}.npz", X=x, Y=rng.integers(0, 10, n))
    return folder


def test_cifar5m_parts_load_with_held_out_tail(tmp_path):
    folder = _cifar5m_parts(tmp_path / "c5m")
    cfg = tiny(TINY_IMAGES, "data.source=\"cifar5m\"", f"data.path=\"{folder}\"", "data.eval_samples=8",
               "data.normalize=false", "data.image_size=32")
    s = build_stream(cfg, CPU)
    assert s.source.length == 42 and s.eval_size == 8
    x, y = s.next_batch(42)
    assert x.shape == (42, 3, 32, 32) and x.dtype == torch.float32
    train_ids = sorted(round(float(v) * 255) for v in x[:, 0, 0, 0])
    assert train_ids == list(range(30)) + list(range(100, 112))   # last 8 of part1 held out
    ev = next(s.eval_batches(100))[0]
    assert sorted(round(float(v) * 255) for v in ev[:, 0, 0, 0]) == list(range(112, 120))


def test_cifar5m_held_on_the_device_or_in_host_memory_gives_the_same_bits(tmp_path):
    """Issue 28: data.hold = "host" (numpy parts, .npy memory-mapped; the batch gathered on the host)
    and "device" (one uint8 tensor, indexed where it lives) draw the same batches, resumed or not."""
    from engine.config import ConfigError
    from engine.data.images import HostImages

    folder = _cifar5m_parts(tmp_path / "c5m")
    npy = tmp_path / "npy"
    npy.mkdir()
    for i in range(2):                                  # the --npy form, which the host path memory-maps
        with np.load(folder / f"part{i}.npz") as z:
            np.save(npy / f"part{i}.X.npy", z["X"])
            np.save(npy / f"part{i}.Y.npy", z["Y"])

    def stream(path, hold, *extra):
        return build_stream(tiny(TINY_IMAGES, 'data.source="cifar5m"', f'data.path="{path}"', "data.eval_samples=8",
                                 "data.image_size=32", 'data.augment=["crop", "flip"]', f'data.hold="{hold}"',
                                 *extra), CPU)

    dev, host, mapped = stream(folder, "device"), stream(folder, "host"), stream(npy, "host")
    assert type(dev.source).__name__ == "_Indexed" and isinstance(host.source, HostImages)
    assert all(isinstance(p, np.memmap) for p in mapped.source.parts)          # shared pages, no private copy
    assert isinstance(stream(folder, "auto").source, HostImages)              # a CPU run: auto holds on the host
    for n in (16, 5, 30, 16):                                                 # crosses the part boundary and an epoch
        a, b, c = dev.next_batch(n), host.next_batch(n), mapped.next_batch(n)
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], b[1]) and torch.equal(a[1], c[1])
    again = stream(npy, "host")
    again.load_state_dict(dev.state_dict())
    assert torch.equal(dev.next_batch(7)[0], again.next_batch(7)[0])
    for p, q in zip(dev.eval_batches(3), mapped.eval_batches(3)):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
    off = [stream(f, h, 'data.mode="offline"', "data.offline_size=10") for f, h in ((folder, "device"), (npy, "host"))]
    assert torch.equal(off[0].next_batch(25)[0], off[1].next_batch(25)[0])
    # negative control: another seed is another stream
    other = build_stream(tiny(TINY_IMAGES, 'data.source="cifar5m"', f'data.path="{npy}"', "data.eval_samples=8",
                              "data.image_size=32", 'data.augment=["crop", "flip"]', "seed=1"), CPU)
    assert not torch.equal(stream(folder, "device").next_batch(16)[0], other.next_batch(16)[0])
    with pytest.raises(ConfigError, match=r"'data.hold' = 'gpu' is not one of auto, device, host"):
        tiny(TINY_IMAGES, 'data.hold="gpu"')
    # a run made before data.hold said data.on_device: it still loads, as what it meant
    from engine.config import build, to_dict
    old = to_dict(tiny(TINY_IMAGES))
    del old["data"]["hold"]
    old["data"]["on_device"] = False
    assert build(old, "<old run>").data.hold == "host"


def test_cifar5m_missing_and_malformed(tmp_path):
    cfg = tiny(TINY_IMAGES, "data.source=\"cifar5m\"", f"data.path=\"{tmp_path}\"")
    with pytest.raises(DataMissing) as e:
        build_stream(cfg, CPU)
    assert str(e.value) == (f"CIFAR-5m not found: no part0.npz … part5.npz in {tmp_path} (point data.path at the folder; "
                            f"`gpctl data get cifar5m --out {tmp_path}` downloads it, ~18 GB)")
    np.savez(tmp_path / "part0.npz", X=np.zeros((4, 8, 8), np.uint8), Y=np.zeros(4))
    with pytest.raises(DataMissing, match="part0.npz: X must be uint8 N×32×32×3"):
        build_stream(cfg, CPU)


def _c4_folder(tmp_path):
    folder = tmp_path / "c4"
    folder.mkdir()
    words = "the cat sat on a mat while dogs ran in the park and birds sang songs".split()
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("validation", 20)):
        with gzip.open(folder / f"c4-{split}.00000-of-00001.json.gz", "wt") as f:
            for i in range(n):
                text = " ".join(rng.choice(words, size=int(rng.integers(5, 40))))
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:00:00Z",
                                    "url": f"https://example.com/{split}/{i}"}) + "\n")
    return folder


def _c4_cfg(folder, tok, *extra):
    return tiny(TINY_LM, "data.source=\"c4\"", f"data.path=\"{folder}\"", f"data.tokenizer=\"{tok}\"",
                "data.seq_len=16", "data.eval_samples=4", "model.vocab_size=300", *extra)


def test_c4_local_shards_are_tokenized_and_packed(tmp_path, tokenizer_dir):
    from transformers import GPT2TokenizerFast

    folder = _c4_folder(tmp_path)
    s = build_stream(_c4_cfg(folder, tokenizer_dir), CPU)
    x, y = s.next_batch(3)
    assert x.shape == (3, 16) and y is None
    tok = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    assert tok.eos_token_id is not None
    first = json.loads(gzip.open(folder / "c4-train.00000-of-00001.json.gz", "rt").readline())["text"]
    expect = (tok(first)["input_ids"] + [tok.eos_token_id] + [0] * 48)
    n = min(16, len(tok(first)["input_ids"]) + 1)
    assert x[0, :n].tolist() == expect[:n]                     # documents joined with EOS, in order
    assert next(s.eval_batches(8))[0].shape == (4, 16)


def test_c4_resume_continues_at_the_same_token(tmp_path, tokenizer_dir):
    folder = _c4_folder(tmp_path)
    cfg = _c4_cfg(folder, tokenizer_dir)
    a = build_stream(cfg, CPU)
    a.next_batch(5)
    state = json.loads(json.dumps(a.state_dict()))
    expect = a.next_batch(4)[0]
    b = build_stream(cfg, CPU)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(4)[0], expect)


@pytest.mark.skipif(not GPT2_TOKENIZER.exists(), reason="GPT-2 tokenizer files not in ../shared/data")
def test_real_gpt2_vocabulary_loads_from_a_folder():
    from engine.data.c4 import load_tokenizer
    tok = load_tokenizer(str(GPT2_TOKENIZER))
    assert (len(tok), tok.eos_token_id, tok("hello world")["input_ids"]) == (50257, 50256, [31373, 995])


def test_missing_tokenizer_is_one_line(tmp_path):
    from engine.data.c4 import load_tokenizer
    with pytest.raises(DataMissing, match=r"^tokenizer '.*nope' could not be loaded"):
        load_tokenizer(str(tmp_path / "nope"))


def test_imagenet_folder_stream(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            d = tmp_path / "imnet" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(d / f"{i}.png")
    cfg = tiny(TINY_IMAGES, "data.source=\"imagenet\"", f"data.path=\"{tmp_path / 'imnet'}\"", "data.image_size=32",
               "data.eval_samples=4", "data.augment=[\"crop\", \"flip\"]", "data.mode=\"offline\"",
               "data.offline_size=4", "data.workers=2")
    s = build_stream(cfg, CPU)
    assert (s.source.length, s.eval_size) == (6, 4)
    x, y = s.next_batch(8)                          # crosses an epoch of the 4-image offline subset
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert sorted(y[:4].tolist()) == [0, 0, 1, 1]   # class-balanced subset
    assert s.epoch == 2 and s.unique_seen == 4
    with pytest.raises(DataMissing, match="ImageNet not found: no train/ and val/"):
        build_stream(tiny(TINY_IMAGES, "data.source=\"imagenet\"", f"data.path=\"{tmp_path}\""), CPU)


def test_uniform_synthetic_tokens_are_drawn_at_once_with_entropy_log_v():
    """Issue 13: the GPT-2 throughput benchmark measured the Markov generator's Python loop."""
    import math

    from engine.config import DataConfig
    from engine.data.synthetic import MarkovTokens
    src = MarkovTokens(DataConfig(source="synthetic_tokens", vocab_size=50257, seq_len=2048, eval_samples=4,
                                  teacher_sharpness=0.0), data_seed=0)
    x, _ = src.read(0, 64)
    assert x.shape == (64, 2048) and int(x.min()) >= 0 and int(x.max()) < 50257
    assert src.bayes_loss == pytest.approx(math.log(50257), rel=1e-4)
    again, _ = MarkovTokens(DataConfig(source="synthetic_tokens", vocab_size=50257, seq_len=2048, eval_samples=4,
                                       teacher_sharpness=0.0), data_seed=0).read(0, 64)
    assert torch.equal(x, again)                                    # reproducible by position
    counts = torch.bincount(x.flatten().long() % 16, minlength=16).float()
    assert float(counts.std() / counts.mean()) < 0.02               # uniform (a 4-sigma bound here)
    assert src.a is None                                             # no 50257 x 50257 tables (10 GB each)
