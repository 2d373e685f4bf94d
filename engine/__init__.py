"""gpctl's engine: training loop, models, data, schedules, checkpoints and the run directory.

Imports only the stdlib, torch, numpy and safetensors at the top level (torchvision, transformers
and datasets inside the modules that need them). Never gpctl, typer, textual or rich.
"""
