"""Training FLOPs and bytes of nodes whose weights are parameters read through ``get_attr``
(``F.conv2d(x, self.weight)``, ``F.linear``, ``a @ b``): the roofline counts them as it
counts the same layers written as modules, and as ``FlopCounterMode`` counts a real step."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastgraph.perf.nodes import node_points
from fastgraph.perf.roofline import load_profile

BATCH = 4


class Functional(nn.Module):
    """Two 3x3 convs and a linear layer written with ``torch.nn.functional`` and parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(16, 16, 3, 3))
        self.fc = nn.Parameter(torch.randn(10, 16))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, padding=1))
        return F.linear(x.mean((2, 3)), self.fc)


class Modules(nn.Module):
    """The same network with ``nn.Conv2d`` and ``nn.Linear``."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 10, bias=False)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def _train_points(model: nn.Module, x: torch.Tensor):
    gm = fx.symbolic_trace(model)
    return node_points(gm, load_profile("h100"), "fp32", mode="train", batch_size=BATCH, example=x)


def test_functional_weights_count_their_weight_gradient_like_flop_counter_mode():
    x = torch.randn(BATCH, 3, 32, 32)
    model = Functional()
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    # Hand count: 2*Cin*Cout*k*k*H*W forward per conv; the first conv has no input gradient.
    conv1, conv2, fc = 2 * 3 * 16 * 9 * 1024, 2 * 16 * 16 * 9 * 1024, 2 * 16 * 10
    hand = (2 * conv1 + 3 * conv2 + 3 * fc) * BATCH
    assert counter.get_total_flops() == hand
    assert sum(p.flops for p in _train_points(model, x)) == hand


def test_functional_weights_move_the_bytes_of_the_same_layers_as_modules():
    x = torch.randn(2, 3, 32, 32)
    functional, modules = _train_points(Functional(), x), _train_points(Modules(), x)
    assert sum(p.flops for p in functional) == sum(p.flops for p in modules)
    # Gradient write and SGD-momentum update of every trainable parameter, once per step.
    assert sum(p.bytes for p in functional) == sum(p.bytes for p in modules)


def test_a_parameter_used_twice_is_updated_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8, 3, 3))

        def forward(self, x):
            return F.conv2d(F.conv2d(x, self.w, padding=1), self.w, padding=1)

    x = torch.randn(2, 8, 8, 8)
    points = _train_points(Shared(), x)
    parameter = 8 * 8 * 9 * 4  # bytes at fp32
    activation = 8 * 8 * 8 * 4 * BATCH  # one (BATCH, 8, 8, 8) tensor, bytes
    # Each conv: 3x (input read + output write) and 2 parameter reads; the update
    # (gradient write, read parameter, gradient and momentum, write parameter and
    # momentum: 6 parameter sizes) once for the step.
    hand = 2 * (3 * 2 * activation + 2 * parameter) + 6 * parameter
    assert sum(p.bytes for p in points) == hand
