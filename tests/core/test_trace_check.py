"""The trace is checked against the user's eager model in the mode of use: what
torch.fx cannot keep is refused in one line naming the construct and its line, and what
it keeps (traced in the mode of use) is accepted and equal to the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgraph.core.errors import ModelError
from fastgraph.core.tracing import check_trace, trace, untraceable_constructs
from fastgraph.core.verification import verify


class SoftmaxInEval(nn.Module):
    """Returns logits in training and probabilities in evaluation."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        logits = self.head(F.relu(self.conv(x)).mean((2, 3)))
        if not self.training:
            return logits.softmax(1)
        return logits


class DetachedScale(nn.Module):
    """A scale computed without gradients."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x)
        with torch.no_grad():
            scale = h.abs().mean()
        return self.head((h / scale).mean((2, 3)))


class FrozenBN(nn.Module):
    """Keeps its BatchNorm in eval mode whatever train() says, as detection models do."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)

    def train(self, mode=True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class MaxNorm(nn.Module):
    """A max-norm constraint on the head, applied through .data in the forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        self.head.weight.data = torch.renorm(self.head.weight.data, 2, 0, 0.05)
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


class SignSTE(torch.autograd.Function):
    """sign(x) forward, identity backward (a straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class Binarised(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(SignSTE.apply(self.conv(x)).mean((2, 3)))


def _batch(real_batch):
    x, y = real_batch
    return x[:32], y[:32]


def test_a_training_branch_traced_in_the_mode_of_use_is_kept(real_batch):
    model = SoftmaxInEval()
    for mode in ("train", "infer"):
        gm = trace(model, mode=mode)
        check_trace(model, gm, mode, _batch(real_batch))  # no error
        assert verify(model.train(mode == "train"), gm.train(mode == "train"), mode, _batch(real_batch)).ok


def test_a_training_branch_traced_in_another_mode_is_refused_by_name(real_batch):
    model = SoftmaxInEval()
    gm = trace(model, mode="train")
    with pytest.raises(ModelError) as info:
        check_trace(model, gm, "infer", _batch(real_batch))
    message = str(info.value)
    assert "\n" not in message and "a self.training branch at" in message
    assert f"{__file__}:" in message and "(SoftmaxInEval)" in message


@pytest.mark.parametrize(("model", "construct"), [
    (DetachedScale(), "a torch.no_grad() block at"),
    (FrozenBN(), "a train() override at"),
    (MaxNorm(), "a .data access at"),
])
def test_what_tracing_cannot_keep_is_refused_naming_it(real_batch, model, construct):
    gm = trace(model, mode="train")
    with pytest.raises(ModelError) as info:
        check_trace(model, gm, "train", _batch(real_batch))
    message = str(info.value)
    assert "\n" not in message and construct in message, message
    assert "does not compute what the model computes in train mode" in message


def test_a_custom_autograd_function_is_refused_in_training(real_batch):
    """symbolic_trace runs the Function's forward on proxies and records torch.sign, whose
    gradient is zero: the straight-through gradient is gone. Evaluation keeps it."""
    model = Binarised()
    gm = trace(model, mode="train")
    assert "sign" in gm.code
    with pytest.raises(ModelError, match="a custom autograd.Function SignSTE.apply at"):
        check_trace(model, gm, "train", _batch(real_batch))
    check_trace(model, trace(model, mode="infer"), "infer", _batch(real_batch))


def test_the_scan_names_each_construct_once_per_class():
    found = untraceable_constructs(FrozenBN())
    assert len(found) == 1 and found[0].startswith("a train() override at")
    assert found[0].endswith("(FrozenBN)")
    assert untraceable_constructs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))) == []


def test_a_plain_model_passes_in_both_modes(real_batch, example_models):
    for model in example_models:
        for mode in ("train", "infer"):
            check_trace(model, trace(model, mode=mode), mode, _batch(real_batch))


@pytest.fixture
def example_models():
    from support import build_example

    return [build_example("resnet20.py")]
