"""Grouped (depthwise) convolutions whose double backward is made of ordinary convolutions.

A differentiable saliency map is an input gradient taken with `create_graph=True`; a loss on it
then backpropagates through the convolutions' backward, i.e. runs their double backward. For a
grouped convolution PyTorch's `ConvolutionBackwardBackward0` loops over the groups: on the
EfficientNet encoder, whose depthwise convolutions have one group per channel, one set3 step
launched 9,195 convolutions and took 23x a plain step (measured on an H200).

`GroupedConv2d` is the same convolution with its backward written with first-order ops:
- the input gradient is `conv_transpose2d(grad, weight)`, a grouped convolution that autograd
  differentiates with the ordinary (natively grouped) convolution backward;
- the weight gradient is `convolution_backward` asking for the weight only. A map needs input
  gradients only, so while the map is computed the weight gradient is skipped; it is computed
  when the loss is backpropagated, a first-order pass in which nothing differentiates it again.

`fast_grouped_convs(model)` routes the grouped convolutions of a model through it while the map
is computed, like the activation rules of `trainable.backward_rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from trainable.forward_swap import Switch, swapped_forwards


class GroupedConv2d(torch.autograd.Function):
    """`F.conv2d` with a backward of first-order ops (see the module docstring).

    `switch` (or None: never) is on while only input gradients are asked for.

    Shape:
        x [B, C_in, H, W], weight [C_out, C_in / groups, kH, kW] -> [B, C_out, H', W'].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, switch):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.switch = switch
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # The transposed convolution maps grad back onto the input grid; output_padding
            # restores the rows and columns that the forward's stride dropped.
            output_padding = [
                size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
                for size, out, s, p, d, k in zip(
                    x.shape[2:], grad.shape[2:], stride, padding, dilation, weight.shape[2:]
                )
            ]
            grad_x = F.conv_transpose2d(
                grad, weight, None, stride, padding, output_padding, groups, dilation
            )
        in_map_pass = ctx.switch is not None and ctx.switch.on
        if not in_map_pass and ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [False, True, False],
            )[1]
        if not in_map_pass and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def grouped_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                   switch: Switch | None = None) -> Tensor:
    """`F.conv2d` through `GroupedConv2d` (numeric padding only)."""
    return GroupedConv2d.apply(
        input, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups, switch
    )


class _RouteGroupedConvs(TorchFunctionMode):
    """Sends `F.conv2d` calls with groups > 1 and numeric padding to `GroupedConv2d`.

    A mode, not a call in a replacement forward: encoders pad in their own ways before
    `F.conv2d` (smp's and timm's "same" padding subclasses of nn.Conv2d), and running the
    module's own forward under the mode keeps every one of them exact.
    """

    def __init__(self, switch: Switch) -> None:
        super().__init__()
        self.switch = switch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            call = _conv2d_arguments(*args, **kwargs)
            if call["groups"] > 1 and not isinstance(call["padding"], str):
                return grouped_conv2d(**call, switch=self.switch)
        return func(*args, **kwargs)


def _conv2d_arguments(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return {"input": input, "weight": weight, "bias": bias, "stride": stride, "padding": padding,
                "dilation": dilation, "groups": groups}


def is_grouped_conv(module: nn.Module) -> bool:
    """True for an nn.Conv2d (or subclass) with more than one group, e.g. a depthwise one."""
    return isinstance(module, nn.Conv2d) and module.groups > 1


@contextmanager
def fast_grouped_convs(model: nn.Module):
    """Route the grouped convolutions of `model` through `GroupedConv2d` while open.

    Forwards are swapped on the grouped nn.Conv2d modules only (the rest of the network runs at
    full speed, without a Python mode around every op) and restored on exit, also after an error.
    Inside the context only input gradients may be asked for (`torch.autograd.grad` with respect
    to the input or a feature, as the generators do); on exit the graph nodes compute weight
    gradients too.
    """

    def routed_forward(module: nn.Module, switch: Switch) -> Callable | None:
        # While the switch is on, only input gradients are asked for.
        return _routed_forward(module.forward, switch) if is_grouped_conv(module) else None

    with swapped_forwards(model, routed_forward):
        yield


def _routed_forward(forward: Callable, switch: Switch) -> Callable:
    def routed(*args, **kwargs):
        with _RouteGroupedConvs(switch):
            return forward(*args, **kwargs)

    return routed
