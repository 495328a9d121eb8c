"""Saliency generators: captum's rules on ReLU nets, exact double backprop, model left as found."""

import pytest
import torch
import torch.nn.functional as F
from helpers import METHODS, images, mixed_net, smp_unet
from torch import nn

from trainable.backward_rules import activation_of
from trainable.generators import saliency


def relu_net(inplace: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(inplace),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3),
    )


TARGET = torch.tensor([0, 2, 1])


def test_unknown_method_lists_valid_names():
    with pytest.raises(KeyError, match="guided_backprop, deconvnet, gradient, gradcam"):
        saliency(relu_net(), images(dtype=torch.float32), TARGET, "lrp")


@pytest.mark.parametrize("method, captum_name, kwargs", [
    ("guided_backprop", "GuidedBackprop", {}),
    ("deconvnet", "Deconvolution", {}),
    ("gradient", "Saliency", {"abs": False}),
])
def test_relu_network_equals_captum(method, captum_name, kwargs):
    import captum.attr

    torch.manual_seed(0)
    net = relu_net()
    x = images(dtype=torch.float32)
    ours = saliency(net, x, TARGET, method)
    with pytest.warns(UserWarning):  # captum's notes on requires_grad and its ReLU hooks
        theirs = getattr(captum.attr, captum_name)(net).attribute(x, target=TARGET, **kwargs)
    assert ours.abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_silu_rules_follow_their_definition():
    """model(x) = v . silu(x): guided silu'(x) relu(v), deconvnet relu(v), gradient silu'(x) v."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.SiLU(), nn.Flatten(), nn.Linear(16, 1, bias=False)).double()
    x = images(batch=2, size=4)
    v = net[2].weight.view(1, 1, 4, 4)
    s = torch.sigmoid(x)
    silu_slope = s * (1 + x * (1 - s))
    target = torch.zeros(2, dtype=torch.long)
    expected = {
        "guided_backprop": silu_slope * F.relu(v),
        "deconvnet": F.relu(v).expand_as(x),
        "gradient": silu_slope * v,
    }
    for method, value in expected.items():
        torch.testing.assert_close(saliency(net, x, target, method), value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("encoder", ["efficientnet-b0", "timm-efficientnet-b0"])
def test_every_activation_of_the_encoders_gets_a_rule(encoder):
    model = smp_unet(encoder)
    names = ("relu", "silu", "swish")
    activations = [m for m in model.modules() if not list(m.children())
                   and any(n in type(m).__name__.lower() for n in names)]
    assert activations, "the encoder should contain activations"
    assert all(activation_of(m) is not None for m in activations), {
        type(m).__name__ for m in activations if activation_of(m) is None
    }
    x = torch.rand(2, 1, 64, 64)
    target = torch.tensor([0, 1])
    guided = saliency(model, x, target, "guided_backprop")
    plain = saliency(model, x, target, "gradient")
    # Where the SiLU rule is missing (captum, MONAI...), guided backprop equals the gradient.
    assert not torch.allclose(guided, plain, rtol=0.1, atol=0)


def _map_loss(net, x, method):
    gaze = torch.linspace(0, 1, x[0].numel(), dtype=x.dtype).view(x.shape[1:])
    target = torch.tensor([0, 2, 1])
    s = saliency(net, x, target, method, create_graph=True)
    return (s * gaze).sum() + 0.5 * s.square().sum()


@pytest.mark.parametrize("method", METHODS)
def test_weight_gradient_of_a_loss_on_the_map_equals_finite_differences(method):
    net = mixed_net()
    x = images()
    params = [p for p in net.parameters()]
    grads = torch.autograd.grad(_map_loss(net, x, method), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    g = torch.Generator().manual_seed(2)
    analytic, numeric = [], []
    eps = 1e-6
    with torch.no_grad():
        for p, grad in zip(params, grads):  # one random direction per parameter tensor
            v = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p += eps * v
            up = _map_loss(net, x, method)
            p -= 2 * eps * v
            down = _map_loss(net, x, method)
            p += eps * v
            numeric.append(((up - down) / (2 * eps)).item())
            analytic.append((grad * v).sum().item())
    analytic = torch.tensor(analytic, dtype=torch.float64)
    numeric = torch.tensor(numeric, dtype=torch.float64)
    assert analytic.abs().max() > 1e-3
    error = (analytic - numeric).norm() / analytic.norm()
    assert error < 1e-4, (method, error.item(), analytic, numeric)


@pytest.mark.parametrize("method", METHODS)
def test_map_of_an_image_does_not_depend_on_its_batch(method):
    net = mixed_net()  # in train mode: batch statistics would couple the images
    x = images(batch=4)
    target = torch.tensor([0, 1, 2, 1])
    together = saliency(net, x, target, method)
    for i in range(4):
        alone = saliency(net, x[i:i + 1], target[i:i + 1], method)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-10, atol=1e-12)


def _snapshot(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "forwards": [m.__dict__.get("forward") for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [(b, b.clone()) for b in model.buffers()],
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("modes", "requires_grad"):
        assert before[key] == after[key], key
    for key in ("forwards", "grads"):
        assert all(a is b for a, b in zip(before[key], after[key])), key
    assert before["hooks"] == after["hooks"]
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    for (buffer, value), (buffer_after, _) in zip(before["buffers"], after["buffers"]):
        assert buffer is buffer_after and torch.equal(buffer, value)


def _odd_model() -> nn.Module:
    """Mixed modes, a frozen tensor, a user's hook and forward: all must survive a map."""
    net = mixed_net()
    net.depthwise.eval()
    net.stem[0].bias.requires_grad_(False)
    net.last.register_forward_hook(lambda module, inputs, output: None)
    for module in (net.last[1], net.depthwise[0]):  # instance forwards, as wrappers leave them
        module.forward = module.forward
    return net


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_as_found(method, create_graph):
    net = _odd_model()
    before = _snapshot(net)
    s = saliency(net, images(), TARGET, method, create_graph=create_graph)
    assert s.requires_grad == create_graph
    _assert_same(before, _snapshot(net))


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_as_found_after_an_error(method):
    net = _odd_model()
    before = _snapshot(net)
    with pytest.raises(RuntimeError):  # class 7 of 3: raised after the map pass's forward
        saliency(net, images(), torch.tensor([0, 7, 1]), method, create_graph=True)
    _assert_same(before, _snapshot(net))
    with pytest.raises(RuntimeError):  # a wrong image size: raised in the middle of the forward
        saliency(net, torch.randn(3, 2, 12, 12, dtype=torch.float64), TARGET, method)
    _assert_same(before, _snapshot(net))


def test_smp_unet_is_left_as_found():
    model = smp_unet()
    model.encoder.eval()
    before = _snapshot(model)
    for method in METHODS:
        saliency(model, torch.rand(2, 1, 32, 32), torch.tensor([0, 1]), method, create_graph=True)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_weight_gradients_immune_to_a_later_train_forward(method):
    """A train-mode forward after the map, before backward, updates BN statistics in place."""
    net, x = mixed_net(), images()
    undisturbed = torch.autograd.grad(_map_loss(net, x, method), list(net.parameters()),
                                      allow_unused=True)
    loss = _map_loss(net, x, method)
    net(3 * x + 1)  # moves running_mean/var in place
    disturbed = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    for a, b in zip(undisturbed, disturbed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_inplace_relu_gives_the_same_map_and_gradients(method):
    torch.manual_seed(0)
    inplace, plain = relu_net(inplace=True).double(), relu_net().double()
    plain.load_state_dict(inplace.state_dict())
    x = images()
    results = []
    for net in (inplace, plain):
        s = saliency(net, x, TARGET, method, create_graph=True)
        results.append((s, torch.autograd.grad(s.square().sum(), list(net.parameters()),
                                               allow_unused=True)))
    (s_in, g_in), (s_out, g_out) = results
    torch.testing.assert_close(s_in, s_out, rtol=0, atol=0)
    for a, b in zip(g_in, g_out):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_gives_a_finite_map_close_to_fp32(method):
    model = smp_unet()
    x = torch.rand(2, 1, 64, 64)
    target = torch.tensor([0, 2])
    reference = saliency(model, x, target, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = saliency(model, x, target, method, create_graph=True)
    assert s.shape == x.shape and torch.isfinite(s).all()
    cc = torch.corrcoef(torch.stack([s.detach().flatten(), reference.flatten()]))[0, 1]
    assert cc > 0.98, cc


def test_gradcam_of_an_smp_unet_is_the_cam_of_its_head():
    model = smp_unet()
    x = torch.rand(2, 1, 64, 64)
    target = torch.tensor([1, 2])
    cam = saliency(model, x, target, "gradcam")
    model.eval()
    with torch.no_grad():
        feature = model.encoder(x)[-1]
        row = model.classification_head[-2].weight[target]  # Linear before the Identity activation
        expected = F.relu((row[:, :, None, None] * feature).sum(1, keepdim=True))
        expected = expected / feature[0, 0].numel()  # the head averages over the positions
    expected = F.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
    model.train()
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)
