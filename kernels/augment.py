"""CIFAR-10 augmentation on the device: crop, flip, cutout, normalise, cast, lay out; one launch.

The whole uint8 dataset stays resident on the device (as in airbench and Page's
cifar10-fast GPU augmentation); each batch is gathered from it by index and written once,
already normalised, in the dtype and memory format the network consumes:

    out[b, c, y, x] = 0                                          if (y, x) is in b's cutout square
                    = (P[index[b], c, y + dy, xs + dx] - mean[c]) / std[c]    otherwise

with ``xs = W - 1 - x`` when ``flip[b]`` else ``x`` (crop, then mirror), ``(dy, dx) = shift[b]``
in ``[-pad, pad]`` (the random crop of a ``pad``-padded image, i.e. a random translate),
and ``P`` the source image extended beyond its border by ``pad_mode``: ``"reflect"``
(reflection without repeating the edge, as ``F.pad(mode="reflect")``) or ``"zeros"``
(0 after normalisation, i.e. the mean colour: fb.resnet.torch datasets/cifar10.lua
normalises with ``ColorNormalize`` before ``RandomCrop(32, 4)`` zero-pads). Cutout
(DeVries & Taylor 2017) zeroes a ``cutout_size`` square whose top-left corner may lie
outside the image (clipped).

Normalisation is ``(v - mean) / std`` in float32 with a correctly rounded division
(``tl.math.div_rn``), the same float operations as the reference, so float32 outputs are
bit-identical; narrower outputs round that float32 value to nearest-even, also identical.
Randomness is never drawn inside the kernel: :func:`draw_augmentation` draws it from a
seeded ``torch.Generator``.

Cost per output element (one channel of one pixel), s = bytes of ``out_dtype``:
bytes moved = 1 (uint8 source, read once) + s (output, written once), plus
41 bytes per image (index 8, shift 16, flip 1, cutout 16); FLOPs = 2 (subtract, divide).
A batch of B 3x32x32 images at float32 moves 15,360·B + 41·B bytes: about 0.4 FLOP/byte,
memory-bound on every GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgraph.kernels._triton import HAS_TRITON, can_launch, next_power_of_2, require_launchable

if HAS_TRITON:
    from fastgraph.kernels._triton import tl, triton

PAD_MODES = ("reflect", "zeros")
FLIP_MODES = ("random", "alternate", "none")
_INTERPRETER_DTYPES = (torch.float32, torch.float64)  # numpy has no bfloat16


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _augment_gather_normalize(
        src_ptr, index_ptr, shift_ptr, flip_ptr, cutout_ptr, mean_ptr, std_ptr, out_ptr,
        total, H, W, pad, cutout_size,
        s_n, s_c, s_h, s_w,  # source strides, elements
        o_b, o_c, o_h, o_w,  # output strides, elements
        REFLECT: tl.constexpr, HAS_CUTOUT: tl.constexpr, IN_IMAGE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program writes BLOCK output pixels (all 3 channels) of the flattened (b, y, x) space."""
        pid = tl.program_id(0)
        hw = H * W
        if IN_IMAGE:
            # BLOCK divides H*W: the block lies inside one image, so its per-image values are
            # scalars and the pixel offsets are provably contiguous (coalesced stores). Its first
            # pixel is a multiple of BLOCK: said with a hint, as Triton < 3.9 does not infer the
            # divisibility of (pid * BLOCK) % (H * W), and without it no NCHW store is vectorised.
            e0 = pid * BLOCK
            b = e0 // hw
            p = tl.multiple_of(e0 % hw, BLOCK) + tl.arange(0, BLOCK)
            mask = p < hw
            n = tl.load(index_ptr + b)
            dy = tl.load(shift_ptr + 2 * b)
            dx = tl.load(shift_ptr + 2 * b + 1)
            fl = tl.load(flip_ptr + b)
            if HAS_CUTOUT:
                cy = tl.load(cutout_ptr + 2 * b)
                cx = tl.load(cutout_ptr + 2 * b + 1)
        else:
            # Small images (or the interpreter's large blocks): a block spans several images.
            e = pid * BLOCK + tl.arange(0, BLOCK)
            mask = e < total
            b = e // hw
            p = e % hw
            n = tl.load(index_ptr + b, mask=mask, other=0)
            dy = tl.load(shift_ptr + 2 * b, mask=mask, other=0)
            dx = tl.load(shift_ptr + 2 * b + 1, mask=mask, other=0)
            fl = tl.load(flip_ptr + b, mask=mask, other=0)
            if HAS_CUTOUT:
                cy = tl.load(cutout_ptr + 2 * b, mask=mask, other=0)
                cx = tl.load(cutout_ptr + 2 * b + 1, mask=mask, other=0)
        y = p // W
        x = p % W
        # A shift beyond the padding would read outside the reflected border: clamp it, so a
        # caller's bad draw cannot make the kernel read out of bounds.
        dy = tl.minimum(tl.maximum(dy, -pad), pad)
        dx = tl.minimum(tl.maximum(dx, -pad), pad)
        xs = tl.where(fl != 0, W - 1 - x, x)
        sy = y + dy
        sx = xs + dx
        if REFLECT:
            sy = tl.where(sy < 0, -sy, sy)
            sy = tl.where(sy > H - 1, 2 * (H - 1) - sy, sy)
            sx = tl.where(sx < 0, -sx, sx)
            sx = tl.where(sx > W - 1, 2 * (W - 1) - sx, sx)
            inside = mask
        else:
            inside = mask & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
        src = src_ptr + n.to(tl.int64) * s_n + sy * s_h + sx * s_w
        dst = out_ptr + b.to(tl.int64) * o_b + y * o_h + x * o_w
        if HAS_CUTOUT:
            hole = (y >= cy) & (y < cy + cutout_size) & (x >= cx) & (x < cx + cutout_size)
        for c in tl.static_range(3):
            m = tl.load(mean_ptr + c)
            s = tl.load(std_ptr + c)
            v = tl.load(src + c * s_c, mask=inside, other=0).to(tl.float32)
            val = tl.math.div_rn(v - m, s)
            if not REFLECT:
                # The zero border is zero in normalised units (fb.resnet.torch pads after
                # ColorNormalize), not the normalised value of a black pixel.
                val = tl.where(inside, val, 0.0)
            if HAS_CUTOUT:
                val = tl.where(hole, 0.0, val)
            tl.store(dst + c * o_c, val.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher


def _check(images, index, shift, flip, cutout, mean, std, pad, pad_mode, cutout_size, out_dtype):
    """Validate arguments; raise ``TypeError``/``ValueError`` naming the one at fault."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise TypeError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if index.dtype != torch.int64 or index.dim() != 1:
        raise TypeError(f"index must be int64 (B,), got {index.dtype} {tuple(index.shape)}")
    batch = index.shape[0]
    if shift.dtype != torch.int64 or tuple(shift.shape) != (batch, 2):
        raise TypeError(f"shift must be int64 ({batch}, 2), got {shift.dtype} {tuple(shift.shape)}")
    if flip.dtype != torch.bool or tuple(flip.shape) != (batch,):
        raise TypeError(f"flip must be bool ({batch},), got {flip.dtype} {tuple(flip.shape)}")
    if cutout is not None and cutout_size > 0:
        if cutout.dtype != torch.int64 or tuple(cutout.shape) != (batch, 2):
            raise TypeError(f"cutout must be int64 ({batch}, 2), got {cutout.dtype} {tuple(cutout.shape)}")
    if cutout_size < 0:
        raise ValueError(f"cutout_size must be >= 0, got {cutout_size}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    height, width = images.shape[2:]
    if pad_mode == "reflect" and pad >= min(height, width):
        raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {height}x{width}")
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ValueError(f"mean and std must be 3 values each, std nonzero; got {mean}, {std}")
    if not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
    tensors = [index, shift, flip] + ([cutout] if cutout is not None and cutout_size > 0 else [])
    if any(t.device != images.device for t in tensors):
        raise ValueError("images, index, shift, flip and cutout must be on the same device")


def _mean_std(mean, std, device):
    """Per-channel float32 mean and std: the exact values both kernel and reference use."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def _empty_output(batch, height, width, out_dtype, channels_last, device):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((batch, 3, height, width), dtype=out_dtype, device=device, memory_format=fmt)


def _block_size(device_type: str, hw: int, total: int) -> int:
    """Pixels per program: one 32x32 image per program on a GPU (per-image values are then
    scalars); a few large blocks in the interpreter, which pays per program."""
    if device_type == "cuda":
        return min(1024, next_power_of_2(hw))
    return min(16384, next_power_of_2(total))


def _launch_augment(images, index, shift, flip, cutout=None, *, mean, std, pad=2, pad_mode="reflect",
                    cutout_size=0, out_dtype=torch.float32, channels_last=True, block=None):
    """Run the Triton kernel (``block``: pixels per program, default :func:`_block_size`).

    Raises ``RuntimeError`` where the kernel cannot run on these tensors.
    """
    require_launchable(images, "augment")
    if images.device.type == "cpu" and out_dtype not in _INTERPRETER_DTYPES:
        raise RuntimeError(f"augment: Triton's interpreter has no {out_dtype}; use float32 on the CPU")
    batch, (height, width) = index.shape[0], images.shape[2:]
    out = _empty_output(batch, height, width, out_dtype, channels_last, images.device)
    if batch == 0:
        return out
    mean_t, std_t = _mean_std(mean, std, images.device)
    has_cutout = cutout is not None and cutout_size > 0
    hw = height * width
    total = batch * hw
    block = block or _block_size(images.device.type, hw, total)
    num_warps = 4 if images.device.type == "cuda" else 1
    in_image = hw % block == 0
    grid = (triton.cdiv(total, block),)
    _augment_gather_normalize[grid](
        images, index, shift.contiguous(), flip.contiguous().view(torch.uint8),
        cutout.contiguous() if has_cutout else index, mean_t, std_t, out,
        total, height, width, pad, cutout_size,
        *images.stride(), *out.stride(),
        REFLECT=pad_mode == "reflect", HAS_CUTOUT=has_cutout, IN_IMAGE=in_image,
        BLOCK=block, num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------- public function


def augment(images, index, shift, flip, cutout=None, *, mean, std, pad=2, pad_mode="reflect",
            cutout_size=0, out_dtype=torch.float32, channels_last=True) -> torch.Tensor:
    """Gather, crop, flip, cut out and normalise a batch of uint8 images in one kernel launch.

    Args:
        images: uint8 (N, 3, H, W), the whole dataset, on the device (any strides).
        index: int64 (B,), the rows of ``images`` to gather (0 <= index < N; not checked on
            the device, to avoid a synchronisation).
        shift: int64 (B, 2), (dy, dx) in [-pad, pad]: the crop offset (translate), pixels.
        flip: bool (B,), mirror left-right after the crop.
        cutout: int64 (B, 2), top-left (y, x) of a ``cutout_size`` square zeroed in the
            output (may lie partly outside the image), or ``None``.
        mean, std: 3 floats each, 0..255 units (e.g. ``fastgraph.data.CIFAR10_MEAN``).
        pad: crop padding, pixels; ``pad_mode``: ``"reflect"`` or ``"zeros"`` (the border
            is 0 after normalisation, as fb.resnet.torch's ``RandomCrop`` after ``ColorNormalize``).
        cutout_size: side of the cutout square, pixels (0: no cutout).
        out_dtype: float dtype of the output; ``channels_last``: output memory format.

    Returns:
        (B, 3, H, W) ``out_dtype`` tensor on the images' device (see the module docstring
        for the exact formula).

    Runs the Triton kernel on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``);
    elsewhere it runs :func:`augment_reference`, which gives the same bits.

    Raises:
        TypeError / ValueError: wrong dtype, shape, device, pad mode, or pad >= image size.
    """
    _check(images, index, shift, flip, cutout, mean, std, pad, pad_mode, cutout_size, out_dtype)
    args = (images, index, shift, flip, cutout)
    kwargs = dict(mean=mean, std=std, pad=pad, pad_mode=pad_mode, cutout_size=cutout_size,
                  out_dtype=out_dtype, channels_last=channels_last)
    if can_launch(images) and (images.device.type == "cuda" or out_dtype in _INTERPRETER_DTYPES):
        return _launch_augment(*args, **kwargs)
    return augment_reference(*args, **kwargs)


# ----------------------------------------------------------------------------- reference


def augment_reference(images, index, shift, flip, cutout=None, *, mean, std, pad=2, pad_mode="reflect",
                      cutout_size=0, out_dtype=torch.float32, channels_last=True) -> torch.Tensor:
    """Plain-PyTorch :func:`augment`: same arguments, same result bit for bit.

    Bytes moved (eager, float32 out, per output element): gather 1 + 4 (float copy) +
    normalise 4+4 + padded copy 4+4 + crop gather 4+4 + cutout 4+4 (+ layout 4+4), about
    ten times the kernel's 5.
    """
    _check(images, index, shift, flip, cutout, mean, std, pad, pad_mode, cutout_size, out_dtype)
    batch, (height, width), device = index.shape[0], images.shape[2:], images.device
    mean_t, std_t = _mean_std(mean, std, device)
    # Normalise, then pad: the "zeros" border is 0 in normalised units (fb.resnet.torch).
    src = (images[index].to(torch.float32) - mean_t.view(1, 3, 1, 1)) / std_t.view(1, 3, 1, 1)
    if pad > 0:
        src = F.pad(src, (pad, pad, pad, pad), mode="reflect" if pad_mode == "reflect" else "constant")
    d = shift.clamp(-pad, pad)
    rows = torch.arange(height, device=device) + pad + d[:, :1]  # (B, H)
    cols = torch.arange(width, device=device)
    cols = torch.where(flip[:, None], width - 1 - cols, cols) + pad + d[:, 1:]  # (B, W)
    b = torch.arange(batch, device=device)[:, None, None, None]
    c = torch.arange(3, device=device)[None, :, None, None]
    out = src[b, c, rows[:, None, :, None], cols[:, None, None, :]]
    if cutout is not None and cutout_size > 0:
        ys = torch.arange(height, device=device)
        xs = torch.arange(width, device=device)
        in_y = (ys >= cutout[:, :1]) & (ys < cutout[:, :1] + cutout_size)  # (B, H)
        in_x = (xs >= cutout[:, 1:]) & (xs < cutout[:, 1:] + cutout_size)  # (B, W)
        hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]
        out = torch.where(hole, torch.zeros((), device=device), out)
    out = out.to(out_dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------- drawing the randomness

_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift / multiply rounds) on int64 tensors without overflow."""
    h = h & _M32
    for _ in range(2):
        h = h ^ (h >> 16)
        h = (h * 0x45D9F3B) & _M32  # < 2**59: exact in int64
    return h ^ (h >> 16)


def alternating_flip_base(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image's epoch-0 flip for the alternating scheme: a fixed coin per (seed, index).

    bool (B,) from int64 ``index`` (B,): bit 0 of a 32-bit hash of the image index mixed with
    the seed. Same seed and index give the same coin on any device; about half the images
    start flipped.
    """
    seed32 = (int(seed) ^ (int(seed) >> 32)) & _M32
    salt = int(_mix32(torch.tensor(seed32, dtype=torch.int64)))
    return (_mix32(index.to(torch.int64) ^ salt) & 1).bool()


def draw_augmentation(batch_size, generator, *, pad, cutout_size, flip="random", epoch=0, index=None,
                      device=None, image_size=(32, 32)):
    """Draw one batch's random crop, flip and cutout for :func:`augment` from ``generator``.

    Args:
        batch_size: B.
        generator: a seeded ``torch.Generator`` (CPU or CUDA); draws happen on its device in
            the order shift, flip (``"random"`` only), cutout, so a seed fixes the run.
        pad: crop padding, pixels: ``shift`` is uniform over [-pad, pad]^2.
        cutout_size: side of the cutout square, pixels (0: no cutout, returns ``None``).
        flip: ``"random"``: each image flipped with probability 1/2;
            ``"alternate"``: airbench's alternating flip (Jordan 2024): image ``i`` is flipped
            in epoch ``e`` iff ``base(i) XOR (e odd)``, where ``base(i)`` is a coin derived from
            the image index and ``generator.initial_seed()`` (:func:`alternating_flip_base`),
            so every image is seen flipped and unflipped on alternate epochs and half the
            dataset starts flipped; needs ``index`` (the dataset rows of the batch);
            ``"none"``: no flip.
        epoch: the epoch number (``"alternate"`` only).
        index: int64 (B,) dataset rows of this batch (``"alternate"`` only).
        device: where the results go (default: the generator's device).
        image_size: (H, W) of the images, for the cutout position.

    Returns:
        ``(shift, flip, cutout)``: int64 (B, 2) (dy, dx); bool (B,); int64 (B, 2) top-left
        (y, x) or ``None``. The cutout centre is uniform over the image and the square is
        clipped at the border (DeVries & Taylor 2017, "Improved Regularization of
        Convolutional Neural Networks with Cutout").

    Raises:
        ValueError: unknown flip mode, negative pad/cutout size, or ``"alternate"`` without ``index``.
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    if pad < 0 or cutout_size < 0:
        raise ValueError(f"pad and cutout_size must be >= 0, got {pad}, {cutout_size}")
    if flip == "alternate" and (index is None or index.shape != (batch_size,)):
        raise ValueError("flip='alternate' needs index, the int64 (batch_size,) dataset rows of the batch")
    gdev = generator.device
    device = gdev if device is None else torch.device(device)
    shift = torch.randint(-pad, pad + 1, (batch_size, 2), generator=generator, device=gdev)
    if flip == "random":
        flips = torch.rand(batch_size, generator=generator, device=gdev) < 0.5
    elif flip == "alternate":
        flips = alternating_flip_base(index.to(gdev), generator.initial_seed()) ^ bool(epoch % 2)
    else:
        flips = torch.zeros(batch_size, dtype=torch.bool, device=gdev)
    cutout = None
    if cutout_size > 0:
        height, width = image_size
        cy = torch.randint(0, height, (batch_size,), generator=generator, device=gdev)
        cx = torch.randint(0, width, (batch_size,), generator=generator, device=gdev)
        cutout = torch.stack([cy, cx], dim=1) - cutout_size // 2
    if cutout is not None:
        cutout = cutout.to(device)
    return shift.to(device), flips.to(device), cutout
