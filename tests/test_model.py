"""STAWM's parts and every head, on every preset (shrunk where the real one is slow on a CPU)."""

import math

import pytest
import torch

from stawm import PRESETS, STAWM, Output, preset
from stawm.model.glimpse import IDENTITY, glimpse, invert_affine
from stawm.model.heads import Query, gaussian_kl, relaxed_bernoulli
from stawm.model.networks import MobileNetGlimpse, TransposeCNN, context_net, glimpse_conv_net, sketch_side


def shrunk(name, authors_code=False):
    """The preset's architecture with small widths and two glimpses, so every head runs in a second."""
    return preset(name, authors_code=authors_code, memory_size=16, hidden_size=32, glimpses=2)


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


@pytest.mark.parametrize("authors_code", [False, True])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_head_of_every_preset_has_the_right_shapes(name, authors_code):
    cfg = shrunk(name, authors_code)
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
    model = STAWM(cfg).eval()
    reads = []  # a classifier reads once, at the terminal state: (log_probs, W q before sigma)
    model.classifier.register_forward_hook(lambda module, args, out: reads.append(out[1]))
    with torch.no_grad():
        out = model(torch.rand(4, 1, 28, 28))
    assert float(out.memory.min()) >= 0  # e >= 0 and post >= 0 keep W nonnegative from W = 0
    assert float(out.max_abs_w) <= cfg.eta / cfg.delta * 36
    (projected,) = reads  # ReLU6 reads 0 at or below 0 and 6 at or above 6
    assert float(out.readout_dead) == pytest.approx(float((projected <= 0).float().mean()))
    assert float(out.readout_saturated) == pytest.approx(float((projected >= 6).float().mean()))


# --- sizes and parameter counts, worked out by hand from Appendix D and the authors' layer lists ------------

# (preset, authors_code) -> (context features, glimpse features, sketch side or None). By hand:
# MNIST context: 28 -> 13 -> 6 -> 2 (3x3, stride 2, unpadded) x 256 filters = 1024; CIFAR-10: 32 -> 15 -> 7 -> 3,
# x 256 = 2304; CelebA: 64 -> 32 -> 16 -> 8 -> 4 (4x4, stride 2, padding 1) x 64 = 1024.
# Glimpse CNNs: 8 -> 6 -> 2 (stride 1, then 2) x 128 = 512; 28 -> 13 -> 6 -> 2 x 256 = 1024; 4 -> 2 x 128 = 512;
# 6 -> 4 x 128 = 2048; the sketchpad's "same as 6 x 6 drawing" CNN on 8 x 8: 8 -> 6 x 128 = 4608;
# CIFAR 12 -> 10 -> 4 -> 2 x 256 = 1024, 16 -> 14 -> 6 -> 4 x 256 = 4096; CelebA 32 -> 33 (padding 2) -> 16 -> 8 -> 4
# x 64 = 1024 (the bug this table guards: unpadded, it shrank to 64 features); tiny: 28 -> 13 -> 6 x 16 = 576,
# 8 -> 6 -> 2 x 16 = 64; cpu-small: 28 -> 13 -> 6 -> 2 x 64 = 256, 8 -> 6 -> 2 x 32 = 128.
# Sketches: the exact mirror draws S_g x S_g; the authors' draw-8 decoder runs stride 1 first: 2 -> 4 -> 10 (output
# padding 1); their CelebA decoder has no output padding: 4 -> 8 -> 16 -> 32 -> 31 (stride 1, padding 2).
NETWORK_SIZES = {
    ("mnist-class-8", False): (1024, 512, None), ("mnist-class-8", True): (1024, 512, None),
    ("mnist-class-28", False): (1024, 1024, None), ("mnist-class-28", True): (1024, 1024, None),
    ("mnist-draw-4", False): (1024, 512, 4), ("mnist-draw-4", True): (1024, 512, 4),
    ("mnist-draw-6", False): (1024, 2048, 6), ("mnist-draw-6", True): (1024, 2048, 6),
    ("mnist-draw-8", False): (1024, 512, 8), ("mnist-draw-8", True): (1024, 512, 10),
    ("mnist-selfsup-6", False): (1024, 2048, 6), ("mnist-selfsup-6", True): (1024, 2048, 6),
    ("mnist-sketchpad", False): (1024, 4608, 8), ("mnist-sketchpad", True): (1024, 512, 10),
    ("cifar-class-mobilenetv2", False): (2304, 1280, None), ("cifar-class-mobilenetv2", True): (2304, 1280, None),
    ("cifar-draw-12", False): (2304, 1024, 12), ("cifar-draw-12", True): (2304, 1024, 12),
    ("cifar-draw-16", False): (2304, 4096, 16), ("cifar-draw-16", True): (2304, 4096, 16),
    ("celeba-draw-32", False): (1024, 1024, 32), ("celeba-draw-32", True): (1024, 1024, 31),
    ("tiny", False): (576, 64, None), ("tiny", True): (576, 64, None),
    ("cpu-small", False): (256, 128, None), ("cpu-small", True): (256, 128, None),
}


def test_the_size_table_covers_every_preset_in_both_modes():
    assert set(NETWORK_SIZES) == {(name, mode) for name in PRESETS for mode in (False, True)}


@pytest.mark.parametrize("name, authors_code", sorted(NETWORK_SIZES))
def test_network_output_sizes(name, authors_code):
    cfg = preset(name, authors_code=authors_code)
    context_features, glimpse_features, sketch = NETWORK_SIZES[name, authors_code]
    with torch.no_grad():  # run each network on one input: the sizes are what comes out, not what was planned
        assert context_net(cfg).eval()(torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size)).shape == (
            1, context_features)
        glimpse_cnn = MobileNetGlimpse(cfg.channels) if cfg.glimpse_cnn == "mobilenetv2" else glimpse_conv_net(cfg)
        assert glimpse_cnn.eval()(torch.zeros(1, cfg.channels, cfg.glimpse_size, cfg.glimpse_size)).shape == (
            1, glimpse_features)
        if sketch is not None:
            decoder = TransposeCNN(cfg, cfg.channels + (cfg.canvas == "bernoulli")).eval()
            assert decoder(torch.zeros(1, glimpse_features)).shape == (
                1, cfg.channels + (cfg.canvas == "bernoulli"), sketch, sketch)
            assert sketch_side(cfg) == sketch


def _conv(c_in, c_out, kernel, batch_norm):
    return kernel * kernel * c_in * c_out + (2 * c_out if batch_norm else c_out)  # BatchNorm's scale + shift, or bias


def _linear(n_in, n_out):
    return n_in * n_out + n_out


def _lstm_cell(n_in, hidden):
    return 4 * hidden * (n_in + hidden) + 8 * hidden  # four gates, two biases each


def _cnn(c_in, channels, kernel, batch_norm):
    return sum(_conv(a, b, kernel, batch_norm) for a, b in zip((c_in, *channels[:-1]), channels))


def trainable_by_hand(cfg, context_features, glimpse_features) -> int:
    """The layer list of Section 3.2 / Appendix D, counted layer by layer (MobileNetV2 aside)."""
    M, Hd, K = cfg.memory_size, cfg.hidden_size, cfg.latent_size
    emitter = _linear(Hd, Hd // 2) + _linear(Hd // 2, 6)
    classifier = _linear(context_features, M) + _linear(M, cfg.num_classes)  # query projection + read-out layer
    rates = 3 if cfg.learnable_rates else 0
    if cfg.task == "selfsup":  # the drawing model is frozen
        return classifier + rates
    total = (_cnn(cfg.channels, cfg.context_channels, cfg.context_kernel, cfg.batch_norm)
             + _linear(context_features, Hd) + 2 * _lstm_cell(Hd, Hd) + emitter
             + _cnn(cfg.channels, cfg.glimpse_channels, cfg.glimpse_kernel, cfg.batch_norm)
             + _linear(glimpse_features, Hd) + _linear(Hd, M) + _linear(6, M) + rates)  # ... what, where, the rates
    if cfg.task in ("classify", "sketchpad"):
        total += classifier
    if cfg.task in ("draw", "sketchpad"):
        sketch_channels = cfg.channels + (cfg.canvas == "bernoulli")
        outs = (sketch_channels, *cfg.glimpse_channels[:-1])  # each transpose conv maps a glimpse layer's output back
        decoder = sum(_conv(c, out, cfg.glimpse_kernel, cfg.batch_norm) for c, out in zip(cfg.glimpse_channels, outs))
        total += (_linear(context_features, M) + _linear(M, 2 * K) + _linear(K, glimpse_features) + decoder
                  + emitter)  # draw query, latent (mu, log var), expansion, transpose CNN, the inverse emitter
    return total


@pytest.mark.parametrize("name, authors_code", sorted(k for k in NETWORK_SIZES if k[0] != "cifar-class-mobilenetv2"))
def test_trainable_parameters_counted_by_hand(name, authors_code):
    cfg = preset(name, authors_code=authors_code)
    model = STAWM(cfg)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == trainable_by_hand(cfg, *NETWORK_SIZES[name, authors_code][:2])


def test_classifier_parameter_counts_match_the_authors_scripts():
    # Their scripts build 6,097,299 and 21,744,531 trainable numbers, of which their Memory's `project`
    # Linear(M, 2M), never called, holds 256 * 512 + 512 = 131,584 and 512 * 1024 + 1024 = 525,312.
    count = lambda name: sum(p.numel() for p in STAWM(preset(name, authors_code=True)).parameters() if p.requires_grad)
    assert count("mnist-class-8") == 6_097_299 - 131_584
    assert count("mnist-class-28") == 21_744_531 - 525_312


# --- the authors' choices, where they change what is computed ---------------------------------------------------


def test_training_query_never_exceeds_six():
    """Dropout before the ReLU6 (its 1/(1-p) scaling included): a query entry is at most 6 in training too."""
    query = Query(context_features=32, memory_size=512, dropout=0.5).train()
    context = torch.rand(64, 32)
    with torch.no_grad():
        query.proj.weight.normal_(0, 3.0)  # pre-activations with a std of about 10: many far above 6
        torch.manual_seed(0)
        q = query(context)
        torch.manual_seed(0)  # the same dropout mask, in the old order: ReLU6 first, then dropout's x2
        old = torch.nn.functional.dropout(torch.nn.functional.relu6(query.proj(context)), 0.5, training=True)
    assert float(q.max()) == 6.0 and float(q.min()) == 0.0
    assert float(old.max()) == 12.0  # what the Appendix A read-out bound, which takes 6, would have missed
    assert 0.1 < float((q == 6).float().mean()) < 0.5  # about half dropped, and many kept ones saturated


def test_queries_of_a_training_forward_pass_stay_within_six():
    cfg = shrunk("mnist-sketchpad")
    model = STAWM(cfg).train()
    seen = []
    for head in (model.classifier.query, model.drawer.query):
        head.proj.weight.data.mul_(100)  # drive the projections far past 6
        head.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    model(torch.rand(8, 1, 28, 28))
    assert len(seen) == 2 and max(float(q.max()) for q in seen) == 6.0


def test_relaxed_mask_is_torch_distributions_own_sample():
    probs = torch.tensor([[0.0, 1e-9, 0.3, 0.5, 0.999, 1.0]]).expand(4, 6)
    torch.manual_seed(7)
    ours = relaxed_bernoulli(probs, 2.0)
    torch.manual_seed(7)
    theirs = torch.distributions.RelaxedBernoulli(torch.tensor(2.0), probs=probs).rsample()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.isfinite(ours).all() and ours.min() > 0 and ours.max() < 1


@pytest.mark.parametrize("z, mask", [(True, True), (False, True), (True, False), (False, False)])
def test_eval_mode_samples_z_and_the_mask_each_only_when_asked(z, mask):
    """Two eval passes under different seeds: the canvas differs when either is sampled; with z = mu (the
    authors' CelebA) and the mask sampled, the latents of both passes are equal and the canvases are not."""
    cfg = shrunk("celeba-draw-32").replace(image_size=32, glimpse_size=16, eval_sample=z, eval_sample_mask=mask,
                                           glimpse_padding=(2, 1, 1, 1))
    model = STAWM(cfg).eval()
    images = torch.rand(2, 3, 32, 32)
    sketches = []
    model.drawer.expand.register_forward_hook(lambda module, args, out: sketches.append(args[0]))  # z
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(images).canvas
        torch.manual_seed(1)
        second = model(images).canvas
    half = len(sketches) // 2
    assert all(torch.equal(a, b) for a, b in zip(sketches[:half], sketches[half:])) is not z
    assert torch.equal(first, second) is not (z or mask)


def test_the_authors_celeba_script_uses_the_mean_latent_and_a_sampled_mask_in_eval():
    authors = preset("celeba-draw-32", authors_code=True)
    assert (authors.eval_sample, authors.eval_sample_mask) == (False, True)
    assert (preset("celeba-draw-32").eval_sample, preset("celeba-draw-32").eval_sample_mask) == (True, True)


def test_sketchpad_sums_the_nll_over_the_batch():
    cfg = shrunk("mnist-sketchpad")
    model = STAWM(cfg)
    log_probs = torch.log_softmax(torch.randn(5, 10), dim=1)
    labels = torch.tensor([0, 3, 3, 7, 9])
    out = Output(log_probs, None, None, torch.zeros(5, 2, 2, 3), torch.zeros(5, 16, 16), *torch.zeros(4))
    loss, parts = model.loss(out, torch.zeros(5, 1, 28, 28), labels)
    expected = -sum(float(log_probs[i, c]) for i, c in enumerate(labels.tolist()))  # summed, not averaged
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    mean_model = STAWM(cfg.replace(nll_reduction="mean"))
    assert float(mean_model.loss(out, torch.zeros(5, 1, 28, 28), labels)[0]) == pytest.approx(expected / 5, rel=1e-6)


def test_mnist_decoders_end_in_batchnorm_without_bias_and_celeba_in_a_biased_layer():
    mnist = TransposeCNN(preset("mnist-draw-8", authors_code=True), 1)
    last = mnist.layers[-1]
    assert isinstance(last[0], torch.nn.ConvTranspose2d) and last[0].bias is None
    assert isinstance(last[1], torch.nn.BatchNorm2d) and len(last) == 2  # no ReLU after the sketch's logits
    assert [layer[0].stride[0] for layer in mnist.layers] == [1, 2]  # the authors' order: stride 1 first
    assert [layer[0].stride[0] for layer in TransposeCNN(preset("mnist-draw-8"), 1).layers] == [2, 1]  # the mirror
    celeba = TransposeCNN(preset("celeba-draw-32"), 4)
    assert all(layer[0].bias is not None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in layer)
               for layer in celeba.layers)
