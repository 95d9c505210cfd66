"""fold_bn on models as people write them, where the fold cannot be exact: a conv whose
weight or bias another op reads (weight tying through ``F.conv2d(y, self.conv.weight)``),
and a conv or BN carrying a forward hook. The pass must not fire there; the same model
without the tie or the hook still folds, exactly, on real CIFAR-10 images in float64."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from fastgraph.core.pass_manager import run_passes
from fastgraph.passes import rewrite_count
from fastgraph.passes.fold_bn import fold_bn


class TiedConv(nn.Module):
    """conv -> BN, plus a second branch reading the conv's weight (``tie="weight"``) or bias
    (``tie="bias"``) directly; ``tie=None`` is the plain conv -> BN."""

    def __init__(self, tie: str | None):
        super().__init__()
        self.tie = tie
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.tie == "weight":
            y = y + F.conv2d(x, self.conv.weight, None, padding=1)
        elif self.tie == "bias":
            y = y + self.conv.bias.view(1, -1, 1, 1)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _scale_output(module, inputs, output):
    return output * 0.5 - 0.25


def _scale_input(module, inputs):
    return (inputs[0] * 2.0,)


def _with_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with running statistics from real images and BN affine
    parameters away from 1 and 0, so a wrong fold shows in the outputs."""
    with torch.no_grad():
        model.train()
        model.bn.momentum = None
        model(images)
        model.bn.weight.copy_(torch.linspace(0.5, 1.5, 16))
        model.bn.bias.copy_(torch.linspace(-0.3, 0.3, 16))
    return model.eval()


def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.double().eval()(x)


def test_folds_the_untied_conv_exactly(real64):
    x, _ = real64(32)
    model = _with_statistics(TiedConv(None).double(), x)
    gm = fx.symbolic_trace(model)
    out = fold_bn(gm)
    assert rewrite_count(gm, out) == 1
    assert_close(_eval_outputs(out, x), _eval_outputs(model, x), rtol=1e-12, atol=1e-12)


def test_conv_whose_weight_or_bias_another_op_reads_is_not_folded(real64):
    x, y = real64(32)
    for tie in ("weight", "bias"):
        model = _with_statistics(TiedConv(tie).double(), x)
        gm = fx.symbolic_trace(model)
        out = fold_bn(gm)
        # The fold replaces the conv's weight and bias: the other reader would see the folded ones.
        assert out is gm, tie
        assert_close(_eval_outputs(out, x), _eval_outputs(model, x), rtol=1e-12, atol=1e-12)
        _, report = run_passes(gm, ["fold_bn"], mode="infer", batch=(x, y))
        assert report.outcomes[0].status == "no-op", tie


def test_conv_or_bn_with_a_forward_hook_is_not_folded(real64):
    x, _ = real64(32)
    for where in ("conv", "bn"):
        model = _with_statistics(TiedConv(None).double(), x)
        if where == "conv":
            model.conv.register_forward_hook(_scale_output)
        else:
            model.bn.register_forward_pre_hook(_scale_input)
        gm = fx.symbolic_trace(model)
        out = fold_bn(gm)
        # The folded conv is a fresh module: the hook, which the traced graph runs, would be lost.
        assert out is gm, where
        assert_close(_eval_outputs(out, x), _eval_outputs(model, x), rtol=1e-12, atol=1e-12)
