"""Activation functions of MLPs, by the names checkpoints use (`hidden_act`, `activation_function`)."""

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.errors import InvalidParameterError


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,  # GPT-2 and Gemma: tanh approximation
    "relu": F.relu,
}


def _lookup(name: str):
    if name not in ACTIVATIONS:
        raise InvalidParameterError("hidden_act", f"unsupported activation {name!r} "
                                                  f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class Activation(nn.Module):
    """An element-wise activation chosen by name."""

    def __init__(self, name: str):
        super().__init__()
        self.fn = _lookup(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class GatedActivation(nn.Module):
    """Gated MLP activation: the input holds [gate | up] along the last dim; returns act(gate) * up
    (SwiGLU for silu, GeGLU for the GELUs)."""

    def __init__(self, name: str = "silu"):
        super().__init__()
        self.fn = _lookup(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.fn(gate) * up


class SiluAndMul(GatedActivation):
    """SwiGLU: the input holds [gate | up] along the last dim; returns silu(gate) * up."""

    def __init__(self):
        super().__init__("silu")
