"""ResNet-50 for ImageNet (He, Zhang, Ren and Sun, "Deep Residual Learning for Image
Recognition", 2016, Table 1): a 7x7 stride-2 stem and 3x3 stride-2 max-pool, then 3, 4, 6
and 3 bottleneck blocks (1x1, 3x3, 1x1 convolutions, expansion 4) at widths 64, 128, 256
and 512, global average pooling and one linear layer. About 25.6M parameters and 4.1
GFLOPs (multiply-adds counted as two FLOPs: 8.2) per 224x224 image in inference.

The layout is torchvision's ``resnet50`` ("ResNet v1.5": the stride-2 sits on the 3x3
convolution of a block, not the first 1x1), which the FFCV and MLPerf ResNet-50 results
train. ``zero_init_residual`` sets the last BN scale of every block to zero, the
initialisation of Goyal et al., "Accurate, Large Minibatch SGD" (2017, section 5.1),
that large-batch training uses.
"""

from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, width, stride=1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:  # projection shortcut ("option B")
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000, zero_init_residual=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, c_in = [], 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            layers = []
            for j in range(blocks):
                layers.append(Bottleneck(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def build_model(num_classes=1000):
    return ResNet50(num_classes=num_classes)
