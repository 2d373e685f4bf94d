"""Models by config name. Each builder imports its library (torchvision, transformers) lazily."""
from __future__ import annotations

import torch.nn as nn

from engine.config import ModelConfig


def build_model(mc: ModelConfig) -> nn.Module:
    if mc.name == "resnet18":
        from engine.models.resnet import resnet18_cifar
        model = resnet18_cifar(num_classes=mc.num_classes, width=mc.width)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = mc.bn_momentum
        return model
    if mc.name == "cnn":
        from engine.models.cnn import PlainCNN
        return PlainCNN(num_classes=mc.num_classes, width=mc.width, depth=mc.depth)
    if mc.name == "convnext":
        from engine.models.convnext import convnext
        return convnext(depths=mc.depths, dims=mc.dims, num_classes=mc.num_classes)
    if mc.name == "gpt2":
        from engine.models.gpt2 import gpt2
        return gpt2(mc)
    raise ValueError(f"unknown model {mc.name!r}")


def hf_config_dict(mc: ModelConfig) -> dict | None:
    """The transformers config of a GPT-2 (None for other models)."""
    if mc.name != "gpt2":
        return None
    from engine.models.gpt2 import gpt2_config
    return gpt2_config(mc).to_dict()
