"""STAWM's parts and every head, on every preset (shrunk where the real one is slow on a CPU)."""

import math

import pytest
import torch

from stawm import PRESETS, STAWM, preset
from stawm.glimpse import IDENTITY, glimpse, invert_affine
from stawm.heads import gaussian_kl


def shrunk(name):
    """The preset's architecture with small widths and two glimpses, so every head runs in a second."""
    return preset(name, memory_size=16, hidden_size=32, glimpses=2)


@pytest.mark.parametrize("align_corners", [True, False])
def test_identity_glimpse_of_image_size_returns_the_image(align_corners):
    image = torch.rand(2, 3, 28, 28)
    A = torch.tensor(IDENTITY).view(1, 2, 3).expand(2, 2, 3)
    torch.testing.assert_close(glimpse(image, A, 28, align_corners), image)


def test_fresh_emitter_is_the_identity():
    model = STAWM(preset("tiny", glimpse_size=28, glimpse_channels=(4,), glimpse_strides=(1,)))
    images = torch.rand(2, 1, 28, 28)
    poses = model(images).poses  # (B, N, 2, 3)
    torch.testing.assert_close(poses, torch.tensor(IDENTITY).view(1, 1, 2, 3).expand_as(poses))


def test_invert_affine_composes_to_identity():
    A = torch.tensor([[[0.5, 0.1, 0.2], [-0.1, 0.4, -0.3]]])
    inv = invert_affine(A)
    full = lambda m: torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]])], dim=1)
    torch.testing.assert_close(full(A) @ full(inv), torch.eye(3).unsqueeze(0))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_head_of_every_preset_has_the_right_shapes(name):
    cfg = shrunk(name)
    model = STAWM(cfg)
    B = 3
    images = torch.rand(B, cfg.channels, cfg.image_size, cfg.image_size)
    out = model(images)
    assert out.poses.shape == (B, 2, 2, 3)
    assert out.memory.shape == (B, 16, 16)
    if cfg.task in ("classify", "sketchpad", "selfsup"):
        assert out.log_probs.shape == (B, cfg.num_classes)
        torch.testing.assert_close(out.log_probs.exp().sum(1), torch.ones(B))
    else:
        assert out.log_probs is None
    if cfg.task in ("draw", "sketchpad"):
        assert out.canvas.shape == (B, cfg.channels, cfg.image_size, cfg.image_size)
        assert out.canvas.min() >= 0 and out.canvas.max() <= 1
        assert out.kl.shape == (B,)
    else:
        assert out.canvas is None
    loss, parts = model.loss(out, images, torch.arange(B) % cfg.num_classes)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    loss.backward()


def test_gaussian_kl_closed_form():
    # -1/2 [(1 + 0 - 1 - 1) + (1 + log 2 - 0 - 2)] = 1 - log(2) / 2
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    assert float(gaussian_kl(mu, logvar)[0]) == pytest.approx(1 - math.log(2) / 2, rel=1e-6)


def test_joint_kl_is_the_sum_over_glimpses():
    mu, logvar = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2))  # Eq. 25: sum over n and k
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)


def test_empty_addition_canvas_is_black():
    cfg = shrunk("mnist-draw-6")
    model = STAWM(cfg)
    blank = model.drawer.finish(model.drawer.start(2, torch.zeros(1)))
    assert float(blank.max()) == pytest.approx(1 / (1 + math.exp(6)), rel=1e-5)  # sigmoid(-6)


def test_selfsup_trains_only_classifier_and_rates():
    model = STAWM(shrunk("mnist-selfsup-6"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("classifier.")} | {
        "memory.delta", "memory.eta", "memory.theta"}
    model.train()
    assert model.classifier.training and not model.context_net.training  # frozen BatchNorm stays put


def test_selfsup_loads_a_drawing_model():
    drawer = STAWM(shrunk("mnist-draw-6").replace(glimpses=2))
    selfsup = STAWM(shrunk("mnist-selfsup-6"))
    selfsup.load_drawing_weights(drawer.state_dict())
    torch.testing.assert_close(selfsup.what.weight, drawer.what.weight)
    with pytest.raises(ValueError, match="does not match"):
        selfsup.load_drawing_weights({"nonsense.weight": torch.zeros(1)})


def test_memory_input_is_nonnegative_and_memory_stays_under_its_bound():
    cfg = shrunk("mnist-class-8")
    with torch.no_grad():
        out = STAWM(cfg).eval()(torch.rand(4, 1, 28, 28))
    assert float(out.memory.min()) >= 0  # e >= 0 and post >= 0 keep W nonnegative from W = 0
    assert float(out.max_w) <= cfg.eta / cfg.delta * 36
