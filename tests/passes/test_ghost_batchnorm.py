"""ghost_batchnorm: one reshape + one batch-norm call equals a loop over ghost batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.core.modules import GhostBatchNorm
from fastgraph.passes import get, rewrite_count
from fastgraph.passes._options import PassOptionError


@pytest.fixture
def example(example_graph):
    """``example("resnet20")``: that example file's model traced with torch.fx (train mode)."""
    return lambda name: example_graph(f"{name}.py")


class LoopGhostBatchNorm(nn.Module):
    """Reference: an explicit Python loop over the K = N/S ghost batches (samples k, k+K, ...),
    each a plain training-mode batch norm with its own copy of the running statistics,
    then the running statistics set to the mean of those copies."""

    def __init__(self, bn: nn.BatchNorm2d, ghost_batch_size: int):
        super().__init__()
        self.bn, self.s = bn, ghost_batch_size

    def forward(self, x):
        k = x.shape[0] // self.s
        out = torch.empty_like(x)
        means, variances = [], []
        for g in range(k):
            mean, var = self.bn.running_mean.clone(), self.bn.running_var.clone()
            out[g::k] = F.batch_norm(x[g::k], mean, var, self.bn.weight, self.bn.bias, True,
                                     self.bn.momentum, self.bn.eps)
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.stack(means).mean(0))
            self.bn.running_var.copy_(torch.stack(variances).mean(0))
            self.bn.num_batches_tracked += 1
        return out


@pytest.fixture
def features(real_batch):
    """Real activations: 64 CIFAR-10 test images through a fixed random 3x3 conv, (64, 8, 16, 16)."""
    x, _ = real_batch
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        return conv(x)


def random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize("ghost_batch_size", [8, 16, 32])
def test_equals_loop_over_ghost_batches(features, ghost_batch_size):
    bn = random_bn(features.shape[1])
    ghost = GhostBatchNorm.from_batchnorm(bn, ghost_batch_size)
    reference = LoopGhostBatchNorm(copy.deepcopy(bn), ghost_batch_size)
    for step in range(2):  # the second step starts from updated running statistics
        x = (features * (1 + step)).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ghost(x), reference(x_ref)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        upstream = torch.randn_like(y)
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ghost.weight.grad, reference.bn.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ghost.bias.grad, reference.bn.bias.grad, atol=1e-4, rtol=1e-4)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ghost, name), getattr(reference.bn, name))
    # The statistics really are per ghost batch: not plain batch norm over all 64.
    plain = copy.deepcopy(bn)
    assert not torch.allclose(ghost(features), plain(features), atol=1e-3)


def test_cumulative_momentum_none_and_eval_never_splits(features):
    bn = random_bn(features.shape[1])
    bn.momentum = None
    bn.num_batches_tracked.fill_(4)
    ghost = GhostBatchNorm.from_batchnorm(bn, 16)
    reference = LoopGhostBatchNorm(copy.deepcopy(bn), 16)
    reference.bn.momentum = 1.0 / (int(bn.num_batches_tracked) + 1)  # what momentum=None means
    torch.testing.assert_close(ghost(features), reference(features), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ghost.running_var, reference.bn.running_var)

    ghost.eval()
    bn_eval = nn.BatchNorm2d(features.shape[1]).eval()
    bn_eval.load_state_dict(ghost.state_dict())
    odd = features[:10]  # eval accepts any batch size: running statistics, no split
    torch.testing.assert_close(ghost(odd), bn_eval(odd), atol=0, rtol=0)


def test_channels_last_input(features):
    bn = random_bn(features.shape[1])
    ghost, reference = GhostBatchNorm.from_batchnorm(bn, 16), GhostBatchNorm.from_batchnorm(bn, 16)
    y = ghost(features.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference(features), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ghost.running_var, reference.running_var)


def test_indivisible_training_batch_names_n_and_s(features):
    ghost = GhostBatchNorm.from_batchnorm(random_bn(8), 16)
    with pytest.raises(ValueError, match="N=40 .* S=16"):
        ghost(features[:40])


def test_pass_on_resnet20(example, real_batch):
    x = real_batch[0][:16, :, :16, :16]  # real 16x16 crops: 2 ghost batches of 8
    gm = example("resnet20")
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    out = get("ghost_batchnorm").fn(gm, ghost_batch_size=8)

    # The input is untouched; every BatchNorm2d is replaced, names and state kept.
    assert all(type(m) is nn.BatchNorm2d for n, m in gm.named_modules() if "bn" in n)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    ghosts = [m for m in out.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 19 and rewrite_count(gm, out) == 19
    assert all(m.ghost_batch_size == 8 for m in ghosts)
    assert out.state_dict().keys() == gm.state_dict().keys()
    out.load_state_dict(gm.state_dict())  # checkpoints load both ways

    reference = copy.deepcopy(gm).eval()
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), reference(x), atol=0, rtol=0)
        out.train()
        y = out(x)
        assert not torch.allclose(y, copy.deepcopy(gm).train()(x), atol=1e-3)  # ghost statistics differ

    # FX-traceable, in both modes (re-tracing records one call per ghost batch norm).
    for mode in (True, False):
        retraced = fx.symbolic_trace(out.train(mode))
        with torch.no_grad():
            torch.testing.assert_close(retraced(x), copy.deepcopy(out)(x), atol=1e-5, rtol=1e-5)


def test_ghost_batch_equal_to_batch_is_plain_batchnorm(example, real_batch):
    x = real_batch[0][:32]
    gm = example("resnet20").train()
    out = get("ghost_batchnorm").fn(gm, ghost_batch_size=32)
    with torch.no_grad():
        torch.testing.assert_close(out(x), copy.deepcopy(gm)(x), atol=1e-5, rtol=1e-5)


def test_keeps_frozen_flags_and_does_not_fire_twice(example):
    gm = example("resnet9")
    gm.get_submodule("prep.1").weight.requires_grad_(False)
    out = get("ghost_batchnorm").fn(gm)
    assert not out.get_submodule("prep.1").weight.requires_grad
    assert out.get_submodule("layer1.0.1").weight.requires_grad
    assert get("ghost_batchnorm").fn(out, ghost_batch_size=8) is out


def test_compiles_without_graph_breaks(real_batch):
    """torch.compile captures the training graph whole (the batch-size check is traced as a guard)."""
    import torch._dynamo

    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    out = get("ghost_batchnorm").fn(gm, ghost_batch_size=16).train()
    explanation = torch._dynamo.explain(out)(real_batch[0][:32])
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_negative_cases(example):
    plain = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    assert get("ghost_batchnorm").fn(plain) is plain
    with pytest.raises(PassOptionError, match="ghost_batch_size"):
        get("ghost_batchnorm").fn(example("resnet20"), ghost_batch_size=0)
