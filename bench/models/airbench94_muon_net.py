"""airbench94_muon's network (Keller Jordan, 2024; KellerJordan/cifar10-airbench
airbench94_muon.py ``CifarNet``), the model the ``fast_muon`` recipe is written for.

airbench94's network (``airbench94_net.py`` beside this file) with the two changes the
Muon script makes: the head's weights are rescaled to standard deviation 1 and its logits
divided by the width, 256, instead of 9 (``CifarNet.reset``: ``w *= 1 / w.std()``;
``forward``: ``self.head(x) / x.size(-1)``), and the whitening conv keeps nn.Conv2d's
default bias initialisation.
"""

import torch
from airbench94_net import AirbenchNet


def build_model():
    net = AirbenchNet(logit_divisor=256, zero_stem_bias=False)
    with torch.no_grad():
        net.head.weight /= net.head.weight.std()
    return net
