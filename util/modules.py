"""What wraps a model during training (DDP, torch.compile), and how to get the plain module back."""
import torch
from torch.nn.parallel import DistributedDataParallel


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP and torch.compile wrappers so state_dict keys are the plain model's."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
