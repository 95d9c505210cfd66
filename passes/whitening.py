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

from fastgraph.core.modules import PatchWhitening

from . import Identity, copy_module, finish, register
from ._fx import call_sites, module_of, single_user, unique_name
from ._options import require

HINTS_KEY = "fastgraph.param_hints"  # parameter hints for the optimiser (see fastgraph.training.optim)

# Images per chunk when accumulating the patch second moments: bounds the float64 patch
# matrix to about 256 * 30 * 30 * 27 * 8 bytes = 50 MB for 3x3 patches of 32x32 images.
_CHUNK = 256


def _identity(gm: fx.GraphModule, options: dict, batch_size: int) -> Identity:
    """The same replacement with the new layers set to compute the replaced conv exactly:
    Page's form with the 1x1 conv reproducing the stem (at the stem's own kernel size),
    airbench's form with the stem's own filters kept."""
    if options.get("into", "pointwise") == "stem":
        return Identity({"filters": "keep"})
    return Identity({"kernel_size": None, "pointwise_init": "reproduce"})


@register(exact=False, modes=("train",), needs_data=True, identity=_identity)
def whitening(
    gm: fx.GraphModule,
    *,
    images: Tensor,
    kernel_size: int | None = None,
    eps: float = 5e-4,
    pairs: bool = False,
    into: str = "pointwise",
    pointwise_init: str = "fresh",
    filters: str = "pca",
    bias_epochs: float | None = None,
    bias_schedule: str = "run",
    bias_lr_scale: float = 1.0,
    bias_wd_scale: float = 1.0,
) -> fx.GraphModule:
    """Training-time, needs images: the first 3-channel conv becomes a fixed PCA patch-whitening conv.

    Sources: Page, "How to Train Your ResNet 8: Bag of Tricks" and davidcpage/cifar10-fast
    ``whitening_block`` (3x3 patches, 27 channels, eps 1e-2, then a freshly initialised
    1x1 conv); Jordan, airbench94.py ``init_whitening_conv`` (the 2x2 first conv *is* the
    whitening conv: +/- pairs, eps 5e-4, filters frozen, bias trained for
    ``whiten_bias_epochs = 3``).

    The whitening filters are the eigenvectors of the uncentred second-moment matrix of
    the kernel_size x kernel_size patches of ``images`` (the sources' estimate; normalised
    images have near-zero mean), largest eigenvalue first, each scaled by
    1/sqrt(eigenvalue + eps), computed in float64 and stored in the conv's dtype. The
    first ``nn.Conv2d`` in graph order with 3 input channels (square kernel k, stride 1,
    dilation 1, groups 1, zero padding) is rewritten in one of two forms:

    - ``into="pointwise"`` (Page): a :class:`~fastgraph.core.modules.PatchWhitening` (a
      buffer, never trained) followed by a learnable 1x1 ``nn.Conv2d`` to the conv's
      width, which takes the conv's qualified name and its bias. The whitening conv
      carries the conv's padding, adjusted when kernel_size != k so the output keeps its
      size (an odd difference pads one more pixel right/bottom, as ``padding='same'``).
      ``pointwise_init="fresh"`` gives the 1x1 conv PyTorch's default initialisation, as
      Page's code does; ``"reproduce"`` (the identity configuration, needs kernel_size ==
      k) sets it to M = W_conv @ whitening^-1 (halved over a +/- pair), so the pair
      computes exactly the replaced conv.
    - ``into="stem"`` (airbench94): the conv keeps its name, shape and bias; its weight
      becomes the whitening filters (``filters="pca"``) or stays as it is
      (``filters="keep"``, the identity configuration), and is frozen (parameter hint
      ``trainable: false``). Its bias trains for the first ``bias_epochs`` epochs only
      (hint ``train_epochs``), or throughout when None; ``bias_schedule="run"`` keeps the
      run's lr schedule for it until then (airbench94.py), ``"own"`` compresses the
      schedule into its ``bias_epochs`` (airbench94_muon.py: ``1 - step /
      whiten_bias_train_steps``; hint ``own_schedule``), with ``bias_lr_scale`` and
      ``bias_wd_scale`` as its lr and weight-decay multiples (hints ``lr_scale``,
      ``weight_decay_scale``; airbench94_muon gives it the BN biases' lr). The conv's
      output channels must equal the number of filters and kernel_size, if given, must be k.

    Hints go to ``meta["fastgraph.param_hints"]`` as ``freeze_bn_scale``'s do.

    Options:
        images: float (N, 3, H, W) normalised training images, a few thousand (Page used
            10,000, airbench 5,000); H, W >= kernel_size.
        kernel_size: patch size in pixels; default the conv's own k.
        eps: added to each eigenvalue (units of squared normalised intensity) before the
            square root; bounds the gain of the low-variance directions.
        pairs: also stack each filter's negation, giving 2 * 3 * kernel_size**2 channels.
        into, pointwise_init, filters, bias_epochs, bias_schedule, bias_lr_scale,
            bias_wd_scale: the form, as above.

    Guards (nothing fires, input returned): no conv on 3 channels; the first one is
    strided, dilated, grouped, non-square or not zero-padded, or called from more than
    one place; the graph already holds a PatchWhitening or frozen stem filters. Raises
    ``PassOptionError`` for bad ``images``/``kernel_size``/``eps``/form options, a
    kernel_size that cannot keep the output size, or a stem whose width is not the
    number of filters.
    """
    require(eps > 0, "whitening", f"eps must be > 0, got {eps}")
    require(kernel_size is None or int(kernel_size) >= 1, "whitening",
            f"kernel_size must be >= 1, got {kernel_size}")
    require(into in ("pointwise", "stem"), "whitening", f"into must be 'pointwise' or 'stem', got {into!r}")
    require(pointwise_init in ("fresh", "reproduce"), "whitening",
            f"pointwise_init must be 'fresh' or 'reproduce', got {pointwise_init!r}")
    require(filters in ("pca", "keep"), "whitening", f"filters must be 'pca' or 'keep', got {filters!r}")
    require(bias_epochs is None or bias_epochs > 0, "whitening",
            f"bias_epochs must be > 0 or None, got {bias_epochs}")
    require(bias_schedule in ("run", "own"), "whitening",
            f"bias_schedule must be 'run' or 'own', got {bias_schedule!r}")
    require(bias_lr_scale > 0 and bias_wd_scale >= 0, "whitening",
            f"bias_lr_scale must be > 0 and bias_wd_scale >= 0, got {bias_lr_scale}, {bias_wd_scale}")
    _check_images(images)

    if any(isinstance(m, PatchWhitening) for m in gm.modules()):
        return gm
    node = _first_rgb_conv(gm)
    if node is None:
        return gm
    conv = module_of(gm, node)
    if not _whitenable(conv) or len(node.args) != 1 or node.kwargs or call_sites(gm, node.target) != 1:
        return gm
    if into == "stem" and not conv.weight.requires_grad:
        return gm  # already frozen: whitened before

    k = conv.kernel_size[0]
    kw = k if kernel_size is None else int(kernel_size)
    require(kw <= min(images.shape[-2:]), "whitening",
            f"kernel_size={kw} is larger than the images ({tuple(images.shape[-2:])})")
    eigenvalues, eigenvectors = (t.to(conv.weight.device) for t in _patch_eigens(images, kw))
    scale = (eigenvalues.clamp_min(0) + eps).rsqrt()
    whiten = eigenvectors.T * scale[:, None]  # (3kw², 3kw²): row i = v_i / sqrt(λ_i + eps)
    bank = torch.cat([whiten, -whiten]) if pairs else whiten
    if into == "stem":
        bias_hint = {"lr_scale": float(bias_lr_scale), "weight_decay_scale": float(bias_wd_scale)}
        if bias_epochs is not None:
            bias_hint.update(train_epochs=float(bias_epochs), own_schedule=bias_schedule == "own")
        return _whiten_stem(gm, node, bank.reshape(-1, 3, kw, kw), kw, filters, bias_hint)

    padding = _whitening_padding(conv, kw)
    weight_dtype, device = conv.weight.dtype, conv.weight.device
    whitening_module = PatchWhitening(bank.reshape(-1, 3, kw, kw).to(device=device, dtype=weight_dtype),
                                      padding)
    pointwise = nn.Conv2d(bank.shape[0], conv.out_channels, 1, bias=conv.bias is not None,
                          device=device, dtype=weight_dtype)
    with torch.no_grad():
        if pointwise_init == "reproduce":
            require(kw == k, "whitening", f"pointwise_init='reproduce' needs kernel_size == {k} (the conv's)")
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
    return finish(out, rewrites=1, rewritten=[node.name])


def _whiten_stem(gm: fx.GraphModule, node: fx.Node, bank: Tensor, kw: int, filters: str,
                 bias_hint: dict) -> fx.GraphModule:
    """airbench94's form: the stem conv's weight becomes ``bank`` (or is kept) and is frozen."""
    conv = module_of(gm, node)
    require(kw == conv.kernel_size[0], "whitening",
            f"into='stem' whitens the conv's own {conv.kernel_size[0]}x{conv.kernel_size[0]} "
            f"patches; kernel_size={kw} would change its shape")
    require(bank.shape[0] == conv.out_channels, "whitening",
            f"into='stem' needs a first conv with {bank.shape[0]} output channels (the filters"
            f"{' and their negations' if bank.shape[0] == 6 * kw * kw else ''}), this one has "
            f"{conv.out_channels}")
    out = copy_module(gm)
    stem = out.get_submodule(node.target)
    if filters == "pca":
        with torch.no_grad():
            stem.weight.copy_(bank)
    hints = {f"{node.target}.weight": {"trainable": False}}
    if stem.bias is not None:
        hints[f"{node.target}.bias"] = bias_hint
    merged = {name: dict(h) for name, h in out.meta.get(HINTS_KEY, {}).items()}
    for name, h in hints.items():
        merged[name] = {**merged.get(name, {}), **h}
    out.meta[HINTS_KEY] = merged
    stem.weight.requires_grad_(False)
    return finish(out, rewrites=1, rewritten=[node.name])


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
    rewritten = []
    for whiten_target, conv_target in pairs:
        whiten_node, conv_node = nodes[whiten_target], nodes[conv_target]
        rewritten += [whiten_node.name, conv_node.name]
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
    return finish(out, rewrites=len(pairs), rewritten=rewritten)


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
