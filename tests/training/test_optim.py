"""fastgraph.training.optim: ConvMuon against a hand-written airbench94_muon update, its zero_grad in
the trainer's call order, and the parameter groups build_optimizers makes from pass hints.

The reference update is KellerJordan/cifar10-airbench ``airbench94_muon.py`` (``Muon.step``
and ``zeropower_via_newtonschulz5``), written out here, plus ``torch.optim.Muon``'s
decoupled weight decay, which airbench does not use."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.training.optim import HINTS_KEY, ConvMuon, build_optimizers
from fastgraph.training.recipes import TorchHyperparameters, validate

pytestmark = pytest.mark.usefixtures("one_thread")

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # airbench94_muon.py and torch.optim.Muon's defaults


def airbench_zeropower(g: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """``zeropower_via_newtonschulz5`` of airbench94_muon.py: quintic Newton-Schulz in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    x = x / (x.norm() + eps)  # top singular value <= 1
    if g.size(0) > g.size(1):
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    if g.size(0) > g.size(1):
        x = x.T
    return x


@torch.no_grad()
def airbench_muon_step(weights, grads, buffers, *, lr, momentum, nesterov, ns_steps, weight_decay,
                       normalize):
    """airbench94_muon.py ``Muon.step`` on 4-D weights, in place; weight decay as torch.optim.Muon's."""
    for w, g, buf in zip(weights, grads, buffers, strict=True):
        buf.mul_(momentum).add_(g)
        u = g + momentum * buf if nesterov else buf
        if normalize:
            w.mul_(len(w) ** 0.5 / w.norm())
        w.mul_(1 - lr * weight_decay)
        w.sub_(lr * airbench_zeropower(u.reshape(len(u), -1), ns_steps).float().view(w.shape))


class SmallConvNet(nn.Module):
    """airbench's layout in miniature: a 2x2 whitening-shaped conv with a bias, a 3x3 conv,
    BN, GELU, global average pool, a linear head. Both convs have out <= fan_in, where
    torch.optim.Muon's shape factor is 1."""

    def __init__(self):
        super().__init__()
        self.whiten = nn.Conv2d(3, 12, 2)
        self.conv = nn.Conv2d(12, 8, 3, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, x):
        return self.head(F.gelu(self.norm(self.conv(self.whiten(x)))).mean(dim=(2, 3)))


MUON = dict(lr=0.24, momentum=0.6, nesterov=True, ns_steps=3)  # airbench94_muon.py's


@torch.no_grad()
def _relative_errors(got, want, start) -> list[float]:
    """Per bank: ||got - want|| / ||want - start|| (Frobenius), the error as a share of the step."""
    return [float((g - w).norm() / (w - s).norm()) for g, w, s in zip(got, want, start, strict=True)]


# bf16 Newton-Schulz rounds differently in torch (fused addmm, its momentum scaled by 1 - m)
# and airbench (separate products): 1-4% of a step here; a wrong gradient or lr is 30% or more.
TOLERANCE = 0.08


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_two_trainer_steps_match_airbench_muon_on_fresh_gradients(layout):
    # The trainer's order: forward, zero_grad(set_to_none=True), backward, step. Each step's
    # update must come from that batch's gradient alone, as in airbench94_muon.py.
    torch.manual_seed(0)
    net = SmallConvNet().to(memory_format=layout)
    ref = copy.deepcopy(net)
    banks = [net.whiten.weight, net.conv.weight]
    ref_banks = [ref.whiten.weight, ref.conv.weight]
    start = [b.detach().clone() for b in banks]
    opt = ConvMuon(banks, weight_decay=0.05, normalize_weights=True, **MUON)
    buffers = [torch.zeros_like(b) for b in ref_banks]
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    for x, y in batches:
        loss = F.cross_entropy(net(x.contiguous(memory_format=layout)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fresh = torch.autograd.grad(F.cross_entropy(ref(x), y), ref_banks)
        airbench_muon_step(ref_banks, fresh, buffers, weight_decay=0.05, normalize=True, **MUON)
    errors = _relative_errors(banks, ref_banks, start)
    assert max(errors) < TOLERANCE, errors


def test_wide_banks_step_without_torch_muon_shape_factor():
    # airbench applies no shape-based lr factor; torch.optim.Muon multiplies the lr by
    # sqrt(max(1, out / fan_in)), which is 2 for a 1x1 conv from 4 to 16 channels.
    torch.manual_seed(0)
    shapes = [(16, 4, 1, 1), (32, 2, 3, 3), (8, 4, 3, 3)]  # factors 2, sqrt(32/18), 1
    banks = [nn.Parameter(torch.randn(s) * 0.2) for s in shapes]
    ref = [b.detach().clone() for b in banks]
    start = [b.detach().clone() for b in banks]
    buffers = [torch.zeros_like(b) for b in ref]
    opt = ConvMuon(banks, weight_decay=0.1, normalize_weights=False, **MUON)
    for _ in range(2):
        grads = [torch.randn_like(b) for b in banks]
        opt.zero_grad(set_to_none=True)
        for bank, g in zip(banks, grads, strict=True):
            bank.grad = g.clone()
        opt.step()
        airbench_muon_step(ref, grads, buffers, weight_decay=0.1, normalize=False, **MUON)
    errors = _relative_errors(banks, ref, start)
    assert max(errors) < TOLERANCE, errors
    for group in opt.param_groups:  # the factor is undone for the step only
        assert group["lr"] == MUON["lr"] and group["weight_decay"] == 0.1


def test_zero_grad_clears_every_bank_gradient():
    torch.manual_seed(0)
    net = SmallConvNet().to(memory_format=torch.channels_last)
    banks = [net.whiten.weight, net.conv.weight]
    opt = ConvMuon(banks, weight_decay=0.0, normalize_weights=True, **MUON)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(b.grad is None for b in banks)
    assert all(m.grad is None for m in opt.matrices)
    F.cross_entropy(net(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(b.grad is not None and not b.grad.any() for b in banks)


def test_schedule_reaches_muon_after_a_resume():
    # Optimizer.load_state_dict replaces its param_groups list; the trainer's lr must still land
    torch.manual_seed(0)
    saved = ConvMuon([nn.Parameter(torch.randn(8, 4, 3, 3))], weight_decay=0.0, normalize_weights=False,
                     **MUON)
    saved.param_groups[0]["peak_lr"] = MUON["lr"]
    saved.banks[0].grad = torch.randn(8, 4, 3, 3)
    saved.step()
    bank = nn.Parameter(torch.randn(8, 4, 3, 3))
    resumed = ConvMuon([bank], weight_decay=0.0, normalize_weights=False, **MUON)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["peak_lr"] == MUON["lr"]
    for group in resumed.param_groups:
        group["lr"] = 0.0
    before = bank.detach().clone()
    bank.grad = torch.randn(8, 4, 3, 3)
    resumed.step()
    assert torch.equal(bank.detach(), before)


def _recipe(muon_enabled: bool):
    return validate("test", {
        "name": "t", "title": "t", "sources": ["s"], "model": "m.py",
        "train": {"epochs": 1, "batch_size": 8},
        "optimizer": {"lr": 0.1},
        "muon": {"enabled": muon_enabled, "lr": 0.3, "momentum": 0.5, "nesterov": False, "ns_steps": 4,
                 "weight_decay": 0.01, "normalize_weights": False},
        "schedule": {"knots": [0, 1], "values": [1, 1]},
    })


def test_train_epochs_hint_gets_its_own_sgd_group():
    gm = fx.symbolic_trace(SmallConvNet())
    bias = {"lr_scale": 64.0, "weight_decay_scale": 1 / 64}
    gm.meta[HINTS_KEY] = {"whiten.weight": {"trainable": False},
                          "whiten.bias": {**bias, "train_epochs": 3},
                          "norm.bias": bias,
                          "conv.weight": {"train_epochs": 2}}
    hyper = TorchHyperparameters(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    (sgd,) = build_optimizers(gm, _recipe(muon_enabled=True), hyper)  # no 4-D weight left for Muon
    group_of = {id(p): g for g in sgd.param_groups for p in g["params"]}
    named = dict(gm.named_parameters())
    whiten_group, norm_group = group_of[id(named["whiten.bias"])], group_of[id(named["norm.bias"])]
    assert whiten_group["train_epochs"] == 3 and whiten_group["params"] == [named["whiten.bias"]]
    assert whiten_group["peak_lr"] == pytest.approx(6.4)
    assert whiten_group["weight_decay"] == pytest.approx(5e-4 / 64)
    assert norm_group["train_epochs"] is None and norm_group["peak_lr"] == pytest.approx(6.4)
    assert group_of[id(named["conv.weight"])]["train_epochs"] == 2  # on SGD, not Muon
    assert id(named["whiten.weight"]) not in group_of and not named["whiten.weight"].requires_grad
    gm.meta[HINTS_KEY]["whiten.bias"]["train_epochs"] = 0
    with pytest.raises(ValueError, match="whiten.bias: train_epochs"):
        build_optimizers(gm, _recipe(muon_enabled=True), hyper)


def test_muon_section_configures_conv_muon():
    gm = fx.symbolic_trace(SmallConvNet())
    hyper = TorchHyperparameters(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sgd, muon = build_optimizers(gm, _recipe(muon_enabled=True), hyper)
    named = dict(gm.named_parameters())
    assert [id(p) for p in muon.banks] == [id(named["whiten.weight"]), id(named["conv.weight"])]
    (group,) = muon.param_groups  # both banks have out <= fan_in
    assert (group["lr"], group["peak_lr"], group["momentum"], group["nesterov"], group["ns_steps"],
            group["weight_decay"]) == (0.3, 0.3, 0.5, False, 4, 0.01)
    assert muon.normalize_weights is False
    assert all(g["train_epochs"] is None for g in sgd.param_groups)
    (sgd,) = build_optimizers(gm, _recipe(muon_enabled=False), hyper)
    assert sum(len(g["params"]) for g in sgd.param_groups) == len(named)
    assert math.isclose(sgd.param_groups[0]["peak_lr"], 0.1)
