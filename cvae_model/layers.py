"""Building blocks: weight initializers and a masked linear layer."""

from __future__ import annotations

import math

from torch import Tensor, nn

from cvae_model.config import Initializer

__all__ = ["BIAS_INIT", "MaskedLinear", "dense", "init_linear", "masked_linear_with_init"]

BIAS_INIT = 0.001
"""Every bias starts at this constant, as in the original."""

_TRUNCATED_NORMAL_STD = 0.05  # TF2's tf.initializers.TruncatedNormal() default
# lecun_normal draws from a normal truncated at 2 std whose std is then corrected by this factor
# (the std of a unit normal truncated to [-2, 2]), as Keras/TF do.
_TRUNCATION_CORRECTION = 0.87962566103423978


def init_linear(layer: nn.Linear, initializer: Initializer) -> None:
    """Initialize a linear layer's weight with the named scheme and its bias with ``BIAS_INIT``."""
    weight = layer.weight
    if initializer == "orthogonal":
        nn.init.orthogonal_(weight)
    elif initializer == "truncated_normal":
        nn.init.trunc_normal_(weight, std=_TRUNCATED_NORMAL_STD, a=-2 * _TRUNCATED_NORMAL_STD,
                              b=2 * _TRUNCATED_NORMAL_STD)
    elif initializer == "lecun_normal":
        fan_in = weight.shape[1]
        std = math.sqrt(1.0 / fan_in) / _TRUNCATION_CORRECTION
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    else:  # configs validate this; reaching here is a programming error
        raise AssertionError(f"unknown initializer {initializer!r}")
    if layer.bias is not None:
        nn.init.constant_(layer.bias, BIAS_INIT)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (a registered buffer).

    Masked entries receive zero gradient and never contribute, so connectivity is exact.
    """

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


def masked_linear_with_init(mask: Tensor, initializer: Initializer) -> MaskedLinear:
    layer = MaskedLinear(mask)
    init_linear(layer, initializer)
    return layer


def dense(in_features: int, out_features: int, initializer: Initializer) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    init_linear(layer, initializer)
    return layer
