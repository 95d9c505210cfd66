"""Fuzzing the exact passes and their check: random conv / BatchNorm / activation / pool /
residual graphs, some with in-place ops, views and outputs of magnitude 1e-4. Whatever
the pass manager applies must compute what the eager model computes (checked
independently, on a batch the manager never saw); whatever it refuses must say why."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fastgraph.core.pass_manager import run_passes

ACTIVATIONS = ("relu", "relu_", "leaky", "celu", "gelu")
EXACT = {"train": ["pool_before_activation", "nvtx_ranges"], "infer": ["fold_bn", "pool_before_activation"]}


class Block(nn.Module):
    """conv -> [BN] -> activation -> [max-pool], optionally around a residual or a view."""

    def __init__(self, c: int, bn: bool, act: str, pool: bool, residual: str, view: bool):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=not bn)
        self.bn = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.act, self.pool, self.residual, self.view = act, pool, residual, view

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.view:
            h = h.view(h.shape[0], -1, h.shape[2], h.shape[3])
        if self.act == "relu":
            h = F.relu(h)
        elif self.act == "relu_":
            h = F.relu(h, inplace=True)
        elif self.act == "leaky":
            h = F.leaky_relu(h, 0.1)
        elif self.act == "celu":
            h = F.celu(h, 0.5)
        else:
            h = F.gelu(h)
        if self.residual == "add":
            h = h + x
        elif self.residual == "add_":
            h.add_(x)
        return F.max_pool2d(h, 2) if self.pool else h


class Net(nn.Module):
    def __init__(self, blocks: list[dict], head_scale: float):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(8, **b) for b in blocks))
        self.head = nn.Linear(8, 10)
        self.head_scale = head_scale

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3))) * self.head_scale


blocks = st.lists(st.fixed_dictionaries({
    "bn": st.booleans(), "act": st.sampled_from(ACTIVATIONS), "pool": st.booleans(),
    "residual": st.sampled_from(("none", "add", "add_")), "view": st.booleans()}), min_size=1, max_size=3)


def _reference(model: nn.Module, mode: str, x: torch.Tensor):
    """Float64 outputs and (train mode) input gradient of a copy of ``model``."""
    import copy

    m = copy.deepcopy(model).double().train(mode == "train")
    x = x.double().requires_grad_(mode == "train")
    out = m(x * 1.0)
    if mode != "train":
        return out.detach(), None
    out.square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.usefixtures("one_thread")
@settings(max_examples=25, deadline=None, derandomize=True,  # the same examples in every CI run
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=blocks, tiny=st.booleans(), mode=st.sampled_from(("train", "infer")), seed=st.integers(0, 2**16))
def test_no_silent_wrong_rewrite(real_batch, spec, tiny, mode, seed):
    x, y = real_batch
    torch.manual_seed(seed)
    model = Net(spec, 1e-4 if tiny else 1.0).train(mode == "train")
    if mode == "infer":  # trained-looking statistics, as a user's checkpoint has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    gm = fx.symbolic_trace(model)
    out, report = run_passes(gm, EXACT[mode], mode=mode, batch=(x[:16, :, :16, :16], y[:16]))
    for outcome in report.outcomes:
        assert outcome.status in ("applied", "refused", "no-op")
        if outcome.status == "refused":
            assert outcome.message and "kept the module before it" in outcome.message, outcome
    fresh = x[32:48, :, 8:24, 8:24]  # images and a crop the manager never saw
    try:
        want, want_grad = _reference(model, mode, fresh)
    except RuntimeError:  # e.g. relu_ then add_ on its output: autograd refuses the model itself
        assert all(o.status != "applied" for o in report.outcomes), report.to_dict()
        return
    got, got_grad = _reference(out, mode, fresh)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-6 * scale, report.to_dict()
    if want_grad is not None:
        assert (got_grad - want_grad).abs().max().item() <= 1e-6 * want_grad.abs().max().item()
