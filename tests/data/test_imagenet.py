"""The ImageNet-format data path: layouts (folders, tar shards), errors, the crop and
resolution rules of the FFCV ResNet-50 recipe, and the streamed batches, on small
ImageNet-format sets built from real CIFAR-10 images (imagenet_builders)."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from imagenet_builders import write_imagenet_folder
from PIL import Image

from fastgraph.core.errors import DataError, UserError
from fastgraph.data.imagenet import (
    ImageSet,
    center_crop_box,
    decode_crop,
    image_header,
    is_imagenet_layout,
    progressive_resolution,
    random_resized_crop_box,
    scan_imagenet,
)
from fastgraph.data.imagenet_stream import TestStream, TrainStream, epoch_order, image_draw
from fastgraph.training.distributed import batch_positions

MEAN = (123.675, 116.28, 103.53)  # ImageNet's, in 0..255 units (as the FFCV recipe uses)
STD = (58.395, 57.12, 57.375)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x (24 train + 8 val) JPEGs of 40..96 pixels a side, as class folders."""
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet") / "folder")


@pytest.fixture(scope="module")
def train(folder) -> ImageSet:
    return scan_imagenet(folder, "train")


def stream(images, **kw) -> TrainStream:
    args = dict(batch_size=16, device=CPU, seed=7, resolution=lambda epoch: 48, mean=MEAN, std=STD, workers=0)
    return TrainStream(images, **{**args, **kw})


def one_line_error(excinfo, *names) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message
    return message


# ------------------------------------------------------------------ layouts and index


def test_folder_and_shards_give_the_same_images_and_labels(folder, train, tmp_path):
    sharded = write_imagenet_folder(tmp_path / "shards", shards=True)
    assert not (sharded / "train").exists() and len(list(sharded.glob("train-*.tar"))) == 2
    for split, n in (("train", 72), ("val", 24)):
        a, b = scan_imagenet(folder, split), scan_imagenet(sharded, split)
        assert len(a) == len(b) == n and a.classes == b.classes
        np.testing.assert_array_equal(a.labels, b.labels)
        assert all(a.read(i) == b.read(i) for i in range(n))
        assert b.name(0).startswith(str(sharded / f"{split}-")) and ".tar:" in b.name(0)
    assert is_imagenet_layout(folder) and is_imagenet_layout(sharded)


def test_shards_inside_the_split_folder(train, folder, tmp_path):
    (tmp_path / "train").mkdir()
    write_imagenet_folder(tmp_path / "build", shards=True)
    for shard in (tmp_path / "build").glob("train-*.tar"):
        shutil.move(shard, tmp_path / "train" / shard.name)
    b = scan_imagenet(tmp_path, "train")
    assert len(b) == len(train) and b.read(30) == train.read(30)


def test_classes_sorted_and_files_in_natural_order(folder, tmp_path):
    root = tmp_path / "renamed"
    shutil.copytree(folder, root)
    (root / "train" / "airplane").rename(root / "train" / "zebra")  # first class becomes last
    images = scan_imagenet(root, "train")
    assert images.classes == ("automobile", "bird", "zebra")
    assert images.labels.tolist() == sorted(images.labels.tolist())
    zebras = [images.name(i) for i in np.flatnonzero(images.labels == 2)]
    assert [int(n.rsplit("/", 1)[1].split(".")[0]) for n in zebras] == list(range(24))  # 10 after 9
    first_zebra = int(np.flatnonzero(images.labels == 2)[0])
    assert images.read(first_zebra) == (folder / "train/airplane/0.jpg").read_bytes()


def test_cifar_imagefolder_is_not_an_imagenet_layout(tmp_path, folder):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    assert not is_imagenet_layout(tmp_path)
    assert not is_imagenet_layout(folder / "train" / "bird" / "0.jpg")


# ------------------------------------------------------------------ errors


def test_missing_root_and_missing_split(tmp_path, folder):
    with pytest.raises(DataError) as e:
        scan_imagenet(tmp_path / "nowhere", "train")
    one_line_error(e, tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as e:
        scan_imagenet(tmp_path, "val")
    one_line_error(e, tmp_path, "val")
    with pytest.raises(DataError) as e:
        scan_imagenet(tmp_path, "train")
    assert "no class folders" in one_line_error(e, tmp_path / "train")


def test_empty_class_folder(tmp_path, folder):
    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    (root / "val" / "deer").mkdir()
    (root / "val" / "deer" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        scan_imagenet(root, "val")
    assert "empty class folder" in one_line_error(e, root / "val" / "deer")


def test_compressed_and_corrupt_shards(tmp_path):
    root = write_imagenet_folder(tmp_path / "shards", shards=True)
    shard = root / "train-0001.tar"
    gz = root / "train-0001.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    shard.unlink()
    with pytest.raises(DataError) as e:
        scan_imagenet(root, "train")
    assert "uncompressed" in one_line_error(e, gz)
    gz.rename(shard)  # gzip bytes behind a .tar name
    with pytest.raises(DataError) as e:
        scan_imagenet(root, "train")
    assert "gzip" in one_line_error(e, shard)
    shard.write_bytes(b"\x00not a tar archive" * 100)
    with pytest.raises(DataError) as e:
        scan_imagenet(root, "train")
    assert "corrupt" in one_line_error(e, shard)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_is_named_in_one_line(tmp_path, folder, workers):
    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    bad = root / "train" / "bird" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # header intact, scan data cut
    images = scan_imagenet(root, "train")
    with pytest.raises(DataError) as e:
        decode_crop(bad.read_bytes(), (0, 0, 8, 8), 8, False, str(bad))
    one_line_error(e, bad)
    s = stream(images, batch_size=len(images), workers=workers)  # one batch holds every image
    with pytest.raises(DataError) as e:
        next(s.epoch(0))
    s.close()
    assert "cannot decode" in one_line_error(e, bad)


def test_bad_options(train):
    with pytest.raises(UserError, match="decode"):
        stream(train, decode="nvjpeg")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            stream(train, decode="gpu")
    with pytest.raises(DataError, match="fewer than one batch"):
        stream(train, batch_size=len(train) + 1)
    with pytest.raises(UserError, match="positions"):
        stream(train, positions=torch.tensor([0, 16]))


# ------------------------------------------------------------------ crop and resolution rules


@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), seed=st.integers(0, 2**31),
       lo=st.floats(0.05, 0.9), ratio_hi=st.floats(1.0, 3.0))
def test_random_resized_crop_box_follows_torchvision(width, height, seed, lo, ratio_hi):
    scale, ratio = (lo, 1.0), (1 / ratio_hi, ratio_hi)
    box = random_resized_crop_box(width, height, torch.Generator().manual_seed(seed), scale, ratio)
    left, top, w, h = box
    assert 0 <= left and 0 <= top and 0 < w and 0 < h and left + w <= width and top + h <= height
    assert box == random_resized_crop_box(width, height, torch.Generator().manual_seed(seed), scale, ratio)
    if (left, top) == ((width - w) // 2, (height - h) // 2) and (w == width or h == height):
        return  # the central crop after 10 misses (or a drawn box that looks like it)
    # w and h are round(sqrt(A r)) and round(sqrt(A / r)): the unrounded area A and aspect
    # r lie in intervals that must meet the drawn ranges.
    area = width * height
    a_lo, a_hi = (w - 0.5) * (h - 0.5), (w + 0.5) * (h + 0.5)
    r_lo, r_hi = (w - 0.5) / (h + 0.5), (w + 0.5) / max(h - 0.5, 1e-9)
    assert a_lo <= scale[1] * area * (1 + 1e-9) and a_hi >= scale[0] * area * (1 - 1e-9)
    assert r_lo <= ratio[1] * (1 + 1e-9) and r_hi >= ratio[0] * (1 - 1e-9)


def test_random_resized_crop_box_distribution():
    g = torch.Generator().manual_seed(0)
    boxes = np.array([random_resized_crop_box(500, 375, g) for _ in range(2000)])
    frac = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    aspect = np.log(boxes[:, 2] / boxes[:, 3])
    assert frac.min() < 0.1 and frac.max() > 0.9 and 0.08 * 0.95 < frac.min()
    assert np.abs(aspect).max() <= math.log(4 / 3) + 0.02 and aspect.std() > 0.1
    # the fitted boxes are placed uniformly: their centres spread over the image
    centres = boxes[:, 0] + boxes[:, 2] / 2
    assert centres.min() < 150 and centres.max() > 350


def test_center_crop_box_is_ffcvs():
    assert center_crop_box(500, 375, 224, 224 / 256) == ((500 - 328) // 2, (375 - 328) // 2, 328, 328)
    assert center_crop_box(375, 500, 224, 1.0) == (0, 62, 375, 375)
    with pytest.raises(ValueError):
        center_crop_box(10, 10, 8, 1.5)


def test_progressive_resolution_matches_ffcv_formula():
    def ffcv(epoch, lo, hi, start, end):  # libffcv/ffcv-imagenet train_imagenet.py get_resolution
        if epoch <= start:
            return lo
        if epoch >= end:
            return hi
        return int(round((lo + (hi - lo) * (epoch - start) / (end - start)) / 32)) * 32

    for epoch in [0, 5, 11, 11.25, 11.5, 11.75, 12, 12.5, 13, 20]:
        assert progressive_resolution(epoch, min_res=160, max_res=192, start_ramp=11, end_ramp=13) == \
            ffcv(epoch, 160, 192, 11, 13)
    ramp = [progressive_resolution(e, min_res=160, max_res=256, start_ramp=2, end_ramp=12) for e in range(15)]
    assert ramp == [ffcv(e, 160, 256, 2, 12) for e in range(15)]
    assert ramp[0] == 160 and ramp[-1] == 256 and ramp == sorted(ramp) and all(r % 32 == 0 for r in ramp)
    with pytest.raises(ValueError):
        progressive_resolution(0, min_res=192, max_res=160, start_ramp=0, end_ramp=1)


def test_draft_decode_is_close_to_a_full_decode(tmp_path):
    root = write_imagenet_folder(tmp_path / "big", classes=1, per_class_train=4, per_class_val=1,
                                 sizes=(300, 420))
    images = scan_imagenet(root, "train")
    for i in range(len(images)):
        data = images.read(i)
        w, h, fmt, _ = image_header(data, images.name(i))
        assert fmt == "JPEG"
        box = center_crop_box(w, h, 64, 1.0)  # shrinks 4x or more: draft decodes at 1/4
        fast = decode_crop(data, box, 64, False, images.name(i)).astype(np.float64)
        full = decode_crop(data, box, 64, False, images.name(i), draft=False).astype(np.float64)
        assert np.abs(fast - full).mean() < 3.0 and np.abs(fast - full).max() < 64


# ------------------------------------------------------------------ streams


def _by_hand(images, seed, epoch, rows, res):
    """The normalised batch made with decode_crop and the documented draws, image by image."""
    out = []
    for k in rows:
        data = images.read(int(k))
        width, height, _, _ = image_header(data, images.name(int(k)))
        box, mirrored = image_draw(seed, epoch, int(k), width, height)
        out.append(decode_crop(data, box, res, mirrored, images.name(int(k))))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_train_batches_are_the_documented_crops(train):
    s = stream(train)
    assert s.steps_per_epoch == 72 // 16
    batches = list(s.epoch(1))
    assert len(batches) == 4
    order = epoch_order(7, 1, len(train))
    assert sorted(order.tolist()) == list(range(len(train)))
    for i, (x, y) in enumerate(batches):
        rows = order[i * 16:(i + 1) * 16]
        assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32 and x.is_contiguous()
        torch.testing.assert_close(y, torch.from_numpy(train.labels[rows]))
        torch.testing.assert_close(x, _by_hand(train, 7, 1, rows, 48), atol=1e-5, rtol=1e-5)
    per_channel = torch.cat([x for x, _ in batches]).mean(dim=(0, 2, 3))
    assert per_channel.abs().max() < 1.5  # normalised: near zero mean for natural images


def test_dtype_layout_and_resolution_schedule(train):
    s = stream(train, out_dtype=torch.bfloat16, channels_last=True, resolution=lambda e: 32 + 16 * e)
    for epoch in (0, 2):
        x, _ = next(s.epoch(epoch))
        assert x.shape == (16, 3, 32 + 16 * epoch, 32 + 16 * epoch) and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)


def test_reproducible_across_instances_and_worker_counts_and_epochs_differ(train):
    one = list(stream(train).epoch(3))
    with stream(train, workers=2) as pooled:
        next(pooled.epoch(0))  # an epoch left after one batch: its prefetched batches are dropped
        two = list(pooled.epoch(3))
        again = list(pooled.epoch(3))  # the persistent workers serve a second pass
    for (x1, y1), (x2, y2), (x3, y3) in zip(one, two, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1, x3) and torch.equal(y1, y3)
    other_epoch = next(stream(train).epoch(4))
    other_seed = next(stream(train, seed=8).epoch(3))
    assert not torch.equal(other_epoch[0], one[0][0]) and not torch.equal(other_seed[0], one[0][0])


def test_skip_and_steps_resume_exactly(train):
    s = stream(train)
    full = list(s.epoch(2))
    resumed = list(s.epoch(2, skip=2))
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first = list(s.epoch(2, steps=1))
    assert len(first) == 1 and torch.equal(first[0][0], full[0][0])


@pytest.mark.parametrize("ghost", [None, 4])
def test_ranks_together_see_the_global_batch(train, ghost):
    whole = list(stream(train).epoch(0))
    ranks = []
    for rank in range(2):
        positions = batch_positions(16, 2, rank, ghost)
        ranks.append((positions, list(stream(train, positions=positions).epoch(0))))
    for step, (x, y) in enumerate(whole):
        for positions, batches in ranks:
            assert torch.equal(batches[step][0], x[positions]) and torch.equal(batches[step][1], y[positions])
        assert sorted(torch.cat([p for p, _ in ranks]).tolist()) == list(range(16))


def test_state_dict_checks_the_seed(train):
    s = stream(train)
    s.load_state_dict(s.state_dict())
    with pytest.raises(UserError, match="seed"):
        stream(train, seed=1).load_state_dict(s.state_dict())


def test_test_stream_is_the_ffcv_center_crop(folder):
    val = scan_imagenet(folder, "val")
    ts = TestStream(val, batch_size=10, device=CPU, res=48, workers=0)
    assert len(ts) == 24
    batches = list(ts)
    assert [len(y) for _, y in batches] == [10, 10, 4]
    x = torch.cat([b for b, _ in batches])
    assert x.dtype == torch.uint8 and x.shape == (24, 3, 48, 48)
    assert torch.cat([y for _, y in batches]).tolist() == val.labels.tolist()
    for i in range(len(val)):
        with Image.open(val.name(i)) as im:  # the central 7/8 square, resized: FFCV's evaluation crop
            w, h = im.size
            side = int(224 / 256 * min(w, h))
            assert side / 48 < 2  # below the draft-mode threshold: a full decode
            left, top = (w - side) // 2, (h - side) // 2
            ref = im.convert("RGB").crop((left, top, left + side, top + side)).resize(
                (48, 48), Image.Resampling.BILINEAR)
        # PyTorch's antialiased bilinear uint8 kernel and Pillow's BILINEAR resize agree to
        # one grey level (the rounding of the last bit).
        diff = (x[i].int() - torch.from_numpy(np.array(ref)).permute(2, 0, 1).int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.25
    xf, yf = ts.first(7)
    assert yf.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(xf[1], x[8]) and torch.equal(xf[3], x[1])  # val holds 8 images per class


@dataclasses.dataclass(frozen=True, eq=False)
class CountingImageSet(ImageSet):
    """The real reader, counting the images read (in this process: workers=0)."""

    def read(self, i: int) -> bytes:
        type(self).reads.append(i)
        return super().read(i)


def test_streams_read_only_what_is_asked(train, folder):
    counting = CountingImageSet(**{f.name: getattr(train, f.name) for f in dataclasses.fields(train)})
    CountingImageSet.reads = []
    s = stream(counting)
    assert CountingImageSet.reads == []  # nothing decoded up front
    x, _ = next(s.epoch(0))
    assert sorted(CountingImageSet.reads) == sorted(epoch_order(7, 0, len(train))[:16].tolist())
    CountingImageSet.reads = []
    list(s.epoch(0, skip=3))
    assert len(CountingImageSet.reads) == 16
    CountingImageSet.reads = []
    TestStream(counting, batch_size=8, device=CPU, res=32, workers=0).first(5)
    assert len(CountingImageSet.reads) == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("torchvision") is None,
                    reason="the nvJPEG decode path needs a CUDA GPU and torchvision")
def test_gpu_decode_matches_the_cpu_path(tmp_path):
    root = write_imagenet_folder(tmp_path / "big", classes=3, per_class_train=16, per_class_val=8,
                                 sizes=(200, 420))
    cuda = torch.device("cuda")
    images = scan_imagenet(root, "train")
    cpu, gpu = (stream(images, device=cuda, decode=d, resolution=lambda e: 96) for d in ("cpu", "gpu"))
    assert cpu.decoder == "cpu" and gpu.decoder == "gpu"
    for (xc, yc), (xg, yg) in zip(cpu.epoch(0), gpu.epoch(0), strict=True):
        assert torch.equal(yc, yg) and xg.device.type == "cuda"
        # Same boxes and flips; the decoders (libjpeg-turbo with DCT-domain draft vs nvJPEG
        # at full size) differ by a few grey levels: 0.05 normalised is ~3 levels.
        assert (xc - xg).abs().mean() < 0.05
    val = scan_imagenet(root, "val")
    tc, tg = (TestStream(val, batch_size=8, device=cuda, res=160, workers=0, decode=d)
              for d in ("cpu", "gpu"))
    for (xc, _), (xg, _) in zip(tc, tg, strict=True):
        assert (xc.float() - xg.float()).abs().mean() < 2.0


def test_subset_keeps_classes_order_and_bytes(folder, tmp_path):
    sharded = scan_imagenet(write_imagenet_folder(tmp_path / "shards", shards=True), "train")
    for images in (scan_imagenet(folder, "train"), sharded):
        part = images.subset([50, 3, 30, 3])
        assert part.classes == images.classes and len(part) == 3
        assert part.labels.tolist() == images.labels[[3, 30, 50]].tolist()
        assert [part.read(i) for i in range(3)] == [images.read(i) for i in (3, 30, 50)]
        assert part.name(2) == images.name(50)
        with pytest.raises(IndexError):
            images.subset([len(images)])
