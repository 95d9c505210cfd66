"""ResNet-18 (torchvision's structure, quarter width), built once at import as a
module-level instance, the way many scripts write it."""

from resnet import resnet18

net = resnet18()
