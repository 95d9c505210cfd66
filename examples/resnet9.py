"""ResNet-9 as in David Page's DAWNBench entry ("How to Train Your ResNet", 2018-19).

Written the way the original is: every block is conv -> BatchNorm -> ReLU, followed by a
2x2 max-pool where the resolution halves. Page later moved the pool before the BatchNorm
(a training-time change) and the ReLU after the pool (exact); fastgraph's passes make
those rewrites from this plain file. About 6.57M parameters, ~0.76 GFLOPs per 32x32 image.
"""

import torch
from torch import nn


def conv_bn(c_in, c_out):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.res1 = conv_bn(channels, channels)
        self.res2 = conv_bn(channels, channels)

    def forward(self, x):
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    def __init__(self, num_classes=10, width=(64, 128, 256, 512), weight=0.0625):
        super().__init__()
        c0, c1, c2, c3 = width
        self.prep = conv_bn(3, c0)
        self.layer1 = nn.Sequential(conv_bn(c0, c1), nn.MaxPool2d(2), Residual(c1))
        self.layer2 = nn.Sequential(conv_bn(c1, c2), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(c2, c3), nn.MaxPool2d(2), Residual(c3))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(c3, num_classes, bias=False)
        # Page scales the logits: 1/16 in his final 10-epoch network (cifar10-fast
        # new_dawn.py: net(weight=1/16)), 1/8 in the 24-epoch DAWNBench one (dawn.py).
        self.weight = weight

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.linear(x) * self.weight


def build_model():
    return ResNet9()
