"""Model files and recipes written into a test's tmp_path for the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Train on one intra-op thread: on a shared 2-core machine two OpenMP threads that
    spin-wait on a busy neighbour run these small convolutions over 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

RESNET9_LIKE = '''\
import torch
from torch import nn


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.res1, self.res2 = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return x + self.res2(self.res1(x))


class Net(nn.Module):
    """Page's ResNet-9 layout at reduced width."""

    def __init__(self, w=WIDTHS):
        super().__init__()
        self.prep = conv_bn(3, w[0])
        self.layer1 = nn.Sequential(conv_bn(w[0], w[1]), nn.MaxPool2d(2), Residual(w[1]))
        self.layer2 = nn.Sequential(conv_bn(w[1], w[2]), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(w[2], w[3]), nn.MaxPool2d(2), Residual(w[3]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(w[3], 10, bias=False)

    def forward(self, x):
        x = self.pool(self.layer3(self.layer2(self.layer1(self.prep(x)))))
        return self.linear(torch.flatten(x, 1)) * 0.125


def build_model():
    return Net()
'''

# Page's bag of tricks, shortened: whitening, pool before BN, CELU, frozen BN scales,
# ghost BN; a one-cycle lr over the few steps a CPU test can afford.
RECIPE = '''\
name = "cpu-check"
title = "Page-style recipe shortened for CPU tests"
sources = ["tests"]
model = "model.py"

[train]
epochs = {epochs}
batch_size = {batch_size}
label_smoothing = 0.2

[optimizer]
lr = {lr}
momentum = 0.9
nesterov = true
weight_decay = 5e-4

[schedule]
knots = [0.0, 0.25, 1.0]
values = [0.1, 1.0, 0.0]

[ema]
enabled = {ema}
decay = 0.9
every = 2

[augment]
pad = 2
flip = "random"
cutout = {cutout}

[eval]
tta_level = 1
batch_size = 500
model = "{eval_model}"

[[passes]]
name = "whitening"
kernel_size = 3
eps = 1e-2
images = 2000

[[passes]]
name = "pool_before_bn"

[[passes]]
name = "swap_activation"
to = "celu"
alpha = 0.075

[[passes]]
name = "freeze_bn_scale"

[[passes]]
name = "ghost_batchnorm"
ghost_batch_size = 32
'''


def write_model(tmp_path: Path, widths=(16, 32, 64, 128)) -> Path:
    path = tmp_path / "model.py"
    path.write_text(RESNET9_LIKE.replace("WIDTHS", repr(tuple(widths))))
    return path


def write_recipe(tmp_path: Path, *, epochs=2, batch_size=128, lr=0.4, ema=False, cutout=0) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(epochs=epochs, batch_size=batch_size, lr=lr, ema=str(ema).lower(),
                                  cutout=cutout, eval_model="ema" if ema else "trained"))
    return path
