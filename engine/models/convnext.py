"""ConvNeXt from torchvision (Liu et al. 2022). depths/dims [3,3,9,3]/[96,192,384,768] is ConvNeXt-T."""
from __future__ import annotations

import torch.nn as nn


def convnext(depths: list[int], dims: list[int], num_classes: int) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    if len(depths) != len(dims):
        raise ValueError("convnext: depths and dims must have the same length")
    setting = [CNBlockConfig(dims[i], dims[i + 1] if i + 1 < len(dims) else None, depths[i])
               for i in range(len(dims))]
    return ConvNeXt(setting, stochastic_depth_prob=0.1 if dims[0] >= 96 else 0.0, num_classes=num_classes)
