"""Patch whitening of the input: a fixed PCA-whitening conv before the first learnable conv.

Page ("How to Train Your ResNet 8: Bag of Tricks", 2019; davidcpage/cifar10-fast) replaces
the first 3x3 conv of ResNet-9 by a fixed 3x3 conv whose 27 filters are the eigenvectors
of the covariance of 3x3 input patches, each scaled by 1/sqrt(eigenvalue + eps), followed
by a learnable 1x1 conv. airbench94 (Jordan, 2024) uses 2x2 patches and stacks each
filter with its negation (24 channels). Training then sees decorrelated, unit-variance
inputs. ``fuse_whitening`` folds the pair back into one conv for inference.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from fastgraph.modules import PatchWhitening

from . import copy_module, finish, register
from ._fx import call_sites, module_of, single_user, unique_name
from ._options import require

# Images per chunk when accumulating the patch second moments: bounds the float64 patch
# matrix to about 256 * 30 * 30 * 27 * 8 bytes = 50 MB for 3x3 patches of 32x32 images.
_CHUNK = 256


@register(exact=False, modes=("train",), needs_data=True)
def whitening(
    gm: fx.GraphModule,
    *,
    images: Tensor,
    kernel_size: int | None = None,
    eps: float = 5e-4,
    pairs: bool = False,
) -> fx.GraphModule:
    """Training-time, needs images: the first 3-channel conv becomes fixed PCA patch whitening + a 1x1 conv.

    Sources: Page, "How to Train Your ResNet 8: Bag of Tricks" (3x3 patches, 27
    channels, eps 1e-2); Jordan, airbench94 (2x2 patches, eps 5e-4, +/- pairs).

    The first ``nn.Conv2d`` in graph order with 3 input channels (square kernel k,
    stride 1, dilation 1, groups 1, zero padding) is replaced by a
    :class:`~fastgraph.modules.PatchWhitening` (a buffer, never trained) followed by a
    learnable 1x1 ``nn.Conv2d`` to the conv's original width, which takes the conv's
    qualified name and its bias. The whitening conv's filters are the eigenvectors of the
    uncentred second-moment matrix of the kernel_size x kernel_size patches of
    ``images`` (the sources' estimate; normalised images have near-zero mean), largest
    eigenvalue first, each scaled by 1/sqrt(eigenvalue + eps). Moments and eigenvectors are
    computed in float64; the buffer is stored in the conv's dtype.

    Options:
        images: float (N, 3, H, W) normalised training images, a few thousand (Page used
            10,000, airbench 5,000); H, W >= kernel_size.
        kernel_size: patch size in pixels; default the conv's own k.
        eps: added to each eigenvalue (units of squared normalised intensity) before the
            square root; bounds the gain of the low-variance directions.
        pairs: also stack each filter's negation, giving 2 * 3 * kernel_size**2 channels.

    The whitening conv carries the conv's padding, adjusted when kernel_size != k so the
    output keeps its spatial size (an odd difference pads one more pixel right/bottom,
    as ``padding='same'`` does). When kernel_size == k the 1x1 conv is initialised so the
    pair computes exactly the replaced conv (M = W_conv @ whitening^-1, halved over a
    +/- pair); otherwise it gets PyTorch's default initialisation.

    Guards (nothing fires, input returned): no conv on 3 channels; the first one is
    strided, dilated, grouped, non-square or not zero-padded, or called from more than
    one place; the graph already holds a PatchWhitening. Raises ``PassOptionError`` for
    bad ``images``/``kernel_size``/``eps``, or a kernel_size that cannot keep the output
    size.
    """
    require(eps > 0, "whitening", f"eps must be > 0, got {eps}")
    require(kernel_size is None or int(kernel_size) >= 1, "whitening",
            f"kernel_size must be >= 1, got {kernel_size}")
    _check_images(images)

    if any(isinstance(m, PatchWhitening) for m in gm.modules()):
        return gm
    node = _first_rgb_conv(gm)
    if node is None:
        return gm
    conv = module_of(gm, node)
    if not _whitenable(conv) or len(node.args) != 1 or node.kwargs or call_sites(gm, node.target) != 1:
        return gm

    k = conv.kernel_size[0]
    kw = k if kernel_size is None else int(kernel_size)
    require(kw <= min(images.shape[-2:]), "whitening",
            f"kernel_size={kw} is larger than the images ({tuple(images.shape[-2:])})")
    padding = _whitening_padding(conv, kw)

    weight_dtype, device = conv.weight.dtype, conv.weight.device
    eigenvalues, eigenvectors = (t.to(device) for t in _patch_eigens(images, kw))
    scale = (eigenvalues.clamp_min(0) + eps).rsqrt()
    whiten = eigenvectors.T * scale[:, None]  # (3kw², 3kw²): row i = v_i / sqrt(λ_i + eps)
    filters = torch.cat([whiten, -whiten]) if pairs else whiten
    whitening_module = PatchWhitening(
        filters.reshape(-1, 3, kw, kw).to(device=device, dtype=weight_dtype), padding
    )

    pointwise = nn.Conv2d(filters.shape[0], conv.out_channels, 1, bias=conv.bias is not None,
                          device=device, dtype=weight_dtype)
    with torch.no_grad():
        if kw == k:
            # whiten^-1 = V diag(sqrt(λ + eps)): the pair then equals the replaced conv.
            unwhiten = eigenvectors / scale[None, :]
            m = conv.weight.detach().double().reshape(conv.out_channels, -1) @ unwhiten
            if pairs:
                m = torch.cat([m, -m], dim=1) / 2
            pointwise.weight.copy_(m.reshape(pointwise.weight.shape))
        if conv.bias is not None:
            pointwise.bias.copy_(conv.bias)
    pointwise.train(conv.training)
    whitening_module.train(conv.training)

    out = copy_module(gm)
    target = node.target
    node = next(n for n in out.graph.nodes if n.op == "call_module" and n.target == target)
    name = unique_name(out, "whitening")
    out.add_submodule(name, whitening_module)
    out.add_submodule(target, pointwise)
    with out.graph.inserting_before(node):
        whitened = out.graph.call_module(name, args=(node.args[0],))
    node.args = (whitened,)
    return finish(out, rewrites=1)


@register(exact=True, modes=("infer",))
def fuse_whitening(gm: fx.GraphModule) -> fx.GraphModule:
    """Exact, inference: a PatchWhitening followed by its 1x1 conv folds into one k x k conv.

    The fused weight is W[o] = sum_m M[o, m] * whitening[m], computed in float64 and
    stored in the 1x1 conv's dtype; the bias is the 1x1 conv's. The fused ``nn.Conv2d``
    takes the 1x1 conv's qualified name (so its parameters keep their names) and the
    whitening conv's padding (an uneven padding becomes an ``F.pad`` before it).

    Guards: the PatchWhitening's output has a single user, which is a 1x1 ``nn.Conv2d``
    with stride 1, no padding, dilation 1, groups 1 taking it as its only input; neither
    module is called from elsewhere. Nothing to fuse: the input is returned unchanged.
    """
    pairs = []
    for node in gm.graph.nodes:
        whiten = module_of(gm, node)
        if not isinstance(whiten, PatchWhitening) or not single_user(node):
            continue
        user = next(iter(node.users))
        conv = module_of(gm, user)
        if (isinstance(conv, nn.Conv2d) and _is_pointwise(conv)
                and user.args == (node,) and not user.kwargs
                and conv.in_channels == whiten.weight.shape[0]
                and call_sites(gm, node.target) == 1 and call_sites(gm, user.target) == 1):
            pairs.append((node.target, user.target))
    if not pairs:
        return gm

    out = copy_module(gm)
    nodes = {n.target: n for n in out.graph.nodes if n.op == "call_module"}
    for whiten_target, conv_target in pairs:
        whiten_node, conv_node = nodes[whiten_target], nodes[conv_target]
        whiten, pointwise = out.get_submodule(whiten_target), out.get_submodule(conv_target)
        left, right, top, bottom = whiten.padding
        symmetric = left == right and top == bottom
        k = whiten.kernel_size
        fused = nn.Conv2d(whiten.weight.shape[1], pointwise.out_channels, k,
                          padding=(top, left) if symmetric else 0,
                          bias=pointwise.bias is not None,
                          device=pointwise.weight.device, dtype=pointwise.weight.dtype)
        with torch.no_grad():
            m = pointwise.weight.double().flatten(1)  # (O, C_w)
            w = torch.einsum("om,mcij->ocij", m, whiten.weight.double())
            fused.weight.copy_(w)
            if pointwise.bias is not None:
                fused.bias.copy_(pointwise.bias)
        fused.train(pointwise.training)
        out.add_submodule(conv_target, fused)
        source = whiten_node.args[0]
        if not symmetric:
            with out.graph.inserting_before(conv_node):
                source = out.graph.call_function(F.pad, args=(source, whiten.padding))
        conv_node.args = (source,)
        out.graph.erase_node(whiten_node)
    return finish(out, rewrites=len(pairs))


def _check_images(images) -> None:
    ok = isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == 3
    require(ok, "whitening", "images must be a float tensor (N, 3, H, W) of normalised training "
            f"images, got {type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    require(images.is_floating_point() and images.shape[0] > 0, "whitening",
            f"images must be a non-empty float tensor, got dtype {images.dtype}, N={images.shape[0]}")


def _first_rgb_conv(gm: fx.GraphModule) -> fx.Node | None:
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            return node
    return None


def _whitenable(conv: nn.Conv2d) -> bool:
    kh, kw = conv.kernel_size
    return (kh == kw and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), "valid"))


def _whitening_padding(conv: nn.Conv2d, kw: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that gives a kw x kw conv the conv's output size."""
    k = conv.kernel_size[0]
    if conv.padding == "same":
        totals = (k - 1, k - 1)
    elif conv.padding == "valid":
        totals = (0, 0)
    else:
        totals = (2 * conv.padding[1], 2 * conv.padding[0])  # (width, height)
    pads = []
    for total in totals:
        new_total = total - k + kw
        require(new_total >= 0, "whitening",
                f"kernel_size={kw} cannot keep the output size of a {k}x{k} conv with padding "
                f"{conv.padding}; use kernel_size >= {k - total}")
        pads += [new_total // 2, new_total - new_total // 2]
    return tuple(pads)


def _patch_eigens(images: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (3k²,) descending and eigenvectors (3k², 3k²) as columns, float64, of the
    second-moment matrix of all k x k patches of ``images``; vectors flatten as (c, i, j)."""
    dim = 3 * k * k
    moment = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
    count = 0
    for chunk in images.split(_CHUNK):
        # (c, i, j) rows, one column per patch: one copy of a strided view, then one GEMM.
        # float64 throughout: in float32 the smallest eigenvalues (~1e-4 of the largest on
        # JPEG CIFAR-10) come out a few tenths of a percent off, and they set the largest gains.
        patches = chunk.double().unfold(2, k, 1).unfold(3, k, 1).permute(1, 4, 5, 0, 2, 3).reshape(dim, -1)
        moment += patches @ patches.T
        count += patches.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(moment / count)
    return eigenvalues.flip(0), eigenvectors.flip(1)
