"""pool_before_activation on graphs as people and torch.compile write them, where the swap
cannot be exact: an in-place activation on a tensor that an earlier in-place op wrote
(``y += s``, ``y.add_(s)``) while another name for that tensor is read later, and an
activation or pool module carrying a hook. The pass must not fire there; outputs and
gradients on real CIFAR-10 images in float64 stay those of the model."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fastgraph.passes import rewrite_count
from fastgraph.passes.pool_before_activation import pool_before_activation


class Parts(nn.Module):
    """conv -> BN plus a 1x1 shortcut, an in-place ReLU, a max-pool and two heads: one on
    the pooled tensor, one on the BN output (``kept``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.shortcut = nn.Conv2d(3, 16, 1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16, 10)
        self.side = nn.Linear(16, 10)


def _iadd_graph(read_kept: bool) -> fx.GraphModule:
    """The graph torch.compile captures for ``y = bn(conv(x)); kept = y; y += shortcut(x);
    z = pool(act(y))``, returning ``head(z)`` (+ ``side(kept)`` when ``read_kept``).

    Built by hand: ``torch.fx.symbolic_trace`` records ``y += s`` as an out-of-place add,
    Dynamo as ``operator.iadd``, which writes ``y`` and so ``kept``."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    bn = graph.call_module("bn", (graph.call_module("conv", (x,)),))
    summed = graph.call_function(operator.iadd, (bn, graph.call_module("shortcut", (x,))))
    pooled = graph.call_module("pool", (graph.call_module("act", (summed,)),))

    def head(name, node):
        flat = graph.call_method("flatten", (graph.call_function(F.adaptive_avg_pool2d, (node, 1)), 1))
        return graph.call_module(name, (flat,))

    out = head("head", pooled)
    if read_kept:
        out = graph.call_function(operator.add, (out, head("side", bn)))
    graph.output(out)
    return fx.GraphModule(Parts(), graph)


class AddMethod(Parts):
    """``y.add_(s)`` then ``relu_`` on the result, with ``y`` read again by the side head."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.pool(y.add_(self.shortcut(x)).relu_())
        kept = self.side(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return self.head(F.adaptive_avg_pool2d(z, 1).flatten(1)) + kept


class Plain(Parts):
    def forward(self, x):
        z = self.pool(self.act(self.bn(self.conv(x)) + self.shortcut(x)))
        features = F.adaptive_avg_pool2d(z, 1).flatten(1)
        return self.head(features) + self.side(features)


def _positional_shift(module, inputs, output):
    # Not monotonic per window: max-pool no longer commutes with the hooked module.
    return output * torch.linspace(0.0, 1.0, output.shape[-1], dtype=output.dtype)


@pytest.mark.parametrize("read_kept, swaps", [(True, 0), (False, 1)])
def test_inplace_activation_after_iadd_is_swapped_only_without_a_second_name(real64, same_function,
                                                                            read_kept, swaps):
    # With ``kept`` read later the in-place ReLU also writes what it names; after a swap it would not.
    x, y = real64(32)
    gm = _iadd_graph(read_kept=read_kept).double()
    out = pool_before_activation(gm)
    assert rewrite_count(gm, out) == swaps
    same_function(gm, out, x, y, train=True)


def test_relu_inplace_on_add_inplace_with_a_second_reader_is_not_swapped(real64, same_function):
    x, y = real64(32)
    gm = fx.symbolic_trace(AddMethod().double())
    out = pool_before_activation(gm)
    assert rewrite_count(gm, out) == 0
    same_function(gm, out, x, y, train=True)


def test_activation_or_pool_with_a_hook_is_not_swapped(real64, same_function):
    x, y = real64(32)
    for where in ("act", "pool"):
        model = Plain().double()
        getattr(model, where).register_forward_hook(_positional_shift)
        gm = fx.symbolic_trace(model)
        out = pool_before_activation(gm)
        # The hook runs with the module, which the swap would move onto other tensors.
        assert rewrite_count(gm, out) == 0, where
        same_function(model, out, x, y, train=True)
    plain = fx.symbolic_trace(Plain().double())
    assert rewrite_count(plain, pool_before_activation(plain)) == 1
