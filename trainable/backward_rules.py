"""Modified backward rules of activations: guided backpropagation and deconvnet, differentiably.

An attribution method of the backprop family is the input gradient with the backward rule of
each activation y = f(x) replaced. With g the gradient arriving at y, the three rules differ only
in which of two gates they apply:

| rule            | backward signal   | forward gate f'(x) | positive-signal gate |
| --------------- | ----------------- | ------------------ | -------------------- |
| gradient        | f'(x) * g         | yes                | no                   |
| guided_backprop | f'(x) * relu(g)   | yes                | yes                  |
| deconvnet       | relu(g)           | no                 | yes                  |

For ReLU, f'(x) = 1[x > 0], which gives exactly Springenberg et al.'s guided backpropagation,
relu(g) * 1[x > 0], and Zeiler & Fergus's deconvnet, relu(g) (the rules of captum's
`GuidedBackprop` and `Deconvolution`). For SiLU/Swish, f(x) = x * sigmoid(x) and
f'(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x))):
- guided: f'(x) * relu(g). The local derivative passed on for positive signals only; it is the
  ReLU rule with the 0/1 gate replaced by the activation's own derivative, so on an
  EfficientNet encoder the map still depends on the forward pass through the SiLUs (with a
  ReLU-only rule, as in captum, pytorch-grad-cam or MONAI, "guided backprop" of a SiLU network
  is exactly the plain gradient: their hooks never touch a SiLU).
- deconvnet: relu(g). Deconvnet ignores the forward input and keeps the positive signal. The
  literal "apply the layer's nonlinearity to the signal" would be silu(g), which is not
  positively homogeneous (silu(c * g) != c * silu(g)), so the map's shape would change with the
  scale of the logits; relu(g) keeps deconvnet's defining properties for any activation.

The rules are written with differentiable torch ops of (g, x), so with `create_graph=True` the
map is differentiable with respect to the weights (double backpropagation). The modified rule
must hold only while the map itself is computed: when a loss on the map is later backpropagated,
it reaches the saved inputs x of the activations, and from there the weights, through the same
forward graph; that path must use the exact derivative. Each graph node therefore asks a shared
switch which rule to apply, and `modified_activations` turns the switch off on exit. (Hook-based
code leaves the rule modified; its parameter gradients were measured 3.6-6.7x wrong on the U-Net.)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainable.forward_swap import Switch, swapped_forwards

RULES = ("gradient", "guided_backprop", "deconvnet")


def _relu_derivative(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _relu6_derivative(x: Tensor) -> Tensor:
    return ((x > 0) & (x < 6)).to(x.dtype)


def _silu_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: its function and its derivative, both differentiable ops."""

    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]


RELU = Activation(F.relu, _relu_derivative)
RELU6 = Activation(F.relu6, _relu6_derivative)
SILU = Activation(F.silu, _silu_derivative)

# Matched by class name: the Swish classes of timm (Swish, SwishMe, SwishJit) and of
# efficientnet_pytorch (Swish, MemoryEfficientSwish) compute x * sigmoid(x) but do not subclass
# nn.SiLU, and importing those packages only to name their classes would make them dependencies.
_SWISH_NAMES = {"Swish", "SwishMe", "SwishJit", "MemoryEfficientSwish"}


def activation_of(module: nn.Module) -> Activation | None:
    """The activation a module computes, or None when it is not one the rules know.

    smp's `efficientnet-b0` encoder uses `nn.SiLU`, `timm-efficientnet-b0` uses timm's `Swish`,
    the U-Net decoder uses `nn.ReLU(inplace=True)`, the `-lite` encoders `nn.ReLU6`.
    """
    if isinstance(module, nn.ReLU6):  # before ReLU: ReLU6 subclasses Hardtanh, not ReLU
        return RELU6
    if isinstance(module, nn.ReLU):
        return RELU
    if isinstance(module, nn.SiLU) or type(module).__name__ in _SWISH_NAMES:
        return SILU
    return None


class _RuleActivation(torch.autograd.Function):
    """An activation whose backward applies `rule` while the switch is on, the exact rule after."""

    @staticmethod
    def forward(ctx, x: Tensor, activation: Activation, rule: str, switch: Switch) -> Tensor:
        ctx.save_for_backward(x)
        ctx.activation, ctx.rule, ctx.switch = activation, rule, switch
        return activation.fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        rule = ctx.rule if ctx.switch.on else "gradient"
        if rule == "deconvnet":
            grad_x = F.relu(grad)
        elif rule == "guided_backprop":
            grad_x = ctx.activation.derivative(x) * F.relu(grad)
        else:
            grad_x = ctx.activation.derivative(x) * grad
        return grad_x, None, None, None


@contextmanager
def modified_activations(model: nn.Module, rule: str):
    """Give every known activation of `model` the backward `rule` while the context is open.

    The activations' forwards are replaced by out-of-place ones (in-place activations included:
    the rule needs the input they would overwrite) and restored on exit, also after an error.
    On exit the nodes already in the graph switch to the exact derivative, so a loss on a map
    computed inside the context backpropagates exactly.

    Args:
        model: the network; its other modules are untouched.
        rule: one of `RULES`.
    """
    if rule not in RULES:
        raise KeyError(f"unknown backward rule {rule!r}; valid: {', '.join(RULES)}")

    def rule_forward(module: nn.Module, switch: Switch) -> Callable | None:
        activation = activation_of(module)
        return None if activation is None else _rule_forward(activation, rule, switch)

    with swapped_forwards(model, rule_forward):
        yield


def _rule_forward(activation: Activation, rule: str, switch: Switch) -> Callable:
    def forward(x: Tensor) -> Tensor:
        return _RuleActivation.apply(x, activation, rule, switch)

    return forward
