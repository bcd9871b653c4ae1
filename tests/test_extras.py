"""The opt-in models and studies of issue 5: WGAN-GP, the class-conditional DDPM with classifier-free
guidance, the sampler study, the latent and width sweeps, and Fashion-MNIST."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import check_epoch_drift, check_metrics_files, in_process, make_mnist_root


# --- WGAN-GP -------------------------------------------------------------------------

class LinearCritic(nn.Module):
    """C(x) = <a, x>: its gradient is a everywhere, so the penalty is exactly (||a|| - 1)^2."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x):
        return (x.flatten(1) * self.a).sum(1)


@pytest.mark.parametrize("norm", [0.5, 1.0, 3.0])
def test_gradient_penalty_of_a_linear_critic(nb, norm):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(784, generator=gen)
    critic = LinearCritic(a / a.norm() * norm)
    real, fake = torch.rand(16, 1, 28, 28, generator=gen), torch.rand(16, 1, 28, 28, generator=gen)
    penalty = nb.gradient_penalty(critic, real, fake, gen)
    assert penalty.item() == pytest.approx((norm - 1) ** 2, abs=1e-4)
    penalty.backward()  # the penalty itself is trained: d/da (||a|| - 1)^2 = 2 (||a|| - 1) a / ||a||
    assert critic.a.grad.norm().item() == pytest.approx(2 * abs(norm - 1), abs=1e-4)


def test_critic_and_generator_losses(nb):
    real, fake = torch.tensor([3.0, 5.0]), torch.tensor([1.0, -1.0])
    assert nb.critic_loss(real, fake, torch.tensor(0.5), 10.0).item() == pytest.approx(0 - 4 + 5)
    assert nb.wgan_g_loss(fake).item() == pytest.approx(0.0)
    critic = nb.Discriminator(0, 8, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())  # per-image penalty needs no BN
    assert any(isinstance(m, nn.BatchNorm2d) for m in nb.Discriminator(0, 8).modules())


def test_wgan_takes_one_generator_step_per_n_critic(nb):
    cfg = nb.make_config(["--profile", "smoke", "--wgan-n-critic", "3", "--gan-width", "8", "--wgan-critic-width",
                          "8"], env={})
    torch.manual_seed(0)
    trainer = nb.build_trainer("wgan", cfg, torch.device("cpu"))
    images, labels = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8), torch.arange(16) % 10
    g_changes, c_changes = [], []
    for _ in range(6):
        g, c = [[p.detach().clone() for p in m.parameters()] for m in (trainer.G, trainer.C)]
        losses = trainer.step(images, labels)
        g_changes.append(any(not torch.equal(a, b) for a, b in zip(g, trainer.G.parameters())))
        c_changes.append(any(not torch.equal(a, b) for a, b in zip(c, trainer.C.parameters())))
        assert set(losses) == {"W", "critic", "GP", "G"} and all(torch.isfinite(v) for v in losses.values())
    assert g_changes == [False, False, True, False, False, True] and all(c_changes)
    assert trainer.critic_steps.state_dict()["n"] == 6


# --- class-conditional DDPM ------------------------------------------------------------

class LabelEcho(nn.Module):
    """A stand-in denoiser whose 'noise' is the label (n_classes = 10 stands for no label)."""
    n_classes = 10

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(y.clone())
        return y.float().view(-1, 1, 1, 1).expand_as(x)


def test_guidance_combines_conditional_and_null_predictions(nb):
    model = LabelEcho()
    x, t, y = torch.zeros(3, 1, 28, 28), torch.zeros(3, dtype=torch.long), torch.tensor([2, 4, 6])
    sched = nb.Schedule()
    assert torch.equal(nb.predict_eps(model, sched, x, t, y, 0.0)[:, 0, 0, 0], y.float())  # w = 0: conditional only
    eps = nb.predict_eps(model, sched, x, t, y, 3.0)[:, 0, 0, 0]
    assert torch.allclose(eps, 4 * y.float() - 3 * 10)  # (1 + w) eps(y) - w eps(null)
    assert model.seen[-1].tolist() == [2, 4, 6, 10, 10, 10]  # one batch of 2n
    # a network that predicts x_0: guidance mixes its x_0 predictions, and the mix is turned into noise
    model.predicts = "x0"
    x0_mix = 4 * y.float() - 3 * 10
    ab = sched.alpha_bar[t]
    expected = (x[:, 0, 0, 0] - ab.sqrt() * x0_mix) / (1 - ab).sqrt()
    assert torch.allclose(nb.predict_eps(model, sched, x, t, y, 3.0)[:, 0, 0, 0], expected)


def test_labels_are_dropped_with_p_uncond(nb):
    sched = nb.Schedule(100)
    model = LabelEcho()
    y = torch.arange(4000) % 10
    gen = torch.Generator().manual_seed(0)
    nb.ddpm_loss(model, sched, torch.zeros(4000, 1, 28, 28), gen, y=y, p_uncond=0.1)
    dropped = (model.seen[-1] == 10).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.015)
    kept = model.seen[-1] != 10
    assert torch.equal(model.seen[-1][kept], y[kept])
    nb.ddpm_loss(model, sched, torch.zeros(8, 1, 28, 28), gen, y=y[:8], p_uncond=1.0)
    assert (model.seen[-1] == 10).all()


def test_conditional_unet_and_unchanged_unconditional_one(nb):
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999])
    net = nb.UNet(16, n_classes=10)
    assert net(x, t, torch.tensor([0, 1, 2, 10])).shape == (4, 1, 28, 28)
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), 10)))  # no label = the null label
    torch.manual_seed(0)
    plain = nb.UNet(16)
    torch.manual_seed(0)
    conditional = nb.UNet(16, n_classes=10)
    assert set(conditional.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
    assert all(torch.equal(v, conditional.state_dict()[k]) for k, v in plain.state_dict().items())


def test_widths_and_defaults_keep_the_assignment_models(nb):
    assert sum(p.numel() for p in nb.VAE(16).parameters()) == 628_097  # the size of every earlier run
    assert sum(p.numel() for p in nb.VAE(16, 64).parameters()) > 2 * 628_097
    assert nb.Generator(100, 0, 32)(torch.randn(2, 100)).shape == (2, 1, 28, 28)
    assert nb.Discriminator(0, 128)(torch.rand(2, 1, 28, 28)).shape == (2,)


@pytest.mark.e2e
def test_checkpoint_without_a_newer_setting_still_resumes(nb, smoke_ctx, tmp_path):
    cfg = smoke_ctx.cfg
    nb.train_model(smoke_ctx, "vae", tmp_path / "vae.pt")
    state = torch.load(tmp_path / "vae.pt", weights_only=True)
    for name in ("vae_width", "dataset", "gan_width"):  # as a checkpoint from before these settings existed
        del state["config"][name]
    torch.save(state, tmp_path / "vae.pt")
    assert nb.load_checkpoint(tmp_path / "vae.pt", "vae", cfg, 1)["epoch"] == 1
    wider = nb.make_config(["--profile", "smoke", "--vae-width", "64"], env={})
    with pytest.raises(nb.SetupError, match="vae_width 32 -> 64"):
        nb.load_checkpoint(tmp_path / "vae.pt", "vae", wider, 1)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar"], "use mnist or fashion"),
    (["--models", "vae", "--sampler-study"], "sampler_study needs the DDPM"),
    (["--wgan-n-critic", "0"], "wgan_n_critic"),
    (["--wgan-critic-width", "0"], "wgan_critic_width 1 or more"),
    (["--gan-d-width", "0"], "gan_d_width 1 or more"),
    (["--cddpm-guidance", "-1"], "cddpm_guidance"),
    (["--sweep-steps", "-1"], "sweep_steps"),
    (["--vae-latent", "1"], "vae_latent"),
])
def test_bad_extra_settings_fail_with_a_message(nb, argv, message):
    with pytest.raises(nb.SetupError, match=message):
        nb.make_config(["--profile", "smoke"] + argv, env={})


def test_extra_models_are_opt_in(nb):
    assert nb.make_config([], env={}).models == ("vae", "gan", "cgan", "ddpm")
    assert nb.make_config(["--models", "wgan,cddpm"], env={}).models == ("wgan", "cddpm")


# --- Fashion-MNIST -------------------------------------------------------------------

def make_fashion_root(root):
    return make_mnist_root(root, folder="FashionMNIST")


def test_fashion_loads_from_its_own_folder_and_says_how_to_get_it(nb, tmp_path, monkeypatch):
    root = make_fashion_root(tmp_path / "data")
    images, labels = nb.load_mnist(str(root), train=False, dataset="fashion")
    assert images.shape == (128, 28, 28) and set(labels.tolist()) == set(range(10))
    from urllib.error import URLError

    import torchvision

    def no_network(self):
        raise URLError("no network (test)")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)
    with pytest.raises(nb.SetupError, match="dataset-fashion-mnist") as err:
        nb.load_mnist(str(tmp_path / "empty"), dataset="fashion")
    assert "FashionMNIST/raw" in str(err.value)


@pytest.mark.e2e
def test_extra_models_and_studies_smoke_run(nb, tiny_mnist, tmp_path, capsys):
    """The opt-in models and the studies that need them, in one run at the smallest sizes that reach every
    branch: a narrow U-Net and one optimizer step per sweep setting. The sampler study has a run of its own."""
    out = tmp_path / "out"
    _, said = in_process(nb, ["--profile", "smoke", "--data-root", str(tiny_mnist), "--out", str(out),
                              "--n-samples", "20", "--models", "ddpm,wgan,cddpm", "--ddpm-width", "8",
                              "--sweep-steps", "1", "--reference-ddpm"], capsys)
    assert "assignment checklist: all items met" in said
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"ddpm", "wgan", "cddpm"} and "sampler_study" not in results
    wgan = results["models"]["wgan"]
    assert len(wgan["epoch_loss"]["W"]) == 1 and np.isfinite(wgan["epoch_loss"]["W"][0])
    guidance = results["guidance_study"]["weights"]
    assert set(guidance) == {"0", "1", "3"}
    assert all(0 <= r["accuracy"] <= 1 and r["fid"] >= 0 and r["seconds_per_image"] > 0 for r in guidance.values())
    rows = results["sweeps"]["rows"]
    assert len(rows) == 16 and all(r["steps"] == 1 and r["fid"] >= 0 and r["train_seconds"] > 0 for r in rows)
    assert {(r["field"], r["value"]) for r in rows} >= {("vae_latent", 5), ("gan_width", 256)}
    reference = results["reference_ddpm"]
    assert reference["steps"] >= 1 and reference["fid"] >= 0 and reference["parameters"] > 0
    assert reference["ours"]["fid"] == results["models"]["ddpm"]["epoch_fid"][-1]
    with np.load(out / "samples" / "cddpm.npz") as data:
        counts = np.bincount(data["labels"], minlength=10)
        assert data["images"].shape == (20, 28, 28) and counts.min() == counts.max() == 2
    state = torch.load(out / "checkpoints" / "wgan.pt", weights_only=True)
    assert {"generator", "critic", "critic_steps"} <= set(state)
    for figure in ("wgan_samples.png", "cddpm_grid.png", "cddpm_guidance.png", "cddpm_style.png", "wgan_epochs.png",
                   "sweeps.png", "reference_ddpm.png"):
        assert (out / figure).stat().st_size > 1000, figure
    assert not (out / "sampler_study.png").exists()
    report = (out / "REPORT.md").read_text()
    for heading in ("## cDDPM: classifier-free guidance", "## Latent-size and width sweeps",
                    "WGAN-GP Wasserstein estimate", "## The slower DDPM design at equal training time"):
        assert heading in report, heading
    assert "## DDPM samplers from the same weights" not in report
    assert "nan" not in report.lower()


@pytest.mark.e2e
def test_sampler_study_smoke_run(nb, tiny_mnist, tmp_path, capsys):
    """The sampler study alone (1,350 network passes per image, so a narrow U-Net): eight samplers from the
    same weights, each row named apart, with its figure and its section of the report."""
    out = tmp_path / "out"
    _, said = in_process(nb, ["--profile", "smoke", "--data-root", str(tiny_mnist), "--out", str(out),
                              "--n-samples", "20", "--models", "ddpm", "--ddpm-width", "8", "--sampler-study"],
                         capsys)
    assert "assignment checklist: all items met" in said
    results = json.loads((out / "results.json").read_text())
    samplers = results["sampler_study"]["samplers"]
    assert [(r["network_passes"], r["eta"]) for r in samplers.values()] == [
        (1000, 0.0), (100, 0.0), (50, 0.0), (20, 0.0), (10, 0.0), (100, 1.0), (50, 1.0), (20, 1.0)]
    assert len(set(samplers)) == 8  # each row named apart ("DDIM, 50 steps, eta 1")
    assert all(r["fid"] >= 0 and r["seconds_per_image"] > 0 for r in samplers.values())
    assert results["sampler_study"]["n"] == 20
    assert (out / "sampler_study.png").stat().st_size > 1000
    report = (out / "REPORT.md").read_text()
    assert "## DDPM samplers from the same weights" in report and "nan" not in report.lower()


@pytest.mark.e2e
def test_fashion_smoke_run_with_two_seeds(nb, tmp_path, capsys):
    """Fashion-MNIST end to end (its long class names in every figure), one epoch each; and the seeds study:
    every model trained again with seed 43, the spread reported."""
    root = make_fashion_root(tmp_path / "data")
    out = tmp_path / "out"
    _, said = in_process(nb, ["--profile", "smoke", "--dataset", "fashion", "--data-root", str(root), "--out",
                              str(out), "--n-samples", "20", "--models", "vae,cgan", "--seeds", "2"], capsys)
    assert "1 data: Fashion-MNIST 28x28" in said and "assignment checklist: all items met" in said
    table = pd.read_csv(out / "metrics.csv", index_col="model")
    report = (out / "REPORT.md").read_text()
    assert "on Fashion-MNIST" in report and "Fashion-MNIST test images" in report
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"] == "fashion"
    spread = results["seed_spread"]
    assert set(spread) == {"vae", "cgan"}
    for s in spread.values():
        assert s["seeds"] == [42, 43] and len(s["fid"]) == 2 and s["summary"]["fid"]["std"] >= 0
    assert table.loc[["vae", "cgan"], "stability_seed_fid_std"].notna().all()
    for m in results["models"].values():
        check_epoch_drift(m, 1)
    check_metrics_files(out, {"vae", "cgan"}, real="real Fashion-MNIST")
