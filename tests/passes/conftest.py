"""Helpers for pass tests: examples traced as users' files, real CIFAR-10 batches in
float64, and the before/after comparison an exact pass must survive (outputs, gradients
w.r.t. the input and every parameter, running statistics, one SGD step)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from support import build_example


def trace_example(file_name: str) -> fx.GraphModule:
    """The example's model traced with ``torch.fx.symbolic_trace``."""
    return fx.symbolic_trace(build_example(file_name))


def graph_snapshot(gm: fx.GraphModule) -> tuple[str, dict[str, torch.Tensor], dict[str, int]]:
    """Generated code, state dict copy and submodule identities: proof a pass left ``gm`` alone."""
    state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    return gm.code, state, {name: id(m) for name, m in gm.named_modules()}


def assert_untouched(gm: fx.GraphModule, snapshot) -> None:
    code, state, ids = snapshot
    assert gm.code == code
    now = gm.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert {name: id(m) for name, m in gm.named_modules()} == ids


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), x.grad


def assert_same_function(before: nn.Module, after: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         *, train: bool, rtol: float = 1e-10, atol: float = 1e-10) -> None:
    """Assert ``after`` computes what ``before`` does on ``x`` (float64 real images, labels ``y``).

    Always: eval-mode outputs. With ``train``: train-mode outputs, gradients of the
    cross-entropy w.r.t. the input and every parameter (matched by name, the same names
    in both), the running statistics after that step, and the train-mode outputs after
    one SGD step with momentum and weight decay on each model. Works on copies.
    """
    before, after = copy.deepcopy(before), copy.deepcopy(after)
    before.eval()
    after.eval()
    with torch.no_grad():
        assert_close(after(x), before(x), rtol=rtol, atol=atol)
    if not train:
        return
    before.train()
    after.train()
    out_b, dx_b = _forward_backward(before, x, y)
    out_a, dx_a = _forward_backward(after, x, y)
    assert_close(out_a, out_b, rtol=rtol, atol=atol)
    assert_close(dx_a, dx_b, rtol=rtol, atol=atol)
    params_b, params_a = dict(before.named_parameters()), dict(after.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, p in params_b.items():
        assert p.grad is not None, name
        assert_close(params_a[name].grad, p.grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    buffers_b, buffers_a = dict(before.named_buffers()), dict(after.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    for name, b in buffers_b.items():
        assert_close(buffers_a[name], b, rtol=rtol, atol=atol)
    for model in (before, after):
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4).step()
    with torch.no_grad():
        assert_close(after(x), before(x), rtol=rtol, atol=atol)


@pytest.fixture
def real64(real_batch):
    """``real64(n)``: the first ``n`` real test images as float64 (n, 3, 32, 32) and their labels."""

    def take(n: int = 64):
        images, labels = real_batch
        return images[:n].to(torch.float64), labels[:n]

    return take


# Test modules reach the helpers through fixtures: two conftest.py files share one
# module name, so importing from "conftest" would be ambiguous.


@pytest.fixture
def example_graph():
    """``example_graph(file_name)``: an example's model traced with ``torch.fx``."""
    return trace_example


@pytest.fixture
def example_module():
    """``example_module(file_name)``: an example's ``build_model()``, not traced."""
    return build_example


@pytest.fixture
def same_function():
    """The before/after assertion :func:`assert_same_function`."""
    return assert_same_function


@pytest.fixture
def frozen():
    """``check = frozen(gm)`` records ``gm``; ``check()`` asserts nothing in it changed since."""

    def record(gm: fx.GraphModule):
        snapshot = graph_snapshot(gm)
        return lambda: assert_untouched(gm, snapshot)

    return record
