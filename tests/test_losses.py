"""Loss sets: orderings and invariances on hand-made maps, and where each term sends gradient."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import smp_unet
from hypothesis import given, settings
from hypothesis import strategies as st

from trainable.generators import saliency
from trainable.loss_sets import LOSS_SETS
from trainable.losses import (
    classification,
    consistency,
    loss_terms,
    map_alignment,
    mask_loss,
    reference_gaze_target,
    rrr_penalty,
)

SIZE = 32


def blob(cx: float, cy: float, sigma: float = 0.15, batch: int = 2) -> torch.Tensor:
    """A Gaussian blob centred at (cx, cy) in [-1, 1]^2, [B, 1, SIZE, SIZE]."""
    axis = torch.linspace(-1, 1, SIZE)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    g = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return g.expand(batch, 1, SIZE, SIZE).clone()


GAZE = blob(0.3, -0.2)


def test_classification_is_bce_on_one_hot_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.eye(3)[[0, 1]]
    expected = -(labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(classification(logits, labels), expected)


def test_aligned_map_scores_better_than_misaligned():
    aligned = map_alignment(blob(0.25, -0.2), GAZE)
    near = map_alignment(blob(0.0, 0.0), GAZE)
    far = map_alignment(blob(-0.7, 0.7), GAZE)
    assert aligned < near < far


def test_zero_when_the_map_equals_the_target():
    assert map_alignment(GAZE, GAZE) < 1e-5
    assert map_alignment(-3 * GAZE, GAZE) < 1e-5  # a signed map counts by magnitude


@pytest.mark.parametrize("scale", [1e-16, 1e-3, 1.0, 1e3, 1e6])
def test_scale_invariant_also_for_tiny_maps(scale):
    pred = blob(0.0, 0.0) + 0.3 * blob(0.3, -0.2)
    torch.testing.assert_close(map_alignment(scale * pred, GAZE), map_alignment(pred, GAZE),
                               rtol=1e-4, atol=1e-6)


def test_shift_invariant_for_a_probability_mask():
    mask = torch.sigmoid(torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(map_alignment(0.5 * mask + 0.25, GAZE), map_alignment(mask, GAZE),
                               rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-12, 6),
       channels=st.sampled_from([1, 3]))
def test_bounded_and_finite_for_any_map(seed, log_scale, channels):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2, channels, 8, 8, generator=g) * 10.0**log_scale
    target = torch.rand(2, 1, 8, 8, generator=g)
    loss = map_alignment(pred, target)
    assert torch.isfinite(loss) and 0 <= loss <= 2


def test_anticorrelated_maps_approach_two():
    assert map_alignment(1 - GAZE, GAZE) > 1.95


def test_constant_and_zero_maps_give_one_with_finite_gradients():
    for value in (0.0, 0.7):
        pred = torch.full((2, 1, SIZE, SIZE), value, requires_grad=True)
        loss = map_alignment(pred, GAZE)
        (grad,) = torch.autograd.grad(loss, pred)
        assert loss.item() == pytest.approx(1.0)
        assert torch.isfinite(grad).all()


def test_finite_and_close_to_fp32_under_bf16():
    pred = blob(0.1, -0.1) + 0.2 * blob(-0.5, 0.5)
    reference = map_alignment(pred, GAZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = map_alignment(pred.bfloat16(), GAZE.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - reference.item()) < 0.01


def test_gradient_is_spread_over_the_map_not_on_its_extremes():
    """Min-max + BCE put half its gradient on two pixels; CC must not."""
    pred = (blob(0.0, 0.0) + 0.1 * torch.rand(2, 1, SIZE, SIZE)).requires_grad_()
    (grad,) = torch.autograd.grad(map_alignment(pred, GAZE), pred)
    share_of_top_two = grad.abs().flatten(1).topk(2).values.sum(1) / grad.abs().flatten(1).sum(1)
    assert (share_of_top_two < 0.05).all(), share_of_top_two


def test_map_alignment_names_the_shapes_that_differ():
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\)"):
        map_alignment(torch.rand(2, 1, 16, 16), GAZE)


def test_rrr_penalty_is_the_fraction_of_gradient_energy_outside_the_gaze():
    inside = blob(0.3, -0.2, sigma=0.05)  # where gaze is far above 0.1 of its maximum
    outside = blob(-0.7, 0.7, sigma=0.05)
    assert rrr_penalty(inside, GAZE) < 1e-3
    assert rrr_penalty(outside, GAZE) > 0.999
    half = rrr_penalty(inside + outside, GAZE)
    assert 0.45 < half < 0.55
    for scale in (1e-20, 1e4):  # scale-invariant, and tiny gradients do not underflow
        torch.testing.assert_close(rrr_penalty(scale * (inside + outside), GAZE), half)
    assert rrr_penalty(outside, torch.zeros_like(GAZE)) == 0  # no gaze: nothing to leave


def test_consistency_is_the_mean_jensen_shannon_divergence_of_the_class_bernoullis():
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    a, b = (torch.as_tensor(rng.normal(0, 3, (5, 3))) for _ in range(2))
    a[0, 0], b[0, 0] = 40.0, -40.0  # saturated and opposite: the bound, finite
    p, q = torch.sigmoid(a).numpy(), torch.sigmoid(b).numpy()
    want = np.mean([jensenshannon([p[i, k], 1 - p[i, k]], [q[i, k], 1 - q[i, k]]) ** 2
                    for i in range(5) for k in range(3)])
    got = consistency(a.requires_grad_(), b.requires_grad_())
    assert float(got.detach()) == pytest.approx(want, rel=1e-9)
    with torch.no_grad():
        assert float(consistency(a, a)) == pytest.approx(0.0, abs=1e-12)
        assert float(consistency(a, b)) == pytest.approx(float(consistency(b, a)), rel=1e-12)
    got.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0  # both views are pulled


def test_loss_sets_have_the_named_terms_and_totals():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 3, generator=g), torch.eye(3)[[0, 2]]
    inputs = {"mask_logits": torch.randn(2, 1, SIZE, SIZE, generator=g),
                  "gen_map": torch.randn(2, 1, SIZE, SIZE, generator=g), "gaze": GAZE,
                  "input_grad": torch.randn(2, 1, SIZE, SIZE, generator=g)}
    weight, r, lam = 0.7, 0.3, 5.0
    expected_totals = {
        "classifier": lambda t: t["cls"],
        "baseline": lambda t: t["cls"] + weight * t["mask_gaze"],
        "set1": lambda t: t["cls"] + weight * t["map_gaze"],
        "set2": lambda t: t["cls"] + weight * t["mask_map"],
        "set3": lambda t: t["cls"] + weight * (r * t["mask_gaze"] + (1 - r) * t["map_gaze"]),
        "rrr": lambda t: t["cls"] + lam * t["rrr"],
        "rrr_abs": lambda t: t["cls"] + lam * t["rrr_abs"],
    }
    assert set(expected_totals) == set(LOSS_SETS)
    for loss_set, total in expected_totals.items():
        terms = loss_terms(loss_set, logits=logits, labels=labels, r=r, weight=weight,
                           rrr_lambda=lam, **inputs)
        assert set(terms) == {"cls", "total", *LOSS_SETS[loss_set].terms}
        torch.testing.assert_close(terms["total"], total(terms))
    mask = torch.sigmoid(inputs["mask_logits"])
    terms = loss_terms("set3", logits=logits, labels=labels, **inputs)
    torch.testing.assert_close(terms["mask_gaze"], map_alignment(mask, GAZE))
    torch.testing.assert_close(terms["map_gaze"], map_alignment(inputs["gen_map"], GAZE))


def test_loss_terms_name_what_is_missing_or_unknown():
    logits, labels = torch.zeros(2, 3), torch.eye(3)[[0, 1]]
    with pytest.raises(ValueError, match="'set1' needs gen_map="):
        loss_terms("set1", logits=logits, labels=labels, gaze=GAZE)
    with pytest.raises(KeyError, match="classifier, baseline, set1, set2, set3, rrr"):
        loss_terms("set4", logits=logits, labels=labels)


def _encoder_grads(model, loss):
    params = list(model.encoder.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g for g in grads if g is not None and g.abs().max() > 0]


@pytest.mark.parametrize("generator", ["guided_backprop", "deconvnet"])
def test_set1_term_trains_the_encoder_and_a_detached_map_would_not(generator):
    model = smp_unet()
    x = torch.rand(2, 1, SIZE, SIZE)
    labels = torch.eye(3)[[0, 2]]
    _, logits = model(x)
    for create_graph, moves in ((True, True), (False, False)):
        gen_map = saliency(model, x, labels.argmax(1), generator, create_graph=create_graph)
        term = loss_terms("set1", logits=logits, labels=labels, gen_map=gen_map,
                          gaze=GAZE)["map_gaze"]
        if moves:
            moved = _encoder_grads(model, term)
            n_encoder = len(list(model.encoder.parameters()))
            assert len(moved) > n_encoder // 2, (len(moved), n_encoder)
        else:
            assert not term.requires_grad  # a constant map: nothing to train


def test_set2_sends_no_gradient_through_the_generator_map():
    model = smp_unet()
    x = torch.rand(2, 1, SIZE, SIZE)
    labels = torch.eye(3)[[0, 2]]
    mask, logits = model(x)
    gen_map = saliency(model, x, labels.argmax(1), "guided_backprop", create_graph=True)
    total = loss_terms("set2", logits=logits, labels=labels, mask_logits=mask,
                       gen_map=gen_map)["total"]
    grad_map, grad_mask = torch.autograd.grad(total, [gen_map, mask], allow_unused=True)
    assert grad_map is None
    assert grad_mask.abs().max() > 0


# --- the paper's recipe: BCE mask loss, the reference gaze target, maps of every output ---


def numpy_bce_with_logits(logits, target) -> float:
    """-[t log sigmoid(m) + (1 - t) log(1 - sigmoid(m))], mean, in float64."""
    m, t = np.asarray(logits, np.float64), np.asarray(target, np.float64)
    p = 1 / (1 + np.exp(-m))
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def test_bce_mask_loss_is_bce_with_logits_against_the_heatmap():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 0.5]]]])  # [1, 1, 2, 2]
    gaze = torch.tensor([[[[0.3, 1.0], [0.0, 0.6]]]])
    expected = numpy_bce_with_logits(logits, gaze)
    got = mask_loss(logits, gaze, "bce")
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(got) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, gaze)), abs=1e-6)
    # logits of 0 cost log 2 against any target
    assert float(mask_loss(torch.zeros(1, 1, 2, 2), gaze, "bce")) == pytest.approx(np.log(2))
    labels = torch.eye(3)[[1]]
    terms = loss_terms("baseline", logits=torch.zeros(1, 3), labels=labels, mask_logits=logits,
                       gaze=gaze, weight=0.5, seg_loss="bce")
    assert float(terms["mask_gaze"]) == pytest.approx(expected, abs=1e-6)
    assert float(terms["total"]) == pytest.approx(np.log(2) + 0.5 * expected, abs=1e-6)
    # set2: the generator's map as the target, scaled to |G| / max |G| in [0, 1]
    gen_map = torch.tensor([[[[-2.0, 4.0], [1.0, 0.0]]]])
    terms = loss_terms("set2", logits=torch.zeros(1, 3), labels=labels, mask_logits=logits,
                       gen_map=gen_map, seg_loss="bce")
    expected = numpy_bce_with_logits(logits, [[[[0.5, 1.0], [0.25, 0.0]]]])
    assert float(terms["mask_map"]) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="seg_loss"):
        mask_loss(logits, gaze, "mse")


def test_reference_target_is_the_authors_viridis_png_in_grey():
    """Their pipeline: plt.imsave (viridis PNG), PIL open -> RGB -> L, / 255."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    heatmap = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    heatmap[0, :3] = (0.0, 1.0, 0.5)
    png = io.BytesIO()
    plt.imsave(png, heatmap, format="png")
    png.seek(0)
    theirs = np.asarray(Image.open(png).convert("RGB").convert("L"), np.float64) / 255
    ours = reference_gaze_target(torch.from_numpy(heatmap)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    # by hand: viridis(0) = (68, 1, 84) and viridis(1) = (253, 231, 36) as bytes; PIL's grey
    # is (19595 R + 38470 G + 7471 B + 32768) >> 16, i.e. 30 and 215
    assert ours[0, 0] * 255 == pytest.approx(30) and ours[0, 1] * 255 == pytest.approx(215)


def test_the_loop_renders_the_reference_target_where_the_set_uses_it():
    from trainable.config import TrialConfig
    from trainable.loop import compute_terms

    class Unet(torch.nn.Module):  # a fixed mask of logits 0.5 and zero class logits
        def forward(self, x):
            return torch.full_like(x[:, :1], 0.5), torch.zeros(len(x), 3)

    x, y, gaze = torch.rand(2, 1, 4, 4), torch.eye(3)[[0, 2]], torch.rand(2, 1, 4, 4)
    rendered = reference_gaze_target(gaze)
    for target, expected_target in (("heatmap", gaze), ("reference", rendered)):
        cfg = TrialConfig.from_dict({"loss_set": "baseline", "seg_loss": "bce",
                                     "gaze_target": target})
        term = compute_terms(Unet(), x, y, gaze, cfg)["mask_gaze"]
        expected = numpy_bce_with_logits(np.full((2, 1, 4, 4), 0.5), expected_target)
        assert float(term) == pytest.approx(expected, abs=1e-6)


class Linear(torch.nn.Module):
    """logits = W x + b: the input gradient of output k is W_k, whatever the image."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = torch.nn.Linear(16, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 16, generator=g))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _cc(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("outputs", ["true_class", "all"])
def test_set1_and_rrr_constrain_the_maps_of_the_chosen_outputs(outputs):
    from trainable.config import TrialConfig
    from trainable.loop import compute_terms

    model = Linear()
    w = model.fc.weight.detach().numpy().reshape(3, 4, 4)
    x, y = torch.rand(2, 1, 4, 4), torch.eye(3)[[0, 2]]
    gaze = torch.rand(2, 1, 4, 4)
    gaze[:, :, :2] = 0  # the top half unlooked-at: rrr's region is the bottom half
    g = gaze[:, 0].numpy()
    classes = {"true_class": lambda b: [(0, 2)[b]], "all": lambda b: [0, 1, 2]}[outputs]
    pairs = [(k, b) for b in range(2) for k in classes(b)]
    expected_set1 = np.mean([1 - _cc(np.abs(w[k]), g[b]) for k, b in pairs])
    outside = g < 0.1 * g.max((1, 2), keepdims=True)
    expected_rrr = np.mean([(w[k] ** 2 * outside[b]).sum() / (w[k] ** 2).sum()
                            for k, b in pairs])
    base = {"generator": "gradient", "map_outputs": outputs}
    set1 = compute_terms(model, x, y, gaze, TrialConfig.from_dict({"loss_set": "set1", **base}))
    rrr = compute_terms(model, x, y, gaze, TrialConfig.from_dict({"loss_set": "rrr", **base}))
    assert float(set1["map_gaze"].detach()) == pytest.approx(expected_set1, abs=1e-5)
    assert float(rrr["rrr"].detach()) == pytest.approx(expected_rrr, abs=1e-5)
    set1["map_gaze"].backward()  # the maps of every output train the weights of every output
    trained = model.fc.weight.grad.abs().sum(1) > 0
    assert trained.tolist() == ([True, False, True] if outputs == "true_class" else [True] * 3)


def test_rrr_abs_is_the_squared_gradient_of_every_output_outside_the_gaze():
    """Ross et al.'s penalty on logits W x: the input gradient of sum_k log sigma(z_k) is
    sum_k (1 - sigma(z_k)) W_k, its energy outside the gaze region summed, averaged over images."""
    from trainable.config import TrialConfig
    from trainable.loop import compute_terms

    model = Linear()
    w = model.fc.weight.detach().numpy().astype(np.float64)  # [3, 16]
    x, y = torch.rand(2, 1, 4, 4), torch.eye(3)[[0, 2]]
    gaze = torch.rand(2, 1, 4, 4)
    gaze[:, :, :2] = 0
    g = gaze[:, 0].numpy()
    outside = (g < 0.1 * g.max((1, 2), keepdims=True)).reshape(2, 16)
    z = x.flatten(1).numpy() @ w.T + model.fc.bias.detach().numpy()
    grad = (1 - 1 / (1 + np.exp(-z))) @ w  # [2, 16]
    expected = np.mean([(grad[b] ** 2 * outside[b]).sum() for b in range(2)])
    cfg = TrialConfig.from_dict({"loss_set": "rrr_abs", "rrr_lambda": 3.0})
    terms = compute_terms(model, x, y, gaze, cfg, rrr_scale=0.5)
    assert float(terms["rrr_abs"].detach()) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(terms["total"], terms["cls"] + 3.0 * 0.5 * terms["rrr_abs"])
    terms["total"].backward()  # through the input gradient into the weights
    assert model.fc.weight.grad.abs().sum() > 0


def test_rrr_abs_cannot_be_saturated_away():
    """Logits pushed far from zero (what escaped the eval-mode map pass): the negative
    classes' log-probabilities keep their gradient, so the penalty does not vanish, and an
    image whose gradient lies inside the gaze region pays nothing however large it is."""
    from trainable.config import TrialConfig
    from trainable.loop import compute_terms

    model = Linear()
    with torch.no_grad():
        model.fc.weight.mul_(1e3)
    x, y = torch.rand(2, 1, 4, 4), torch.eye(3)[[0, 2]]
    gaze = torch.ones(2, 1, 4, 4)
    gaze[:, :, :2] = 0
    cfg = TrialConfig.from_dict({"loss_set": "rrr_abs"})
    saturated = compute_terms(model, x, y, gaze, cfg)["rrr_abs"]
    assert float(saturated.detach()) > 1.0
    with torch.no_grad():
        model.fc.weight.view(3, 4, 4)[:, :2] = 0  # no gradient outside the region
    assert float(compute_terms(model, x, y, gaze, cfg)["rrr_abs"].detach()) == 0.0
