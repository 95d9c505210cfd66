"""A ResNet written with in-place residual adds (``out.add_(x)``) trains bit-identically
to the same ResNet written ``out = out + x`` under every shipped recipe: no pass or
clean-up may drop a statement that writes memory (the recipes' passes once deleted the
in-place adds, and the network trained without its shortcuts)."""

from __future__ import annotations

import pytest
import torch

from fastgraph.training.loop import TrainOptions, train
from fastgraph.training.recipes import load_recipe
from support import real_data_path

pytestmark = pytest.mark.usefixtures("one_thread")

# A 2x2 stem to 24 channels (airbench's whitening form needs it), two residual blocks.
MODEL = '''
import torch
from torch import nn
import torch.nn.functional as F

INPLACE = {inplace}


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if INPLACE:
            out.add_(x)
        else:
            out = out + x
        return F.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 2, bias=True)
        self.conv, self.bn = nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.block1, self.block2 = Block(16), Block(16)
        self.head = nn.Linear(16, 10, bias=False)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.pool(F.relu(self.bn(self.conv(x))))
        x = self.block2(self.pool(self.block1(x)))
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


def build_model():
    return Net()
'''


def _train(tmp_path, recipe_name: str, inplace: bool):
    path = tmp_path / f"net_{inplace}.py"
    path.write_text(MODEL.format(inplace=inplace))
    result = train(TrainOptions(model_path=str(path), recipe=load_recipe(recipe_name), epochs=0.75,
                                batch_size=64, subset=256, test_subset=100, seed=3, device="cpu",
                                compile=False, progress_eval=False, data=str(real_data_path())))
    return result


@pytest.mark.parametrize("recipe", ["page2019", "fast", "fast_muon", "resnet20_seed_baseline"])
def test_in_place_residual_adds_train_bit_identically(tmp_path, data_path, recipe):
    inplace, functional = _train(tmp_path, recipe, True), _train(tmp_path, recipe, False)
    run_a, run_b = inplace.runs[0], functional.runs[0]
    assert run_a.epochs[-1].step == 3  # three steps of 64 out of 256 images
    assert [p["status"] for p in run_a.passes["passes"]] == [p["status"] for p in run_b.passes["passes"]]
    state_a, state_b = inplace.model.state_dict(), functional.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), (recipe, key)
    assert run_a.epochs[-1].train_loss == run_b.epochs[-1].train_loss
    assert run_a.tta_acc == run_b.tta_acc
