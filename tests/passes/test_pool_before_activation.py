"""pool_before_activation: exact in train and eval mode (outputs, gradients, one SGD step)
on real CIFAR-10 batches, and it leaves non-monotonic activations and average pools alone."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from fastgraph.passes import REGISTRY, rewrite_count
from fastgraph.passes._fx import is_max_pool, is_monotonic_activation
from fastgraph.passes.pool_before_activation import pool_before_activation


class ActPool(nn.Module):
    """conv -> activation -> pool -> linear: the pattern and a learnable context for gradients."""

    def __init__(self, act, pool, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.act = act
        self.pool = pool
        with torch.no_grad():
            features = self.features(torch.zeros(1, 3, 32, 32)).shape[1]
        self.head = nn.Linear(features, 10)

    def features(self, x):
        return torch.flatten(self.pool(self.act(self.conv(x))), 1)

    def forward(self, x):
        return self.head(self.features(x))


def build(act, pool):
    return fx.symbolic_trace(ActPool(act, pool).to(torch.float64))


def test_registered_exact_for_both_modes():
    info = REGISTRY["pool_before_activation"]
    assert info.exact and info.modes == ("train", "infer")


def test_resnet9_three_swaps_same_function(example_graph, real64, same_function, frozen):
    gm = example_graph("resnet9.py").to(torch.float64)
    check = frozen(gm)
    out = pool_before_activation(gm)
    check()
    assert out is not gm and rewrite_count(gm, out) == 3
    # Each block's ReLU now reads the pool's output.
    for layer in ("layer1", "layer2", "layer3"):
        (pool,) = [n for n in out.graph.nodes if n.target == f"{layer}.1"]
        (relu,) = pool.users
        assert relu.target == f"{layer}.0.2"
        assert pool.args[0].target == f"{layer}.0.1"  # the BatchNorm
    x, y = real64(4)  # ResNet-9 in float64, forward and backward: keep the batch small
    same_function(gm, out, x, y, train=True)


@pytest.mark.parametrize("file_name", ["resnet20.py", "preact_resnet20.py"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_max_pool_returns_input(example_graph, file_name, mode):
    gm = example_graph(file_name)
    getattr(gm, mode)()
    assert pool_before_activation(gm) is gm


ACTIVATIONS = {
    "ReLU": nn.ReLU(),
    "ReLU-inplace": nn.ReLU(inplace=True),
    "ReLU6": nn.ReLU6(),
    "LeakyReLU": nn.LeakyReLU(0.1),
    "LeakyReLU-0": nn.LeakyReLU(0.0),
    "ELU": nn.ELU(0.7),
    "CELU": nn.CELU(0.075),
    "Hardtanh": nn.Hardtanh(-0.5, 0.8),
    "F.relu": F.relu,
    "F.relu-inplace": functools.partial(F.relu, inplace=True),
    "torch.relu": torch.relu,
    "Tensor.relu": lambda t: t.relu(),
    "F.relu6": F.relu6,
    "F.leaky_relu": functools.partial(F.leaky_relu, negative_slope=0.2),
    "F.elu": F.elu,
    "F.celu": functools.partial(F.celu, alpha=0.3, inplace=True),
    "F.hardtanh": functools.partial(F.hardtanh, min_val=-0.2, max_val=0.3),
}
POOLS = {
    "MaxPool2d": nn.MaxPool2d(2),
    "MaxPool2d-3s2p1": nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    "F.max_pool2d": functools.partial(F.max_pool2d, kernel_size=2),
    "torch.max_pool2d": lambda t: torch.max_pool2d(t, 2),
    "AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d(1),
    "F.adaptive_max_pool2d": functools.partial(F.adaptive_max_pool2d, output_size=3),
}


def _swap_checked(act, pool, real64, same_function, frozen):
    x, y = real64(16)
    gm = build(act, pool)
    check = frozen(gm)
    out = pool_before_activation(gm)
    check()
    assert rewrite_count(gm, out) == 1
    (act_node,) = [n for n in out.graph.nodes if is_monotonic_activation(out, n)]
    assert is_max_pool(out, act_node.args[0])
    same_function(gm, out, x, y, train=True)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_monotonic_activation_forms_swap_exactly(act, real64, same_function, frozen):
    _swap_checked(ACTIVATIONS[act], nn.MaxPool2d(2), real64, same_function, frozen)


@pytest.mark.parametrize("pool", POOLS)
def test_max_pool_forms_swap_exactly(pool, real64, same_function, frozen):
    _swap_checked(nn.ReLU(inplace=True), POOLS[pool], real64, same_function, frozen)


def test_chain_of_activations_moves_behind_the_pool(real64, same_function):
    x, y = real64(16)
    gm = build(nn.Sequential(nn.LeakyReLU(0.1), nn.Hardtanh(-1.0, 2.0)), nn.MaxPool2d(2))
    out = pool_before_activation(gm)
    assert rewrite_count(gm, out) == 2
    order = [n.target for n in out.graph.nodes if n.op == "call_module"]
    assert order == ["conv", "pool", "act.0", "act.1", "head"]
    same_function(gm, out, x, y, train=True)


NOT_MONOTONIC = {
    "GELU": nn.GELU(),
    "SiLU": nn.SiLU(),
    "Mish": nn.Mish(),
    "F.gelu": F.gelu,
    "F.silu": F.silu,
    "LeakyReLU-negative-slope": nn.LeakyReLU(-0.5),
    "ELU-negative-alpha": nn.ELU(-1.0),
    "F.leaky_relu-negative-slope": functools.partial(F.leaky_relu, negative_slope=-0.5),
}


@pytest.mark.parametrize("act", NOT_MONOTONIC)
def test_non_monotonic_activation_not_moved(act):
    gm = build(NOT_MONOTONIC[act], nn.MaxPool2d(2))
    assert pool_before_activation(gm) is gm


OTHER_POOLS = {
    "AvgPool2d": nn.AvgPool2d(2),
    "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d(1),
    "F.avg_pool2d": functools.partial(F.avg_pool2d, kernel_size=2),
    "F.adaptive_avg_pool2d": functools.partial(F.adaptive_avg_pool2d, output_size=1),
    "MaxPool2d-return_indices": lambda t: F.max_pool2d(t, 2, return_indices=True)[0],
    "AdaptiveMaxPool2d-return_indices": lambda t: F.adaptive_max_pool2d(t, 2, return_indices=True)[0],
}


@pytest.mark.parametrize("pool", OTHER_POOLS)
def test_other_pools_not_touched(pool):
    gm = build(nn.ReLU(), OTHER_POOLS[pool])
    assert pool_before_activation(gm) is gm


class TwoReaders(nn.Module):
    """The activation output (or, for an in-place one, its input) is read twice."""

    def __init__(self, inplace, read_input):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.pool = nn.MaxPool2d(2)
        self.read_input = read_input

    def forward(self, x):
        h = self.conv(x)
        a = self.act(h)
        other = h if self.read_input else a
        return self.pool(a).sum((1, 2, 3)) + other.mean((1, 2, 3))


@pytest.mark.parametrize(("inplace", "read_input"), [(False, False), (True, False), (True, True)])
def test_second_reader_blocks_swap(inplace, read_input):
    gm = fx.symbolic_trace(TwoReaders(inplace, read_input))
    assert pool_before_activation(gm) is gm


def test_out_of_place_activation_with_shared_input_swaps(real64):
    # The activation's input may have other readers when it is not overwritten.
    x, _ = real64(4)
    gm = fx.symbolic_trace(TwoReaders(inplace=False, read_input=True)).to(torch.float64)
    out = pool_before_activation(gm)
    assert rewrite_count(gm, out) == 1
    assert_close(out(x), gm(x), rtol=1e-12, atol=1e-12)


# Property test: any monotonic activation in any form, any 2-D max-pool geometry.
ACT_STRATEGY = st.one_of(
    st.sampled_from([nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), F.relu, F.relu6, torch.relu]),
    st.floats(0.0, 2.0).map(lambda s: nn.LeakyReLU(s)),
    st.floats(0.0, 2.0).map(lambda s: functools.partial(F.leaky_relu, negative_slope=s)),
    st.floats(0.0, 2.0).map(lambda a: nn.ELU(a)),
    st.floats(0.05, 2.0).map(lambda a: functools.partial(F.celu, alpha=a)),
    st.tuples(st.floats(-2.0, 0.0), st.floats(0.01, 2.0)).map(lambda b: nn.Hardtanh(*b)),
)


@st.composite
def pool_and_shape(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    if draw(st.booleans()):
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        size = (draw(st.integers(1, h)), draw(st.integers(1, w)))
        return nn.AdaptiveMaxPool2d(size), (n, c, h, w)
    k = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, k // 2))
    stride = draw(st.integers(1, 3))
    reach = dilation * (k - 1) + 1 - 2 * padding  # smallest input the window fits
    h, w = draw(st.integers(max(reach, 1), 9)), draw(st.integers(max(reach, 1), 9))
    pool = nn.MaxPool2d(k, stride, padding, dilation, ceil_mode=draw(st.booleans()))
    return pool, (n, c, h, w)


class Pointwise(nn.Module):
    """A per-channel scale (a parameter to take gradients of), the activation, the pool."""

    def __init__(self, act, pool, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))
        self.act, self.pool = act, pool

    def forward(self, x):
        return self.pool(self.act(x * self.scale.reshape(1, -1, 1, 1)))


@settings(max_examples=40, deadline=None)
@given(act=ACT_STRATEGY, pool_shape=pool_and_shape(), seed=st.integers(0, 2**31 - 1))
def test_swap_is_exact_property(act, pool_shape, seed):
    pool, shape = pool_shape
    gm = fx.symbolic_trace(Pointwise(act, pool, shape[1]))
    out = pool_before_activation(gm)
    if isinstance(pool, nn.MaxPool2d) and pool.padding and pool.dilation > 1:
        assert out is gm  # windows may fall on padding alone (see the test below)
        return
    assert rewrite_count(gm, out) == 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g) * 2
    upstream = torch.randn_like(gm(x))
    results = []
    for model in (gm, out):
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        y = model(xi)
        (y * upstream).sum().backward()
        results.append((y.detach(), xi.grad, model.scale.grad.clone()))
    for a, b in zip(*results, strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_padded_dilated_pool_refused():
    """A window on padding alone gives -inf, and relu(-inf) = 0 != max of relu'd padding:
    the swap would change the output, so the pass leaves such pools alone."""
    pool = nn.MaxPool2d(2, stride=1, padding=1, dilation=2)
    x = torch.randn(1, 1, 1, 1, dtype=torch.float64)
    assert torch.isinf(pool(F.relu(x))).all() and (F.relu(pool(x)) == 0).all()
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), pool))
    assert pool_before_activation(gm) is gm
    functional = fx.symbolic_trace(ActPool(F.relu, lambda t: F.max_pool2d(t, 3, 1, 1, 2)))
    assert pool_before_activation(functional) is functional


class ViewThenInPlace(nn.Module):
    """relu_ on a view of the conv output, whose base is read elsewhere."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        base = self.conv(x)
        view = base.view(-1, 8, 32, 32)
        pooled = F.max_pool2d(F.relu(view, inplace=True), 2)
        return self.head(pooled.mean((2, 3)) + base.mean((2, 3)))  # base holds the ReLU's output


class InPlaceOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        return self.head(F.max_pool2d(x.relu_(), 2).mean((2, 3)))  # writes the caller's tensor


@pytest.mark.parametrize("model", [ViewThenInPlace, InPlaceOnInput])
def test_in_place_activation_on_an_aliased_tensor_does_not_move(model, real_batch):
    """The old guard counted the users of the activation's input only; a view taken of it
    (or the base it is a view of, or the caller's input) also sees the in-place write."""
    gm = fx.symbolic_trace(model())
    assert pool_before_activation(gm) is gm
