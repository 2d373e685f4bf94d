"""A plain CNN: the small student of the CPU reproduction (issue 7's calibration hint).

`depth` 3x3 conv + ReLU layers; the first has `width` channels, and every second layer after it
halves the resolution (stride 2) and doubles the channels; then global average pooling and a linear
head. No BatchNorm, so a batch-size change is only a change of gradient noise (BN's batch statistics
would change the function too), and eval mode computes the same function as train mode.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PlainCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, depth: int = 3):
        super().__init__()
        layers, c_in, c = [], 3, width
        for i in range(depth):
            stride = 2 if i % 2 else 1
            if stride == 2:
                c *= 2
            layers += [nn.Conv2d(c_in, c, 3, stride, 1), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))
