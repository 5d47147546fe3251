"""Build a model that shares every untouched tensor with the base and owns only its fused weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's parameters by name, tied ones listed under each of their names."""
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}


def shared_copy(base_model: nn.Module) -> nn.Module:
    """Return a copy of ``base_model`` whose parameters and buffers are the base's own tensors."""
    memo: dict[int, object] = {}
    for parameter in base_model.parameters():
        memo[id(parameter)] = parameter
    for buffer in base_model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(base_model, memo)


def build_fused_model(base_model: nn.Module, fused: dict[str, torch.Tensor]) -> nn.Module:
    """Return a copy of ``base_model`` whose parameters named in ``fused`` are those tensors.

    Every other parameter and buffer is the base's own object, not a copy, so the new model costs
    only the ``fused`` tensors plus Python objects. Each fused tensor replaces the parameter of
    exactly one module: when the base ties ``lm_head.weight`` to the embedding, fusing one of the
    two unties it and leaves the other one as the base tensor.

    Args:
        base_model: the model to share tensors with; it is not modified.
        fused: parameter name → tensor of the same shape, for example from ``Fuser.allocate``.
    """
    model = shared_copy(base_model)
    for name, tensor in fused.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._parameters.get(attribute)
        if current is None or tuple(current.shape) != tuple(tensor.shape):
            shape = None if current is None else tuple(current.shape)
            raise ValueError(
                f"cannot place fused tensor {name} of shape {tuple(tensor.shape)}: base has {shape}"
            )
        module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    return model
