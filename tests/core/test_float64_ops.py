"""The float64 check's max pools: PyTorch's values, PyTorch's gradients without ties, the
gradient shared at ties; and a check that no longer reads two roundings of one function as
two functions, while a rewrite that really moves a maximum still fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastgraph.core.float64_ops import (
    TIE_RTOL,
    Float64Reference,
    adaptive_max_pool2d_tie_shared,
    max_pool2d_tie_shared,
)
from fastgraph.core.verification import verify


def _grads(fn, x, dy):
    leaf = x.clone().requires_grad_()
    y = fn(leaf)
    (dx,) = torch.autograd.grad(y, leaf, dy(y))
    return y.detach(), dx


@settings(max_examples=40, deadline=None)
@given(kernel=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), size=st.integers(5, 11), seed=st.integers(0, 2**16))
def test_max_pool_equals_pytorch_without_ties(kernel, stride, padding, dilation, size, seed):
    if 2 * padding > kernel:  # PyTorch's own limit: pad at most half the kernel
        padding = kernel // 2
    if dilation * (kernel - 1) + 1 > size + 2 * padding:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64, generator=g)  # continuous: no ties
    args = (kernel, stride, padding, dilation)
    y, dx = _grads(lambda t: max_pool2d_tie_shared(t, *args), x, lambda y: torch.ones_like(y) + y)
    ref_y, ref_dx = _grads(lambda t: F.max_pool2d(t, *args), x, lambda y: torch.ones_like(y) + y)
    assert torch.equal(y, ref_y)
    assert torch.allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)  # overlapping windows sum in another order


@pytest.mark.parametrize("size,out", [((7, 9), (1, 1)), ((7, 9), (3, 4)), ((4, 4), (4, 4)),
                                      ((5, 6), (None, 2))])
def test_adaptive_max_pool_equals_pytorch_without_ties(size, out):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    y, dx = _grads(lambda t: adaptive_max_pool2d_tie_shared(t, out), x, lambda y: y + 1)
    ref_y, ref_dx = _grads(lambda t: F.adaptive_max_pool2d(t, out), x, lambda y: y + 1)
    assert torch.equal(y, ref_y) and torch.equal(dx, ref_dx)


def test_gradient_is_shared_among_ties_and_near_ties_only():
    x = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    x[0, 0, :, :2] = 1.0  # window 1: four exact ties
    x[0, 0, :, 2:] = torch.tensor([[2.0, 2.0 - 1e-13], [2.0 - 1e-6, 0.0]])  # window 2: one near tie
    _, dx = _grads(lambda t: max_pool2d_tie_shared(t, 2), x, torch.ones_like)
    assert torch.equal(dx[0, 0, :, :2], torch.full((2, 2), 0.25, dtype=torch.float64))
    # 1e-13 of the scale is rounding, shared; 1e-6 is a real difference, not
    assert torch.equal(dx[0, 0, :, 2:], torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64))
    _, ref = _grads(lambda t: F.max_pool2d(t, 2), x, torch.ones_like)
    assert ref[0, 0, 0, 0] == 1.0  # what PyTorch does: all to the first maximum it meets


def test_the_mode_takes_every_max_pool_form_in_float64_only():
    x = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    forms = [nn.MaxPool2d(2), lambda t: F.max_pool2d(t, kernel_size=2, stride=2),
             lambda t: torch.max_pool2d(t, 2), nn.AdaptiveMaxPool2d(2),
             lambda t: F.adaptive_max_pool2d(t, (2, 2))]
    for form in forms:
        with Float64Reference():
            _, dx = _grads(form, x, torch.ones_like)
        assert torch.equal(dx, torch.full_like(x, 0.25)), form
    with Float64Reference():  # forms it leaves to PyTorch: indices, ceil mode, float32
        kept = [_grads(lambda t: F.max_pool2d(t, 2, return_indices=True)[0], x, torch.ones_like)[1],
                _grads(lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True), x, torch.ones_like)[1],
                _grads(nn.MaxPool2d(2), x.float(), torch.ones_like)[1]]
    assert all(d.sum() == d.max() * d.count_nonzero() and d.max() == 1 for d in kept)


class _ConvPool(nn.Module):
    """conv -> ReLU -> max-pool -> linear; ``offset`` (1, 1, 32, 32) is added after the ReLU,
    and with ``cancel`` taken away again: (v + t) - t is v up to rounding that depends on the
    position, as a GPU convolution algorithm's rounding does."""

    def __init__(self, offset: torch.Tensor | None = None, cancel: bool = True):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 16 * 16, 10)
        self.cancel = cancel
        self.offset = torch.zeros(1, 1, 32, 32) if offset is None else offset  # a constant, not state

    def forward(self, x):
        y = torch.relu(self.conv(x)) + self.offset
        if self.cancel:
            y = y - self.offset
        return self.head(self.pool(y).flatten(1))


@pytest.fixture
def flat_batch(real_batch):
    """Real CIFAR-10 images with a saturated 12x12 corner, as over-exposed skies have: the
    conv computes equal values there, which max-pool windows tie on."""
    x, y = real_batch
    x = x[:16].clone()
    x[:, :, :12, :12] = x.amax()
    return x, y[:16]


def test_two_roundings_of_one_function_pass_the_check(flat_batch):
    ramp = torch.linspace(0.1, 3.7, 32 * 32).reshape(1, 1, 32, 32)
    check = verify(_ConvPool(), _ConvPool(ramp), "train", flat_batch)
    assert check.ok, check.worst
    assert check.max_grad_diff < 1e-9


def test_a_rewrite_that_moves_a_maximum_still_fails(flat_batch):
    # 1e-6 on every other pixel: outputs within the tolerance, but the maxima tied in the
    # saturated corner are no longer tied (1e-6 is 100x TIE_RTOL of activations up to 10),
    # so the input gradient goes to other pixels
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checkerboard = ((rows + cols) % 2).float().reshape(1, 1, 32, 32)
    model = _ConvPool()
    assert torch.relu(model.conv(flat_batch[0])).max() < 10 and 1e-6 / (TIE_RTOL * 10) > 99
    check = verify(model, _ConvPool(1e-6 * checkerboard, cancel=False), "train", flat_batch)
    assert not check.ok and ":grad:<input>" in check.worst, check.worst
    assert check.max_output_diff < 1e-5
