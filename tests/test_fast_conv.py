"""The fast path: grouped convolutions with a first-order backward give the same maps, faster."""

import pytest
import torch
import torch.nn.functional as F
from helpers import METHODS, images, mixed_net, smp_unet
from torch import nn
from torch.profiler import profile

from trainable.fast_conv import fast_grouped_convs, grouped_conv2d, is_grouped_conv
from trainable.generators import saliency


@pytest.mark.parametrize("stride, padding, dilation, size, multiplier", [
    (1, 1, 1, 7, 1),
    (2, 1, 1, 7, 1),  # odd input, stride 2: the transposed conv needs output_padding
    (2, 2, 2, 8, 1),
    (3, 0, 1, 10, 2),  # channel multiplier 2, stride 3
])
def test_grouped_conv_and_its_double_backward_are_exact(stride, padding, dilation, size,
                                                        multiplier):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3 * multiplier, 1, 3, 3, generator=g, dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(3 * multiplier, generator=g, dtype=torch.float64, requires_grad=True)
    args = (stride, padding, dilation, 3)
    torch.testing.assert_close(grouped_conv2d(x, w, b, *args), F.conv2d(x, w, b, *args),
                               rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: grouped_conv2d(*t, *args), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *t: grouped_conv2d(*t, *args), (x, w, b))


def test_every_grouped_conv_of_the_encoder_is_routed():
    """smp pads its depthwise convs in a Conv2d subclass; the route must reach all of them."""
    model = smp_unet()
    grouped = [m for m in model.modules() if is_grouped_conv(m)]
    assert len(grouped) == 16  # one depthwise conv per MBConv block of efficientnet-b0
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, out: seen.append(type(out.grad_fn).__name__))
             for m in grouped]
    try:
        with fast_grouped_convs(model):
            model.encoder(torch.rand(2, 1, 32, 32))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == ["GroupedConv2dBackward"] * 16


def _map_and_weight_grads(model, x, target, method, fast):
    s = saliency(model, x, target, method, create_graph=True, fast=fast)
    gaze = torch.linspace(0, 1, x[0, 0].numel(), dtype=x.dtype).view(x.shape[2:])
    loss = (s * gaze).sum() / s.detach().abs().max()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return s, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_the_reference_on_the_unet(method):
    model = smp_unet().double()
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    target = torch.tensor([0, 2])
    s_fast, g_fast = _map_and_weight_grads(model, x, target, method, fast=True)
    s_slow, g_slow = _map_and_weight_grads(model, x, target, method, fast=False)
    assert s_fast.abs().max() > 0
    torch.testing.assert_close(s_fast, s_slow, rtol=1e-10, atol=1e-10 * s_slow.abs().max().item())
    scale = max(g.abs().max().item() for g in g_slow)
    assert scale > 0
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_the_reference_on_a_small_net(method):
    net, x = mixed_net(), images()
    target = torch.tensor([0, 2, 1])
    s_fast, g_fast = _map_and_weight_grads(net, x, target, method, fast=True)
    s_slow, g_slow = _map_and_weight_grads(net, x, target, method, fast=False)
    torch.testing.assert_close(s_fast, s_slow, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_double_backward_launches_far_fewer_convolutions():
    """The reason for the module: PyTorch's double backward of a grouped conv loops over groups."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3))
    x = torch.rand(2, 1, 16, 16)

    def convolutions(fast: bool) -> int:
        with profile() as prof:
            s = saliency(net, x, torch.tensor([0, 1]), "guided_backprop", create_graph=True,
                         fast=fast)
            s.square().sum().backward()
        return sum(e.count for e in prof.key_averages()
                   if e.key in ("aten::convolution", "aten::convolution_backward"))

    slow, fast = convolutions(False), convolutions(True)
    assert slow >= 32, slow  # at least one per group of the depthwise conv (measured: 41)
    assert fast <= 12, fast  # a fixed handful (measured: 10)
