"""ResNeXt-50 32x4d (torchvision's structure: bottlenecks with a 32-group 3x3 conv, quarter width)."""

from resnet import resnext50_32x4d


def build_model():
    return resnext50_32x4d()
