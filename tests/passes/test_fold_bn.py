"""fold_bn: every example's conv -> BN pairs fold with realistic running statistics (taken
from real CIFAR-10 batches) and random affine parameters, the folded graph matches the
original on real images in float64, folding happens in float64 whatever the model's dtype,
and the pass refuses training-mode BN, shared conv outputs and BN without running stats."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.testing import assert_close

from fastgraph.passes import REGISTRY, rewrite_count
from fastgraph.passes.fold_bn import fold_bn

# conv -> BN pairs whose conv output feeds the BN alone, counted by hand in each file:
# ResNet-9: prep, 3 block convs, 4 residual convs. ResNet-20: the stem and 2 per block.
# Pre-activation ResNet-20: only conv1 of each block (the stem's output also feeds the
# shortcut; conv2 feeds the residual add).
FOLDS = {"resnet9.py": 8, "resnet20.py": 19, "preact_resnet20.py": 9}


def realistic_bn(model: nn.Module, images: torch.Tensor, batches: int = 2) -> nn.Module:
    """Running statistics from train-mode forwards over real images (a cumulative average,
    momentum=None, so a few batches give settled statistics) and random non-trivial BN
    affine parameters (some negative scales); returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = None
        model.train()
        for chunk in images.chunk(batches):
            model(chunk)
        for bn in bns:
            bn.momentum = 0.1
            if bn.affine:
                bn.weight.copy_(torch.randn_like(bn.weight) * 0.5 + 1.0)
                bn.bias.copy_(torch.randn_like(bn.bias) * 0.5)
    return model.eval()


def test_registered_exact_inference_only():
    info = REGISTRY["fold_bn"]
    assert info.exact and info.modes == ("infer",)


@pytest.mark.parametrize("file_name", sorted(FOLDS))
def test_examples_fold_same_function(file_name, example_module, real_batch, real64, same_function, frozen):
    model = realistic_bn(example_module(file_name), real_batch[0][:16])
    # In the model's own float32 the fold agrees to rounding (it is computed in float64).
    gm = fx.symbolic_trace(model)
    out32 = fold_bn(gm)
    assert next(out32.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert_close(out32(real_batch[0][16:24]), gm(real_batch[0][16:24]), rtol=1e-4, atol=1e-4)
    gm = gm.to(torch.float64)
    check = frozen(gm)
    out = fold_bn(gm)
    check()
    assert rewrite_count(gm, out) == FOLDS[file_name]
    bn_before = [n for n in gm.graph.nodes if isinstance(_module(gm, n), nn.BatchNorm2d)]
    bn_after = [n for n in out.graph.nodes if isinstance(_module(out, n), nn.BatchNorm2d)]
    assert len(bn_after) == len(bn_before) - FOLDS[file_name]
    for node in bn_before:  # each folded BN's conv is a fresh module with a bias
        if node.name not in {n.name for n in bn_after}:
            conv = node.args[0].target
            assert out.get_submodule(conv) is not gm.get_submodule(conv)
            assert out.get_submodule(conv).bias is not None
    x, y = real64(24)
    same_function(gm, out, x[16:], y[16:], train=False)  # images the statistics never saw


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def test_low_precision_folds_in_float64(real_batch):
    """A bf16 model folds to exactly the float64 fold rounded once to bf16."""
    model = realistic_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)), real_batch[0])
    with torch.no_grad():  # statistics where rounding bites: large mean, small variance
        model[1].running_mean.add_(300.0)
        model[1].running_var.mul_(1e-3)
    low = fx.symbolic_trace(copy.deepcopy(model).to(torch.bfloat16))
    high = fx.symbolic_trace(copy.deepcopy(low).to(torch.float64))  # the same bf16 values, widened
    folded_low, folded_high = fold_bn(low), fold_bn(high)
    conv_low, conv_high = folded_low.get_submodule("0"), folded_high.get_submodule("0")
    assert conv_low.weight.dtype == torch.bfloat16
    assert torch.equal(conv_low.weight, conv_high.weight.to(torch.bfloat16))
    assert torch.equal(conv_low.bias, conv_high.bias.to(torch.bfloat16))
    # The same arithmetic carried out in bf16 gives a different bias: the trap is real here.
    bn = low.get_submodule("1")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    naive_bias = bn.bias - bn.running_mean * scale + low.get_submodule("0").bias * scale
    assert not torch.equal(naive_bias.detach(), conv_low.bias.detach())


CONVS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "stride2": dict(stride=2),
    "dilation2": dict(dilation=2, padding=2),
    "groups4": dict(groups=4),
    "depthwise": dict(groups=12),
    "reflect": dict(padding_mode="reflect"),
    "1x1": dict(kernel_size=1, padding=0),
    "bn-no-affine": dict(affine=False),
}


@pytest.mark.parametrize("case", CONVS)
def test_conv_variants(case, real_batch, real64, same_function):
    options = dict(kernel_size=3, padding=1, bias=False) | CONVS[case]
    affine = options.pop("affine", True)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, **options), nn.BatchNorm2d(12, affine=affine), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    )
    gm = fx.symbolic_trace(realistic_bn(model, real_batch[0])).to(torch.float64)
    out = fold_bn(gm)
    assert rewrite_count(gm, out) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    x, y = real64(16)
    same_function(gm, out, x, y, train=False)


class ConvReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ConvCalledTwice(ConvReadTwice):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class CustomBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _LeafTracer(fx.Tracer):
    """Keeps CustomBN a call_module node, as torch.nn modules are."""

    def is_leaf_module(self, m, qualified_name):
        return isinstance(m, CustomBN) or super().is_leaf_module(m, qualified_name)


def _eval(module: nn.Module) -> fx.GraphModule:
    module.eval()
    return fx.GraphModule(module, _LeafTracer().trace(module))


REFUSED = {
    "conv-read-twice": lambda: _eval(ConvReadTwice()),
    "conv-called-twice": lambda: _eval(ConvCalledTwice()),
    "bn-train-mode": lambda: fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()),
    "bn-no-running-stats": lambda: _eval(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))),
    "bn-forward-overridden": lambda: _eval(nn.Sequential(nn.Conv2d(3, 8, 3), CustomBN(8))),
    "bn-without-conv": lambda: _eval(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3))),
    "conv1d": lambda: _eval(nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8))),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused(case, frozen):
    gm = REFUSED[case]()
    check = frozen(gm)
    assert fold_bn(gm) is gm
    check()


@pytest.mark.parametrize("file_name", sorted(FOLDS))
def test_examples_in_train_mode_untouched(file_name, example_graph):
    gm = example_graph(file_name).train()
    assert fold_bn(gm) is gm


def test_only_the_foldable_pair_folds(real_batch, real64, same_function):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = ConvReadTwice()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.bn(self.conv(self.shared(x))).mean((2, 3)))

    gm = fx.symbolic_trace(realistic_bn(Mixed(), real_batch[0])).to(torch.float64)
    out = fold_bn(gm)
    assert rewrite_count(gm, out) == 1
    assert isinstance(out.get_submodule("shared.bn"), nn.BatchNorm2d)
    assert not hasattr(out, "bn")
    x, y = real64(16)
    same_function(gm, out, x, y, train=False)


def test_ghost_batchnorm_in_eval_folds(example_module, real_batch, real64, same_function):
    """After training with ghost BN the inference graph still folds: in eval mode a
    GhostBatchNorm is exactly BatchNorm2d (running statistics, never split)."""
    from fastgraph.passes.ghost_batchnorm import ghost_batchnorm

    model = realistic_bn(example_module("resnet20.py"), real_batch[0][:16])
    ghost = ghost_batchnorm(fx.symbolic_trace(model), ghost_batch_size=8).eval().to(torch.float64)
    out = fold_bn(ghost)
    assert rewrite_count(ghost, out) == FOLDS["resnet20.py"]
    x, y = real64(24)
    same_function(ghost, out, x[16:], y[16:], train=False)
    assert fold_bn(ghost.train()) is ghost  # training-mode ghost BN splits: never folded
