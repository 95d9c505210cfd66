"""The augmentation kernel against its reference (bit for bit, on real CIFAR-10 and odd
shapes), the semantics of crop/flip/cutout checked independently, and the statistics of
the drawn randomness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD, normalize
from fastgraph.kernels.augment import (
    _launch_augment,
    alternating_flip_base,
    augment,
    augment_reference,
    draw_augmentation,
)

pytestmark = pytest.mark.kernels

NORM = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)


def _draws(batch, seed, *, pad, cutout_size, flip="random", image_size=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    return draw_augmentation(batch, g, pad=pad, cutout_size=cutout_size, flip=flip, image_size=image_size)


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
@pytest.mark.parametrize("cutout_size", [0, 8])
@pytest.mark.parametrize("channels_last", [True, False])
def test_kernel_equals_reference_on_cifar10(cifar10, pad_mode, cutout_size, channels_last):
    images = cifar10.train_images  # the whole dataset is the source, as on the device
    index = torch.randint(0, len(images), (48,), generator=torch.Generator().manual_seed(1))
    shift, flip, cutout = _draws(48, 2, pad=4, cutout_size=cutout_size)
    kw = dict(NORM, pad=4, pad_mode=pad_mode, cutout_size=cutout_size, channels_last=channels_last)
    out = _launch_augment(images, index, shift, flip, cutout, **kw)
    ref = augment_reference(images, index, shift, flip, cutout, **kw)
    assert out.dtype == torch.float32 and out.shape == (48, 3, 32, 32)
    assert torch.equal(out, ref)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and out.stride() == ref.stride()
    assert torch.equal(augment(images, index, shift, flip, cutout, **kw), ref)  # public path


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_gpu_block_shape_under_the_interpreter(cifar10, pad_mode):
    """The GPU configuration (one image per program, per-image scalars) gives the same bits."""
    images = cifar10.test_images
    index = torch.arange(5, 12)
    shift, flip, cutout = _draws(7, 3, pad=2, cutout_size=6)
    kw = dict(NORM, pad=2, pad_mode=pad_mode, cutout_size=6)
    out = _launch_augment(images, index, shift, flip, cutout, block=1024, **kw)
    assert torch.equal(out, augment_reference(images, index, shift, flip, cutout, **kw))


@pytest.mark.parametrize(
    "n, height, width, batch, pad, pad_mode, cutout_size",
    [
        (5, 7, 5, 3, 3, "reflect", 3),  # odd sizes, pad close to the width
        (4, 9, 13, 1, 2, "zeros", 4),  # batch of one
        (3, 1, 1, 5, 2, "zeros", 1),  # 1x1 images: everything comes from the zero border
        (6, 6, 6, 11, 0, "reflect", 0),  # no padding
        (2, 12, 10, 9, 5, "reflect", 20),  # cutout larger than the image
    ],
)
def test_odd_shapes(n, height, width, batch, pad, pad_mode, cutout_size):
    g = torch.Generator().manual_seed(n * 100 + batch)
    images = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)
    index = torch.randint(0, n, (batch,), generator=g)
    shift, flip, cutout = draw_augmentation(batch, g, pad=pad, cutout_size=cutout_size,
                                            image_size=(height, width))
    kw = dict(NORM, pad=pad, pad_mode=pad_mode, cutout_size=cutout_size)
    for block in (None, 16, 64):  # several images per program, and blocks inside one image
        out = _launch_augment(images, index, shift, flip, cutout, block=block, **kw)
        assert torch.equal(out, augment_reference(images, index, shift, flip, cutout, **kw))


def test_identity_augmentation_is_normalize(cifar10):
    """No shift, no flip, no cutout: exactly fastgraph.data.normalize of the gathered images."""
    index = torch.tensor([0, 17, 49_999, 123])
    zeros = torch.zeros(4, 2, dtype=torch.int64)
    out = augment(cifar10.train_images, index, zeros, torch.zeros(4, dtype=torch.bool), **NORM)
    assert torch.equal(out, normalize(cifar10.train_images[index]))


def test_crop_flip_semantics(cifar10):
    """Translate then mirror, checked by slicing, independently of the reference's indexing."""
    image = cifar10.test_images[3:4]
    base = normalize(image)[0]
    fill = torch.zeros(3, 1, 1)  # the zero border is 0 after normalisation
    shift = torch.tensor([[1, -2]])
    out = augment(image, torch.tensor([0]), shift, torch.tensor([False]), pad=2, pad_mode="zeros", **NORM)[0]
    # out[y, x] = image[y + 1, x - 2]: rows 0..30 come from 1..31, columns 2..31 from 0..29
    assert torch.equal(out[:, :31, 2:], base[:, 1:, :30])
    assert torch.equal(out[:, 31:, :], fill.expand(3, 1, 32))
    assert torch.equal(out[:, :, :2], fill.expand(3, 32, 2))
    flipped = augment(image, torch.tensor([0]), shift, torch.tensor([True]), pad=2, pad_mode="zeros",
                      **NORM)[0]
    assert torch.equal(flipped, torch.flip(out, dims=[-1]))
    reflect = augment(image, torch.tensor([0]), torch.tensor([[-2, 0]]), torch.tensor([False]), pad=2,
                      pad_mode="reflect", **NORM)[0]
    assert torch.equal(reflect, F.pad(base[None], (0, 0, 2, 0), mode="reflect")[0, :, :32])


@pytest.mark.parametrize("channels_last", [True, False])
def test_zero_padding_is_zero_after_normalisation(cifar10, channels_last):
    """fb.resnet.torch (datasets/cifar10.lua: ColorNormalize, HorizontalFlip, RandomCrop(32, 4))
    zero-pads the normalised image, so the border is the mean colour (0), not a black pixel;
    checked against normalise, zero-pad, crop, mirror at every extreme shift, both flips."""
    images, pad, n = cifar10.train_images, 4, 9
    index = torch.arange(n) * 5_000 + 7  # odd batch, images from across the training set
    corners = torch.tensor([-pad, 0, pad])
    shift = torch.stack(torch.meshgrid(corners, corners, indexing="ij"), dim=-1).reshape(n, 2)
    flip = torch.arange(n) % 2 == 1
    padded = F.pad(normalize(images[index]), (pad,) * 4)  # normalise, then zero-pad
    crops = [padded[i, :, pad + dy:pad + dy + 32, pad + dx:pad + dx + 32]
             for i, (dy, dx) in enumerate(shift.tolist())]
    expected = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip.tolist(), strict=True)])
    kw = dict(NORM, pad=pad, pad_mode="zeros", channels_last=channels_last)
    for fn in (_launch_augment, augment_reference):
        out = fn(images, index, shift, flip, **kw)
        assert torch.equal(out, expected)
        assert (out[0, :, :pad, :] == 0).all() and (out[8, :, -pad:, :] == 0).all()


def test_cutout_is_a_clipped_square(cifar10):
    image, index = cifar10.test_images[:1], torch.tensor([0])
    args = (image, index, torch.zeros(1, 2, dtype=torch.int64), torch.tensor([False]))
    plain = augment(*args, **NORM)[0]
    out = augment(*args, torch.tensor([[-2, 29]]), cutout_size=4, **NORM)[0]
    hole = torch.zeros(32, 32, dtype=torch.bool)
    hole[:2, 29:] = True  # rows -2..1 and columns 29..32, clipped to the image
    assert torch.equal(out == 0, hole.expand(3, 32, 32))
    assert torch.equal(out[:, ~hole], plain[:, ~hole])


def test_narrow_output_dtypes_fall_back_on_cpu(cifar10):
    images, index = cifar10.test_images, torch.arange(8)
    shift, flip, cutout = _draws(8, 5, pad=2, cutout_size=4)
    kw = dict(NORM, cutout_size=4, out_dtype=torch.bfloat16)
    out = augment(images, index, shift, flip, cutout, **kw)
    ref32 = augment_reference(images, index, shift, flip, cutout, **dict(kw, out_dtype=torch.float32))
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref32.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="interpreter has no"):
        _launch_augment(images, index, shift, flip, cutout, **kw)


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(images=torch.zeros(2, 3, 8, 8)), TypeError),  # float, not uint8
        (dict(images=torch.zeros(2, 1, 8, 8, dtype=torch.uint8)), TypeError),  # grey
        (dict(index=torch.zeros(2, dtype=torch.int32)), TypeError),
        (dict(shift=torch.zeros(2, 3, dtype=torch.int64)), TypeError),
        (dict(flip=torch.zeros(2, dtype=torch.uint8)), TypeError),
        (dict(pad_mode="replicate"), ValueError),
        (dict(pad=8), ValueError),  # reflect needs pad < image size
        (dict(std=(1.0, 0.0, 1.0)), ValueError),
        (dict(out_dtype=torch.int32), TypeError),
    ],
)
def test_bad_arguments_raise(change, error):
    kw = dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), index=torch.zeros(2, dtype=torch.int64),
              shift=torch.zeros(2, 2, dtype=torch.int64), flip=torch.zeros(2, dtype=torch.bool),
              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pad=2)
    kw.update(change)
    for fn in (augment, augment_reference):
        with pytest.raises(error):
            fn(**kw)


# ----------------------------------------------------------------------------- the randomness

# Chi-square critical values at p = 0.001 (4 and 24 degrees of freedom).
CHI2_CRIT_4, CHI2_CRIT_24 = 18.467, 51.179


def _chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_shift_is_uniform_over_the_padding():
    shift, _, _ = _draws(20_000, 7, pad=2, cutout_size=0)
    assert shift.dtype == torch.int64 and int(shift.min()) == -2 and int(shift.max()) == 2
    for axis in range(2):
        assert _chi2(torch.bincount(shift[:, axis] + 2, minlength=5).double()) < CHI2_CRIT_4
    joint = torch.bincount((shift[:, 0] + 2) * 5 + shift[:, 1] + 2, minlength=25).double()
    assert _chi2(joint) < CHI2_CRIT_24


def test_random_flip_rate_is_one_half():
    _, flip, _ = _draws(20_000, 8, pad=2, cutout_size=0)
    assert abs(flip.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / 20_000)
    _, never, _ = _draws(100, 8, pad=2, cutout_size=0, flip="none")
    assert not never.any()


def test_draws_are_reproducible_from_the_seed():
    a = _draws(64, 11, pad=4, cutout_size=8)
    b = _draws(64, 11, pad=4, cutout_size=8)
    c = _draws(64, 12, pad=4, cutout_size=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_cutout_covers_the_expected_fraction(cifar10):
    """Measured zeroed fraction of real outputs vs the exact expectation of a clipped square
    whose centre is uniform over the image."""
    size, n = 8, 1000
    shift, flip, cutout = _draws(n, 9, pad=2, cutout_size=size)
    out = augment(cifar10.train_images, torch.arange(n), shift, flip, cutout, cutout_size=size, **NORM)
    covered = (out == 0).all(dim=1).double().mean(dim=(1, 2))  # per image
    per_axis = sum(min(c - size // 2 + size, 32) - max(c - size // 2, 0) for c in range(32)) / 32 / 32
    expected = per_axis**2
    assert abs(covered.mean().item() - expected) < 5 * covered.std().item() / math.sqrt(n)
    assert 0 < expected < (size / 32) ** 2  # clipping at the border makes it less than a full square


def test_alternating_flip_flips_every_image_each_epoch(cifar10):
    g = torch.Generator().manual_seed(1234)
    index = torch.randperm(50_000, generator=torch.Generator().manual_seed(0))
    flips = [draw_augmentation(50_000, g, pad=2, cutout_size=0, flip="alternate", epoch=e, index=index)[1]
             for e in range(4)]
    for e in range(1, 4):
        assert torch.equal(flips[e], ~flips[e - 1])
    assert abs(flips[0].double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / 50_000)
    # The coin is a function of (seed, image index): independent of batch order, new per seed.
    assert torch.equal(flips[0], alternating_flip_base(index, 1234))
    assert torch.equal(alternating_flip_base(index.flip(0), 1234), flips[0].flip(0))
    other = alternating_flip_base(index, 4321)
    assert abs((other == flips[0]).double().mean().item() - 0.5) < 0.02
    # Applied: an image in epoch 1 is the mirror of itself in epoch 0 (no shift, no cutout).
    rows = index[:16]
    zero = torch.zeros(16, 2, dtype=torch.int64)
    e0 = augment(cifar10.train_images, rows, zero, flips[0][:16], **NORM)
    e1 = augment(cifar10.train_images, rows, zero, flips[1][:16], **NORM)
    assert torch.equal(e1, torch.flip(e0, dims=[-1]))


def test_alternate_needs_the_index():
    with pytest.raises(ValueError, match="index"):
        draw_augmentation(4, torch.Generator(), pad=2, cutout_size=0, flip="alternate")


def test_kernel_compiles_for_h100(compile_for_gpu):
    """The kernel compiles to sm_90 cubins (bfloat16 and float32 out, both layouts, cutout on/off)."""
    sig = dict(src_ptr="*u8", index_ptr="*i64", shift_ptr="*i64", flip_ptr="*u8", cutout_ptr="*i64",
               mean_ptr="*fp32", std_ptr="*fp32")
    ints = ("total", "H", "W", "pad", "cutout_size", "s_n", "s_c", "s_h", "s_w", "o_b", "o_c", "o_h", "o_w")
    sig |= {n: "i32" for n in ints}
    divisible = [n for n in sig if n.endswith("_ptr")]
    divisible += ["out_ptr", "total", "H", "W", "s_n", "s_c", "s_h", "o_b"]
    specs = []
    for out, channels_last, cutout in (("bf16", True, True), ("fp32", False, False)):
        layout = dict(o_c=1) if channels_last else dict(o_w=1)
        consts = dict(REFLECT=True, HAS_CUTOUT=cutout, IN_IMAGE=True, BLOCK=1024, s_w=1, **layout)
        strides = ["o_h"] if channels_last else ["o_c", "o_h"]  # 3*32 or 32*32 and 32: multiples of 16
        specs.append(("fastgraph.kernels.augment", "_augment_gather_normalize", dict(sig, out_ptr=f"*{out}"),
                      consts, divisible + strides, 4))
    results = compile_for_gpu(specs)
    assert all(r["cubin_bytes"] > 0 for r in results)
    import triton

    # NCHW rows of one image are written as vectors (Triton < 3.9 needs the kernel's multiple_of hint)
    assert results[1]["vector_stores"] > 0, f"Triton {triton.__version__}: {results[1]}"


@pytest.mark.gpu
def test_compiled_kernel_on_cuda_equals_reference(run_on_gpu):
    run_on_gpu("""
import torch
from fastgraph.kernels.augment import augment, augment_reference, draw_augmentation, _launch_augment
g = torch.Generator(device="cuda").manual_seed(0)
images = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, device="cuda")
index = torch.randint(0, 1000, (512,), device="cuda", generator=g)
for cutout_size in (0, 8):
    shift, flip, cutout = draw_augmentation(512, g, pad=4, cutout_size=cutout_size)
    for pad_mode in ("reflect", "zeros"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for cl in (True, False):
                kw = dict(mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7), pad=4, pad_mode=pad_mode,
                          cutout_size=cutout_size, out_dtype=dtype, channels_last=cl)
                out = _launch_augment(images, index, shift, flip, cutout, **kw)
                assert torch.equal(out, augment_reference(images, index, shift, flip, cutout, **kw)), kw
""")
