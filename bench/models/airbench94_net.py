"""airbench94's network (Keller Jordan, 2024; KellerJordan/cifar10-airbench airbench94.py
``make_net``) as a plain PyTorch model file, the model the ``fast`` training recipe is
written for.

A 2x2 stem conv to 24 channels with a zero-initialised bias (airbench94.py
``Conv.reset_parameters``), which fastgraph's whitening pass (``into="stem"``) turns into
the frozen 2x2 patch-whitening conv with +/- pairs; GELU; three conv groups of
conv -> max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU with widths 64, 256,
256; a 3x3 max-pool and a bias-free linear head whose logits are divided by 9
(``scaling_factor = 1/9``). Conv filters start as identity (Dirac) on their first
``in_channels`` outputs, the implicit residual airbench initialises with. About 1.97M
parameters. The BatchNorm settings (momentum 0.4 in PyTorch's convention, eps 1e-12,
weight frozen at 1) are the recipe's ``[batchnorm]`` section and ``freeze_bn_scale`` pass.
"""

import torch
from torch import nn


class Conv(nn.Conv2d):
    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = Conv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = Conv(c_out, c_out)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    def __init__(self, widths=(64, 256, 256), stem_width=24, logit_divisor=9, zero_stem_bias=True):
        super().__init__()
        self.logit_divisor = logit_divisor
        self.stem = nn.Conv2d(3, stem_width, kernel_size=2, padding=0, bias=True)
        if zero_stem_bias:
            nn.init.zeros_(self.stem.bias)
        self.stem_act = nn.GELU()
        self.group1 = ConvGroup(stem_width, widths[0])
        self.group2 = ConvGroup(widths[0], widths[1])
        self.group3 = ConvGroup(widths[1], widths[2])
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[2], 10, bias=False)

    def forward(self, x):
        x = self.group3(self.group2(self.group1(self.stem_act(self.stem(x)))))
        x = torch.flatten(self.pool(x), 1)
        return self.head(x) / self.logit_divisor


def build_model():
    return AirbenchNet()
