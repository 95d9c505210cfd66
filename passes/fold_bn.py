"""Fold an inference-mode BatchNorm into the convolution before it."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fastgraph.core.modules import GhostBatchNorm

from . import copy_module, finish, register
from ._fx import call_sites, module_of, only_input, single_user, stock_module


def _foldable(gm: fx.GraphModule, bn_node: fx.Node) -> fx.Node | None:
    """The conv node that ``bn_node`` can be folded into, else ``None`` (the guards)."""
    bn = stock_module(gm, bn_node, nn.BatchNorm2d)
    if bn is None and type(module_of(gm, bn_node)) is GhostBatchNorm:
        bn = module_of(gm, bn_node)  # in eval mode it is exactly BatchNorm2d (never splits)
    if bn is None or bn.training or len(bn_node.args) != 1 or bn_node.kwargs:
        return None
    # Without running statistics BatchNorm normalises by batch statistics even in eval
    # mode: not an affine map of its input, so nothing to fold.
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return None
    conv_node = only_input(bn_node)
    if conv_node is None or not single_user(conv_node):
        return None
    conv = stock_module(gm, conv_node, nn.Conv2d)
    if conv is None or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return None
    if len(conv_node.args) != 1 or conv_node.kwargs or call_sites(gm, conv_node.target) != 1:
        return None  # a conv called from several places would change them all
    if conv.out_channels != bn.num_features or not conv.weight.dtype.is_floating_point:
        return None
    return conv_node


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``nn.Conv2d`` computing ``bn(conv(x))`` with ``bn`` in eval mode.

    With s = gamma / sqrt(running_var + eps) per output channel, the weight becomes
    ``W * s`` and the bias ``(b - running_mean) * s + beta`` (b = 0 for a conv without
    bias, gamma = 1 and beta = 0 for a BN without affine parameters). The arithmetic is
    done in float64 and cast once to the conv's dtype: folding in fp16/bf16 rounds the
    scale and the shifted mean separately and silently loses accuracy. The result has
    the conv's device and dtype and always has a bias; neither input is modified.
    """
    f64 = torch.float64
    with torch.no_grad():
        weight = conv.weight.detach().to(f64)
        bias = conv.bias.detach().to(f64) if conv.bias is not None else torch.zeros(
            conv.out_channels, dtype=f64, device=weight.device)
        mean = bn.running_mean.detach().to(f64)
        var = bn.running_var.detach().to(f64)
        gamma = bn.weight.detach().to(f64) if bn.affine else torch.ones_like(mean)
        beta = bn.bias.detach().to(f64) if bn.affine else torch.zeros_like(mean)
        scale = gamma * torch.rsqrt(var + bn.eps)
        new_weight = weight * scale.reshape(-1, 1, 1, 1)
        new_bias = (bias - mean) * scale + beta

    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
        padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(new_weight)
        fused.bias.copy_(new_bias)
    fused.train(conv.training)
    return fused


@register(exact=True, modes=("infer",))
def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Inference: nn.Conv2d -> BatchNorm2d in eval mode becomes one nn.Conv2d with bias.

    Source: the standard inference-time fold (e.g. ``torch.fx.experimental.optimization.fuse``,
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``); DESIGN.md's trap: fold in high
    precision and guard that the conv output has a single user.

    Guards: the BN is a stock ``nn.BatchNorm2d`` in eval mode with running statistics;
    the conv is a stock ``nn.Conv2d`` (any groups, stride, dilation, padding, with or
    without bias) called from one place only, whose output feeds the BN alone. Each
    fold replaces the conv submodule with a fresh one (see :func:`_folded_conv`) and
    removes the BN node; the input module is untouched.

    Returns ``gm`` itself when nothing folds, else a new GraphModule whose
    ``meta["fastgraph.rewrites"]`` is the number of folds.
    """
    if not any(_foldable(gm, n) for n in gm.graph.nodes if n.op == "call_module"):
        return gm
    out = copy_module(gm)
    rewrites, rewritten = 0, []
    for bn_node in list(out.graph.nodes):
        if bn_node.op != "call_module":
            continue
        conv_node = _foldable(out, bn_node)
        if conv_node is None:
            continue
        fused = _folded_conv(out.get_submodule(conv_node.target), out.get_submodule(bn_node.target))
        parent, _, leaf = conv_node.target.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, fused)
        bn_node.replace_all_uses_with(conv_node)
        rewritten += [conv_node.name, bn_node.name]
        out.graph.erase_node(bn_node)
        rewrites += 1
    return finish(out, rewrites=rewrites, rewritten=rewritten)
