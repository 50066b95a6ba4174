"""An Inception-shaped FID feature network small enough for tests, initialized to keep its signal."""

from __future__ import annotations

import torch
from torch import nn

from refface.evaluation.inception import FIDInceptionV3


def tiny_inception(seed: int = 0) -> FIDInceptionV3:
    """The FID Inception at 1/16 width (128-d features); He-initialized so deep features stay O(1)."""
    torch.manual_seed(seed)
    net = FIDInceptionV3(scale=1 / 16)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.eval()
