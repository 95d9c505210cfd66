"""Small modules that fastgraph's passes insert into a graph (training-time and TTA).

Each one is FX-traceable: its ``forward`` branches only on ``self.training`` and on
constant attributes set at construction, never on data. The few operations that depend
on the batch size at run time (the ghost-batch check, the drop masks) live in free
functions registered with :func:`torch.fx.wrap`, so re-tracing a graph that holds these
modules records them as single calls instead of failing on a shape test.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fastgraph.core.errors import UserError


class GhostBatchSizeError(UserError, ValueError):
    """A training batch of N samples that ghost batch norm cannot split into ghost batches of S."""


# --------------------------------------------------------------------------- ghost batch norm


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    num_batches_tracked: Tensor | None,
    ghost_batch_size: int,
    momentum: float | None,
    eps: float,
) -> Tensor:
    """Training-mode batch norm over ghost batches of ``ghost_batch_size`` samples.

    ``x`` (N, C, H, W), any float dtype; returns the same shape and dtype. One reshape puts
    the K = N / S ghost batches on the channel axis, (N, C, H, W) -> (S, K*C, H, W), and a
    single ``F.batch_norm`` call then normalises each (ghost batch, channel) pair over its
    S*H*W values. For a contiguous NCHW tensor the reshape is a view: ghost batch k holds
    the samples k, k+K, k+2K, ... (a strided split, as in Page's cifar10-fast; batches are
    shuffled, so which S samples share statistics does not matter). A channels-last input
    has no such view: it is copied, and the output is returned channels-last.

    Running statistics (C,) are updated in place with the mean over ghost batches of the
    per-ghost-batch updates: with momentum m, running = (1 - m) * running + m * mean_k(stat_k),
    where stat_k is ghost batch k's mean or unbiased variance. ``momentum=None`` uses the
    cumulative average 1 / num_batches_tracked, as ``nn.BatchNorm2d`` does.

    Raises :class:`GhostBatchSizeError` (a ``ValueError``) when N is not a multiple of S.
    Source: Hoffer, Hubara and Soudry, "Train longer, generalize better", 2017 (ghost
    batch norm); Page, "How to Train Your ResNet 8: Bag of Tricks", 2019.
    """
    if x.dim() != 4:
        raise ValueError(f"ghost batch norm expects a 4-D (N, C, H, W) input, got {x.dim()}-D")
    n, c, h, w = x.shape
    if n % ghost_batch_size:
        raise GhostBatchSizeError(
            f"ghost batch norm: a training batch of N={n} samples does not split into ghost "
            f"batches of S={ghost_batch_size}; use a batch size that is a multiple of {ghost_batch_size} "
            "(drop the last incomplete batch)"
        )
    k = n // ghost_batch_size
    factor = 0.0
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    elif momentum is not None:
        factor = momentum
    # K copies of the running statistics receive the per-ghost-batch updates.
    split_mean = running_mean.repeat(k) if running_mean is not None else None
    split_var = running_var.repeat(k) if running_var is not None else None
    y = F.batch_norm(
        x.reshape(ghost_batch_size, k * c, h, w),
        split_mean,
        split_var,
        weight.repeat(k) if weight is not None else None,
        bias.repeat(k) if bias is not None else None,
        True,
        factor,
        eps,
    )
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.copy_(split_mean.view(k, c).mean(0))
            running_var.copy_(split_var.view(k, c).mean(0))
    y = y.reshape(n, c, h, w)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # No view puts the ghost batches on the channel axis of an NHWC tensor: the reshape
        # above copied; hand the next layer the layout it was given.
        y = y.contiguous(memory_format=torch.channels_last)
    return y


torch.fx.wrap("ghost_batch_norm")


class GhostBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises over ghost batches of S samples.

    Input and output (N, C, H, W). Training: statistics per ghost batch of
    ``ghost_batch_size`` samples via :func:`ghost_batch_norm` (one reshape, one
    batch-norm call, no loop over ghost batches); N must be a multiple of S, else
    :class:`GhostBatchSizeError`. Evaluation: exactly ``nn.BatchNorm2d`` (running
    statistics, never split). Parameters and buffers keep BatchNorm2d's names and shapes
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so
    checkpoints load either way and passes that look for BatchNorm2d still find it.

    Page used ghost batches of 32 (512 / 16 splits) in his DAWNBench ResNet-9.
    """

    def __init__(self, num_features: int, ghost_batch_size: int = 32, **kwargs):
        super().__init__(num_features, **kwargs)
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
        self.ghost_batch_size = int(ghost_batch_size)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, ghost_batch_size: int) -> GhostBatchNorm:
        """A GhostBatchNorm with ``bn``'s settings, parameters, buffers and requires_grad flags."""
        ref = bn.weight if bn.weight is not None else bn.running_mean
        ghost = cls(
            bn.num_features,
            ghost_batch_size,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None else None,
        )
        ghost.load_state_dict(bn.state_dict())
        if bn.affine:
            ghost.weight.requires_grad_(bn.weight.requires_grad)
            ghost.bias.requires_grad_(bn.bias.requires_grad)
        ghost.train(bn.training)
        return ghost

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            # nn.BatchNorm2d's evaluation, written out: its forward tests x.dim() in Python,
            # which FX cannot trace. Running statistics when tracked, never split.
            use_batch_stats = self.running_mean is None and self.running_var is None
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                use_batch_stats, 0.0, self.eps)
        return ghost_batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.num_batches_tracked,
            self.ghost_batch_size,
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


# --------------------------------------------------------------------------- patch whitening


class PatchWhitening(nn.Module):
    """A fixed (not trained) k x k convolution that PCA-whitens the input's k x k patches.

    Input (N, C_in, H, W) float; output (N, C_out, H', W') with the spatial size the
    zero padding ``padding`` = (left, right, top, bottom) gives a stride-1 k x k conv.
    ``weight`` (C_out, C_in, k, k) is a buffer, so optimisers never see it while
    ``state_dict``, ``.to()`` and ``.half()`` still carry it. Made by the ``whitening``
    pass (Page, "How to Train Your ResNet 8"; Jordan, airbench94, 2024).
    """

    def __init__(self, weight: Tensor, padding: tuple[int, int, int, int] = (0, 0, 0, 0)):
        super().__init__()
        if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
            raise ValueError(f"whitening weight must be (C_out, C_in, k, k), got {tuple(weight.shape)}")
        self.register_buffer("weight", weight.detach().clone())
        self.padding = tuple(int(p) for p in padding)
        left, right, top, bottom = self.padding
        # Symmetric padding goes to the conv itself; only an uneven split needs F.pad.
        self._symmetric = left == right and top == bottom

    @property
    def kernel_size(self) -> int:
        return int(self.weight.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        if self._symmetric:
            return F.conv2d(x, self.weight, None, 1, (self.padding[2], self.padding[0]))
        return F.conv2d(F.pad(x, self.padding), self.weight)

    def extra_repr(self) -> str:
        c_out, c_in, k, _ = self.weight.shape
        return f"{c_in}, {c_out}, kernel_size={k}, padding={self.padding}"


# --------------------------------------------------------------------------- anti-aliasing blur


class BlurPool2d(nn.Module):
    """A fixed depthwise 3x3 low-pass filter, put before a strided convolution to anti-alias it.

    Input (N, C, H, W) with C = ``channels``; output the same shape, dtype, device and
    (as ``F.conv2d`` keeps it) memory format: each channel convolved with the (3, 3)
    filter :meth:`filter` names, stride 1, zero padding 1. The filter is a buffer
    ``blur_filter`` (C, 1, 3, 3), repeated per channel: never trained, carried by ``.to()``
    and ``.half()``; it is not persistent (a fixed function of ``kernel``), so the model's
    ``state_dict`` keeps the keys it had without the blur.

    ``kernel="binomial3"`` computes FFCV's ``BlurPoolConv2d`` blur
    (libffcv/ffcv-imagenet ``train_imagenet.py``: ``F.conv2d(x, blur_filter, stride=1,
    padding=(1, 1), groups=in_channels)`` with ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16``),
    the "Tri-3" filter of Zhang, "Making Convolutional Networks Shift-Invariant Again",
    ICML 2019. ``kernel="delta"`` returns finite inputs unchanged (exactly in float64; a
    convolution computed in TF32 rounds them).

    Raises ``ValueError`` for ``channels`` < 1 or an unknown ``kernel``.
    """

    # "binomial3": FFCV's [1 2 1] x [1 2 1] / 16 low-pass; "delta": a 1 at the centre, the
    # identity (the blurpool pass's identity configuration).
    KERNELS = ("binomial3", "delta")

    def __init__(self, channels: int, kernel: str = "binomial3"):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        filt = self.filter(kernel)
        self.channels, self.kernel = channels, kernel
        self.register_buffer("blur_filter", filt.expand(channels, 1, 3, 3).clone(), persistent=False)

    @staticmethod
    def filter(kernel: str) -> Tensor:
        """The float32 (3, 3) filter named ``kernel`` (one of :attr:`KERNELS`); it sums to 1.

        Raises ``ValueError`` for another name.
        """
        if kernel == "binomial3":
            row = torch.tensor([1.0, 2.0, 1.0])
            return torch.outer(row, row) / 16.0
        if kernel == "delta":
            delta = torch.zeros(3, 3)
            delta[1, 1] = 1.0
            return delta
        raise ValueError(f"blur kernel must be one of {BlurPool2d.KERNELS}, got {kernel!r}")

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.blur_filter, None, 1, 1, 1, self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel={self.kernel!r}"


# --------------------------------------------------------------------------- stochastic depth


def stochastic_depth_mask(x: Tensor, survival: float, per_sample: bool) -> Tensor:
    """A 0 / (1/survival) mask broadcastable to ``x``: one Bernoulli(survival) draw per sample
    (shape (N, 1, ..., 1)) or one for the whole batch (shape (1, ..., 1)), in ``x``'s dtype."""
    shape = (x.shape[0] if per_sample else 1,) + (1,) * (x.dim() - 1)
    return x.new_empty(shape).bernoulli_(survival).div_(survival)


torch.fx.wrap("stochastic_depth_mask")


class StochasticDepth(nn.Module):
    """Multiplies a residual branch by a random keep mask in training; the identity in eval.

    Input and output any shape (N, ...). Training: each sample's branch (``per="sample"``)
    or the whole batch's (``per="batch"``) is kept with probability ``survival`` and then
    scaled by 1/survival, so the expected output equals the input ("inverted" scaling;
    Huang et al. instead scale by the survival probability at test time, which is
    equivalent in expectation) and evaluation needs no rescaling. Source: Huang, Sun, Liu,
    Sedra and Weinberger, "Deep Networks with Stochastic Depth", 2016.
    """

    def __init__(self, survival: float, per: str = "sample"):
        super().__init__()
        if not 0.0 < survival <= 1.0:
            raise ValueError(f"survival probability must be in (0, 1], got {survival}")
        if per not in ("sample", "batch"):
            raise ValueError(f"per must be 'sample' or 'batch', got {per!r}")
        self.survival = float(survival)
        self.per = per

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.survival >= 1.0:
            return x
        return x * stochastic_depth_mask(x, self.survival, self.per == "sample")

    def extra_repr(self) -> str:
        return f"survival={self.survival:.4f}, per={self.per!r}"


# --------------------------------------------------------------------------- test-time augmentation


class TTAViews(nn.Module):
    """Stacks the test-time-augmentation views of a batch along the batch axis.

    Input (N, C, H, W); output (V*N, C, H, W), view-major. ``level=1``: [x, mirror(x)]
    (V = 2). ``level=2`` (airbench94's ``tta_level=2``): [x, t1, t2, mirror(x), mirror(t1),
    mirror(t2)] (V = 6) where t1 and t2 are x moved one pixel down-right and up-left,
    cut from its 1-pixel reflect padding. The mirror is ``torch.flip`` on the width axis (ONNX
    has no Flip op; the exporter writes it as a Slice with step -1).
    """

    def __init__(self, level: int = 1):
        super().__init__()
        if level not in (1, 2):
            raise ValueError(f"TTA level must be 1 or 2, got {level}")
        self.level = level

    def forward(self, x: Tensor) -> Tensor:
        if self.level == 2:
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            x = torch.cat([x, padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]])
        return torch.cat([x, torch.flip(x, [-1])])


class TTAMean(nn.Module):
    """Averages the model's outputs over the views :class:`TTAViews` stacked.

    Input (V*N, ...) view-major; output (N, ...). ``level=1``: the mean of the plain and
    mirrored outputs. ``level=2``: airbench94's weights, 1/4 each for x and mirror(x) and
    1/8 each for the four translated views.
    """

    def __init__(self, level: int = 1):
        super().__init__()
        if level not in (1, 2):
            raise ValueError(f"TTA level must be 1 or 2, got {level}")
        self.level = level

    def forward(self, logits: Tensor) -> Tensor:
        if self.level == 1:
            return logits.unflatten(0, (2, -1)).mean(0)
        per_translate = logits.unflatten(0, (2, 3, -1)).mean(0)  # (3, N, ...): x, t1, t2
        return 0.5 * per_translate[0] + 0.25 * (per_translate[1] + per_translate[2])
