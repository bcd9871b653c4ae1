"""Unit tests of the notebook's definitions: shapes, losses, the diffusion maths, configuration."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def test_model_shapes(nb):
    x = torch.rand(4, 1, 28, 28)
    logits, mu, logvar = nb.VAE(latent=8)(x)
    assert logits.shape == (4, 1, 28, 28) and mu.shape == logvar.shape == (4, 8)
    assert nb.VAE().encoder[1].in_features == 784  # the encoder sees the flattened image

    z = torch.randn(4, 100)
    y = nb.one_hot(torch.tensor([0, 3, 7, 9]))
    assert nb.Generator(100)(z).shape == (4, 1, 28, 28)
    assert nb.Generator(100, 10)(z, y).shape == (4, 1, 28, 28)
    assert nb.Discriminator()(x).shape == (4,)
    assert nb.Discriminator(10)(x, y).shape == (4,)
    assert nb.UNet(32)(x, torch.tensor([0, 10, 500, 999])).shape == (4, 1, 28, 28)
    assert nb.Evaluator()(x).shape == (4, 10)


def test_discriminator_label_maps_equal_stacked_planes(nb):
    """The cGAN's D adds one precomputed map per class instead of convolving ten constant planes:
    the same logits as stacking the planes, and the same gradients for the first layer's weights."""
    torch.manual_seed(0)
    D = nb.Discriminator(10, width=16)
    x, y = torch.randn(6, 1, 28, 28), nb.one_hot(torch.tensor([0, 1, 4, 4, 7, 9]))
    stacked = D.net(torch.cat([x, y[:, :, None, None].expand(-1, -1, 28, 28)], dim=1)).squeeze(1)
    shortcut = D(x, y)
    assert torch.allclose(shortcut, stacked, atol=1e-5)
    grad_stacked = torch.autograd.grad(stacked.sum(), D.net[0].weight)[0]
    grad_shortcut = torch.autograd.grad(shortcut.sum(), D.net[0].weight)[0]
    assert torch.allclose(grad_shortcut, grad_stacked, atol=1e-5)
    assert D.net[0].in_channels == 11  # the assignment's "D sees image + label" still holds


def test_generator_range_and_export_convention(nb):
    images = nb.Generator(100)(torch.randn(8, 100))
    assert images.min() >= -1 and images.max() <= 1  # tanh
    exported = nb.to_uint8(torch.tensor([[-1.0, 0.0, 1.0]]).view(1, 1, 1, 3), signed=True)
    assert exported.dtype == np.uint8 and exported.tolist() == [[[0, 128, 255]]]  # 0 = background
    raw = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    assert nb.to_unit(raw).tolist() == [[[[0.0, 1.0]]]] and nb.to_signed(raw).tolist() == [[[[-1.0, 1.0]]]]


def test_vae_loss_terms(nb):
    x = torch.rand(3, 1, 28, 28)
    logits = torch.randn(3, 1, 28, 28)
    zeros = torch.zeros(3, 5)
    total, bce, kl = nb.vae_loss(logits, x, zeros, zeros)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)  # q(z|x) = N(0, I): no KL
    expected_bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum") / 3
    assert bce.item() == pytest.approx(expected_bce.item(), rel=1e-4)
    mu, logvar = torch.full((1, 2), 1.0), torch.zeros(1, 2)  # KL = 0.5 * sum(mu^2) = 1
    assert nb.vae_loss(logits[:1], x[:1], mu, logvar)[2].item() == pytest.approx(1.0)
    assert total.item() == pytest.approx(bce.item() + kl.item())


def test_cgan_label_smoothing(nb):
    """The discriminator's real target is 0.9: its real-image loss is smallest at D(x) = 0.9."""
    assert nb.Config().cgan_real_target == 0.9
    fake = torch.full((5,), -30.0)  # D is sure these are fake: the fake term is ~0
    logit = torch.full((5,), math.log(0.9 / 0.1), requires_grad=True)
    loss = nb.d_loss(logit, fake, real_target=0.9)
    loss.backward()
    assert logit.grad.abs().max() < 1e-6  # minimum at sigmoid(logit) = 0.9
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    confident = nb.d_loss(torch.full((5,), 30.0), fake, real_target=0.9)
    assert confident.item() > loss.item() + 1  # an over-confident D is penalised
    assert nb.g_loss(torch.full((5,), 30.0)).item() < 1e-6


def test_forward_process_matches_closed_form(nb):
    """Noising step by step, x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps, has the
    distribution q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
    sched = nb.Schedule(T=1000)
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t_stop = 300
    x = x0.clone()
    for t in range(t_stop + 1):
        x = sched.alpha[t].sqrt() * x + sched.beta[t].sqrt() * torch.randn_like(x)
    ab = sched.alpha_bar[t_stop]
    assert x.mean().item() == pytest.approx(0.7 * ab.sqrt().item(), abs=0.02)
    assert x.var().item() == pytest.approx(1 - ab.item(), abs=0.02)
    closed = nb.q_sample(sched, x0, torch.full((20000,), t_stop), torch.randn_like(x0))
    assert closed.mean().item() == pytest.approx(x.mean().item(), abs=0.02)
    assert closed.var().item() == pytest.approx(x.var().item(), abs=0.02)
    # the schedule itself
    assert sched.beta[0].item() == pytest.approx(1e-4) and sched.beta[-1].item() == pytest.approx(0.02)
    assert sched.alpha_bar[-1].item() < 1e-4  # x_T is almost pure noise
    assert torch.allclose(sched.alpha_bar, torch.cumprod(1 - sched.beta.double(), 0).float())


class OracleNoise(torch.nn.Module):
    """The exact noise predictor for a data set holding a single image x0."""

    def __init__(self, sched, x0):
        super().__init__()
        self.sched, self.x0 = sched, x0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t):
        ab = self.sched.alpha_bar[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def test_samplers_recover_the_data_with_an_oracle(nb):
    sched = nb.Schedule(T=100, beta_start=1e-4, beta_end=0.2)
    x0 = torch.linspace(-0.8, 0.8, 784).view(1, 1, 28, 28)
    oracle = OracleNoise(sched, x0)
    gen = torch.Generator().manual_seed(0)
    ddim = nb.sample_ddim(oracle, sched, 3, gen, "cpu", steps=10, progress=False)
    assert torch.allclose(ddim, x0.expand(3, -1, -1, -1), atol=1e-4)
    ancestral = nb.sample_ancestral(oracle, sched, 3, gen, "cpu", progress=False)
    assert (ancestral - x0).abs().max() < 0.05
    noisy = nb.sample_ddim(oracle, sched, 3, gen, "cpu", steps=10, progress=False, eta=1.0)
    assert torch.allclose(noisy, x0.expand(3, -1, -1, -1), atol=1e-4)  # the last jump adds no noise


def test_ddim_noise_is_the_ancestral_noise_on_one_step_jumps(nb):
    sched = nb.Schedule()
    t = torch.arange(1, sched.T)
    sigma = nb.ddim_sigma(sched.alpha_bar[t], sched.alpha_bar[t - 1], eta=1.0)
    assert torch.allclose(sigma ** 2, sched.posterior_var[t], rtol=1e-3)
    assert (nb.ddim_sigma(sched.alpha_bar[t], sched.alpha_bar[t - 1], eta=0.0) == 0).all()
    class HalfNoise(torch.nn.Module):  # a poor denoiser: the final image depends on the noise added on the way
        def forward(self, x_t, t):
            return 0.5 * x_t

    draws = [nb.sample_ddim(HalfNoise(), sched, 2, torch.Generator().manual_seed(0), "cpu", steps=5, progress=False,
                            eta=eta) for eta in (0.0, 0.0, 1.0)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_ddim_timesteps(nb):
    ts = nb.ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert nb.ddim_timesteps(10, 10) == list(range(9, -1, -1))


def test_ddpm_loss_weighting(nb):
    sched = nb.Schedule()
    model = nb.UNet(16)
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    plain = nb.ddpm_loss(model, sched, x0, torch.Generator().manual_seed(1), min_snr=0)
    weighted = nb.ddpm_loss(model, sched, x0, torch.Generator().manual_seed(1), min_snr=5)
    assert 0 < weighted.item() <= plain.item()  # min(SNR, 5) / SNR <= 1
    snr = sched.snr
    assert (torch.clamp(snr, max=5) / snr)[-1].item() == pytest.approx(1.0)  # noisy steps keep weight 1


def test_forward_process_figure_follows_the_schedule(nb):
    """The forward-process figure's x_t: x_0 itself at t = 0, and at t > 0 the signal scaled by sqrt(alpha-bar_t)
    with noise of standard deviation sqrt(1 - alpha-bar_t), the maths' t counting from 1 in the code's arrays."""
    sched = nb.Schedule()
    x0 = torch.rand(64, 1, 28, 28) * 2 - 1
    ts = [0, 1, 100, 500, 1000]
    frames = nb.forward_process(sched, x0, ts, torch.Generator().manual_seed(0))
    assert frames.shape == (len(ts), 64, 1, 28, 28)
    assert torch.equal(frames[0], x0)
    assert nb.alpha_bar_at(sched, 1) == pytest.approx(1 - 1e-4) and nb.alpha_bar_at(sched, 0) == 1.0
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for frame, t in zip(frames[1:], ts[1:]):
        ab = float(sched.alpha_bar[t - 1])
        noise = frame - ab ** 0.5 * x0
        assert noise.std().item() == pytest.approx((1 - ab) ** 0.5, rel=0.02)
        assert torch.allclose(noise, (1 - ab) ** 0.5 * eps, atol=1e-5)  # one eps for every t
    assert frames[-1].std().item() == pytest.approx(1.0, abs=0.02)  # x_T: pure noise


def test_ddim_trace_keeps_the_samples(nb):
    """Recording the reverse process changes nothing it draws; it keeps x_t and the predicted x_0 of each step."""
    sched, model = nb.Schedule(), nb.UNet(16).eval()
    trace = []
    plain = nb.sample_ddim(model, sched, 3, torch.Generator().manual_seed(2), "cpu", 4, False, eta=1.0)
    traced = nb.sample_ddim(model, sched, 3, torch.Generator().manual_seed(2), "cpu", 4, False, eta=1.0, trace=trace)
    assert torch.equal(plain, traced)
    assert [t for t, _, _ in trace] == nb.ddim_timesteps(sched.T, 4)
    assert all(x.shape == x0.shape == (3, 1, 28, 28) and x0.abs().max() <= 1 for _, x, x0 in trace)


def test_epoch_frames_and_their_gif(nb, tmp_path):
    from PIL import Image
    probes = [np.full((40, 28, 28), 20 * e, np.uint8) for e in range(5)]
    frames = nb.epoch_frames(probes, 32)
    assert frames.shape == (5, 32, 28, 28) and (frames[3] == 60).all()
    nb.write_gif(frames, tmp_path / "e.gif", cols=8)
    with Image.open(tmp_path / "e.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (8 * 28 * 2, 4 * 28 * 2)


def test_a_checkpoint_without_a_newer_log_loads_it_as_gaps(nb):
    """A history saved by code that logged fewer losses and no per-epoch seconds: those load as NaN."""
    old = nb.History("ddpm", "loss")
    for _ in range(3):
        old.log(loss=torch.tensor(1.0))
    old.end_epoch()
    saved = old.as_dict()
    del saved["epoch_seconds"]
    new = nb.History("ddpm", "loss", "mse")
    new.load(saved)
    assert len(new.step["mse"]) == 3 and np.isnan(new.epoch["mse"]).all() and np.isnan(new.epoch_seconds).all()
    assert new.epochs_done == 1


def test_attention_matches_torch_sdpa(nb):
    torch.manual_seed(0)
    attention = nb.SelfAttention(64, heads=4).eval()
    x = torch.randn(3, 64, 7, 7)
    q, k, v = attention.qkv(attention.norm(x)).reshape(3, 3, 4, 16, 49).unbind(1)
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    expected = x + attention.proj(out.transpose(-1, -2).reshape(3, 64, 7, 7))
    assert torch.allclose(attention(x), expected, atol=1e-5)


def test_ema_tracks_weights(nb):
    model = torch.nn.Linear(2, 2)
    ema = nb.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.model.weight, model.weight, atol=1e-6)


def test_batches_are_seeded_and_complete(nb):
    cfg = nb.Config(batch_size=4)
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1).expand(12, 28, 28).contiguous()
    labels = torch.arange(12)
    first = [y.tolist() for _, y in nb.batches(images, labels, cfg, torch.Generator().manual_seed(42))]
    again = [y.tolist() for _, y in nb.batches(images, labels, cfg, torch.Generator().manual_seed(42))]
    assert first == again and sorted(sum(first, [])) == list(range(12))
    cfg.max_batches = 2
    assert len(list(nb.batches(images, labels, cfg, torch.Generator()))) == 2


def test_balanced_labels(nb):
    counts = np.bincount(nb.balanced_labels(1000).numpy(), minlength=10)
    assert counts.tolist() == [100] * 10


def test_fid_known_cases(nb):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    assert nb.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert nb.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.02)  # |shift|^2 = 8
    assert nb.frechet_distance(a, a + 2.0) > nb.frechet_distance(a, a + 1.0)
    blank = np.zeros((2, 28, 28), np.uint8)
    assert nb.sharpness(blank) == 0


def digits_with_strokes(n: int = 50) -> np.ndarray:
    """n crisp 'digits': a ring three pixels wide and a bar, at places that vary with the index."""
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        cy, cx, r = 12 + i % 5, 12 + i % 4, 6 + i % 3
        ring = np.abs(np.hypot(yy - cy, xx - cx) - r) <= 1.5
        images[i][ring] = 255
        images[i, 20:23, 6 + i % 6:18 + i % 6] = 255
    return images


def test_sharpness_falls_with_blur_and_is_not_raised_by_speckle(nb):
    clean = digits_with_strokes()
    rng = np.random.default_rng(0)
    speckled = clean.copy()
    dots = rng.uniform(size=clean.shape) < 0.04  # scattered single bright pixels, 4% of the image
    speckled[dots] = 255
    blurred = torch.nn.functional.avg_pool2d(torch.tensor(clean[:, None], dtype=torch.float), 3, 1, 1)
    blurred = blurred[:, 0].round().to(torch.uint8).numpy()
    sharp, speck, blur = nb.sharpness(clean), nb.sharpness(speckled), nb.sharpness(blurred)
    assert speck <= sharp * 1.02  # dots do not make the strokes look sharper
    raw = lambda x: np.abs(np.diff(x.astype(float) / 255, axis=1)).mean()  # unfiltered, dots raise it
    assert raw(speckled) > 1.3 * raw(clean)
    assert blur < 0.8 * sharp
    only_dots = torch.tensor(np.where(dots & (clean == 0), 255, 0), dtype=torch.float)
    assert nb.median3(only_dots).sum() < 0.01 * only_dots.sum()  # scattered dots vanish (a few chance clusters stay)
    kept = nb.median3(torch.tensor(clean, dtype=torch.float)).sum() / clean.astype(float).sum()
    assert kept > 0.9  # strokes three pixels wide stay (the filter rounds their corners)


def test_share_range_is_the_wilson_interval(nb):
    low, high = nb.share_range(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = nb.share_range(1.0, 200)  # never wrong in 200: the range still says how sure
    assert high == 1.0 and 0.97 < low < 0.99
    assert nb.share_range(0.0, 200)[0] == 0.0


def test_bootstrap_range_covers_a_second_draw(nb):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1000, 8))
    covered = 0
    for trial in range(20):
        first, second = (rng.normal(0.2, 1.0, size=(1000, 8)) for _ in range(2))
        again = rng.normal(size=(1000, 8))  # a new reference too
        fid = nb.frechet_distance(first, ref)
        low, high = nb.bootstrap_range(nb.frechet_distance, fid, first, ref, draws=50, seed=trial)
        assert low < fid < high
        covered += low <= nb.frechet_distance(second, again) <= high
    assert covered >= 17  # a 95% range: about 19 of 20


def test_memorisation_flags_copies_of_training_digits(nb):
    from conftest import fake_digits

    (train, train_y), (test, test_y) = fake_digits(500, seed=5), fake_digits(2000, seed=6)  # 200 per class
    train = torch.as_tensor(train)
    ctx = nb.Run(nb.Config())
    ctx.train = (train, None)
    ctx.reference = torch.as_tensor(test)
    real = nb.real_nearest(ctx, test_y)
    assert real["n"] == 2000 and all(0 < t < real["median_distance"] for t in real["thresholds"])
    distances, index = nb.nearest_distances(train[:3].numpy(), nb.training_pool(ctx))
    assert np.allclose(distances, 0, atol=1e-3) and index.tolist() == [0, 1, 2]
    thresholds = real["thresholds"]
    copies = nb.memorisation(ctx, train[100:300].numpy(), train_y[100:300], thresholds)  # 200 exact copies
    assert copies["near_copy_share"] == 1.0 and copies["closest"][0][2] < 1e-3 and copies["closest"][0][3] < 1e-3
    new_x, new_y = fake_digits(200, seed=7)  # new draws, as a model that does not copy
    fresh = nb.memorisation(ctx, new_x, new_y, thresholds)
    assert fresh["near_copy_share"] < 0.05 and fresh["near_copy_range"][0] <= nb.COPY_QUANTILE
    more_x, more_y = fake_digits(100, seed=8)
    half = nb.memorisation(ctx, np.concatenate([train[:100].numpy(), more_x]), np.concatenate([train_y[:100], more_y]),
                           thresholds)
    assert 0.45 <= half["near_copy_share"] <= 0.55 and len(half["closest"]) == 6


def test_near_copies_are_judged_against_their_own_class(nb):
    """A thin class lies closer to its neighbours than a thick one: with one threshold for all, every near copy
    would be thin. Per class, a fresh thick digit as close as a real thin one is no near copy, and a class no
    real digit has flags nothing."""
    rng = np.random.default_rng(0)
    train = torch.zeros(40, 28, 28, dtype=torch.uint8)
    train[:20, :, 13] = 255  # class 0: a one-pixel bar ("1")
    train[20:, 4:24, 4:24] = 255  # class 1: a thick square
    ctx = nb.Run(nb.Config())
    ctx.train = (train, None)
    reference = train.clone()
    reference[:20, rng.integers(0, 28, 20), 14] = 255  # one extra pixel each: close to a bar
    reference[20:, 4:10, 4:24] = 0  # a third of the square gone: far from any square
    ctx.reference = reference
    real = nb.real_nearest(ctx, np.repeat([0, 1], 20))
    assert real["thresholds"][0] < real["thresholds"][1] and all(np.isnan(real["thresholds"][2:]))
    thick = train[20:22].clone()
    thick[:, 4, 4] = 0  # one pixel off a square: far closer than the real squares, a near copy of its class
    m = nb.memorisation(ctx, thick.numpy(), np.array([1, 1]), real["thresholds"])
    assert m["near_copy_share"] == 1.0
    assert nb.memorisation(ctx, thick.numpy(), np.array([5, 5]), real["thresholds"])["near_copy_share"] == 0.0


def test_two_sample_test_sees_real_against_real_as_chance_and_a_shift_at_once(nb):
    from conftest import fake_digits

    cfg = nb.make_config(["--profile", "smoke", "--detector-steps", "60"], env={})
    real, again = fake_digits(600, seed=3)[0], fake_digits(600, seed=4)[0]
    same = nb.two_sample_test(real, again, cfg, torch.device("cpu"), seed=0)
    assert same["n_fit"] == same["n_test"] == 600
    assert same["range"][0] <= 0.5 <= same["range"][1]  # two draws of one distribution: a coin
    shifted = np.roll(again, 3, axis=2)  # the same digits three pixels to the right
    moved = nb.two_sample_test(real, shifted, cfg, torch.device("cpu"), seed=0)
    assert moved["accuracy"] > 0.95 and moved["range"][0] > 0.9
    def thick(x):  # the same digits drawn with a wider pen
        return torch.nn.functional.max_pool2d(torch.as_tensor(x).float()[:, None], 3, 1, 1)[:, 0].to(torch.uint8).numpy()

    rng = np.random.default_rng(0)  # classes drawn at random, as in real data (fake_digits cycles through them)
    a, b = (fake_digits(3000, seed=s)[0][rng.choice(3000, 600, replace=False)] for s in (5, 6))
    mixed = np.where((np.arange(600) % 2 == 0)[:, None, None], a, thick(a))  # thin and thick alternate
    ordered = np.concatenate([b[:300], thick(b[300:])])  # thin digits first, as in MNIST's test set
    unfair = nb.two_sample_test(mixed, ordered, cfg, torch.device("cpu"), seed=0)
    assert unfair["range"][1] < 0.4  # fitted on thin digits, tested on thick ones
    fair = nb.two_sample_test(mixed, nb.reference_digits(torch.as_tensor(ordered), 600, seed=0), cfg,
                              torch.device("cpu"), seed=0)
    assert fair["range"][0] <= 0.5 <= fair["range"][1], (unfair, fair)
    state = torch.get_rng_state()
    nb.two_sample_test(real, again, cfg, torch.device("cpu"), seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the run's random state is left as it was


def test_the_reference_digits_are_a_random_sample_of_the_test_set(nb):
    test = torch.arange(1000).reshape(1000, 1, 1).expand(1000, 28, 28) // 500  # first half 0, second half 1
    ref = nb.reference_digits(test, 200, seed=0).float()
    assert len(ref) == 200 and 0.35 < ref.mean() < 0.65  # both halves of the test set, not its first 200
    assert 0.3 < ref[:100].mean() < 0.7 and 0.3 < ref[100:].mean() < 0.7  # and in random order
    assert torch.equal(ref, nb.reference_digits(test, 200, seed=0).float())
    assert sorted(nb.reference_digits(test, 1000, 0)[:, 0, 0].tolist()) == sorted(test[:, 0, 0].tolist())


def test_precision_recall_known_cases(nb):
    rng = np.random.default_rng(0)
    real, again = rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4))
    pr = nb.precision_recall(real, again)
    assert pr["precision"] > 0.95 and pr["recall"] > 0.95  # two draws of the same distribution
    pr = nb.precision_recall(real, again + 3.0)
    assert pr["precision"] < 0.1 and pr["recall"] < 0.1  # moved away: neither realistic nor covering
    narrow = rng.normal(size=(1000, 4)) * 0.3  # realistic but covers only the centre
    pr = nb.precision_recall(real, narrow)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.5 and pr["precision_range"] is None


def test_precision_recall_range_covers_a_second_draw(nb):
    rng = np.random.default_rng(1)
    covered = {"precision": 0, "recall": 0}
    for trial in range(20):
        real, fake = rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) * 0.8 + 0.3
        first = nb.precision_recall(real, fake, draws=50, seed=trial)
        second = nb.precision_recall(rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) * 0.8 + 0.3)
        for measure in covered:
            low, high = first[measure + "_range"]
            assert 0 <= low <= first[measure] <= high <= 1 and low < high
            covered[measure] += low <= second[measure] <= high
    assert min(covered.values()) >= 15, covered  # a 95% range: about 19 of 20


def test_inception_score_and_class_stats(nb):
    balanced = torch.eye(10).repeat(10, 1)  # confident and every digit equally often
    assert nb.inception_score(balanced) == pytest.approx(10.0, rel=1e-6)
    one_class = torch.zeros(100, 10)
    one_class[:, 3] = 1
    assert nb.inception_score(one_class) == pytest.approx(1.0)
    assert nb.inception_score(torch.full((100, 10), 0.1)) == pytest.approx(1.0)  # unsure
    stats = nb.class_stats(balanced)
    assert stats["coverage"] == pytest.approx(1.0) and stats["smallest_class_share"] == pytest.approx(0.1)
    stats = nb.class_stats(one_class)
    assert stats["coverage"] == 0.0 and stats["smallest_class_share"] == 0.0


class BarOracle(torch.nn.Module):
    """An exact classifier for the tests' fake digits (a bar at row 4 + 2y): reads which rows hold ink."""

    def __init__(self):
        super().__init__()
        self.read = torch.nn.Linear(28, 10, bias=False)
        with torch.no_grad():
            self.read.weight.zero_()
            for y in range(10):
                self.read.weight[y, 4 + 2 * y] = 50.0

    def features(self, x):
        return x.mean(3).flatten(1)  # ink per row

    def forward(self, x):
        return self.read(self.features(x))


def test_controllability_of_obedient_and_deaf_generators(nb):
    from conftest import fake_digits

    oracle = BarOracle()
    asked = nb.balanced_labels(1000)
    obedient = np.stack([fake_digits(10, seed=0)[0][d] for d in asked.tolist()])  # sample i is digit asked[i]
    matrix = nb.confusion(asked, nb.predict(oracle, obedient))
    control = nb.control_from_hits(np.diag(matrix), "asked", matrix)
    assert np.allclose(matrix, np.eye(10)) and control["score"] == 1.0 and control["attempts_per_digit"] == 1.0
    deaf, _ = fake_digits(1000, seed=1)
    deaf = deaf[np.random.default_rng(2).permutation(1000)]  # every digit, whatever was asked
    matrix = nb.confusion(asked, nb.predict(oracle, deaf))
    control = nb.control_from_hits(np.diag(matrix), "asked", matrix)
    assert control["hit_rate"] == pytest.approx(0.1, abs=0.03) and control["can_be_asked"]
    assert 0.05 < control["score"] < 0.12  # chance: about 10 attempts per digit
    never_a_three = np.diag(matrix).copy()
    never_a_three[3] = 0
    assert nb.control_from_hits(never_a_three, "x")["score"] == 0.0


def fake_model_metrics(rng):
    drift = {"fid": rng.uniform(0, 500), "real_gap": rng.uniform(1, 100), "n": 1000} if rng.uniform() < 0.8 else None
    return {"fid": rng.uniform(0.01, 1000), "inception_score": rng.uniform(1, 10), "precision": rng.uniform(),
            "two_sample": {"accuracy": rng.uniform(0.3, 1.0)},
            "recall": rng.uniform(), "sharpness": rng.uniform(0, 0.5), "coverage": rng.uniform(),
            "smallest_class_share": rng.uniform(0, 0.1), "epoch_drift": drift, "train_seconds": rng.uniform(0.1, 5000),
            "seconds_per_image": rng.uniform(1e-6, 10), "seconds_per_image_batch1": rng.uniform(1e-5, 100),
            "peak_memory_mb": rng.uniform(10, 1e5), "control": nb_control(rng)}


def nb_control(rng):
    return {"score": 1 / np.mean(1 / rng.uniform(0.001, 1, 10))}


REAL = {"fid_floor": 50.0, "inception_score": 9.6, "sharpness": 0.065}


def test_scores_stay_in_unit_interval(nb):
    rng = np.random.default_rng(0)
    for _ in range(200):
        models = {n: fake_model_metrics(rng) for n in ("vae", "gan", "cgan", "ddpm")}
        real = {"fid_floor": rng.uniform(0.01, 100), "inception_score": rng.uniform(1, 10),
                "sharpness": rng.uniform(0.01, 0.5)}
        scores = nb.axis_scores({"models": models, "real_test": real})
        for s in scores.values():
            assert all(0.0 <= s[a] <= 1.0 for a in ("clarity", "control", "stability", "efficiency")), s
    m = fake_model_metrics(rng)
    best = dict(m, fid=50.0, inception_score=9.6, coverage=1.0, recall=1.0, smallest_class_share=0.1,
                epoch_drift={"fid": 0.0, "real_gap": 50.0, "n": 1000}, two_sample={"accuracy": 0.5})
    assert nb.clarity_score(best, REAL) == pytest.approx(1.0)
    assert nb.stability_score(best) == pytest.approx(1.0)
    costs = {"a": dict(m, train_seconds=1, seconds_per_image=1, seconds_per_image_batch1=1, peak_memory_mb=1),
             "b": dict(m, train_seconds=10, seconds_per_image=10, seconds_per_image_batch1=10, peak_memory_mb=10)}
    assert nb.efficiency_scores(costs) == pytest.approx({"a": 1.0, "b": 0.5})


def test_clarity_falls_as_fid_rises_on_a_log_scale(nb):
    m = {"inception_score": 7.0, "two_sample": {"accuracy": 0.8}}
    fids = [50, 60, 100, 200, 400, 800, 999]
    clarity = [nb.clarity_score(dict(m, fid=f), REAL) for f in fids]
    assert all(a > b for a, b in zip(clarity, clarity[1:]))
    # log scale: every halving of the FID gains the same, (1/3) log 2 / log CLARITY_WORST
    gain = math.log(2) / math.log(nb.CLARITY_WORST) / 3
    assert clarity[2] - clarity[3] == pytest.approx(gain) and clarity[3] - clarity[4] == pytest.approx(gain)
    assert nb.fid_term(nb.CLARITY_WORST * 50, 50) == 0.0 == nb.fid_term(10 ** 6, 50) and nb.fid_term(30, 50) == 1.0
    # FIDs 100, 250, 400, 500 with Inception Scores within 0.5 of each other keep FID's order; precision and
    # sharpness cannot change it; a model whose IS is far lower than its FID suggests can swap one place
    rng = np.random.default_rng(1)
    for _ in range(100):
        models = {n: {"fid": f, "inception_score": 6 + rng.uniform(0, 0.5), "precision": rng.uniform(),
                      "sharpness": rng.uniform(), "two_sample": {"accuracy": 0.9}}
                  for n, f in zip("abcd", (100, 250, 400, 500))}
        results = {"models": models, "scores": {n: {"clarity": nb.clarity_score(mm, REAL)} for n, mm in models.items()}}
        assert nb.clarity_agreement(results) == 1.0
    models["c"]["inception_score"] = 3.0
    results["scores"]["c"]["clarity"] = nb.clarity_score(models["c"], REAL)
    assert nb.clarity_agreement(results) == pytest.approx(0.8)
    assert nb.clarity_agreement({"models": {"a": {"fid": 1}}, "scores": {"a": {"clarity": 1}}}) is None
    # the detector's accuracy is a third of clarity, and its order is compared with clarity's too
    told = {n: {"fid": f, "inception_score": 6.0, "two_sample": {"accuracy": a}}
            for n, f, a in zip("abcd", (100, 250, 400, 500), (0.6, 0.7, 0.8, 0.99))}
    assert nb.clarity_score(told["a"], REAL) - nb.clarity_score(dict(told["a"], two_sample={"accuracy": 1.0}), REAL) \
        == pytest.approx(2 * 0.4 / 3)
    results = {"models": told, "scores": {n: {"clarity": nb.clarity_score(mm, REAL)} for n, mm in told.items()}}
    assert nb.clarity_agreement(results, nb.detector_accuracy) == 1.0
    for mm in told.values():
        mm["two_sample"]["accuracy"] = 1.0  # a detector that tells every model apart ranks none of them
    assert nb.clarity_agreement(results, nb.detector_accuracy) is None


def test_stability_falls_as_the_last_epoch_moves_the_samples_more(nb):
    m = {"coverage": 0.9, "recall": 0.8, "smallest_class_share": 0.07}
    drifts = [0, 5, 50, 200, 400]
    scores = [nb.stability_score(dict(m, epoch_drift={"fid": d, "real_gap": 50.0, "n": 1000})) for d in drifts]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert nb.drift_term({"fid": 0.0, "real_gap": 50.0}) == 1.0 and nb.drift_term({"fid": 50.0, "real_gap": 50.0}) == 0.5
    # one epoch only: the term is left out, not counted as settled
    assert nb.stability_score(dict(m, epoch_drift=None)) == pytest.approx((0.9 + 0.8 + 0.7) / 3)


def test_step_census_counts_the_model_not_the_process(nb):
    torch.manual_seed(0)
    cfg = nb.Config(vae_latent=4)
    counted = {}
    for width in (8, 32):
        trainer = nb.build_trainer("vae", nb.Config(vae_latent=4, vae_width=width), torch.device("cpu"))
        xb = torch.randint(0, 256, (128, 28, 28), dtype=torch.uint8)
        ballast = torch.ones(64 * 2**20 // 4)  # 64 MB the process holds: not the model's
        losses, parts = nb.step_census(trainer, xb, torch.zeros(128, dtype=torch.long))
        del ballast
        weights = sum(p.numel() * 4 for p in trainer.model.parameters()) / 2**20
        assert parts["weights and optimizer state"] == pytest.approx(3 * weights, rel=0.01)  # w, Adam's m and v
        assert parts["gradients"] == pytest.approx(weights)
        assert 0 < parts["saved activations"] < 64 and torch.isfinite(losses["loss"])
        counted[width] = sum(parts.values())
    assert counted[32] > 2 * counted[8]
    memory = nb.PeakMemory(torch.device("cpu"))
    with memory:
        assert memory.so_far() is None
        memory.step(trainer, xb, torch.zeros(128, dtype=torch.long))
    assert memory.mb == pytest.approx(counted[32], rel=0.01) and "training step" in memory.kind


def test_a_model_that_cannot_be_asked_has_no_hit_rate(nb):
    shares = np.full(10, 0.1)
    redrawn = nb.control_from_hits(shares, nb.REDRAWN)
    assert redrawn["hit_rate"] is None and not redrawn["can_be_asked"]
    assert redrawn["attempts_per_digit"] == pytest.approx(10.0) and "cannot be asked" in nb.control_phrase(redrawn)
    skewed = nb.control_from_hits([0.01] + [0.11] * 9, nb.REDRAWN)
    assert skewed["attempts_per_digit"] > 10 and skewed["score"] < redrawn["score"]
    asked = nb.control_from_hits(np.full(10, 0.9), "asked through its label")
    assert asked["hit_rate"] == pytest.approx(0.9) and "90.0%" in nb.control_phrase(asked)


def test_vae_steering_draws_the_asked_class_codes(nb):
    torch.manual_seed(0)
    vae = nb.build_trainer("vae", nb.Config(vae_latent=4), torch.device("cpu"))
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8)
    labels = torch.arange(200) % 10
    means, stds = nb.class_codes(vae, images, labels)
    assert means.shape == stds.shape == (10, 4)
    assert torch.allclose(means[3], vae.codes(images[labels == 3]).mean(0), atol=1e-5)
    steered = nb.steer(vae, means, stds, torch.tensor([3, 3, 7]), torch.Generator().manual_seed(0))
    assert steered.shape == (3, 28, 28) and steered.dtype == np.uint8


# --- configuration -------------------------------------------------------------------

def test_profiles_and_overrides(nb):
    cfg = nb.make_config(["--profile", "cpu"], env={})
    assert cfg.batch_size == 128 and cfg.seed == 42 and cfg.n_samples >= 1000 and cfg.sampler == "ddim"
    full = nb.make_config(["--profile", "full"], env={})
    assert all(e == 30 for e in full.epochs.values()) and full.n_samples == 10000
    cfg = nb.make_config(["--profile", "smoke", "--models", "vae,ddpm", "--epochs", "3",
                          "--n-samples", "50", "--data-root", "/x"], env={})
    assert cfg.models == ("vae", "ddpm") and cfg.epochs["vae"] == 3 and cfg.n_samples == 50
    env = {"MNIST_GEN_PROFILE": "smoke", "MNIST_GEN_MODELS": "gan", "MNIST_GEN_DDIM_STEPS": "7"}
    cfg = nb.make_config(None, env=env)
    assert cfg.profile == "smoke" and cfg.models == ("gan",) and cfg.ddim_steps == 7
    cfg = nb.make_config(["--ddim-steps", "9"], env=env)  # a flag beats the environment
    assert cfg.ddim_steps == 9


@pytest.mark.parametrize("argv, message", [
    (["--models", "vae,transformer"], "unknown model"),
    (["--epochs", "0"], "epochs must be 1 or more"),
    (["--epochs", "two"], "not a valid int"),
    (["--sampler", "euler"], "use ddim or ancestral"),
    (["--n-samples", "5"], "at least 10"),
    (["--ddim-steps", "5000"], "ddim_steps"),
    (["--amp", "maybe"], "use auto, bf16, fp16 or off"),
    (["--compile"], "compile is for CUDA"),
    (["--seeds", "0"], "seeds must be 1"),
    (["--epoch-fid-samples", "3"], "epoch_fid_samples"),
    (["--epoch-fid-ddim-steps", "0"], "epoch_fid_ddim_steps"),
    (["--benchmark", "sometimes"], "valid switch"),
    (["--n-samples", "200"], r"eval_held_out \(100\) must be at least n_samples \(200\)"),
    (["--detector-steps", "0"], "detector_steps must be 1"),
    (["--bootstrap", "1"], "bootstrap must be 2"),
])
def test_bad_settings_fail_with_a_message(nb, argv, message):
    with pytest.raises(nb.SetupError, match=message):
        nb.make_config(["--profile", "smoke"] + argv, env={})


def test_held_out_digits_must_leave_the_evaluator_some(nb, tiny_mnist, tmp_path):
    """Checked as soon as the data is loaded, before any training: 600 held out of 512 training digits."""
    cfg = nb.make_config(["--profile", "smoke", "--eval-held-out", "600", "--data-root", str(tiny_mnist),
                          "--out", str(tmp_path)], env={})
    with pytest.raises(nb.SetupError, match="eval_held_out 600 must be fewer than the 512 training images"):
        nb.start(nb.Run(cfg))


def test_fp16_steps_scale_the_loss(nb):
    """The path older GPUs take (fp16 autocast + GradScaler), exercised on the CPU."""
    cfg = nb.make_config(["--profile", "smoke", "--amp", "fp16", "--ddpm-width", "8", "--vae-width", "8", "--gan-width",
                          "8", "--gan-d-width", "8", "--wgan-critic-width", "8"], env={})  # narrow: CPU fp16 is slow
    device = torch.device("cpu")
    images, labels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), torch.arange(4)
    for name in nb.MODELS:
        torch.manual_seed(0)
        trainer = nb.build_trainer(name, cfg, device)
        scalers = [v for v in trainer.parts.values() if isinstance(v, nb.LossScaler)]
        assert scalers and all(s.scaler is not None for s in scalers), name
        params = [p for m in trainer.modules for p in m.parameters()]  # the WGAN's G steps every 5th batch only
        before = [p.detach().clone() for p in params]
        for _ in range(8):  # the scaler skips steps whose scaled gradients overflow, then lowers its scale
            losses = trainer.step(images, labels)
            assert all(torch.isfinite(v) for v in losses.values()), name
            if any(not torch.equal(a, b) for a, b in zip(before, params)):
                break
        else:
            raise AssertionError(f"{name}: no fp16 step was taken in 8 tries")


def test_benchmark_switch(nb):
    assert nb.make_config(["--benchmark"], env={}).benchmark is True
    assert nb.make_config(["--benchmark", "0"], env={}).benchmark is False
    assert nb.make_config([], env={"MNIST_GEN_BENCHMARK": "yes"}).benchmark is True
    assert nb.make_config([], env={}).benchmark is False


def test_bad_environment_value(nb):
    with pytest.raises(nb.SetupError, match="MNIST_GEN_SEED"):
        nb.make_config(None, env={"MNIST_GEN_SEED": "forty-two"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu(nb):
    with pytest.raises(nb.SetupError, match="no CUDA GPU"):
        nb.make_config(["--device", "cuda"], env={})


def test_missing_data_without_network(nb, tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision

    def no_network(self):
        raise URLError("no network (test)")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    with pytest.raises(nb.SetupError, match="--data-root"):
        nb.load_mnist(str(tmp_path))


def test_load_tiny_mnist(nb, tiny_mnist):
    images, labels = nb.load_mnist(str(tiny_mnist), train=True)
    assert images.shape == (512, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))


def test_every_setting_has_its_help_group_and_flag(nb):
    fields = nb.dataclasses.fields(nb.Config)
    assert all(f.metadata["help"] and f.metadata["group"] in nb.GROUPS for f in fields)
    assert nb.NOT_TRAINING_FIELDS == {f.name for f in fields if not f.metadata["train"]}
    assert {"out", "epochs", "sampler", "ddim_steps", "resume", "amp", "compile"} <= nb.NOT_TRAINING_FIELDS
    assert {"vae_width", "ddpm_lr", "seed"}.isdisjoint(nb.NOT_TRAINING_FIELDS)
    help_text = nb.build_parser().format_help()
    for group in nb.GROUPS:  # grouped, each flag with its default and its environment variable
        assert f"\n{group}:\n" in help_text, group
    assert "MNIST_GEN_DATA_ROOT" in help_text and "U-Net channels" in help_text
    assert "(default: 50, smoke 5;" in " ".join(help_text.split())  # ddim_steps, with its smoke value
    assert "cpu: vae 10, gan 3, cgan 8, ddpm 5" in " ".join(help_text.split())  # epochs per profile
    assert "--vae-lr" not in help_text  # fixed by the assignment: no flag


def test_precedence_profile_cell_environment_flags(nb):
    cell = {"profile": "smoke", "models": "vae,gan", "epochs": 3, "resume": False, "out": "from-cell", "drive": ""}
    cfg = nb.make_config(None, env={}, cell=cell)
    assert cfg.profile == "smoke" and cfg.models == ("vae", "gan") and cfg.epochs["vae"] == 3
    assert cfg.out == "from-cell" and cfg.n_samples == 20 and not cfg.resume  # the profile fills the rest
    cfg = nb.make_config(None, env={"MNIST_GEN_OUT": "from-env", "MNIST_GEN_PROFILE": "cpu"}, cell=cell)
    assert cfg.out == "from-env" and cfg.profile == "cpu" and cfg.n_samples == 1000
    cfg = nb.make_config(["--out", "from-flag"], env={"MNIST_GEN_OUT": "from-env"}, cell=cell)
    assert cfg.out == "from-flag"
    blank = {"profile": "", "models": "", "epochs": 0, "resume": False, "drive": ""}  # the cell as committed
    assert nb.make_config(None, env={"MNIST_GEN_PROFILE": "cpu"}, cell=blank) == nb.make_config(["--profile", "cpu"], env={})
    with pytest.raises(nb.SetupError, match="settings cell field epochs"):
        nb.make_config(None, env={}, cell={"epochs": "many"})


def test_history_means_and_non_finite_loss(nb):
    hist = nb.History("demo", "loss")
    for v in (1.0, 2.0, 3.0):
        hist.log(loss=torch.tensor(v))
    hist.end_epoch()
    assert hist.epoch["loss"] == [2.0] and hist.step["loss"] == [1.0, 2.0, 3.0]
    hist.log(loss=torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="demo: the loss loss became non-finite"):
        hist.end_epoch()


def test_the_report_calls_models_different_only_beyond_their_ranges(nb):
    def model(fid, low, high, acc, acc_low, acc_high):
        return {"fid": fid, "fid_range": [low, high], "two_sample": {"accuracy": acc, "range": [acc_low, acc_high]}}

    m = {"cgan": model(40, 30, 50, 0.75, 0.72, 0.78), "ddpm": model(200, 180, 230, 0.995, 0.985, 1.0),
         "gan": model(330, 300, 350, 0.72, 0.69, 0.75), "vae": model(360, 340, 390, 0.97, 0.96, 0.98)}
    by_fid = ["cgan", "ddpm", "gan", "vae"]
    assert nb.overlapping(m, by_fid, nb.fid_range) == [("gan", "vae")]
    assert "Within noise by FID (their 95% ranges overlap): GAN and VAE." in \
        nb.within_noise(m, by_fid, nb.fid_range, "FID")
    said = nb.disagreement(m, by_fid)
    assert "DDPM better than GAN by FID, worse by the detector" in said and \
        "DDPM better than VAE by FID, worse by the detector" in said and "cGAN better" not in said
    m["ddpm"]["two_sample"] = {"accuracy": 0.7, "range": [0.68, 0.73]}  # now both order it alike, or within noise
    assert nb.disagreement(m, by_fid).startswith(" Where both measures tell two models apart, they order them alike")


def test_the_report_warns_when_the_models_trained_unequally(nb):
    unequal = {"models": {"vae": {"epochs": 10}, "gan": {"epochs": 3}, "cgan": {"epochs": 8}, "ddpm": {"epochs": 5}}}
    text = " ".join(nb.epochs_caveat(unequal))
    assert "GAN-to-cGAN gap, for one, mixes conditioning with 3 against 8 epochs" in text and "30 epochs" in text
    equal = " ".join(nb.epochs_caveat({"models": {n: {"epochs": 30} for n in ("vae", "gan", "cgan", "ddpm")}}))
    assert equal.startswith("**Equal training.** Every model trained for 30 epochs") and "GAN 3, cGAN 8" in equal
    assert nb.epochs_caveat({"models": {"vae": {"epochs": 30}}}) == []  # one model: nothing to compare


def test_the_report_says_which_conclusions_another_run_changes(nb, tmp_path):
    def run(profile, fids, detector, collapsed=()):
        models = {n: {"epochs": 30 if profile == "full" else 3, "fid": f, "two_sample": {"accuracy": a},
                      "sharpness": 0.1, "coverage": 0.5 if n in collapsed else 1.0, "smallest_class_share": 0.1}
                  for n, f, a in zip(("vae", "gan", "ddpm"), fids, detector)}
        return {"config": {"profile": profile}, "environment": {"code_commit": "abc"}, "models": models,
                "scores": {n: {"clarity": 1 / m["fid"], "stability": 0.5} for n, m in models.items()}}
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "results.json").write_text(json.dumps(run("cpu", (300, 200, 250), (0.9, 0.7, 0.99), ("gan",))))
    full = run("full", (100, 150, 30), (0.8, 0.7, 0.6))
    full["config"]["compare_run"] = str(tmp_path / "cpu")
    text = "\n".join(nb.profile_comparison_markdown(full))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["lowest classifier-FID"] == ["DDPM", "GAN", "yes"]
    assert rows["hardest for the detector to tell from real"] == ["DDPM", "GAN", "yes"]
    assert rows["signs of mode collapse"] == ["none", "GAN", "yes"]
    assert rows["the order by classifier-FID"] == ["DDPM < VAE < GAN", "GAN < DDPM < VAE", "yes"]
    assert rows["most stable (stability score)"][2] == "no"
    assert nb.profile_comparison_markdown(run("cpu", (1, 2, 3), (0.5, 0.5, 0.5))) == []


def test_the_comparison_names_the_settings_and_machine_that_differ(nb):
    """A changed conclusion needs its candidate causes: shared settings that differ (a setting newer than the
    other run counts as its `before` value, so it differs only when it changed the behaviour), settings the
    other run's code did not have, and the device and precision."""
    here = {"config": {"profile": "cpu", "out": "a", "vae_lr": 1e-3, "ddpm_predict": "x0", "gan_ema": 0.0,
                       "wgan_clip": 0.01, "seeds": (1, 2)},  # a tuple here, a list in the other run's JSON
            "environment": {"device": "cpu", "autocast": "bfloat16", "torch": "2.4"}}
    there = {"config": {"profile": "cpu", "out": "b", "vae_lr": 2e-3, "seeds": [1, 2]},
             "environment": {"device": "cpu", "autocast": "None", "torch": "2.4"}}
    said = nb.run_differences(here, there)
    assert "vae_lr 0.002 there, 0.001 here" in said and "ddpm_predict eps there, x0 here" in said
    assert "gan_ema" not in said and "out " not in said and "seeds" not in said  # as before it existed; a place
    assert "did not have: wgan_clip 0.01" in said and "autocast None there, bfloat16 here" in said
    same = nb.run_differences(here, here)
    assert same.startswith("No shared setting differs.") and same.endswith("The same device and precision.")

class Oracle(torch.nn.Module):
    """A 'network' that knows the clean digit x0: it returns the exact noise of x_t (predicts="eps") or x0 itself
    (predicts="x0"), so every error measure of it is 0."""

    def __init__(self, sched, x0, predicts="eps"):
        super().__init__()
        self.sched, self.x0, self.predicts = sched, x0, predicts
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t, y=None):
        if self.predicts == "x0":
            return self.x0.expand_as(x_t)
        ab = self.sched.alpha_bar[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


class Blind(torch.nn.Module):
    """Predicts no noise at all: its MSE is E[eps^2] = 1 at every timestep."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t, y=None):
        return torch.zeros_like(x_t)


def digits_on_black(n=16, seed=0):
    """Digit-like images in [-1, 1]: a background of exactly -1 with a bright block of 'ink'."""
    x0 = -torch.ones(n, 1, 28, 28)
    x0[:, :, 8:20, 12:16] = torch.rand(n, 1, 12, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return x0


def test_noise_error_per_timestep_on_known_networks(nb):
    sched, x0 = nb.Schedule(), digits_on_black()
    ts = nb.error_timesteps(sched.T, 12)
    assert ts[0] == 0 and ts[-1] == sched.T - 1 and ts == sorted(set(ts))
    gen = lambda: torch.Generator().manual_seed(3)
    for predicts in ("eps", "x0"):
        exact = nb.noise_error_per_timestep(Oracle(sched, x0, predicts), sched, x0, ts, gen(), 5.0)
        assert max(exact["mse"]) < 1e-6 and max(exact["background_faint"]) == 0  # no error, no haze
        assert max(exact["background_sd"]) < 1e-2
    blind = nb.noise_error_per_timestep(Blind(), sched, x0, ts, gen(), 5.0)
    assert blind["t"] == [t + 1 for t in ts]  # the maths' t
    assert all(m == pytest.approx(1.0, abs=0.05) for m in blind["mse"])  # E[eps^2] = 1
    snr = sched.snr[ts].double()
    assert np.allclose(blind["weight"], (snr.clamp(max=5) / snr).numpy(), rtol=1e-5)
    assert np.allclose(blind["weighted"], np.array(blind["weight"]) * np.array(blind["mse"]))
    # predicting no noise leaves x_t's noise in x_0: at t = 0 (sigma 0.01, 1.3 grey levels) about a third of the
    # background turns faint once rounded, the haze of a network that cannot see the smallest noise
    assert 0.2 < blind["background_faint"][0] < 0.5 and blind["background_sd"][0] == pytest.approx(1.27, rel=0.1)
    plain = nb.noise_error_per_timestep(Blind(), sched, x0, ts, gen(), 0.0)
    assert plain["weight"] == [1.0] * len(ts)
    crossing = nb.snr_crossing(sched, 5.0)
    assert sched.snr[crossing - 2] > 5 >= sched.snr[crossing - 1] and nb.snr_crossing(sched, 0.0) is None


def test_x0_prediction_is_turned_into_noise(nb):
    """A network that predicts x_0 is read as the noise it implies: an exact x_0 gives the exact noise, and the
    sampler's x_0 from that noise is the network's x_0 again."""
    sched, x0 = nb.Schedule(), digits_on_black(4)
    t = torch.tensor([0, 20, 500, 999])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    x_t = nb.q_sample(sched, x0, t, eps)
    assert torch.allclose(nb.predict_eps(Oracle(sched, x0, "x0"), sched, x_t, t), eps, atol=2e-3)
    assert torch.allclose(nb.eps_from_x0(sched, x_t, t, x0), eps, atol=2e-3)
    net = nb.UNet(16, predicts="x0")
    assert nb.UNet(16).predicts == "eps" and net.predicts == "x0"
    loss = nb.ddpm_loss(net, sched, x0, torch.Generator().manual_seed(1), min_snr=5)
    loss.backward()
    assert torch.isfinite(loss) and net.head[-1].weight.grad.abs().sum() > 0


def test_pixel_histogram(nb):
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 0, :4] = 255
    images[1, 0, :2] = 5
    hist = nb.pixel_histogram(images)
    assert hist.shape == (256,) and hist.sum() == pytest.approx(1.0)
    n = 2 * 784
    assert hist[255] == pytest.approx(4 / n) and hist[5] == pytest.approx(2 / n) and hist[0] == pytest.approx((n - 6) / n)
    assert hist[1:nb.FAINT + 1].sum() == pytest.approx(nb.faint_share(images))


def test_mixture_fitted_to_two_clusters_samples_near_them(nb):
    """A mixture of 2 fitted to codes in two tight clusters, far from 0, draws its codes from those clusters (none
    from the empty middle, where the prior N(0, I) would put most of its draws)."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([4.0, 0.0, 0.0]) + 0.1 * torch.randn(3000, 3, generator=g)
    b = torch.tensor([-4.0, 2.0, 0.0]) + 0.3 * torch.randn(1000, 3, generator=g)
    mixture = nb.fit_mixture(torch.cat([a, b]), 2, seed=1)
    order = mixture["means"][:, 0].argsort(descending=True)
    assert torch.allclose(mixture["means"][order], torch.tensor([[4.0, 0.0, 0.0], [-4.0, 2.0, 0.0]]), atol=0.05)
    assert torch.allclose(mixture["weights"][order], torch.tensor([0.75, 0.25]), atol=0.02)
    assert torch.allclose(mixture["covs"][order[1]].diagonal(), torch.full((3,), 0.09), rtol=0.15)
    z = nb.sample_mixture(mixture, 4000, torch.Generator().manual_seed(2))
    to_a, to_b = (z - a.mean(0)).norm(dim=1), (z - b.mean(0)).norm(dim=1)
    assert (torch.minimum(to_a, to_b) < 1.5).all()  # every draw lies in a cluster
    assert (to_a < to_b).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert torch.equal(z, nb.sample_mixture(mixture, 4000, torch.Generator().manual_seed(2)))  # seeded


def test_vae_samples_from_the_mixture_once_fitted(nb):
    cfg = nb.make_config(["--profile", "smoke", "--vae-mixture", "3"], env={})
    trainer = nb.build_trainer("vae", cfg, torch.device("cpu"))
    images = (torch.rand(200, 28, 28) * 255).to(torch.uint8)
    gen = lambda: torch.Generator().manual_seed(0)
    before = trainer.sample(5, gen())
    assert trainer.sampler_note(None).endswith("N(0, I)")
    trainer.after_training(images)
    assert len(trainer.mixture["weights"]) == 3 and "3-Gaussian" in trainer.sampler_note(None)
    assert torch.equal(trainer.sample(5, gen(), sampler=nb.PRIOR), before)  # the prior on request
    assert not torch.equal(trainer.sample(5, gen()), before)
    off = nb.build_trainer("vae", nb.make_config(["--profile", "smoke", "--vae-mixture", "0"], env={}), torch.device("cpu"))
    off.after_training(images)
    assert off.mixture is None


def test_clipping_wgan_keeps_its_critic_within_the_clip(nb):
    cfg = nb.make_config(["--profile", "smoke", "--models", "wganclip", "--gan-width", "8", "--wgan-critic-width",
                          "8", "--wgan-clip", "0.01"], env={})
    torch.manual_seed(0)
    trainer = nb.build_trainer("wganclip", cfg, torch.device("cpu"))
    assert isinstance(trainer.opt_c, torch.optim.RMSprop) and trainer.opt_c.defaults["lr"] == 5e-5
    assert max(p.abs().max().item() for p in trainer.C.parameters()) > 0.01  # the initial weights are wider
    xb = (torch.rand(16, 28, 28) * 255).to(torch.uint8)
    out = trainer.step(xb, torch.zeros(16, dtype=torch.long))
    assert max(p.abs().max().item() for p in trainer.C.parameters()) <= 0.01
    assert set(trainer.losses) <= set(out) and "GP" not in trainer.losses


def test_gan_options_spectral_norm_and_weight_average(nb):
    cfg = nb.make_config(["--profile", "smoke", "--gan-width", "8", "--gan-d-width", "8", "--gan-spectral-norm", "1",
                          "--gan-ema", "0.9"], env={})
    torch.manual_seed(0)
    for name in ("gan", "cgan"):
        trainer = nb.build_trainer(name, cfg, torch.device("cpu"))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.D.modules())
        assert nb.torch.nn.utils.parametrize.is_parametrized(trainer.D.net[0])
        xb = (torch.rand(16, 28, 28) * 255).to(torch.uint8)
        for _ in range(3):
            trainer.step(xb, torch.arange(16) % 10)
        # spectral normalisation: the largest singular value of each layer's weight stays near 1
        w = trainer.D.net[-1].weight
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=0.1)
        assert trainer.generator is trainer.ema.model and trainer.ema.updates == 3
        live = torch.cat([p.flatten() for p in trainer.G.parameters()])
        average = torch.cat([p.flatten() for p in trainer.generator.parameters()])
        assert not torch.equal(live, average)
        assert {"generator_ema", "ema"} <= set(trainer.parts)


def test_a_checkpoint_older_than_a_setting_counts_as_what_the_code_did_then(nb, tmp_path):
    """ddpm_predict arrived with x0 as its default; the DDPMs trained before it predicted the noise, so their
    checkpoints are refused where x0 is asked and accepted where eps is."""
    import dataclasses
    cfg = nb.make_config(["--profile", "smoke"], env={})
    config = dataclasses.asdict(cfg)
    del config["ddpm_predict"]
    torch.save({"model": "ddpm", "history": {}, "config": config, "epoch": 1}, tmp_path / "ddpm.pt")
    with pytest.raises(nb.SetupError, match="ddpm_predict 'eps' -> 'x0'"):
        nb.load_checkpoint(tmp_path / "ddpm.pt", "ddpm", cfg, 1)
    cfg.ddpm_predict = "eps"
    assert nb.load_checkpoint(tmp_path / "ddpm.pt", "ddpm", cfg, 1)["epoch"] == 1


def test_a_checkpoint_compares_only_the_settings_its_model_trains_with(nb, tmp_path):
    """Every setting of the models group belongs to some model's entry; a VAE checkpoint is not refused for a
    DDPM or GAN setting, while the seed and the data still count for every model."""
    import dataclasses
    prefixes = tuple(p for spec in nb.MODELS.values() for p in spec.reads)
    assert all(name.startswith(prefixes) for name, f in nb.FIELDS.items() if f.metadata["group"] == "models")
    assert nb.trains("gan_ema", "gan") and nb.trains("gan_ema", "cgan") and not nb.trains("gan_ema", "vae")
    assert nb.trains("seed", "vae") and nb.trains("ddpm_predict", "cddpm") and not nb.trains("ddpm_predict", "gan")
    cfg = nb.make_config(["--profile", "smoke"], env={})
    torch.save({"model": "vae", "history": {}, "config": dataclasses.asdict(cfg), "epoch": 1}, tmp_path / "vae.pt")
    other = dataclasses.replace(cfg, ddpm_predict="eps", gan_ema=0.5)
    assert nb.load_checkpoint(tmp_path / "vae.pt", "vae", other, 1)["epoch"] == 1
    with pytest.raises(nb.SetupError, match="seed 42 -> 7"):
        nb.load_checkpoint(tmp_path / "vae.pt", "vae", dataclasses.replace(cfg, seed=7), 1)


def test_a_path_between_two_noises_starts_and_ends_at_them(nb):
    """slerp keeps the norm of equal-norm noises all along the arc, and ends exactly at each noise; noise_path
    draws, for every kind of model, the images of the path's noises: its first and last are the images of
    the two end noises drawn directly."""
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.allclose(nb.slerp(a, b, 0.0), a) and torch.allclose(nb.slerp(a, b, 1.0), b)
    assert torch.allclose(nb.slerp(a, b, 0.3).norm(), torch.tensor(3.0))
    for name in ("vae", "gan", "cgan", "ddpm"):
        cfg = nb.make_config(["--profile", "smoke", "--ddim-steps", "4", "--ddpm-width", "8", "--gan-width", "8"],
                             env={})
        torch.manual_seed(0)
        trainer = nb.build_trainer(name, cfg, torch.device("cpu"))
        for module in trainer.modules:
            module.eval()
        label = 3 if nb.MODELS[name].conditional else None
        path = nb.noise_path(trainer, 5, torch.Generator().manual_seed(1), label)
        ends = trainer.noise(2, torch.Generator().manual_seed(1))
        labels = None if label is None else torch.full((2,), label)
        sampler = nb.Sampler("ddim", 4, eta=0.0) if trainer.uses_sampler else None
        direct = nb.draw(trainer, 2, torch.Generator(), sampler, labels, noise=ends)
        gap = np.abs(path[[0, -1]].astype(int) - direct.astype(int)).max()
        assert path.shape == (5, 28, 28) and gap <= 1, (name, gap)  # equal but for rounding at the ends
