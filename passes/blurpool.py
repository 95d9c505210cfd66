"""BlurPool: a fixed low-pass blur before every strided convolution (Zhang 2019, as FFCV trains it)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fastgraph.core.modules import BlurPool2d

from . import Identity, copy_module, finish, register
from ._fx import _arg, module_of, only_input, unique_name
from ._options import require


def _identity(gm: fx.GraphModule, options: dict, batch_size: int) -> Identity:
    """The same blurs with a delta filter (a 1 at the centre): every conv sees its input unchanged."""
    return Identity({"kernel": "delta"})


@register(exact=False, modes=("train", "infer"), identity=_identity)
def blurpool(gm: fx.GraphModule, *, min_channels: int = 16, kernel: str = "binomial3") -> fx.GraphModule:
    """Training-time: strided convs with >= ``min_channels`` input channels read a 3x3-blurred input (FFCV).

    Sources: Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019
    (anti-aliased downsampling: low-pass filter, then subsample); FFCV,
    libffcv/ffcv-imagenet ``train_imagenet.py``: ``create_model_and_scaler`` applies
    ``apply_blurpool`` when ``use_blurpool`` is 1 (as in ``rn50_configs/rn50_*_epochs.yaml``),
    replacing every ``nn.Conv2d`` with ``max(stride) > 1`` and ``in_channels >= 16`` by
    ``BlurPoolConv2d(conv)``, whose forward is ``conv(F.conv2d(x, blur_filter, stride=1,
    padding=1, groups=in_channels))`` with the filter ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16``.
    In a torchvision ResNet-50 that is the 3x3 conv and the 1x1 downsample conv of the first
    block of stages 2, 3 and 4 (six convs); the 3-channel stem conv is left alone.

    Each such conv ``conv(x)`` becomes ``conv(blur(x))``, ``blur`` a new
    :class:`~fastgraph.core.modules.BlurPool2d` submodule (a depthwise 3x3 filter over the
    conv's ``in_channels``, stride 1, zero padding 1, in the conv weight's dtype and
    device) called just before the conv, one per conv as FFCV does. The conv itself, its
    parameters and their names are unchanged: a checkpoint of the rewritten graph loads
    into the user's model and back (the filter is not in the ``state_dict``).

    Convolutions found: ``call_module`` of any ``nn.Conv2d`` (subclasses too, as FFCV's
    ``isinstance`` test) and ``F.conv2d`` / ``torch.conv2d`` calls whose stride and groups
    are literals and whose weight's shape is known (a ``get_attr`` tensor, or a node
    carrying shape metadata ``val`` / ``example_value`` / ``tensor_meta``); other
    convolution calls are left alone.

    Options:
        min_channels: the fewest input channels a strided conv must have to be blurred
            (FFCV: 16), an integer >= 1.
        kernel: the blur filter: "binomial3" (FFCV's) or "delta" (a 1 at the centre: the
            identity configuration, the same rewrite computing the original function).

    Guards: only convs with stride > 1 in either dimension and at least ``min_channels``
    input channels are blurred; a conv whose input already comes from a BlurPool2d is left
    alone (so a second application changes nothing); nothing to blur returns the input
    unchanged.

    Raises ``PassOptionError`` for ``min_channels`` not an integer >= 1 or an unknown ``kernel``.
    """
    require(isinstance(min_channels, int) and not isinstance(min_channels, bool) and min_channels >= 1,
            "blurpool", f"min_channels must be an integer >= 1, got {min_channels!r}")
    require(kernel in BlurPool2d.KERNELS, "blurpool",
            f"kernel must be one of {BlurPool2d.KERNELS}, got {kernel!r}")

    sites = [node.name for node in gm.graph.nodes if _strided_conv(gm, node, min_channels) is not None]
    if not sites:
        return gm

    out = copy_module(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    for conv_name in sites:
        conv = nodes[conv_name]
        channels, dtype, device = _strided_conv(out, conv, min_channels)
        name = unique_name(out, f"{conv_name}_blur")
        blur = BlurPool2d(channels, kernel).train(gm.training)
        out.add_submodule(name, blur.to(device=device, dtype=dtype if dtype.is_floating_point else None))
        with out.graph.inserting_before(conv):
            blurred = out.graph.call_module(name, args=(conv.args[0],))
        conv.update_arg(0, blurred)
    return finish(out, rewrites=len(sites), rewritten=sites)


def _strided_conv(gm: fx.GraphModule, node: fx.Node, min_channels: int):
    """(in_channels, weight dtype, weight device or None) of a 2-D conv ``node`` that FFCV
    would blur: stride > 1 in either dimension, at least ``min_channels`` input channels,
    input not blurred already; else None."""
    source = only_input(node)
    if source is None or isinstance(module_of(gm, source), BlurPool2d):
        return None
    if node.op == "call_module":
        conv = module_of(gm, node)
        if not isinstance(conv, nn.Conv2d):
            return None
        stride, channels = conv.stride, conv.in_channels
        dtype, device = conv.weight.dtype, conv.weight.device
    elif node.op == "call_function" and node.target is torch.conv2d:  # F.conv2d is torch.conv2d
        weight = _weight(gm, _arg(node, 1, "weight", None))
        stride, groups = _arg(node, 3, "stride", 1), _arg(node, 6, "groups", 1)
        if weight is None or len(weight[0]) != 4 or not _literal_ints(stride) or not _literal_ints(groups):
            return None
        (_, per_group, _, _), dtype, device = weight
        channels = per_group * groups
    else:
        return None
    strides = stride if isinstance(stride, (tuple, list)) else (stride,)
    if max(strides) <= 1 or channels < min_channels:
        return None
    return channels, dtype, device


def _weight(gm: fx.GraphModule, node) -> tuple[tuple[int, ...], torch.dtype, torch.device | None] | None:
    """(shape, dtype, device or None) of a conv's weight argument, when the graph knows them:
    a ``get_attr`` tensor, or a node with shape metadata (``val`` / ``example_value`` from
    Dynamo or make_fx, ``tensor_meta`` from ShapeProp, which records no device)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = gm
        for atom in str(node.target).split("."):
            value = getattr(value, atom, None)
        return (tuple(value.shape), value.dtype, value.device) if isinstance(value, torch.Tensor) else None
    for key in ("val", "example_value"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype, value.device
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape), meta.dtype, None
    return None


def _literal_ints(value) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)
