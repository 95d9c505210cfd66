"""ResNet-50 (torchvision's bottleneck structure, quarter width)."""

from resnet import resnet50


def build_model():
    return resnet50()
