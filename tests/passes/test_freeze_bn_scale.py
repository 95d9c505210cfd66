"""freeze_bn_scale: BN weights frozen at 1, bias optimiser hints, CELU alpha compensation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.passes import get, rewrite_count
from fastgraph.passes._options import PassOptionError

HINTS = "fastgraph.param_hints"


@pytest.fixture
def example(example_graph):
    """``example("resnet20")``: that example file's model traced with torch.fx (train mode)."""
    return lambda name: example_graph(f"{name}.py")


def bn_names(gm) -> list[str]:
    return [n for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)]


def with_learned_scales(gm):
    """As after some training: BN weights away from 1 (Page saw them settle near 1/4)."""
    with torch.no_grad():
        for name in bn_names(gm):
            gm.get_submodule(name).weight.uniform_(0.15, 0.35)
    return gm


class CeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.CELU(0.075)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = F.celu(self.bn2(self.conv2(x)), 0.075)
        return self.fc(x.mean((2, 3)))


def test_weights_frozen_at_one_with_hints(example):
    gm = with_learned_scales(example("resnet9"))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    out = get("freeze_bn_scale").fn(gm)

    names = bn_names(gm)
    assert len(names) == 8 and rewrite_count(gm, out) == 8
    params = dict(out.named_parameters())
    for name in names:
        weight = params[f"{name}.weight"]
        assert not weight.requires_grad and torch.equal(weight, torch.ones_like(weight))
        assert params[f"{name}.bias"].requires_grad
    hints = out.meta[HINTS]
    assert set(hints) == {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    assert set(hints) <= set(params)  # keyed by the real qualified parameter names
    for name in names:
        assert hints[f"{name}.weight"] == {"lr_scale": 0.0, "weight_decay_scale": 0.0, "trainable": False}
        assert hints[f"{name}.bias"] == {"lr_scale": 64.0, "weight_decay_scale": 1 / 64, "trainable": True}

    # The input is untouched.
    assert HINTS not in gm.meta
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())
    assert all(gm.get_submodule(n).weight.requires_grad for n in names)


def test_function_is_the_original_with_unit_scales(example, real_batch):
    x, labels = real_batch[0][:16, :, :16, :16], real_batch[1][:16]  # real 16x16 crops
    gm = with_learned_scales(example("resnet20")).eval()
    out = get("freeze_bn_scale").fn(gm)
    names = bn_names(gm)
    reference = copy.deepcopy(gm)
    with torch.no_grad():
        for name in names:
            reference.get_submodule(name).weight.fill_(1.0)
        torch.testing.assert_close(out(x), reference(x), atol=0, rtol=0)
        assert not torch.allclose(out(x), gm(x), atol=1e-3)

    # An optimiser built from the flags never moves the frozen scales; the biases move.
    out.train()
    opt = torch.optim.SGD([p for p in out.parameters() if p.requires_grad], lr=0.5, weight_decay=5e-4)
    F.cross_entropy(out(x), labels).backward()
    opt.step()
    for name in names:
        bn = out.get_submodule(name)
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert not torch.equal(out.get_submodule("bn1").bias, gm.get_submodule("bn1").bias)


def test_celu_alpha_compensation(real_batch):
    x, _ = real_batch
    gm = fx.symbolic_trace(CeluNet().eval())
    out = get("freeze_bn_scale").fn(gm, celu_alpha=0.3)
    assert rewrite_count(gm, out) == 2 + 2  # two BNs, one CELU module, one F.celu call
    assert out.get_submodule("act").alpha == 0.3 and gm.get_submodule("act").alpha == 0.075
    (call,) = [n for n in out.graph.nodes if n.target is F.celu]
    assert call.kwargs["alpha"] == 0.3

    class Reference(CeluNet):  # written by hand: scales 1, alpha 0.3 in both places
        def forward(self, x):
            x = F.celu(self.bn(self.conv(x)), 0.3)
            x = F.celu(self.bn2(self.conv2(x)), 0.3)
            return self.fc(x.mean((2, 3)))

    reference = Reference().eval()
    reference.load_state_dict(out.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out(x), reference(x), atol=1e-6, rtol=1e-6)

    kept = get("freeze_bn_scale").fn(gm, celu_alpha=None)
    assert kept.get_submodule("act").alpha == 0.075


def test_merges_existing_hints_and_custom_scales(example):
    gm = example("resnet20")
    gm.meta[HINTS] = {"fc.weight": {"lr_scale": 2.0}, "bn1.bias": {"note": 1, "lr_scale": 3.0}}
    out = get("freeze_bn_scale").fn(gm, bias_lr_scale=16.0, bias_wd_scale=1 / 16)
    hints = out.meta[HINTS]
    assert hints["fc.weight"] == {"lr_scale": 2.0}
    assert hints["bn1.bias"] == {"note": 1, "lr_scale": 16.0, "weight_decay_scale": 1 / 16, "trainable": True}
    assert gm.meta[HINTS]["bn1.bias"] == {"note": 1, "lr_scale": 3.0}  # input's meta untouched


def test_does_not_fire_when_nothing_to_do(example):
    once = get("freeze_bn_scale").fn(example("resnet20"))
    assert get("freeze_bn_scale").fn(once) is once
    no_bn = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, affine=False)))
    assert get("freeze_bn_scale").fn(no_bn) is no_bn
    with pytest.raises(PassOptionError, match="celu_alpha"):
        get("freeze_bn_scale").fn(no_bn, celu_alpha=0.0)
