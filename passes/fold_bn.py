"""Fold an inference-mode BatchNorm into the convolution before it."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from . import copy_module, finish, register
from ._fx import (
    BatchNormCall,
    ConvCall,
    batch_norm_call,
    call_sites,
    conv2d_call,
    has_side_effect,
    reads_attributes_of,
    single_user,
)


def _foldable(gm: fx.GraphModule, bn_node: fx.Node) -> tuple[ConvCall, BatchNormCall] | None:
    """The (conv, BN) pair that ``bn_node`` folds into, else ``None`` (the guards)."""
    bn = batch_norm_call(gm, bn_node)
    # Normalising by batch statistics (training, or no running statistics even in eval
    # mode) is not an affine map of the input: nothing to fold.
    if bn is None or bn.batch_statistics:
        return None
    conv = conv2d_call(gm, bn.input)
    if conv is None or not single_user(conv.node):
        return None
    if bn.module is not None and conv.module is not None:
        if call_sites(gm, conv.node.target) != 1:
            return None  # a conv called from several places would change them all
        if reads_attributes_of(gm, conv.node.target):
            return None  # another op reads its weight or bias, which the fold would change under it
        module = conv.module
        if module.out_channels != bn.module.num_features or not module.weight.dtype.is_floating_point:
            return None
        return conv, bn
    if bn.module is None and conv.module is None and _hoistable(bn, conv.node):
        return conv, bn
    return None  # one a module, the other a function: left alone


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


def _fold_inputs(bn: BatchNormCall) -> list[fx.Node]:
    """The graph nodes the in-graph fold reads from the BN call (statistics, affine, eps)."""
    values = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return [v for v in values if isinstance(v, fx.Node)]


def _earlier(node: fx.Node) -> set[fx.Node]:
    """The nodes before ``node`` in its graph's order."""
    earlier = set()
    for other in node.graph.nodes:
        if other is node:
            return earlier
        earlier.add(other)
    return earlier


def _hoistable(bn: BatchNormCall, conv_node: fx.Node) -> bool:
    """Whether every node the fold reads from the BN call comes before ``conv_node``, or can
    move there: free of side effects and itself reading only such nodes. (Dynamo's
    ``eps.item()`` sits between the conv and the BN under dynamic shapes; fx places a
    ``get_attr`` where it is first read.)"""
    gm = conv_node.graph.owning_module
    earlier = _earlier(conv_node)
    stack = _fold_inputs(bn)
    while stack:
        node = stack.pop()
        if node in earlier:
            continue
        if node is conv_node or has_side_effect(gm, node):
            return False
        stack.extend(node.all_input_nodes)
    return True


def _hoist(node: fx.Node, before: fx.Node, earlier: set[fx.Node]) -> None:
    """Move ``node`` (checked by :func:`_hoistable`), after its own inputs, in front of ``before``."""
    if node in earlier:
        return
    for source in node.all_input_nodes:
        _hoist(source, before, earlier)
    before.prepend(node)
    earlier.add(node)


def _fold_in_graph(graph: fx.Graph, conv: ConvCall, bn: BatchNormCall) -> None:
    """Rewire ``conv`` to compute ``bn(conv(x))``: its weight and bias become graph nodes computed
    from the conv's and the BN's inputs on every call, in float64 and cast once to the weight's dtype.

    The same arithmetic as :func:`_folded_conv`, done in the graph: the tensors are graph
    inputs (Dynamo's placeholders), whose values may change between calls without a
    recompile (an optimizer step, ``load_state_dict``), so a fold computed once would go
    stale. Per call it costs a few elementwise ops over the conv's weight, against a
    convolution over the whole batch; gradients flow through it to the conv weight and the
    BN's affine parameters, exactly. The BN node is erased.
    """
    earlier = _earlier(conv.node)
    for node in _fold_inputs(bn):
        _hoist(node, conv.node, earlier)

    def op(fn, *args):
        return graph.call_function(fn, args)

    def f64(node):
        return graph.call_method("to", (node, torch.float64))

    with graph.inserting_before(conv.node):
        scale = op(torch.rsqrt, op(operator.add, f64(bn.running_var), bn.eps))
        if bn.weight is not None:
            scale = op(operator.mul, scale, f64(bn.weight))
        weight = op(operator.mul, f64(conv.weight), graph.call_method("reshape", (scale, (-1, 1, 1, 1))))
        centred = op(operator.neg, f64(bn.running_mean)) if conv.bias is None else op(
            operator.sub, f64(conv.bias), f64(bn.running_mean))
        bias = op(operator.mul, centred, scale)
        if bn.bias is not None:
            bias = op(operator.add, bias, f64(bn.bias))
        weight = graph.call_method("type_as", (weight, conv.weight))
        bias = graph.call_method("type_as", (bias, conv.weight))
    conv.node.update_arg(1, weight)
    if len(conv.node.args) > 2:
        conv.node.update_arg(2, bias)
    elif "bias" in conv.node.kwargs or len(conv.node.args) < 2:
        conv.node.update_kwarg("bias", bias)
    else:
        conv.node.args = (*conv.node.args, bias)
    bn.node.replace_all_uses_with(conv.node)
    graph.erase_node(bn.node)


@register(exact=True, modes=("infer",))
def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Inference: conv2d -> BatchNorm in eval mode becomes one conv2d with bias.

    Source: the standard inference-time fold (e.g. ``torch.fx.experimental.optimization.fuse``,
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``); DESIGN.md's trap: fold in high
    precision and guard that the conv output has a single user.

    Two forms, found by :func:`fastgraph.passes._fx.conv2d_call` and ``batch_norm_call``:

    - module calls (``torch.fx.symbolic_trace``): a stock ``nn.BatchNorm2d`` in eval mode
      with running statistics after a stock ``nn.Conv2d`` (any groups, stride, dilation,
      padding, with or without bias) called from one place only, whose weight and bias
      no other node reads (``F.conv2d(y, self.conv.weight)``), neither module carrying
      hooks (a hook may change what the call computes). The conv submodule is
      replaced with a fresh one holding the folded weight and bias (see
      :func:`_folded_conv`) and the BN node removed.
    - function calls (torch.compile's Dynamo graph, functional code): ``F.batch_norm`` or
      ``torch.batch_norm`` with ``training=False`` and running statistics after
      ``torch.conv2d``, whose tensors are graph nodes. The fold is computed in the graph
      from them (see :func:`_fold_in_graph`), since their values are not fixed.

    Either way the conv output must feed the BN alone, and a module conv with a
    functional BN (or the reverse) is left alone. The input module is untouched.

    Returns ``gm`` itself when nothing folds, else a new GraphModule whose
    ``meta["fastgraph.rewrites"]`` is the number of folds.
    """
    if not any(_foldable(gm, n) for n in gm.graph.nodes):
        return gm
    out = copy_module(gm)
    rewrites, rewritten = 0, []
    for bn_node in list(out.graph.nodes):
        found = _foldable(out, bn_node)
        if found is None:
            continue
        conv, bn = found
        # The BN's other arguments are declared too: the fold moves some in front of the
        # conv, and those only the BN read (Dynamo's ``momentum.item()``) go with it.
        rewritten += [conv.node.name, bn_node.name, *(n.name for n in bn_node.all_input_nodes)]
        if conv.module is not None:
            fused = _folded_conv(conv.module, bn.module)
            parent, _, leaf = conv.node.target.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, fused)
            bn_node.replace_all_uses_with(conv.node)
            out.graph.erase_node(bn_node)
        else:
            _fold_in_graph(out.graph, conv, bn)
        rewrites += 1
    return finish(out, rewrites=rewrites, rewritten=rewritten)
