"""pool_before_bn: the exact node order it produces on ResNet-9, the function it computes
(conv -> max-pool -> BN -> ReLU, checked against the same weights hand-reordered, on real
CIFAR-10 batches in train mode), and the chains it must leave alone."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fastgraph.passes import REGISTRY, rewrite_count
from fastgraph.passes.pool_before_activation import pool_before_activation
from fastgraph.passes.pool_before_bn import pool_before_bn

BLOCKS = ("layer1", "layer2", "layer3")  # ResNet-9's conv_bn blocks followed by MaxPool2d(2)


def chain_from(gm: fx.GraphModule, target: str, length: int) -> list[str]:
    """Targets of ``length`` nodes starting at the node calling ``target``, following the single user."""
    (node,) = [n for n in gm.graph.nodes if n.target == target]
    names = [node.target]
    while len(names) < length:
        node = next(iter(node.users))
        names.append(node.target)
    return names


class PoolFirst(nn.Sequential):
    """ResNet-9's conv_bn with the max-pool moved after the conv, written by hand; it keeps
    the children's names (0: conv, 1: BN, 2: ReLU) so parameters match the graph's."""

    def __init__(self, conv_bn: nn.Sequential, pool: nn.Module):
        super().__init__(*conv_bn)
        self.pool = pool

    def forward(self, x):
        return self[2](self[1](self.pool(self[0](x))))


def test_registered_training_time():
    info = REGISTRY["pool_before_bn"]
    assert not info.exact and info.modes == ("train", "infer")


def test_resnet9_order_and_function(example_module, real64, same_function, frozen):
    model = example_module("resnet9.py").to(torch.float64)
    gm = fx.symbolic_trace(model)
    check = frozen(gm)
    out = pool_before_bn(gm)
    check()
    assert out is not gm and rewrite_count(gm, out) == 3
    for layer in BLOCKS:
        conv, pool, bn, relu = f"{layer}.0.0", f"{layer}.1", f"{layer}.0.1", f"{layer}.0.2"
        assert chain_from(out, conv, 4) == [conv, pool, bn, relu]
    # The same weights, reordered by hand: the rewritten graph must compute exactly this.
    for layer in BLOCKS:
        seq = getattr(model, layer)
        seq[0], seq[1] = PoolFirst(seq[0], seq[1]), nn.Identity()
    x, y = real64(4)  # ResNet-9 in float64, forward and backward: keep the batch small
    same_function(model, out, x, y, train=True)


def test_resnet9_after_pool_before_activation_same_graph(example_graph):
    """conv -> BN -> pool -> ReLU (pool_before_activation's output) reorders to the same graph."""
    gm = example_graph("resnet9.py")
    swapped = pool_before_activation(gm)
    out = pool_before_bn(swapped)
    assert rewrite_count(swapped, out) == 3
    assert out.code == pool_before_bn(gm).code


@pytest.mark.parametrize("file_name", ["resnet20.py", "preact_resnet20.py"])
def test_no_max_pool_returns_input(example_graph, file_name):
    gm = example_graph(file_name)
    assert pool_before_bn(gm) is gm


class Chain(nn.Module):
    """conv -> norm -> act -> pool -> linear, with knobs for the cases the pass must refuse."""

    def __init__(self, norm=None, act=None, pool=None, reader=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm if norm is not None else nn.BatchNorm2d(8)
        self.act = act if act is not None else nn.ReLU()
        self.pool = pool if pool is not None else nn.MaxPool2d(2)
        self.head = nn.Linear(8, 10)
        self.reader = reader  # which intermediate is read a second time, if any

    def forward(self, x):
        c = self.conv(x)
        n = self.norm(c)
        a = self.act(n)
        logits = self.head(self.pool(a).mean((2, 3)))
        extra = {"conv": c, "norm": n, "act": a}.get(self.reader)
        return logits if extra is None else logits + extra.mean((1, 2, 3)).unsqueeze(1)


class ChainPoolFirst(nn.Module):
    """The same modules as a :class:`Chain`, called in the order the pass produces."""

    def __init__(self, chain: Chain):
        super().__init__()
        self.conv, self.norm, self.act, self.pool, self.head = (
            chain.conv, chain.norm, chain.act, chain.pool, chain.head)

    def forward(self, x):
        return self.head(self.act(self.norm(self.pool(self.conv(x)))).mean((2, 3)))


CASES = {
    "ReLU-inplace": (nn.ReLU(inplace=True), nn.MaxPool2d(2)),
    "GELU": (nn.GELU(), nn.MaxPool2d(2)),
    "SiLU": (nn.SiLU(), nn.MaxPool2d(2)),
    "CELU": (nn.CELU(0.075), nn.MaxPool2d(2)),
    "F.gelu": (F.gelu, nn.MaxPool2d(2)),
    "F.max_pool2d": (nn.GELU(), functools.partial(F.max_pool2d, kernel_size=2)),
    "AdaptiveMaxPool2d": (nn.GELU(), nn.AdaptiveMaxPool2d(2)),
}


@pytest.mark.parametrize("case", CASES)
def test_activation_and_pool_forms(case, real64, same_function):
    act, pool = CASES[case]
    x, y = real64(16)
    model = Chain(act=act, pool=pool).to(torch.float64)
    gm = fx.symbolic_trace(model)
    conv, norm, act_node, pool_node = [n.name for n in gm.graph.nodes][1:5]
    out = pool_before_bn(gm)
    assert rewrite_count(gm, out) == 1
    assert [n.name for n in out.graph.nodes][1:5] == [conv, pool_node, norm, act_node]
    same_function(ChainPoolFirst(model), out, x, y, train=True)


REFUSED = {
    "avg-pool": dict(pool=nn.AvgPool2d(2)),
    "adaptive-avg-pool": dict(pool=nn.AdaptiveAvgPool2d(1)),
    "max-pool-with-indices": dict(pool=lambda t: F.max_pool2d(t, 2, return_indices=True)[0]),
    "group-norm": dict(norm=nn.GroupNorm(2, 8)),
    "not-an-activation": dict(act=nn.Dropout(0.0)),
    "conv-read-twice": dict(reader="conv"),
    "bn-read-twice": dict(reader="norm"),
    "act-read-twice": dict(reader="act"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused(case):
    gm = fx.symbolic_trace(Chain(**REFUSED[case]))
    assert pool_before_bn(gm) is gm


def test_bn_without_conv_refused():
    gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)))
    assert pool_before_bn(gm) is gm
