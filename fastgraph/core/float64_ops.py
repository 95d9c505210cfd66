"""The float64 check's own forms of two operations whose PyTorch gradients are not stable
under rounding: CELU and max pooling.

:func:`fastgraph.core.verification.observe` runs both modules of a check inside
:class:`Float64Reference`, so both compute the same well-defined function:

- **CELU** (Barron 2017): PyTorch's backward rounds ``alpha`` to float32, which a float64
  check must not inherit (:func:`celu_float64`).
- **Max pooling at ties.** At a window whose largest values are equal, max has no gradient,
  and PyTorch routes the whole gradient to the first maximum it meets. Which one that is
  depends on the last bit of each value: two float64 computations of the same function that
  round differently (a conv computed as conv + 1x1 conv by the whitening pass, a
  Dirac-initialised network copying one value into neighbouring positions, a flat image
  region) send the input gradient to different pixels, and the check reads a difference of
  order one where there is none. Here the forward value is exactly PyTorch's maximum, and
  the gradient is shared equally among the window's values within ``TIE_RTOL`` of the
  maximum (relative to the largest magnitude of the pooled tensor): the symmetric
  subgradient, which both modules agree on whatever their rounding. Without ties the
  gradient is PyTorch's. A wrong rewrite still shows: its values differ by far more than
  ``TIE_RTOL``. Values a float32 rounding apart (~1e-8) are not ties: a rewrite whose
  weights were rounded to float32 moves them past each other, which is why the pass
  manager builds identity configurations in float64 (``_check_identity``).

Forms PyTorch computes that these do not cover (``return_indices=True``, ``ceil_mode=True``)
run as PyTorch has them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

# Values this close to a window's maximum (relative to the tensor's largest magnitude) are
# ties: exact rewrites built in float64 round values by ~1e-15 of the scale, and values a
# real network separates differ by far more than 1e-9 of it.
TIE_RTOL = 1e-9


def celu_float64(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """CELU (Barron 2017) from elementary ops, whose float64 gradient is exact.

    PyTorch's own CELU backward rounds alpha to float32 before taking its reciprocal
    (``derivatives.yaml``: ``elu_backward(grad, alpha, 1, 1.0/alpha.toFloat(), ...)``): in
    float64, every gradient through ``CELU(alpha=0.075)`` or ``CELU(0.3)`` (Page's alphas,
    not exact in float32) is off by up to 4e-8 relative, which a BatchNorm backward that
    cancels most of a gradient can lift above the check's tolerance. The exponent's
    argument is taken at min(x, 0), so no inf (and no NaN gradient) comes from large x;
    ``x`` is not saved for the backward, so the in-place form may overwrite it.
    """
    positive = x > 0
    negative_part = torch.where(positive, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return torch.where(positive, x, alpha * torch.expm1(negative_part / alpha))


def _tie_shared_max(windows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Max over the last dimension of ``windows`` (..., K): PyTorch's value, the gradient
    shared equally among the entries within ``TIE_RTOL * scale`` of the maximum."""
    top = windows.detach().amax(-1, keepdim=True)
    tied = windows.detach() >= top - TIE_RTOL * scale
    share = tied / tied.sum(-1, keepdim=True)
    # value: the maximum itself; gradient: d/dwindows = share
    return (top + ((windows - windows.detach()) * share).sum(-1, keepdim=True)).squeeze(-1)


def max_pool2d_tie_shared(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                          ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` (floor mode, no indices) whose gradient at ties is shared equally.

    Args:
        x: (N, C, H, W) or (C, H, W), any float dtype.
        kernel_size, stride, padding, dilation: as ``F.max_pool2d`` (int or pair; stride
            defaults to kernel_size).
        ceil_mode: must be False (the caller runs PyTorch's pool for True).

    Returns:
        (N, C, H_out, W_out), equal in value to ``F.max_pool2d``'s output.
    """
    assert not ceil_mode
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(padding), _pair(dilation)
    sh, sw = _pair(stride) if stride else (kh, kw)  # None, () and [] (torch.max_pool2d's) mean the kernel
    scale = x.detach().abs().amax() if x.numel() else x.new_zeros(())
    # padding below every value by more than the scale (not -inf: its gradient would be inf - inf);
    # a window always holds an input value, so padding is never its maximum nor tied with it
    fill = float(x.detach().min() - 1.0 - scale) if x.numel() else 0.0
    padded = F.pad(x, (pw, pw, ph, ph), value=fill) if ph or pw else x
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = padded.unfold(-2, span_h, sh).unfold(-2, span_w, sw)[..., ::dh, ::dw]
    return _tie_shared_max(windows.flatten(-2), scale)


def adaptive_max_pool2d_tie_shared(x: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_max_pool2d`` (no indices) whose gradient at ties is shared equally.

    Window (i, j) covers rows floor(i H / H_out) to ceil((i + 1) H / H_out), as PyTorch's;
    ``output_size`` is an int or a pair (None keeps that input size).

    Returns:
        (N, C, H_out, W_out) (or (C, H_out, W_out)), equal in value to PyTorch's output.
    """
    h, w = x.shape[-2:]
    out_h, out_w = _pair(output_size)
    out_h, out_w = out_h or h, out_w or w
    scale = x.detach().abs().amax() if x.numel() else x.new_zeros(())
    rows = []
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        row = [_tie_shared_max(x[..., r0:r1, (j * w) // out_w:-((-(j + 1) * w) // out_w)].flatten(-2), scale)
               for j in range(out_w)]
        rows.append(torch.stack(row, -1))
    return torch.stack(rows, -2)


def _arg(args, kwargs, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


class Float64Reference(TorchFunctionMode):
    """Inside it, float64 tensors take :func:`celu_float64` for CELU (modules, ``F.celu``,
    ``torch.celu`` and their in-place forms) and the tie-shared max pools for
    ``F.max_pool2d``/``torch.max_pool2d`` (``nn.MaxPool2d``) and ``F.adaptive_max_pool2d``
    (``nn.AdaptiveMaxPool2d``) without indices; every other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float64:
            return func(*args, **kwargs)
        if func in (F.celu, torch.celu, torch.celu_):
            inplace = func is torch.celu_ or _arg(args, kwargs, 2, "inplace", False)
            y = celu_float64(x, float(_arg(args, kwargs, 1, "alpha", 1.0)))
            return x.copy_(y) if inplace else y
        if func in (F.max_pool2d, torch.max_pool2d):
            pool = [_arg(args, kwargs, i, name, default) for i, (name, default) in enumerate(
                (("input", None), ("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
                 ("ceil_mode", False), ("return_indices", False)))]
            if not pool[5] and not pool[6]:
                return max_pool2d_tie_shared(*pool[:5])
        if func is F.adaptive_max_pool2d and not _arg(args, kwargs, 2, "return_indices", False):
            return adaptive_max_pool2d_tie_shared(x, _arg(args, kwargs, 1, "output_size", None))
        return func(*args, **kwargs)
