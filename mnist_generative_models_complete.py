# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Four generative models of handwritten digits: VAE, GAN, cGAN and DDPM
#
# This notebook trains four generative models on MNIST and compares them on **clarity**,
# **controllability**, **efficiency** and **stability**. Every number it shows is measured by this
# run; none is typed in by hand.
#
# * **VAE** learns to compress a digit to a few numbers and back; sampling decodes random codes.
# * **GAN**: a generator and a discriminator play a game; the generator learns to fool.
# * **cGAN**: the same game, but both players see the digit's label, so you can ask for a "7".
# * **DDPM** learns to remove Gaussian noise one small step at a time; sampling starts from pure noise.
#
# **Contents.** The models come first; the machinery that runs them is folded and may be skipped.
#
# * **Part A, the assignment's path**
#   1. [The data](#data): what the models see
#   2. [VAE](#vae), 3. [GAN](#gan), 4. [cGAN](#cgan), 5. [DDPM](#ddpm): each model's idea, maths and code
#      (the DDPM in parts: [forward process](#ddpm-forward), [network](#ddpm-network), [loss](#ddpm-loss),
#      [samplers](#ddpm-samplers), [trainer](#ddpm-trainer))
#   6. [The machinery](#machinery) that trains them: settings, the run, data loading, the training loop,
#      time estimates (folded; you may skip it)
#   7. [Training and watching each model](#training): [the data and the run's time](#train-data),
#      [VAE](#train-vae), [GAN](#train-gan), [cGAN](#train-cgan), [DDPM](#train-ddpm): losses, samples, and
#      pictures of how each one works and how it learned
# * **Part B, [the comparison](#comparison)**: 8. the evaluator, 9. [measuring](#measuring), 10.
#   [scores](#scores), 11. [figures](#figures), 12. [the written report](#report) and
#   [why each model behaves as it does](#discussion), 13. [the assignment checklist](#checklist),
#   14. [play with what was trained](#play)
# * **Part C, [the appendix](#appendix)** (sections C1-C9), all opt in: WGAN-GP and a class-conditional DDPM,
#   studies of samplers, sizes, seeds and the DDPM's design, the slower public DDPM design, and a benchmark.
#
# **How to run.** In Colab the notebook asks for a GPU runtime (a free T4 is enough): change the
# settings cell below if you like, then *Run all*. Colab's disk is lost when the runtime disconnects:
# name a Google Drive folder in `drive` to keep everything, and tick `resume` to continue after a
# disconnect. Before any model trains, section 7 estimates the whole run on this machine, and each
# model's cell says how long it expects to take.
# Headless: `python mnist_generative_models_complete.py --help`.
# Everything lands in the output folder: figures, `samples/<model>.npz`, checkpoints,
# `metrics.csv` and `metrics.json`, `results.json`, and a written `REPORT.md`.

# %% tags=["parameters"]
# Settings: the ones a student changes (Colab shows them as a form beside this code). Empty (or 0, or
# unticked) leaves the choice to the profile. Precedence, lowest first: the profile's defaults < this cell
# < MNIST_GEN_* environment variables < command-line flags (script only). Every other setting: `Config`
# (section 6.2), or `--help`.
profile = ""  # @param ["", "smoke", "cpu", "full"] {allow-input: true}
models = ""  # @param {type:"string"}
epochs = 0  # @param {type:"integer"}
dataset = "mnist"  # @param ["mnist", "fashion"]
data_root = "./data"  # @param {type:"string"}
out = "outputs"  # @param {type:"string"}
drive = ""  # @param {type:"string"}
resume = False  # @param {type:"boolean"}


# %% jupyter={"source_hidden": true}
# @title Imports and constants { display-mode: "form" }
import argparse
import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

IN_KERNEL = "ipykernel" in sys.modules  # True inside Jupyter / Colab
IN_COLAB = "google.colab" in sys.modules  # a Colab runtime (whose disk goes when it disconnects)
if not IN_KERNEL:
    matplotlib.use("Agg")  # headless: draw to files only

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():  # a kernel without ipywidgets gets text bars, and tqdm would warn about it
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

RUN = __name__ == "__main__"  # True in a notebook and as a script; False when the tests import this file
PROFILES = ("smoke", "cpu", "full")
# the data sets on offer: torchvision's class (and folder) name, a title, and the ten class names
DATASETS = {
    "mnist": {"torchvision": "MNIST", "title": "MNIST", "classes": [str(d) for d in range(10)]},
    "fashion": {"torchvision": "FashionMNIST", "title": "Fashion-MNIST",
                "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                            "Sneaker", "Bag", "Ankle boot"]},
}


class SetupError(ValueError):
    """A setting or an input that cannot work; the message says what to change."""


# %% [markdown]
# # Part A: the assignment's path
#
# Sections 1-5 are the models: for each one its idea, its maths and its code (the networks, the loss,
# and a small *trainer* class that takes one training step and draws samples). Nothing trains yet:
# section 6 holds the machinery that runs them, and section 7 trains each model and shows what it
# learned, under a heading that links back to its definition here.
#
# <a id="data"></a>
# ## 1. The data
#
# MNIST holds 60,000 training and 10,000 test images of handwritten digits, 28×28 pixels with grey
# levels 0-255 (0 = background, 255 = ink), each with its label 0-9. The run keeps them as `uint8`
# tensors and hands each model batches of 128 as floats: the VAE sees pixels in $[0, 1]$ (each is the
# probability of ink that its Bernoulli decoder predicts), the GANs and the DDPM in $[-1, 1]$ (the range of
# tanh, centred like the DDPM's Gaussian noise). Section 7.1 shows a grid of real digits, one row per class.

# %%
def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28] in [0, 1] (1 = ink)."""
    return x_uint8.unsqueeze(1).float().div_(255.0)


def to_signed(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28] in [-1, 1], the range of tanh."""
    return to_unit(x_uint8).mul_(2).sub_(1)


def to_uint8(x: torch.Tensor, signed: bool) -> np.ndarray:
    """Model output [B, 1, 28, 28] -> uint8 [B, 28, 28], MNIST convention (0 background, 255 ink)."""
    x = x.float()
    if signed:
        x = (x + 1) / 2
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).cpu().numpy()


FAINT = 10  # grey levels out of 255: a pixel above 0 and at most this is too faint to see on a screen


def one_hot(labels: torch.Tensor, n_classes: int = 10) -> torch.Tensor:
    return F.one_hot(labels, n_classes).float()


# %% [markdown]
# <a id="vae"></a>
# ## 2. Variational autoencoder (VAE)
#
# An **encoder** takes the flattened image $x \in [0,1]^{784}$ and outputs the mean $\mu$
# and log-variance $\log\sigma^2$ of a Gaussian over a small code $z$. We sample
# $z = \mu + \sigma \odot \varepsilon$ with $\varepsilon \sim \mathcal N(0, I)$ (the
# *reparameterisation trick*, so gradients flow through the sampling), and a
# **convolutional decoder** turns $z$ back into a 28×28 image $\hat x$.
#
# **The loss is the negative evidence lower bound (ELBO).** For the encoder's $q(z \mid x)$ and the prior
# $p(z) = \mathcal N(0, I)$, every image satisfies
#
# $$\log p(x) \;\ge\; \mathrm{ELBO}(x) = \mathbb E_{q(z\mid x)}\big[\log p(x \mid z)\big] - \mathrm{KL}\big(q(z\mid x)\,\|\,p(z)\big).$$
#
# The decoder gives each pixel a Bernoulli probability $\hat x_i$, so $-\log p(x \mid z)$ is the binary
# cross-entropy **summed over the 784 pixels**, and the KL between two Gaussians has a closed form. (MNIST's
# pixels are grey levels in $[0, 1]$, not 0 or 1, so on them the BCE is not a normalised likelihood: it is
# smallest at $\hat x_i = x_i$ but does not reach 0 there. It trains the decoder as usual; the ELBO it gives is
# not a true bound on $\log p(x)$ of grey-level images.) Per image
# (and then averaged over the batch) the VAE minimises
#
# $$\mathcal L = -\mathrm{ELBO} = \underbrace{\textstyle\sum_{i=1}^{784} \mathrm{BCE}(\hat x_i, x_i)}_{\text{reconstruction}} +
#   \underbrace{-\tfrac12 \textstyle\sum_j \left(1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2\right)}_{\mathrm{KL}(q(z|x)\,\|\,\mathcal N(0,I))}.$$
#
# Sum, not mean: averaging the BCE over the pixels (a common slip) divides the reconstruction term by 784,
# which is the same as weighting the KL 784 times more, and the decoder then draws the same blurred
# average digit for every code. `vae_loss` sums, and section 7.2 plots the two terms apart.
#
# The KL term pulls every code towards the standard normal, which is what lets us
# generate by decoding $z \sim \mathcal N(0, I)$. Its price is blur: the decoder
# predicts the *average* of the digits that could have produced a code.
#
# **Where the samples' codes come from.** The KL term pulls each $q(z \mid x)$ towards $\mathcal N(0, I)$ but
# does not make the codes of all training digits together, the *aggregate posterior*
# $q(z) = \frac1N \sum_i q(z \mid x_i)$, fill it: they cluster by digit and leave holes between the
# clusters. A code drawn from the prior often lands in a hole, which the decoder never saw in training, and
# comes out as a blob that is no digit. So once training ends (training itself stays BCE + KL), the
# notebook fits a mixture of `vae_mixture` = 50 full-covariance Gaussians to the codes $\mu(x)$ of the
# training digits by EM (`fit_mixture`) and draws the samples' codes from it (*ex-post density
# estimation*, Ghosh et al., 2020). Fifty is a measured choice: on the `cpu` profile's VAE, 10, 20 and 50
# Gaussians each drew better digits than the last, the last close to decoding the training codes
# themselves, and 50 fit in seconds (`outputs/issue-30-tries/`). Section 7.2 shows codes and decoded
# digits from the prior, from training digits and from the mixture; Part B measures both samplers, and the
# export uses the mixture (the prior's samples are measured beside it, `PRIOR`). The memorisation check of
# Part B says whether samples drawn where the training codes lie come closer to training digits.

# %%
class VAE(nn.Module):
    """MLP encoder 784 -> 16w -> 8w -> (mu, log sigma^2); decoder z -> 2w x 7x7 -> w x 14x14 -> 28x28 (w = width)."""

    def __init__(self, latent: int = 16, width: int = 32):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 16 * width), nn.ReLU(),
                                     nn.Linear(16 * width, 8 * width), nn.ReLU())
        self.to_mu = nn.Linear(8 * width, latent)
        self.to_logvar = nn.Linear(8 * width, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, 2 * width * 7 * 7), nn.ReLU(), nn.Unflatten(1, (2 * width, 7, 7)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),  # 7 -> 14
            nn.ConvTranspose2d(width, 1, 4, 2, 1))  # 14 -> 28, logits of x_hat

    def encode(self, x):
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode_logits(self, z):
        return self.decoder(z)

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # z = mu + sigma * eps
        return self.decode_logits(z), mu, logvar

    def draw_codes(self, n: int, gen: torch.Generator, device, mixture: dict | None = None) -> torch.Tensor:
        """z from the prior N(0, I), or from a Gaussian mixture fitted to the training codes."""
        return torch.randn(n, self.latent, generator=gen, device=device) if mixture is None else \
            sample_mixture(mixture, n, gen)

    @torch.inference_mode()
    def sample(self, n: int, gen: torch.Generator, device, mixture: dict | None = None, z=None) -> torch.Tensor:
        """Decoded codes z (drawn by draw_codes unless given), in [0, 1]."""
        z = self.draw_codes(n, gen, device, mixture) if z is None else z
        return torch.sigmoid(self.decode_logits(z))


def vae_loss(x_hat_logits, x, mu, logvar):
    """Return (total, reconstruction, KL), each summed over pixels / latents and averaged over the batch."""
    bce = F.binary_cross_entropy_with_logits(x_hat_logits.float(), x, reduction="sum") / len(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
    return bce + kl, bce, kl


def mixture_log_density(z: torch.Tensor, weights, means, covs) -> torch.Tensor:
    """log pi_j + log N(z_i | m_j, S_j) for every code i and component j: [N, k]. With S_j = L_j L_j^T,
    log N = -||L_j^-1 (z_i - m_j)||^2 / 2 - sum log diag L_j - d/2 log 2 pi (one matrix product per component)."""
    d = z.shape[1]
    chol = torch.linalg.cholesky(covs)
    cols = []
    for j in range(len(means)):
        y = torch.linalg.solve_triangular(chol[j], (z - means[j]).T, upper=False)  # L_j^-1 (z - m_j), [d, N]
        cols.append(-0.5 * y.pow(2).sum(0) - chol[j].diagonal().log().sum() - 0.5 * d * math.log(2 * math.pi))
    return torch.stack(cols, 1) + weights.log()


def fit_mixture(z: torch.Tensor, k: int, seed: int, iters: int = 100, tol: float = 1e-4) -> dict:
    """A mixture of k full-covariance Gaussians, sum_j pi_j N(m_j, S_j), fitted to the codes z [N, d] by EM
    until the mean log-likelihood gains less than `tol` per iteration. E step: r_ij = pi_j N(z_i | m_j, S_j) /
    sum_l pi_l N(z_i | m_l, S_l). M step: pi_j = mean_i r_ij, m_j = the r-weighted mean of the z_i, S_j their
    r-weighted covariance (+ 1e-6 I, so that it stays invertible)."""
    z = z.detach().double().cpu()
    n, d = z.shape
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    means = z[torch.randperm(n, generator=gen)[:k]].clone()  # k codes drawn at random
    covs = torch.cov(z.T).expand(k, d, d).clone()
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    last = -math.inf
    for _ in range(iters):
        log_p = mixture_log_density(z, weights, means, covs)
        log_likelihood = float(torch.logsumexp(log_p, 1).mean())
        if log_likelihood - last < tol:
            break
        last = log_likelihood
        r = torch.softmax(log_p, dim=1)  # E step
        n_j = r.sum(0) + 1e-12  # M step
        weights, means = n_j / n, (r.T @ z) / n_j[:, None]
        covs = torch.stack([(z * r[:, j:j + 1]).T @ z / n_j[j] - torch.outer(means[j], means[j]) for j in range(k)])
        covs = covs + 1e-6 * torch.eye(d, dtype=z.dtype)
    return {"weights": weights.float(), "means": means.float(), "covs": covs.float(),
            "log_likelihood": log_likelihood}


def sample_mixture(mixture: dict, n: int, gen: torch.Generator) -> torch.Tensor:
    """n codes from the mixture: a component j ~ pi, then z = m_j + L_j e with L_j L_j^T = S_j, e ~ N(0, I)."""
    device = gen.device
    weights, means, covs = (mixture[key].to(device) for key in ("weights", "means", "covs"))
    j = torch.multinomial(weights, n, replacement=True, generator=gen)
    e = torch.randn(n, means.shape[1], 1, generator=gen, device=device)
    return means[j] + (torch.linalg.cholesky(covs)[j] @ e).squeeze(-1)


class VAETrainer:
    """The VAE, its optimizer, one training step, and sampling from the prior. It can also encode
    digits (`codes`) and decode chosen codes (`decode`), which section 7.2 and Part B use (its latent space,
    steering it to a class)."""
    losses, fmt, signed, uses_sampler = ("loss", "bce", "kl"), ".1f", False, False

    def __init__(self, name: str, cfg: "Config", device):
        self.name, self.cfg, self.device = name, cfg, device
        self.model = VAE(cfg.vae_latent, cfg.vae_width).to(device)
        self.opt = adam(self.model.parameters(), cfg.vae_lr, device)
        self.scaler = LossScaler(cfg, device)
        self.modules = (self.model,)
        self.parts = {"vae": self.model, "opt": self.opt, "scaler": self.scaler}  # what a checkpoint holds
        self.mixture = None  # fitted to the training codes once training ends (after_training)
        maybe_compile(cfg, *self.modules)

    def after_training(self, images_uint8):
        """Fit the Gaussian mixture of vae_mixture components to the codes (the encoder's mu) of the training
        digits: from then on the VAE samples from it, where its decoder has been, instead of N(0, I)."""
        if self.cfg.vae_mixture:
            self.mixture = fit_mixture(self.codes(images_uint8), self.cfg.vae_mixture, self.cfg.seed)

    def step(self, xb, yb) -> dict:
        x = to_unit(xb)
        with autocast(self.cfg, self.device):
            logits, mu, logvar = self.model(x)
        loss, bce, kl = vae_loss(logits, x, mu.float(), logvar.float())
        self.scaler.backward_step(loss, self.opt)
        return {"loss": loss, "bce": bce, "kl": kl}

    def density(self, sampler=None) -> dict | None:
        """Where the codes come from: the mixture once it is fitted; None (the prior N(0, I)) before, or when
        asked with the PRIOR sampler."""
        return None if sampler is not None and sampler.kind == "prior" else self.mixture

    def sample(self, n, gen, labels=None, sampler=None, progress=False, noise=None):
        return self.model.sample(n, gen, self.device, self.density(sampler), noise)

    def noise(self, n, gen) -> torch.Tensor:
        """What its samples start from: codes z from its density."""
        return self.model.draw_codes(n, gen, self.device, self.density())

    @property
    def gaussian_noise(self) -> bool:  # codes from the mixture are not N(0, I): a path between them is straight
        return self.mixture is None

    def sampler_note(self, sampler) -> str:
        if self.density(sampler) is None:
            return "one decoder pass, z ~ N(0, I)"
        return f"one decoder pass, z from a {len(self.mixture['weights'])}-Gaussian fit to the training codes"

    @torch.inference_mode()
    def codes(self, images_uint8) -> torch.Tensor:
        """The encoder's mu [N, latent] of uint8 digits, in chunks, on the VAE's device."""
        return torch.cat([self.model.encode(to_unit(chunk.to(self.device)))[0].float()
                          for chunk in images_uint8.split(2000)])

    @torch.inference_mode()
    def decode(self, z) -> torch.Tensor:
        """Images in [0, 1] decoded from codes z."""
        return torch.sigmoid(self.model.decode_logits(z).float())

    @staticmethod
    def assignment(name: str, cfg: "Config", entry: dict, out: Path):
        vae = VAE(cfg.vae_latent)
        mu, logvar = vae.encode(torch.zeros(2, 1, 28, 28))
        return ("2 VAE: flattening encoder -> mu, log sigma^2; decoder -> 28x28; BCE + KL; Adam 1e-3",
                vae.encoder[0].__class__ is nn.Flatten and vae.encoder[1].in_features == 784
                and mu.shape == logvar.shape == (2, cfg.vae_latent)
                and vae.decode_logits(mu).shape == (2, 1, 28, 28) and cfg.vae_lr == 1e-3,
                f"latent {cfg.vae_latent}, lr {cfg.vae_lr}")


# %% [markdown]
# <a id="gan"></a>
# ## 3. Generative adversarial network (GAN)
#
# A **generator** $G$ maps noise $z \sim \mathcal N(0, I_{100})$ to an image; a
# **discriminator** network outputs one number per image, a logit $\ell(x)$; the probability it gives to
# "this image is real" is $D(x) = \sigma(\ell(x)) = 1/(1 + e^{-\ell(x)})$. They play
#
# $$\min_G \max_D \; \mathbb E_x[\log D(x)] + \mathbb E_z[\log(1 - D(G(z)))].$$
#
# In practice both use binary cross-entropy on the logits (`binary_cross_entropy_with_logits`, which
# applies $\sigma$ inside, in a numerically safe form): $D$ is trained to say 1 on real and 0 on
# fake, and $G$ is trained to make $D$ say 1 on its fakes (the *non-saturating* loss,
# $-\log D(G(z))$, whose gradient does not vanish when $D$ wins early). If the game reached its
# equilibrium, $G$'s images would be distributed like real ones and $D$ would say $D(x) = 0.5$ to every
# image: section 7.3 plots $D$(real) and $D$(fake) against that line.
# Both nets are DCGAN-style: transposed convolutions with batch norm up from 7×7 to 28×28 in
# $G$, strided convolutions with LeakyReLU down to 7×7 in $D$. $G$ keeps a few feature maps at the
# full 28×28 and draws the pixels from them with a 3×3 convolution, so each stroke is shaped
# from its neighbourhood rather than painted straight from 14×14 features. $D$ has half $G$'s channels
# (`gan_d_width`): telling real from fake is the easier task, and a $D$ as wide as $G$ wins the game
# early (its loss falls while $G$'s rises); since $D$ runs three times per step (on real digits, on
# fakes, and for $G$'s loss), it also takes most of each step's time. The narrower $D$ still gives $G$ a
# useful gradient, and the time it saves buys more epochs. Images live in $[-1, 1]$ (tanh output).
# Sharp digits, but nothing forces $G$ to cover every digit: if it finds one that fools $D$ it may keep
# drawing it (**mode collapse**).
#
# Two standard aids are settings, off by default because they did not help here at equal epochs
# (`outputs/issue-30-tries/`): an average of $G$'s weights to sample from (`gan_ema`, the EMA of section
# 5.5), which matched plain $G$ after 30 epochs, and spectral normalisation of every layer of $D$ in
# place of its batch norm (`gan_spectral_norm`), which slowed learning after 5 epochs. Both apply to the
# cGAN alike: the GAN and the cGAN differ only in the label and the cGAN's smoothed target, so their gap
# is the label's.

# %%
class Generator(nn.Module):
    """Noise (plus an optional one-hot label) -> 28x28 image in [-1, 1]: 2w x 7x7 -> w x 14x14 -> w/4 x 28x28,
    then a 3x3 convolution to the one output channel (w = width)."""

    def __init__(self, noise: int = 100, n_classes: int = 0, width: int = 64):
        super().__init__()
        self.noise, self.n_classes = noise, n_classes
        self.net = nn.Sequential(
            nn.Linear(noise + n_classes, 2 * width * 7 * 7, bias=False),
            nn.BatchNorm1d(2 * width * 7 * 7), nn.ReLU(), nn.Unflatten(1, (2 * width, 7, 7)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),  # 7 -> 14
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, width // 4, 4, 2, 1, bias=False),  # 14 -> 28
            nn.BatchNorm2d(width // 4), nn.ReLU(),
            nn.Conv2d(width // 4, 1, 3, padding=1), nn.Tanh())  # features at 28x28 -> pixels

    def forward(self, z, y_onehot=None):
        if self.n_classes:
            z = torch.cat([z, y_onehot], dim=1)
        return self.net(z)


class Discriminator(nn.Module):
    """Image (plus an optional label, as 10 constant one-hot planes) -> logit of 'real'.
    batch_norm=False gives the WGAN-GP critic (section C1), whose penalty needs per-image gradients."""

    def __init__(self, n_classes: int = 0, width: int = 32, batch_norm: bool = True, spectral: bool = False):
        super().__init__()
        self.n_classes = n_classes
        batch_norm = batch_norm and not spectral
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda layer: layer)
        self.net = nn.Sequential(
            sn(nn.Conv2d(1 + n_classes, width, 4, 2, 1)), nn.LeakyReLU(0.2),  # 28 -> 14
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1, bias=not batch_norm)),  # 14 -> 7
            nn.BatchNorm2d(2 * width) if batch_norm else nn.Identity(), nn.LeakyReLU(0.2),
            nn.Flatten(), sn(nn.Linear(2 * width * 7 * 7, 1)))

    def forward(self, x, y_onehot=None):
        if not self.n_classes:
            return self.net(x).squeeze(1)
        return self.net[1:](self.first_layer(x, y_onehot)).squeeze(1)

    def first_layer(self, x, y_onehot):
        """The first convolution of the image stacked with its label's planes, conv([x, planes(y)]), computed
        as conv_image(x) + conv_planes(planes(y)). The planes are constant, so the second term is one
        width x 14x14 map per class: made from the ten classes' planes, then picked by y. The same numbers
        as stacking the planes, without convolving 10 more channels of every image."""
        conv = self.net[0]
        weight = conv.weight  # read once: with spectral normalisation each read is a power-iteration step
        h = F.conv2d(x, weight[:, :1], conv.bias, conv.stride, conv.padding)
        classes = torch.eye(self.n_classes, device=x.device, dtype=x.dtype)[:, :, None, None]
        maps = F.conv2d(classes.expand(-1, -1, *x.shape[2:]), weight[:, 1:], None, conv.stride, conv.padding)
        return h + (y_onehot.to(maps.dtype) @ maps.flatten(1)).view(len(x), *maps.shape[1:])


def d_loss(real_logits, fake_logits, real_target: float = 1.0):
    """Discriminator BCE: real -> real_target (0.9 = one-sided smoothing), fake -> 0."""
    real = F.binary_cross_entropy_with_logits(
        real_logits.float(), torch.full_like(real_logits.float(), real_target))
    fake = F.binary_cross_entropy_with_logits(
        fake_logits.float(), torch.zeros_like(fake_logits.float()))
    return real + fake


def g_loss(fake_logits):
    """Non-saturating generator BCE: make D call the fakes real."""
    return F.binary_cross_entropy_with_logits(
        fake_logits.float(), torch.ones_like(fake_logits.float()))


class GANTrainer:
    """DCGAN generator G and discriminator D with their optimizers. A conditional entry (the cGAN, section 4)
    gives both players the label, and D's real target is cgan_real_target."""
    losses, fmt, signed, uses_sampler = ("G", "D", "D_real", "D_fake"), ".2f", True, False
    gaussian_noise = True  # its noise is N(0, I): a path between two noises follows an arc (slerp)

    def __init__(self, name: str, cfg: "Config", device):
        self.name, self.cfg, self.device = name, cfg, device
        self.conditional = MODELS[name].conditional
        n_classes = 10 if self.conditional else 0
        self.G = prepare(Generator(cfg.gan_noise, n_classes, cfg.gan_width), cfg, device)
        self.D = prepare(Discriminator(n_classes, cfg.gan_d_width, spectral=cfg.gan_spectral_norm), cfg, device)
        betas = (cfg.gan_beta1, 0.999)
        self.opt_g = adam(self.G.parameters(), cfg.gan_lr, device, betas)
        self.opt_d = adam(self.D.parameters(), cfg.gan_lr, device, betas)
        self.real_target = cfg.cgan_real_target if self.conditional else 1.0
        self.scaler_g, self.scaler_d = LossScaler(cfg, device), LossScaler(cfg, device)
        self.ema = EMA(self.G, cfg.gan_ema) if cfg.gan_ema > 0 else None
        self.modules = (self.G, self.D)
        self.parts = {"generator": self.G, "discriminator": self.D, "opt_g": self.opt_g, "opt_d": self.opt_d,
                      "scaler_g": self.scaler_g, "scaler_d": self.scaler_d}
        if self.ema:
            self.parts.update(generator_ema=self.ema.model, ema=self.ema)
        maybe_compile(cfg, *self.modules)

    def step(self, xb, yb) -> dict:
        G, D = self.G, self.D
        x = to_signed(xb)
        y = one_hot(yb) if self.conditional else None
        z = torch.randn(len(x), self.cfg.gan_noise, device=self.device)
        with autocast(self.cfg, self.device):
            fake = G(z, y)
            # D step: real -> real_target, fake -> 0 (fake detached: G is not updated here)
            real_logits, fake_logits = D(x, y), D(fake.detach(), y)
            loss_d = d_loss(real_logits, fake_logits, self.real_target)
        self.scaler_d.backward_step(loss_d, self.opt_d)
        # G step: make D call the fakes real
        with autocast(self.cfg, self.device):
            loss_g = g_loss(D(fake, y))
        self.scaler_g.backward_step(loss_g, self.opt_g)
        if self.ema:
            self.ema.update(self.G)
        return {"G": loss_g, "D": loss_d, "D_real": torch.sigmoid(real_logits.float()).mean(),
                "D_fake": torch.sigmoid(fake_logits.float()).mean()}

    @property
    def generator(self) -> nn.Module:
        """The generator that samples: G's weight average when gan_ema > 0."""
        return self.ema.model if self.ema else self.G

    def noise(self, n, gen) -> torch.Tensor:
        """What its samples start from: z ~ N(0, I) of gan_noise numbers."""
        return torch.randn(n, self.cfg.gan_noise, generator=gen, device=self.device)

    def sample(self, n, gen, labels=None, sampler=None, progress=False, noise=None):
        z = self.noise(n, gen) if noise is None else noise
        return self.generator(z, one_hot(labels) if self.conditional else None)

    def sampler_note(self, sampler) -> str:
        return "one generator pass"

    @staticmethod
    def assignment(name: str, cfg: "Config", entry: dict, out: Path):
        if not MODELS[name].conditional:
            G = Generator(cfg.gan_noise)
            return ("3 GAN: 100-d noise -> 28x28; discriminator real/fake; BCE; Adam 2e-4",
                    cfg.gan_noise == 100 and G(torch.zeros(2, 100)).shape == (2, 1, 28, 28)
                    and Discriminator()(torch.zeros(2, 1, 28, 28)).shape == (2,) and cfg.gan_lr == 2e-4,
                    f"noise {cfg.gan_noise}, lr {cfg.gan_lr}")
        with np.load(out / "samples" / f"{name}.npz") as data:
            counts = np.bincount(data["labels"], minlength=10)
        return ("4 cGAN: noise + one-hot label; D sees image + label; real target 0.9; Adam 2e-4",
                Generator(cfg.gan_noise, 10).net[0].in_features == cfg.gan_noise + 10
                and Discriminator(10).net[0].in_channels == 11 and cfg.cgan_real_target == 0.9
                and cfg.gan_lr == 2e-4 and counts.max() - counts.min() <= 1,
                f"real target {cfg.cgan_real_target}, labels per digit {counts.min()}-{counts.max()}")


# %% [markdown]
# <a id="cgan"></a>
# ## 4. Conditional GAN (cGAN)
#
# The same game with the label $y$ given to both players: $G(z, y)$ receives the noise
# concatenated with a one-hot $y$, and $D(x, y)$ receives the image stacked with ten
# constant planes, one-hot in $y$. Now $D$ rejects a good "3" that was supposed to be a
# "7", so $G$ must obey the label: **we choose the digit**. Following the assignment,
# $D$'s targets for real images are 0.9 instead of 1 (*one-sided label smoothing*),
# which keeps $D$ from becoming over-confident: its logits on real digits stay bounded, so $D$ does not
# sharpen its boundary without end. (With the non-saturating loss, $G$'s own gradient does not vanish when $D$
# wins; the smoothing calms $D$, not $G$'s gradient.) It also moves the equilibrium: the best $D$ for a
# given $G$ is $D^*(x) = 0.9\,p_{\text{data}}(x) / (p_{\text{data}}(x) + p_g(x))$, which is **0.45**, not 0.5,
# where $G$ matches the data.
# The code is the GAN's: `Generator(n_classes=10)`, `Discriminator(n_classes=10)` and `GANTrainer`,
# which reads `conditional=True` from the cGAN's entry in `MODELS`. Because the ten planes are constant,
# their part of $D$'s first convolution is one feature map per class: `Discriminator.first_layer` makes
# the ten maps once per batch and adds the one each image's label picks, the same numbers as convolving
# the eleven stacked channels at a fraction of the cost.
#
# Section 7.4 shows what the two inputs do: one noise vector per row, the ten labels across.

# %% [markdown]
# <a id="ddpm"></a>
# ## 5. Denoising diffusion probabilistic model (DDPM)
#
# A DDPM turns data into noise by a fixed process, step by small step, and learns to run it backwards.
# Sampling then starts from pure noise and removes a little of it at a time. The four parts below are the
# forward process, the network, the loss and the samplers; then the trainer, with the design choices
# that make it learn fast on a CPU. Section 7.5 draws each idea from the trained model.
#
# <a id="ddpm-forward"></a>
# ### 5.1 The forward process $q$
#
# Fix variances $\beta_1, \dots, \beta_T$ (linear from $10^{-4}$ to $0.02$, $T = 1000$). One step keeps
# $\sqrt{1-\beta_t}$ of the image and adds Gaussian noise of variance $\beta_t$:
#
# $$q(x_t \mid x_{t-1}) = \mathcal N\!\left(\sqrt{1-\beta_t}\,x_{t-1},\;\beta_t I\right).$$
#
# Let $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$. Gaussians compose: after $t$
# steps the signal is scaled by $\sqrt{\alpha_1 \cdots \alpha_t} = \sqrt{\bar\alpha_t}$. The noise variances do
# not simply add up: each step also scales the noise already there, so $V_t = \alpha_t V_{t-1} + \beta_t$,
# and with $V_0 = 0$ this gives $V_t = 1 - \bar\alpha_t$ (check: $\alpha_t (1 - \bar\alpha_{t-1}) + 1 - \alpha_t =
# 1 - \bar\alpha_t$). So any $x_t$ is one line away from the clean digit $x_0$:
#
# $$q(x_t \mid x_0) = \mathcal N\!\left(\sqrt{\bar\alpha_t}\,x_0,\;(1-\bar\alpha_t) I\right),
#   \qquad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\quad \varepsilon \sim
# \mathcal N(0, I).$$
#
# Its signal-to-noise ratio is $\mathrm{SNR}_t = \bar\alpha_t / (1 - \bar\alpha_t)$; at $t = T$,
# $\bar\alpha_T \approx 4\cdot 10^{-5}$ and $x_T$ is pure noise. **Indexing:** the maths counts
# $t = 1..T$ (with $t = 0$ the clean digit); the code's arrays count from 0, so `sched.alpha_bar[t]` for
# `t = 0..T-1` is $\bar\alpha_{t+1}$, and the network's timestep input is that array index.

# %%
class Schedule:
    """The fixed variances beta_t and the quantities derived from them, indexed t = 0..T-1."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, device="cpu"):
        self.T = T
        self.beta = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alpha = 1.0 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.posterior_var = self.beta * (1 - alpha_bar_prev) / (1 - self.alpha_bar)  # beta~_t
        self.snr = self.alpha_bar / (1 - self.alpha_bar)
        for name in ("beta", "alpha", "alpha_bar", "posterior_var", "snr"):
            setattr(self, name, getattr(self, name).float().to(device))


def q_sample(sched: Schedule, x0, t, eps):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    ab = sched.alpha_bar[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


# %% [markdown]
# <a id="ddpm-network"></a>
# ### 5.2 The network $\varepsilon_\theta(x_t, t)$
#
# A U-Net takes the noisy image and the timestep. The timestep enters as a sinusoidal code (the
# Transformer's position code), turned by a small MLP into a vector that every residual block adds to its
# features. The image is folded from 28×28 to 14×14 with 4 channels first (space-to-depth), goes down to
# 7×7, through one self-attention layer for the digit's global shape, and back up, with a skip connection
# at 14×14.
#
# **What it outputs.** The DDPM paper's network outputs the noise $\varepsilon$ directly. This one outputs
# its guess of the clean digit, $\hat x_0$, and `predict_eps` turns that into the noise it implies,
#
# $$\varepsilon_\theta(x_t, t) = \frac{x_t - \sqrt{\bar\alpha_t}\,\hat x_0(x_t, t)}{\sqrt{1 - \bar\alpha_t}},$$
#
# so the loss, the samplers and every formula below still see a noise estimate (`ddpm_predict = "x0"`;
# `"eps"` is the paper's). Why: an MNIST background is exactly 0 (−1 in the model's scale). To leave it
# clean, a noise-predicting network must reproduce the noise on it exactly, $\varepsilon = (x_t +
# \sqrt{\bar\alpha_t})/\sqrt{1-\bar\alpha_t}$, which at small $t$ means amplifying a faint input 100-fold
# ($\sqrt{1-\bar\alpha_1} = 0.01$); what it misses stays in the sample as a grey haze of 1-10 grey levels
# (section 7.5 shows the error per timestep; an earlier `full` run, predicting the noise, left nearly half of
# its pixels faint, real digits under 1%). A network that predicts $x_0$ only has to say "−1" there, whatever
# the noise. Trained the same way for the same steps, it left less haze and drew better digits
# (`outputs/issue-30-tries/`).

# %%
def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The Transformer's position code applied to the timestep: sin and cos at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, plus a skip path."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(t_emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a small feature map."""

    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, h * w).unbind(1)  # [b, heads, d, pixels]
        # softmax(Q K^T / sqrt(d)) V, written out: for 49 pixels this trains faster on a CPU than
        # F.scaled_dot_product_attention, whose CPU backward is built for long sequences
        weights = torch.softmax((q.transpose(-1, -2) @ k) * d ** -0.5, dim=-1)  # [b, heads, pixels, pixels]
        out = v @ weights.transpose(-1, -2)  # [b, heads, d, pixels]
        return x + self.proj(out.reshape(b, c, h, w))


class UNet(nn.Module):
    """28x28 -> (space-to-depth) 14x14 -> 7x7 -> 14x14 -> 28x28, with a skip; it outputs the noise (predicts =
    "eps") or the clean digit (predicts = "x0"), which predict_eps turns into eps_theta(x_t, t).
    With n_classes > 0, eps_theta(x_t, t, y): a learned embedding of the label y (or of the null label
    y = n_classes, "no label") is added to the time embedding (section C2)."""

    def __init__(self, width: int = 64, t_dim: int = 128, n_classes: int = 0, predicts: str = "eps"):
        super().__init__()
        c, self.t_dim, self.predicts = width, t_dim, predicts
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(4, c, 3, padding=1)  # after pixel_unshuffle: 1x28x28 -> 4x14x14
        self.down1 = ResBlock(c, c, t_dim)  # 14x14
        self.downsample = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)  # 14 -> 7
        self.down2 = ResBlock(2 * c, 2 * c, t_dim)  # 7x7
        self.mid_attn = SelfAttention(2 * c)
        self.mid = ResBlock(2 * c, 2 * c, t_dim)
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                      nn.Conv2d(2 * c, c, 3, padding=1))  # 7 -> 14
        self.up1 = ResBlock(2 * c, c, t_dim)  # after concatenating the 14x14 skip
        self.head = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 4, 3, padding=1))
        self.n_classes = n_classes
        if n_classes:  # made last, so the unconditional U-Net's initial weights do not change
            self.label_emb = nn.Embedding(n_classes + 1, t_dim)  # index n_classes = the null label

    def forward(self, x_t, t, y=None):
        t_emb = self.t_mlp(sinusoidal_embedding(t, self.t_dim))
        if self.n_classes:
            y = torch.full_like(t, self.n_classes) if y is None else y
            t_emb = t_emb + self.label_emb(y)
        h = self.stem(F.pixel_unshuffle(x_t, 2))
        skip = self.down1(h, t_emb)
        h = self.down2(self.downsample(skip), t_emb)
        h = self.mid(self.mid_attn(h), t_emb)
        h = self.up1(torch.cat([self.upsample(h), skip], dim=1), t_emb)
        return F.pixel_shuffle(self.head(h), 2)  # 4x14x14 -> 1x28x28: the predicted noise, or x_0


# %% [markdown]
# <a id="ddpm-loss"></a>
# ### 5.3 The loss
#
# Draw a digit $x_0$, a timestep $t$ uniformly, and noise $\varepsilon$; make $x_t$ with the closed form
# above;
# ask the network for the noise (its $\hat x_0$ read as a noise estimate, section 5.2). The DDPM paper's
# simplified loss is the plain mean squared error
#
# $$L_{\text{simple}} = \mathbb E_{x_0, t, \varepsilon}\,\big\lVert \varepsilon - \varepsilon_\theta(x_t, t)\big\rVert^2 .$$
#
# This notebook trains on a **weighted** version: each timestep's error is multiplied by the
# min-SNR-$\gamma$ weight $w_t = \min(\mathrm{SNR}_t, \gamma)/\mathrm{SNR}_t$ ($\gamma = 5$,
# `ddpm_min_snr`), which
# is 1 at the noisy timesteps and small at the nearly clean ones, whose noise is hard to see; without it
# they dominate the gradient. With the network's $\hat x_0$ read as the noise, the noise error is the
# digit error scaled, $\lVert\varepsilon - \varepsilon_\theta\rVert^2 = \mathrm{SNR}_t\,\lVert x_0 - \hat
# x_0\rVert^2$, so the weighted loss is $\min(\mathrm{SNR}_t, \gamma)\,\lVert x_0 - \hat x_0\rVert^2$: every
# timestep below the crossing $\mathrm{SNR}_t = \gamma$ weighs the digit's error alike. The nearly clean steps
# still matter: they draw the last grey levels of the background (section 7.5 measures the error per
# timestep). Dropping the weight, or raising $\gamma$ to 1000, made those steps dominate and the digits
# worse at equal training (`outputs/issue-30-tries/`). The training log keeps both: `loss` is the weighted
# loss that is optimised, `mse` the plain $L_{\text{simple}}$ of the same draws (section 7.5 plots both,
# and the schedule with $w_t$).

# %%
def ddpm_loss(model, sched: Schedule, x0, gen: torch.Generator, min_snr: float = 0.0, y=None, p_uncond: float = 0.0,
              plain: bool = False):
    """MSE between the true noise eps and eps_theta(x_t, t) at uniform random t,
    weighted per timestep by min(SNR_t, gamma) / SNR_t when min_snr = gamma > 0.
    With labels y (conditional model), each is replaced by the null label with probability p_uncond.
    With plain=True: (the weighted loss, the unweighted MSE of the same draws), the second only to watch."""
    t = torch.randint(0, sched.T, (len(x0),), generator=gen, device=x0.device)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    x_t = q_sample(sched, x0, t, eps)
    if y is not None:
        drop = torch.rand(len(y), generator=gen, device=y.device) < p_uncond
        y = torch.where(drop, torch.full_like(y, model.n_classes), y)
    mse = (predict_eps(model, sched, x_t, t, y) - eps).pow(2).mean(dim=(1, 2, 3))
    weighted = mse
    if min_snr > 0:
        snr = sched.snr[t]
        weighted = mse * torch.clamp(snr, max=min_snr) / snr
    return (weighted.mean(), mse.detach().mean()) if plain else weighted.mean()


def eps_from_x0(sched: Schedule, x_t, t, x0_hat):
    """The noise that x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps implies for a predicted x_0:
    eps = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)."""
    ab = sched.alpha_bar[t].view(-1, 1, 1, 1)
    return (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()


def predict_eps(model, sched: Schedule, x_t, t, y=None, w: float = 0.0):
    """eps_theta(x_t, t); with labels y, eps_theta(x_t, t, y); with guidance w > 0 as well,
    eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null): both in one batch of 2n.
    A network that predicts x_0 (model.predicts == "x0") has its output turned into the noise it implies."""
    if y is None:
        out = model(x_t, t).float()
    elif w == 0:
        out = model(x_t, t, y).float()
    else:
        null = torch.full_like(y, model.n_classes)
        out_y, out_null = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
        out = (1 + w) * out_y - w * out_null  # linear in the output, so the same for x_0 as for eps
    return eps_from_x0(sched, x_t.float(), t, out) if getattr(model, "predicts", "eps") == "x0" else out


# %% [markdown]
# <a id="ddpm-samplers"></a>
# ### 5.4 Sampling: running the process backwards
#
# **Ancestral (the paper's).** Start at $x_T \sim \mathcal N(0, I)$ and step down:
# $x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\left(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}
# \varepsilon_\theta(x_t,t)\right) + \sigma_t z$, with $z \sim \mathcal N(0, I)$ and $\sigma_t^2 =
# \tilde\beta_t =
# \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$. That is $T = 1000$ network passes per image.
#
# **DDIM (strided).** The same network also lets a sampler skip steps: predict
# $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta)/\sqrt{\bar\alpha_t}$ and clip it to $[-1, 1]$, the
# range of real digits; re-derive the noise consistent with the clipped $\hat x_0$,
# $\hat\varepsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1-\bar\alpha_t}$; then jump to an earlier
# $s < t$ with $x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1-\bar\alpha_s-\sigma^2}\,\hat\varepsilon +
# \sigma z$,
# where $\sigma =
# \eta\sqrt{\frac{1-\bar\alpha_s}{1-\bar\alpha_t}\big(1-\frac{\bar\alpha_t}{\bar\alpha_s}\big)}$.
# With $\eta = 0$ the path from $x_T$ is **deterministic**; with $\eta = 1$ each jump adds as much fresh noise
# as the ancestral sampler would over the same stretch, so the sampler is random, and later steps can
# correct the errors of earlier ones. **The export uses DDIM with `ddim_eta` = 1**, 50 jumps instead of
# 1000: 20× cheaper, which is what a CPU can afford. The sampler study (section C3) compares both $\eta$.

# %%
@torch.inference_mode()
def sample_ancestral(model, sched: Schedule, n: int, gen: torch.Generator, device, progress=True, y=None, w=0.0):
    """The paper's sampler: T steps of x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z.
    y (labels) and w (guidance weight): for the conditional model, see predict_eps."""
    x = torch.randn(n, 1, 28, 28, generator=gen, device=device)  # x_T ~ N(0, I)
    for t in progress_bar(range(sched.T - 1, -1, -1), desc="ancestral", disable=not progress or BAR["disable"]):
        tt = torch.full((n,), t, device=device, dtype=torch.long)
        eps = predict_eps(model, sched, x, tt, y, w)
        mean = (x - sched.beta[t] / (1 - sched.alpha_bar[t]).sqrt() * eps) / sched.alpha[t].sqrt()
        if t > 0:
            z = torch.randn(x.shape, generator=gen, device=device)
            x = mean + sched.posterior_var[t].sqrt() * z  # + sigma_t z, sigma_t^2 = beta~_t
        else:
            x = mean
    return x.clamp(-1, 1)


def ddim_timesteps(T: int, steps: int) -> list:
    """`steps` evenly spaced timesteps from T-1 down to 0."""
    return sorted({int(round(s)) for s in np.linspace(0, T - 1, steps)}, reverse=True)


def ddim_sigma(ab_t, ab_s, eta: float):
    """The noise of a DDIM jump from t to s < t: eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s).
    For a one-step jump with eta = 1 its square is the ancestral sampler's beta~_t."""
    return eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()


@torch.inference_mode()
def sample_ddim(model, sched: Schedule, n: int, gen: torch.Generator, device, steps: int = 50, progress=True,
                y=None, w=0.0, eta: float = 0.0, trace: list | None = None, x_T: torch.Tensor | None = None):
    """DDIM: predict x_0, then jump to the next (earlier) timestep s, keeping sqrt(1 - ab_s - sigma^2) of the
    predicted noise and adding fresh noise sigma = ddim_sigma (eta = 0: deterministic; eta = 1: the ancestral
    sampler's posterior noise over the same jump). A `trace` list receives (t, x_t, predicted x_0) of each step;
    x_T, if given, is the starting noise (else drawn from gen)."""
    x = torch.randn(n, 1, 28, 28, generator=gen, device=device) if x_T is None else x_T.to(device)
    ts = ddim_timesteps(sched.T, steps)
    for i, t in enumerate(progress_bar(ts, desc=f"DDIM-{steps}", disable=not progress or BAR["disable"])):
        tt = torch.full((n,), t, device=device, dtype=torch.long)
        eps = predict_eps(model, sched, x, tt, y, w)
        ab_t = sched.alpha_bar[t]
        x0_hat = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)  # x_0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)
        if trace is not None:
            trace.append((t, x.clone(), x0_hat.clone()))
        ab_s = sched.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        eps = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()  # noise consistent with the clipped x0
        sigma = ddim_sigma(ab_t, ab_s, eta)
        x = ab_s.sqrt() * x0_hat + (1 - ab_s - sigma ** 2).sqrt() * eps  # x_s = sqrt(ab_s) x_0 + sqrt(1-ab_s-s^2) eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=gen, device=device)  # + sigma z
    return x.clamp(-1, 1)


# %% [markdown]
# <a id="ddpm-trainer"></a>
# ### 5.5 The trainer, and design choices for learning fast on a CPU
# On a 2-core CPU the `cpu` profile gives the DDPM a few thousand optimizer steps, so each step must be
# cheap and teach the network as much as possible.
#
# * **Compute where it pays.** A *space-to-depth stem* folds each 2×2 pixel block into 4 channels
#   (`pixel_unshuffle`), so the U-Net works at 14×14 and 7×7 only, with one self-attention layer at
#   7×7 for global shape. The self-attention is written out instead of calling PyTorch's fused
#   kernel, whose CPU backward is built for long sequences, not 49 pixels. Mixed precision (section 6)
#   is on where the hardware runs bf16 natively. Section C7 trains the slower public design for the
#   same time, and the benchmark (section C8) times a step.
# * **A higher learning rate with warm-up.** Adam at $10^{-3}$ after a 200-step linear warm-up,
#   instead of the usual $2\cdot10^{-4}$ that assumes hundreds of thousands of steps.
# * **EMA of the weights.** Sampling uses an exponential moving average of the weights (decay 0.999,
#   shortened early on), which removes the step-to-step jitter of the last updates.
# * **Min-SNR-$\gamma$ loss weighting** ($\gamma=5$): the per-timestep MSE is weighted by
#   $w_t = \min(\mathrm{SNR}_t, \gamma)/\mathrm{SNR}_t$ with $\mathrm{SNR}_t = \bar\alpha_t/(1-\bar\alpha_t)$.
#   Nearly noise-free steps, whose noise is hard to see, stop dominating the gradient (section 5.3).
# * **The network predicts $x_0$** (section 5.2), read as a noise estimate: a clean background is then a
#   constant to output, not a noise to reproduce. A cosine decay of the learning rate to 0
#   (`ddpm_lr_decay`) was tried with it and left more haze at equal steps, so it is off.
#
# What each choice is worth is measured by the design study, section C6 (its committed run:
# `outputs/ddpm-design-study/`).

# %%
class EMA:
    """Exponential moving average of a model's weights: theta_ema <- d theta_ema + (1 - d) theta."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.params = list(self.model.parameters())

    def state_dict(self) -> dict:
        return {"updates": self.updates}  # the averaged weights are saved as their own module

    def load_state_dict(self, state: dict):
        self.updates = state["updates"]

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))  # short memory at the start
        # theta_ema + (1 - d) (theta - theta_ema), on all tensors at once
        torch._foreach_lerp_(self.params, list(model.parameters()), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


class DDPMTrainer:
    """The U-Net, Adam with linear warm-up, the EMA copy used for sampling, and the noise schedule.
    A conditional entry (the cDDPM, section C2) feeds the labels in, dropped with p_uncond."""
    losses, fmt, signed, uses_sampler = ("loss", "mse"), ".4f", True, True  # loss: weighted; mse: plain
    gaussian_noise = True  # its noise is N(0, I): a path between two noises follows an arc (slerp)

    def __init__(self, name: str, cfg: "Config", device):
        self.name, self.cfg, self.device = name, cfg, device
        self.conditional = MODELS[name].conditional if name in MODELS else False
        self.sched = Schedule(cfg.ddpm_T, cfg.ddpm_beta_start, cfg.ddpm_beta_end, device)
        self.model = prepare(self.make_net(), cfg, device)
        self.opt = adam(self.model.parameters(), cfg.ddpm_lr, device)
        self.total_steps = None  # set by plan() before training: the cosine decay needs to know the end
        self.warmup = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: self.lr_factor(step))
        self.ema = EMA(self.model, cfg.ddpm_ema) if cfg.ddpm_ema > 0 else None
        self.noise_gen = torch.Generator(device).manual_seed(cfg.seed)
        self.scaler = LossScaler(cfg, device)
        self.modules = (self.model,)
        self.parts = {"unet": self.model, "opt": self.opt, "warmup": self.warmup, "noise_gen": self.noise_gen,
                      "scaler": self.scaler}
        if self.ema:
            self.parts.update(unet_ema=self.ema.model, ema=self.ema)
        maybe_compile(cfg, *self.modules)  # after the EMA copy was made from the plain module

    def lr_factor(self, step: int) -> float:
        """The learning rate's multiple of ddpm_lr at an optimizer step: a linear warm-up over ddpm_warmup steps,
        then (with ddpm_lr_decay) a cosine fall to 0 at the last step."""
        warm = min(1.0, (step + 1) / max(1, self.cfg.ddpm_warmup))
        if not self.cfg.ddpm_lr_decay or not self.total_steps:
            return warm
        progress = min(1.0, max(0, step - self.cfg.ddpm_warmup) / max(1, self.total_steps - self.cfg.ddpm_warmup))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))

    def plan(self, total_steps: int):
        """Told by fit how many optimizer steps the whole training takes."""
        self.total_steps = total_steps

    def make_net(self) -> nn.Module:
        return UNet(self.cfg.ddpm_width, n_classes=10 if self.conditional else 0, predicts=self.cfg.ddpm_predict)

    def step(self, xb, yb) -> dict:
        with autocast(self.cfg, self.device):
            loss, mse = ddpm_loss(self.model, self.sched, to_signed(xb), self.noise_gen, self.cfg.ddpm_min_snr,
                                  y=yb if self.conditional else None, p_uncond=self.cfg.cddpm_p_uncond, plain=True)
        self.scaler.backward_step(loss, self.opt)
        self.warmup.step()
        if self.ema:
            self.ema.update(self.model)
        return {"loss": loss, "mse": mse}

    @property
    def net(self) -> nn.Module:
        """The network that samples: the EMA weights when ddpm_ema > 0."""
        return self.ema.model if self.ema else self.model

    def noise(self, n, gen) -> torch.Tensor:
        """What its samples start from: x_T ~ N(0, I), an image of pure noise."""
        return torch.randn(n, 1, 28, 28, generator=gen, device=self.device)

    def sample(self, n, gen, labels=None, sampler=None, progress=False, noise=None):
        sampler = sampler or Sampler(self.cfg.sampler, self.cfg.ddim_steps, eta=self.cfg.ddim_eta)
        w = self.cfg.cddpm_guidance if sampler.guidance is None else sampler.guidance
        y = labels if self.conditional else None
        if sampler.kind == "ancestral":
            assert noise is None, "the ancestral sampler draws its own x_T"
            return sample_ancestral(self.net, self.sched, n, gen, self.device, progress, y, w)
        return sample_ddim(self.net, self.sched, n, gen, self.device, sampler.steps, progress, y, w, sampler.eta,
                           x_T=noise)

    def sampler_note(self, sampler) -> str:
        label = (f"DDIM, {sampler.steps} steps" + (f", eta {sampler.eta:g}" if sampler.eta else "")
                 if sampler.kind == "ddim" else f"ancestral, {self.cfg.ddpm_T} steps")
        w = self.cfg.cddpm_guidance if sampler.guidance is None else sampler.guidance
        return label + (f", guidance {w:g}" if self.conditional else "")

    @staticmethod
    def assignment(name: str, cfg: "Config", entry: dict, out: Path):
        if MODELS[name].conditional:
            return None
        sched = Schedule(cfg.ddpm_T, cfg.ddpm_beta_start, cfg.ddpm_beta_end)
        return ("5 diffusion: Gaussian forward process, U-Net reverse, (min-SNR weighted) MSE on the noise",
                float(sched.alpha_bar[-1]) < 1e-3 and isinstance(UNet(cfg.ddpm_width), UNet)
                and entry["final_epoch_loss"]["loss"] > 0,
                f"T={cfg.ddpm_T}, alpha_bar_T={float(sched.alpha_bar[-1]):.1e}, sampler {entry['sampler']}")


# %% [markdown]
# <a id="machinery"></a>
# ## 6. The machinery that trains them (you may skip it)
#
# This section runs nothing a reader needs to see. It declares the models once (a table that every later
# cell reads), holds every setting in one `Config` object, carries the run's state from cell to cell,
# loads the data, runs the one training loop with its checkpoints and progress bars, draws and exports
# samples, and estimates how long each part will take. Every cell is titled, so Colab shows it folded;
# open one to read it. [Section 7](#training) is where the models train.

# %% [markdown]
# ### 6.1 The models, declared once
#
# Each model is one entry below: its title, the class (defined in its own section) that builds its
# networks, takes a training step and draws samples, whether it is asked for a class, the loss
# curves to plot, its epochs per profile and its colour. Training, sampling, checkpoints, figures,
# the report, the checklist and the benchmark all read this table. **Adding a model** is one new
# section (its networks, its loss and its trainer class in Part A, and a cell in section 7 that calls
# `train_section`) plus one entry here.
#
# A diffusion model draws with a **sampler**, a value passed where it is used: its kind (`ddim` or
# `ancestral`), its number of network passes, and for a conditional model a guidance weight.

# %% jupyter={"source_hidden": true}
# @title The table of models { display-mode: "form" }
@dataclass(frozen=True)
class ModelSpec:
    title: str  # the name in figures and the report
    trainer: str  # the class, defined in the model's section, that builds, trains and samples it
    epochs: dict  # passes over the training set in each profile
    colour: str  # its colour in every figure
    curves: tuple  # the losses its curve shows (keys of the trainer's `losses`)
    conditional: bool = False  # asked for a class through its label (a 10x10 grid instead of 10 samples)
    default: bool = True  # trained unless --models says otherwise (False: opt in, Part C)
    log_curves: bool = False  # loss curves on a log scale
    trends: dict = field(default_factory=dict)  # loss -> what it estimates: the report lists it per epoch
    parts: tuple = ()  # logged values shown beside `curves` in its own section (the loss's terms, what D says)
    parts_title: str = ""  # the title of that panel
    parts_line: float | None = None  # a reference line in that panel
    reads: tuple = ()  # the prefixes of the "models" settings it trains with (a checkpoint compares only those)
    units: str = ""  # the y-axis label of its loss curves
    parts_units: str = ""  # the y-axis label of its `parts` panel (default: units)

    def figure(self, name: str) -> str:
        """The assignment's sample figure of this model."""
        return f"{name}_grid.png" if self.conditional else f"{name}_samples.png"


D_PARTS = dict(parts=("D_real", "D_fake"), parts_line=0.5, units="binary cross-entropy (nats per image)",
               parts_title="D's mean output on real and on fake images (equilibrium: 0.5)",
               parts_units="D(x), the probability D gives 'real'")
DIFFUSION_PARTS = dict(parts=("loss", "mse"), parts_title="weighted loss (optimised) and plain MSE of the same draws",
                       units="squared error per pixel of the noise (noise variance 1)")
CRITIC_UNITS = "critic units (no fixed scale)"
MODELS = {
    "vae": ModelSpec("VAE", "VAETrainer", dict(smoke=1, cpu=10, full=30), "tab:blue", ("loss",),
                     parts=("bce", "kl"), parts_title="the loss's two terms (loss = -ELBO = BCE + KL)",
                     reads=("vae_",), units="nats per image (summed over its 784 pixels)"),
    "gan": ModelSpec("GAN", "GANTrainer", dict(smoke=1, cpu=3, full=30), "tab:orange", ("G", "D"), **D_PARTS,
                     reads=("gan_",)),
    "cgan": ModelSpec("cGAN", "GANTrainer", dict(smoke=1, cpu=8, full=30), "tab:green", ("G", "D"),
                      conditional=True, **D_PARTS, reads=("gan_", "cgan_")),
    "ddpm": ModelSpec("DDPM", "DDPMTrainer", dict(smoke=1, cpu=5, full=30), "tab:red", ("loss",),
                      log_curves=True, **DIFFUSION_PARTS, reads=("ddpm_",)),
    "wgan": ModelSpec("WGAN-GP", "WGANTrainer", dict(smoke=1, cpu=4, full=30), "tab:purple", ("W", "G"),
                      default=False, trends={"W": "Wasserstein estimate E[C(x)] - E[C(G(z))]"}, reads=("gan_", "wgan_"),
                      units=CRITIC_UNITS),
    "wganclip": ModelSpec("WGAN (clip)", "WGANClipTrainer", dict(smoke=1, cpu=4, full=30), "tab:pink", ("W", "G"),
                          default=False, trends={"W": "the clipped critic's estimate E[C(x)] - E[C(G(z))]"},
                          reads=("gan_", "wgan_"), units=CRITIC_UNITS),
    "cddpm": ModelSpec("cDDPM", "DDPMTrainer", dict(smoke=1, cpu=6, full=30), "tab:brown", ("loss",),
                       conditional=True, default=False, log_curves=True, **DIFFUSION_PARTS, reads=("ddpm_", "cddpm_")),
}


@dataclass(frozen=True)
class Sampler:
    """How a diffusion model draws: `ddim` (strided) with `steps` network passes and noise `eta` (0:
    deterministic; 1: as much fresh noise per jump as the ancestral sampler adds), or `ancestral` (the
    paper's T steps); `guidance` is a conditional model's weight w (None: its setting)."""
    kind: str = "ddim"
    steps: int = 50
    guidance: float | None = None
    eta: float = 0.0


PRIOR = Sampler("prior")  # the VAE drawing its codes from N(0, I), not from the mixture fitted after training


# %% [markdown]
# ### 6.2 Settings: one configuration object
#
# One object, `Config`, holds every setting; each field carries its help text, its group in
# `--help`, its per-profile values and whether it changes how a model trains. A **profile** fills in
# the defaults:
#
# * `smoke`: a few batches of whatever data is at hand, for the tests (seconds);
# * `cpu`: real MNIST with every metric, sized for a 2-core machine (the default without a GPU);
# * `full`: the assignment's 30 epochs for every model (the default with a CUDA GPU).
#
# The settings cell above, then `MNIST_GEN_<NAME>` environment variables, then command-line flags
# (`--epochs 5`) override it, and bad values stop the run before any work, with a message that says
# what to change. The profiles' numbers are printed by `--help` and by the first cell that runs.

# %% jupyter={"source_hidden": true}
# @title The Config class: every setting, with its help, group and profile values { display-mode: "form" }
def setting(default, help: str, group: str, *, train: bool = True, flag: bool = True,
            profiles: dict | None = None, parse=None, before=None):
    """A Config field and what the rest of the code needs to know about it: its help text, its
    --help group, whether it changes how a model trains (a checkpoint made with another value is
    refused), whether a flag / MNIST_GEN_ variable may set it, its value in other profiles, how to
    read it from text (default: by its type), and `before`: the value that the code behaved as before
    the setting existed, when that is not its default (a checkpoint older than the setting counts as it)."""
    meta = {"help": help, "group": group, "train": train, "flag": flag, "profiles": profiles or {},
            "parse": parse, "before": before}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def parse_models(text: str) -> tuple:
    return tuple(m.strip().lower() for m in text.split(",") if m.strip())


def parse_epochs(text: str) -> dict:
    n = int(text)
    return {name: n for name in MODELS}


def default_models() -> tuple:
    return tuple(name for name, spec in MODELS.items() if spec.default)


def cpu_epochs() -> dict:
    return {name: spec.epochs["cpu"] for name, spec in MODELS.items()}


GROUPS = {
    "run": "what runs, on what data, where it goes",
    "models": "each model's hyperparameters (the assignment fixes some; they have no flag)",
    "measuring": "samplers and the measurements of Part B",
    "studies": "the opt-in studies of Part C",
    "speed": "mixed precision, compilation and shortened epochs",
}


@dataclass
class Config:
    profile: str = setting("cpu", "smoke | cpu | full: fills in the defaults (auto: full with CUDA, else cpu)",
                           "run", train=False, flag=False)
    models: tuple = setting(default_models, f"comma list of {', '.join(MODELS)}", "run", train=False,
                            parse=parse_models)
    epochs: dict = setting(cpu_epochs, "passes over the training set, per model (a number sets them all)", "run",
                           train=False, parse=parse_epochs)
    dataset: str = setting("mnist", "mnist | fashion (Fashion-MNIST: clothes in the same 28x28 format)", "run")
    data_root: str = setting("./data", "folder that holds (or receives) MNIST/raw/ (FashionMNIST/raw/)", "run",
                             train=False)
    out: str = setting("outputs", "where figures, samples, checkpoints and results go", "run", train=False)
    drive: str = setting("", "Colab: a Google Drive folder (e.g. MyDrive/mnist-gen) that holds `out`, mounted at "
                             "the start, so a disconnect loses nothing", "run", train=False)
    resume: bool = setting(False, "continue each model from its last per-epoch checkpoint; finished ones are "
                                  "loaded", "run", train=False)
    pretrained: bool = setting(False, "train nothing: load each finished checkpoint, redo samples, figures and "
                                      "metrics", "run", train=False)
    device: str = setting("auto", "auto (CUDA when present) | cpu | cuda", "run", train=False)
    seed: int = setting(42, "one seed for python, numpy, torch and the data order", "run")
    batch_size: int = setting(128, "fixed by the assignment for every model", "run", flag=False)
    n_samples: int = setting(1000, "images exported per model to samples/<model>.npz (and as many test digits "
                                   "to compare with)", "run", train=False, profiles={"smoke": 20, "full": 10000})
    compare_run: str = setting("", "another finished run's output folder (e.g. outputs/cpu-run): the report says "
                                   "which of its conclusions this run changes", "run", train=False)
    progress: str = setting("auto", "auto: progress bars (live on a terminal or in a notebook, a line every 30 s "
                                    "in a log file) | off: none, only a line per epoch (saved notebooks)", "run",
                            train=False)
    # VAE
    vae_latent: int = setting(16, "size of the VAE's code z", "models")
    vae_width: int = setting(32, "VAE decoder channels at 14x14 (2x at 7x7); the encoder's layers are 16x "
                                 "and 8x this", "models")
    vae_lr: float = setting(1e-3, "VAE Adam learning rate (assignment: 1e-3)", "models", flag=False)
    vae_mixture: int = setting(50, "Gaussians of the mixture fitted to the VAE's training codes after training, "
                                   "which its samples' codes are drawn from (0 = the prior N(0, I))", "models",
                               train=False, before=0)
    # GAN and cGAN
    gan_noise: int = setting(100, "size of the GAN's noise vector (assignment: 100)", "models", flag=False)
    gan_width: int = setting(64, "G's channels at 14x14 (2x at 7x7, 1/4 at 28x28)", "models")
    gan_d_width: int = setting(32, "the GAN's and cGAN's D channels at 14x14 (2x at 7x7)", "models")
    gan_lr: float = setting(2e-4, "Adam learning rate of G and D (assignment: 2e-4)", "models", flag=False)
    gan_beta1: float = setting(0.5, "Adam beta1 of the GANs (0.5 is the usual choice)", "models", flag=False)
    gan_spectral_norm: bool = setting(False, "spectral normalisation of every layer of the GAN's and cGAN's D (in "
                                             "place of its batch norm)", "models", before=False)
    gan_ema: float = setting(0.0, "decay of the average of G's weights that the GAN and cGAN sample with (0 = "
                                  "off: G itself)", "models", before=0.0)
    cgan_real_target: float = setting(0.9, "the cGAN's target for real images (one-sided label smoothing)",
                                      "models", flag=False)
    # WGAN-GP
    wgan_lr: float = setting(1e-4, "WGAN-GP Adam learning rate of G and the critic (betas 0 and 0.9)", "models",
                             flag=False)
    wgan_n_critic: int = setting(5, "WGAN-GP critic steps (batches) per generator step", "models")
    wgan_gp: float = setting(10.0, "WGAN-GP lambda, the weight of the gradient penalty", "models")
    wgan_critic_width: int = setting(64, "WGAN-GP critic channels at 14x14 (2x at 7x7)", "models")
    wgan_clip: float = setting(0.01, "the clipping WGAN's bound c: critic weights clipped to [-c, c]", "models")
    wgan_clip_lr: float = setting(5e-5, "the clipping WGAN's RMSprop learning rate, G and critic", "models")
    # DDPM and cDDPM
    ddpm_T: int = setting(1000, "diffusion steps of the forward process", "models", flag=False)
    ddpm_beta_start: float = setting(1e-4, "noise variance added at the first step", "models", flag=False)
    ddpm_beta_end: float = setting(0.02, "noise variance added at the last step", "models", flag=False)
    ddpm_width: int = setting(64, "U-Net channels at 14x14 (doubled at 7x7)", "models")
    ddpm_lr: float = setting(1e-3, "DDPM Adam peak learning rate", "models")
    ddpm_warmup: int = setting(200, "optimizer steps of linear learning-rate warm-up", "models", flag=False,
                               profiles={"smoke": 1})
    ddpm_ema: float = setting(0.999, "decay of the weight average used for sampling (0 = off)", "models")
    ddpm_min_snr: float = setting(5.0, "min-SNR-gamma loss weighting over timesteps (0 = plain MSE)", "models")
    ddpm_lr_decay: bool = setting(False, "after the warm-up, lower the DDPM's learning rate along a cosine to 0 at "
                                         "its last step", "models", before=False)
    ddpm_predict: str = setting("x0", "what the U-Net outputs: x0 (the clean digit, turned into the noise it "
                                      "implies) | eps (the noise, as in the DDPM paper)", "models", before="eps")
    cddpm_p_uncond: float = setting(0.1, "probability that a cDDPM training label is replaced by the null label",
                                    "models", flag=False)
    cddpm_guidance: float = setting(1.0, "guidance weight w of the cDDPM's exported samples (0 = none)", "models",
                                    train=False)
    # sampling and measuring
    sampler: str = setting("ddim", "DDPM export sampler: ddim (strided; deterministic only with ddim_eta 0) | "
                                   "ancestral (the paper's "
                                   "T steps)", "measuring", train=False)
    ddim_steps: int = setting(50, "network passes per DDIM sample", "measuring", train=False, profiles={"smoke": 5})
    ddim_eta: float = setting(1.0, "DDIM noise: 0 deterministic, 1 the ancestral sampler's amount on each jump",
                              "measuring", train=False)
    ancestral_preview: int = setting(10, "DDPM images also drawn with the T-step ancestral sampler (0 = none)",
                                     "measuring", train=False, profiles={"smoke": 0})
    eval_epochs: int = setting(2, "passes over the training set for the evaluator", "measuring", train=False,
                               profiles={"smoke": 1, "full": 3})
    eval_held_out: int = setting(10000, "training digits kept from the evaluator: with as many test digits, the "
                                        "real floor of every measure (two sets it never saw)", "measuring",
                                 train=False, profiles={"smoke": 100})
    detector_steps: int = setting(1000, "optimizer steps (batch 128) of the two-sample test's detector (sample "
                                        "or real?), trained afresh per model", "measuring", train=False,
                                  profiles={"smoke": 20})
    bootstrap: int = setting(100, "bootstrap resamples behind the ranges of FID, Inception Score, precision and "
                                  "recall", "measuring",
                             train=False, profiles={"smoke": 10})
    epoch_fid_samples: int = setting(1000, "samples per model drawn after every epoch for the per-epoch FID",
                                     "measuring", train=False, profiles={"smoke": 20})
    epoch_fid_ddpm_samples: int = setting(500, "the same for diffusion models, whose samples cost more",
                                          "measuring", train=False, profiles={"smoke": 20, "full": 1000})
    epoch_fid_ddim_steps: int = setting(10, "DDIM steps of those per-epoch diffusion samples", "measuring",
                                        train=False, profiles={"smoke": 2, "full": 20})
    # opt-in studies (Part C)
    sampler_study: bool = setting(False, "from the DDPM's weights: FID and time of ancestral-1000, "
                                         "DDIM-100/50/20/10 and DDIM-100/50/20 with eta 1", "studies", train=False)
    sweep_steps: int = setting(0, ">0: latent-size and width sweeps of VAE and GAN, this many optimizer steps "
                                  "per setting", "studies", train=False)
    seeds: int = setting(1, ">1: train every model again with seeds seed+1, seed+2, ... and report the spread",
                         "studies", train=False)
    ddpm_study_steps: int = setting(0, ">0: the DDPM design study, this many steps per variant", "studies",
                                    train=False)
    reference_ddpm: bool = setting(False, "also train the slower public DDPM design for as long as ours trained",
                                   "studies", train=False)
    benchmark: bool = setting(False, "instead of the run: time each model's training step and sampling",
                              "studies", train=False)
    # speed
    amp: str = setting("auto", "mixed precision + channels-last: auto (bf16 on Ampere+ GPUs and AMX CPUs, fp16 "
                               "on older GPUs) | bf16 | fp16 | off", "speed", train=False)
    compile: bool = setting(False, "torch.compile the networks being trained (CUDA only)", "speed", train=False)
    max_batches: int = setting(0, ">0 caps the batches per epoch (smoke tests); 0 = whole epochs", "speed",
                               profiles={"smoke": 2})

    def model_epochs(self, name: str) -> int:
        return self.epochs[name]


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
NOT_TRAINING_FIELDS = {name for name, f in FIELDS.items() if not f.metadata["train"]}
BEFORE = {k: f.metadata["before"] for k, f in FIELDS.items() if f.metadata["before"] is not None}  # older code's values
FLAGS = [name for name, f in FIELDS.items() if f.metadata["flag"]]  # also MNIST_GEN_<NAME>
PR_K = 5  # the k of the k-NN manifolds in precision and recall (Kynkaanniemi et al. 2019), section 9


@functools.lru_cache(maxsize=None)
def cuda_capability() -> tuple:
    """The CUDA GPU's compute capability, e.g. (7, 5) for a T4, (9, 0) for an H100."""
    return tuple(torch.cuda.get_device_capability())


def profile_defaults(profile: str) -> dict:
    """The settings a profile changes; every other field keeps its Config default."""
    if profile not in PROFILES:
        raise SetupError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    values = {name: f.metadata["profiles"][profile] for name, f in FIELDS.items() if profile in f.metadata["profiles"]}
    return {**values, "epochs": {name: spec.epochs[profile] for name, spec in MODELS.items()}}


def parse_value(name: str, text, source: str):
    """A setting's value from text (a flag, an environment variable, a settings-cell field)."""
    f = FIELDS[name]
    text = str(text)
    if f.type is bool:
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise SetupError(f"{source}: {text!r} is not a valid switch for {name}: use 1 or 0")
        return text.lower() in ("1", "true", "yes", "on")
    try:
        return (f.metadata["parse"] or f.type)(text)
    except ValueError:
        kind = "int" if f.type is dict else f.type.__name__
        raise SetupError(f"{source}: {text!r} is not a valid {kind} for {name}") from None


def shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=Path(sys.argv[0]).name if not IN_KERNEL else "mnist_generative_models_complete.py",
        usage="%(prog)s [--profile {smoke,cpu,full}] [--models LIST] [--SETTING VALUE ...]  (--help lists them)",
        description="Train and compare VAE, GAN, cGAN and DDPM (and the opt-in WGAN-GP and conditional DDPM) "
                    "on MNIST or Fashion-MNIST.",
        epilog="Epochs per profile: " + "; ".join(
            f"{p}: " + ", ".join(f"{n} {s.epochs[p]}" for n, s in MODELS.items()) for p in PROFILES)
        + ". Precedence, lowest first: the profile's defaults < the notebook's settings cell < MNIST_GEN_<NAME> "
          "environment variables < these flags. Exit status 2: a setting or an input that cannot work (nothing was "
          "trained); 1: a failure while running (a model that diverged, a missed checklist item).")
    base = Config()
    for group, about in GROUPS.items():
        args = parser.add_argument_group(group, about)
        if group == "run":
            args.add_argument("--profile", choices=PROFILES, help=f"{FIELDS['profile'].metadata['help']} "
                              "(env MNIST_GEN_PROFILE)")
        for name in FLAGS:
            f = FIELDS[name]
            if f.metadata["group"] != group:
                continue
            others = "".join(f", {p} {shown(v)}" for p, v in f.metadata["profiles"].items())
            default = "per model, below" if name == "epochs" else (shown(getattr(base, name)) or "none") + others
            switch = {"nargs": "?", "const": "1"} if f.type is bool else {}  # `--benchmark` alone means on
            args.add_argument("--" + name.replace("_", "-"), dest=name, type=str, **switch,
                              help=f"{f.metadata['help']} (default: {default}; env MNIST_GEN_{name.upper()})")
    return parser


def make_config(argv=None, env=None, cell=None) -> Config:
    """Profile defaults < the notebook's settings cell < MNIST_GEN_* environment variables < flags.
    argv: the command line (None in a notebook); cell: the settings cell's values."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv) if argv is not None else None
    cell = {k: v for k, v in (cell or {}).items() if v not in ("", 0, False, None)}  # empty: not set
    profile = ((args.profile if args else None) or env.get("MNIST_GEN_PROFILE") or cell.pop("profile", None)
               or ("full" if torch.cuda.is_available() else "cpu"))
    cell.pop("profile", None)  # when a flag or the environment chose it
    cfg = Config(profile=profile, **profile_defaults(profile))
    layers = [("the settings cell", {k: (v, f"settings cell field {k}") for k, v in cell.items()}),
              ("environment", {n: (env["MNIST_GEN_" + n.upper()], "MNIST_GEN_" + n.upper())
                               for n in FLAGS if env.get("MNIST_GEN_" + n.upper())}),
              ("flags", {n: (getattr(args, n), "--" + n.replace("_", "-"))
                         for n in FLAGS if args is not None and getattr(args, n) is not None})]
    for _, values in layers:
        for name, (text, source) in values.items():
            setattr(cfg, name, parse_value(name, text, source))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def need(ok, message):
        if not ok:
            raise SetupError(message)

    unknown = [m for m in cfg.models if m not in MODELS]
    need(not unknown and cfg.models, f"unknown model(s) {unknown or cfg.models}: use a comma list of {','.join(MODELS)}")
    need(all(cfg.epochs[m] >= 1 for m in cfg.models), "epochs must be 1 or more")
    need(cfg.dataset in DATASETS, f"dataset {cfg.dataset!r}: use {' or '.join(DATASETS)}")
    need(cfg.vae_latent >= 2 and cfg.vae_width >= 1 and cfg.gan_width >= 4 and cfg.gan_d_width >= 1,
         "vae_latent must be 2 or more, vae_width 1 or more, gan_width 4 or more (G keeps gan_width / 4 "
         "channels at 28x28), gan_d_width 1 or more")
    need(cfg.wgan_n_critic >= 1 and cfg.wgan_gp >= 0 and cfg.wgan_critic_width >= 1,
         "wgan_n_critic must be 1 or more, wgan_gp 0 or more, wgan_critic_width 1 or more")
    need(cfg.wgan_clip > 0 and cfg.wgan_clip_lr > 0, "wgan_clip and wgan_clip_lr must be above 0")
    need(cfg.cddpm_guidance >= 0, "cddpm_guidance must be 0 (no guidance) or more")
    need(not cfg.compare_run or (Path(cfg.compare_run) / "results.json").is_file(),
         f"compare_run {cfg.compare_run!r} holds no results.json: name the output folder of a finished run")
    need(cfg.sweep_steps >= 0, "sweep_steps must be 0 (off) or more")
    need(not cfg.sampler_study or "ddpm" in cfg.models,
         "sampler_study needs the DDPM: add ddpm to --models, or drop --sampler-study")
    need(not cfg.reference_ddpm or "ddpm" in cfg.models,
         "reference_ddpm compares with the DDPM: add ddpm to --models, or drop --reference-ddpm")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device {cfg.device!r}: use auto, cpu or cuda")
    need(cfg.device != "cuda" or torch.cuda.is_available(),
         "device cuda was asked for but torch sees no CUDA GPU: use --device cpu (or auto)")
    need(cfg.n_samples >= 10, "n_samples must be at least 10 (one per digit for the cGAN)")
    need(cfg.max_batches >= 0, "max_batches must be 0 (whole epochs) or more")
    need(cfg.progress in ("auto", "off"), f"progress {cfg.progress!r}: use auto or off")
    need(cfg.amp in ("auto", "bf16", "fp16", "off"), f"amp {cfg.amp!r}: use auto, bf16, fp16 or off")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    need(not (cfg.amp == "bf16" and on_cuda) or cuda_capability() >= (8, 0),
         f"amp bf16 needs a GPU of compute capability 8.0 or more (Ampere on); this one has "
         f"{'.'.join(map(str, cuda_capability())) if on_cuda else '?'}: use --amp fp16 (float16 with loss scaling, "
         "what auto picks here) or --amp off")
    need(cfg.sampler in ("ddim", "ancestral"), f"sampler {cfg.sampler!r}: use ddim or ancestral")
    need(1 <= cfg.ddim_steps <= cfg.ddpm_T, f"ddim_steps must be between 1 and {cfg.ddpm_T}")
    need(cfg.ancestral_preview >= 0, "ancestral_preview must be 0 or more")
    need(cfg.ddpm_width >= 8 and cfg.ddpm_width % 8 == 0, "ddpm_width must be a multiple of 8")
    need(cfg.ddpm_lr > 0 and cfg.ddpm_min_snr >= 0, "ddpm_lr must be > 0, ddpm_min_snr >= 0")
    need(0 <= cfg.ddpm_ema < 1 and 0 <= cfg.gan_ema < 1, "ddpm_ema and gan_ema must be in [0, 1)")
    need(cfg.ddpm_predict in ("eps", "x0"), f"ddpm_predict {cfg.ddpm_predict!r}: use eps or x0")
    need(cfg.vae_mixture >= 0, "vae_mixture must be 0 (sample from the prior) or more Gaussians")
    need(cfg.eval_epochs >= 1, "eval_epochs must be 1 or more")
    need(cfg.eval_held_out >= cfg.n_samples, f"eval_held_out ({cfg.eval_held_out}) must be at least n_samples "
         f"({cfg.n_samples}): the real floor compares as many held-out training digits as samples")
    need(cfg.detector_steps >= 1, "detector_steps must be 1 or more")
    need(cfg.bootstrap >= 2, "bootstrap must be 2 or more (resamples behind each range)")
    need(cfg.ddpm_study_steps >= 0, "ddpm_study_steps must be 0 (off) or more")
    need(cfg.epoch_fid_samples >= PR_K + 1 and cfg.epoch_fid_ddpm_samples >= PR_K + 1,
         f"epoch_fid_samples and epoch_fid_ddpm_samples must be at least {PR_K + 1}")
    need(1 <= cfg.epoch_fid_ddim_steps <= cfg.ddpm_T, f"epoch_fid_ddim_steps must be between 1 and {cfg.ddpm_T}")
    need(cfg.seeds >= 1, "seeds must be 1 (one run) or more")
    need(not cfg.compile or (cfg.device != "cpu" and torch.cuda.is_available()), "compile is for CUDA runs (on a "
         "CPU it needs a C++ toolchain and was not measured to help): drop --compile or use --device cuda")


# %% [markdown]
# ### 6.3 The run and its stages
#
# The values every stage needs (the config, the device, the data, the evaluator and its reference
# features, the output folder, the trained models and the results) travel as one object, `Run`.
# Every cell that does work is a **stage**: a function marked `@stage`, which this notebook runs at
# once on its `Run` when the cell is reached. The script twin runs the same cells top to bottom;
# `run(ctx)` replays them all in order (the tests use it).

# %% jupyter={"source_hidden": true}
# @title The run context and its stages { display-mode: "form" }
@dataclass
class Trained:
    """One trained model: its trainer (networks, optimizers, `sample`), its loss history and its exports."""
    name: str
    model: object
    history: object
    parameters: int
    samples: np.ndarray | None = None  # the exported images, uint8 [n, 28, 28]
    asked: torch.Tensor | None = None  # the classes asked of a conditional model, one per sample
    sample_seconds: float = 0.0  # wall time of drawing them
    extras: dict = field(default_factory=dict)  # per-model numbers measured beside the samples

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.name]


@dataclass
class Run:
    cfg: Config
    device: torch.device | None = None
    out: Path | None = None
    train: tuple | None = None  # (images uint8 [N, 28, 28], labels) on the training device
    test: tuple | None = None  # the same on the CPU
    evaluator: nn.Module | None = None
    reference: torch.Tensor | None = None  # the test images every model is compared with
    ref_feats: np.ndarray | None = None  # the evaluator's features of those
    models: dict = field(default_factory=dict)  # name -> Trained, in training order
    arrays: dict = field(default_factory=dict)  # figure data that is not a number (images, coordinates)
    real_feats: np.ndarray | None = None  # the evaluator's features of the held-out training digits (real_features)
    results: dict = field(default_factory=lambda: {"models": {}, "failed": {}})
    started: float = field(default_factory=time.perf_counter)

    def wants(self, name: str) -> bool:
        """Train `name` in this run: selected, and not a benchmark (which replaces the run)."""
        return name in self.cfg.models and not self.cfg.benchmark

    def checkpoint(self, name: str) -> Path:
        return self.out / "checkpoints" / f"{name}.pt"

    @property
    def export_sampler(self) -> Sampler:
        cfg = self.cfg
        return Sampler(cfg.sampler, cfg.ddim_steps if cfg.sampler == "ddim" else cfg.ddpm_T, eta=cfg.ddim_eta)


STAGES = []  # the work cells, in the order they appear


def stage(fn):
    """Mark a cell's work: in a notebook, or as a script, it runs at once on this run's context.
    Its wall time is kept in the results (stage_seconds), so every run says where its time went."""
    @functools.wraps(fn)
    def timed(ctx):
        t0 = time.perf_counter()
        try:
            return fn(ctx)
        finally:
            seconds = ctx.results.setdefault("stage_seconds", {})
            seconds[fn.__name__] = seconds.get(fn.__name__, 0.0) + time.perf_counter() - t0

    STAGES.append(timed)
    if RUN:
        timed(ctx)
    return timed


def shows(name: str):
    """A stage that shows more of model `name` once its section trained (or loaded) it: fn(ctx, trained)
    runs only then."""
    def wrap(fn):
        @functools.wraps(fn)
        def body(ctx):
            trained = ctx.models.get(name)
            return fn(ctx, trained) if trained else None
        return stage(body)
    return wrap


def run(ctx: Run) -> Run:
    """Run every stage of the notebook, in order, on `ctx` (as Run all does, cell by cell)."""
    for fn in STAGES:
        fn(ctx)
    return ctx


def script_error(kind, err, tb):
    """As a script, a SetupError ends the run like argparse's own errors: the usage line, the message,
    exit status 2, no traceback. Anything else keeps Python's report and its exit status 1."""
    if not issubclass(kind, SetupError):
        return sys.__excepthook__(kind, err, tb)
    sys.stdout.flush()
    build_parser().print_usage(sys.stderr)
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


# %% jupyter={"source_hidden": true}
# @title This run's configuration (settings cell, environment, flags) { display-mode: "form" }
if RUN:
    if not IN_KERNEL:
        sys.excepthook = script_error
    cfg = make_config(sys.argv[1:] if not IN_KERNEL else None,
                      cell=dict(profile=profile, models=models, epochs=epochs, dataset=dataset,
                                data_root=data_root, out=out, drive=drive, resume=resume))
    ctx = Run(cfg)


# %% [markdown]
# ### 6.4 Helpers: device, precision, seeds, progress bars, files

# %% jupyter={"source_hidden": true}
# @title Helpers: device, precision, seeds, progress bars, files { display-mode: "form" }
def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# progress bars redraw often on a terminal or in a notebook, rarely when written to a log file
BAR = {"mininterval": 0.2 if (IN_KERNEL or sys.stderr.isatty()) else 30.0, "leave": False, "disable": False}


def configure_progress(cfg: Config) -> None:
    """progress off: no bars at all (a notebook saved with its outputs keeps only the per-epoch lines)."""
    BAR["disable"] = cfg.progress == "off"


def progress_bar(iterable=None, **kwargs):
    """A progress bar (tqdm.auto: a widget in a notebook, text elsewhere)."""
    return tqdm(iterable, **{**BAR, **kwargs})


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """True on Intel CPUs with AMX (bf16 matrix tiles), where bf16 convolutions run 2-3x faster."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def cuda_has_bf16() -> bool:
    """Native bf16 from Ampere (compute capability 8) on; older GPUs such as Colab's T4 only emulate it."""
    return cuda_capability() >= (8, 0)


def amp_dtype(cfg: Config, device: torch.device):
    """The autocast precision, or None for float32. auto: bf16 where the hardware runs it natively
    (CUDA from Ampere on, CPUs with AMX), fp16 on older GPUs (with loss scaling), else float32."""
    if cfg.amp != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg.amp]
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16() else torch.float16
    return torch.bfloat16 if cpu_has_amx() else None


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    return amp_dtype(cfg, device) is not None


def autocast(cfg: Config, device: torch.device):
    """Autocast for forward passes in amp_dtype; weights and optimizer states stay float32."""
    dtype = amp_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def show(fig, path: Path) -> None:
    """Save a figure under the output folder (atomically) and show it inline (in a notebook) or close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    if IN_KERNEL:
        plt.show()
    plt.close(fig)


def write_text(path: Path, text: str):
    """Write atomically: a temporary file, then a rename, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=1, default=float))


def save_npz(path: Path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def save_checkpoint(path: Path, **state):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


DRIVE_MOUNT = Path("/content/drive")  # where Colab mounts Google Drive


def use_drive(cfg: Config) -> None:
    """Colab: mount Google Drive and move `out` into cfg.drive, so outputs and checkpoints survive a
    disconnect (run again with resume on to continue where training stopped)."""
    if not cfg.drive:
        return
    try:
        from google.colab import drive
    except ImportError:
        raise SetupError("drive is a Google Colab setting (it mounts your Drive); elsewhere choose "
                         "the output folder with --out") from None
    drive.mount(str(DRIVE_MOUNT))
    cfg.out = str(DRIVE_MOUNT / cfg.drive / cfg.out)


def flush_drive(cfg: Config) -> None:
    """Colab: write everything out to Google Drive at the end of the run (then it is unmounted)."""
    if cfg.drive:
        from google.colab import drive
        drive.flush_and_unmount()
        print(f"Google Drive: everything written out to {cfg.out} and unmounted (mount it again to open the files)")


def code_blob() -> str | None:
    """The git blob id of this script (what `git hash-object` prints), when it runs as a file: a run made outside
    a git checkout (a copy on a GPU machine) can still be matched to its commit (`git log --find-object`)."""
    if "__file__" not in globals():
        return None
    data = Path(__file__).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def code_commit() -> str:
    """The git commit of the code that runs, or why it is unknown."""
    here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        if head.returncode != 0:
            return "unknown (not run from a git checkout)"
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "mnist_generative_models_complete.py"],
                                 capture_output=True, timeout=10, cwd=here).returncode
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git here)"
    return head.stdout.strip() + (" (with uncommitted changes to the code)" if changed else "")


# %% [markdown]
# ### 6.5 Loading the data
#
# `torchvision.datasets.MNIST(root, download=True)` fetches the four IDX files once (or finds them
# under `root/MNIST/raw/`). We keep the 60,000 training digits as **one uint8 tensor** on the
# training device and cut batches from it with a seeded permutation; conversion to float happens per
# batch. This avoids per-image PIL transforms, which on a 2-core CPU cost more than training the VAE
# (the benchmark, section C8, times both).

# %% jupyter={"source_hidden": true}
# @title Loading MNIST and cutting batches; the run's first stage { display-mode: "form" }
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def raw_folder(root: str, dataset: str = "mnist") -> Path:
    return Path(root) / DATASETS[dataset]["torchvision"] / "raw"


def how_to_get_mnist(root: str, dataset: str = "mnist") -> str:
    folder = DATASETS[dataset]["torchvision"]
    offline = (" On Debian or Ubuntu, `apt-get install dataset-fashion-mnist` puts them, gzipped, in "
               "/usr/share/datasets/fashion-mnist/: gunzip them into that raw/ folder." if dataset == "fashion" else "")
    return (f"Fix: connect to the internet so torchvision can download it, or pass --data-root "
            f"(env MNIST_GEN_DATA_ROOT) pointing at a folder whose {folder}/raw/ holds the four files "
            f"{', '.join(MNIST_FILES)} (unpacked), e.g. from a copy of {raw_folder(root, dataset)} made elsewhere."
            + offline)


def check_idx_file(path: Path, root: str, dataset: str = "mnist"):
    """Refuse a raw MNIST file whose IDX header or size is wrong, naming it (torchvision would fail obscurely)."""
    images = "images" in path.name
    data = path.read_bytes()
    header = 16 if images else 8
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(3 if images else 1)] \
        if len(data) >= header else []
    expected = header + int(np.prod(dims)) if dims else None
    problem = None
    if magic != (2051 if images else 2049):
        problem = f"is not an MNIST IDX {'image' if images else 'label'} file (magic number {magic})"
    elif images and dims[1:] != [28, 28]:
        problem = f"holds {dims[1]}x{dims[2]} images, not 28x28"
    elif len(data) != expected:
        problem = f"is {'truncated' if len(data) < expected else 'too long'}: {len(data)} bytes, expected {expected}"
    if problem:
        raise SetupError(f"{DATASETS[dataset]['title']} file {path} {problem}. Delete it so torchvision downloads "
                         f"it again, or replace it with the original. " + how_to_get_mnist(root, dataset))


def load_mnist(root: str, train: bool = True, dataset: str = "mnist"):
    """Return (images uint8 [N, 28, 28], labels int64 [N]) of one split of MNIST (or Fashion-MNIST)."""
    import torchvision.datasets
    prefix = "train" if train else "t10k"
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        path = raw_folder(root, dataset) / f"{prefix}-{kind}"
        if path.is_file():
            check_idx_file(path, root, dataset)
    try:
        ds = getattr(torchvision.datasets, DATASETS[dataset]["torchvision"])(root, train=train, download=True)
    except Exception as err:  # no network, a half-written file, a foreign file...
        raise SetupError(f"could not load {DATASETS[dataset]['title']} from {raw_folder(root, dataset)} "
                         f"({type(err).__name__}: {str(err)[:200]}).\n" + how_to_get_mnist(root, dataset)) from None
    return ds.data.clone(), ds.targets.clone()


def reference_digits(test_uint8: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n test digits drawn at random (seeded), in random order. MNIST's test set is not shuffled: its first
    5,000 digits come from NIST's SD-3 and are drawn thinner than its last 5,000 (SD-1: fewer pixels above
    127). So its first n would be a biased sample of it, and any first part of the reference (the
    per-epoch FIDs', the two-sample test's fitting half) would be another kind of digit than the rest."""
    return test_uint8[torch.randperm(len(test_uint8), generator=torch.Generator().manual_seed(seed))[:n]]


def steps_per_epoch(n_images: int, cfg: Config) -> int:
    n = n_images // cfg.batch_size  # the last partial batch is dropped
    return min(n, cfg.max_batches) if cfg.max_batches else n


def batches(images: torch.Tensor, labels: torch.Tensor, cfg: Config, gen: torch.Generator):
    """One epoch of (uint8 images, labels) batches in a seeded random order."""
    order = torch.randperm(len(images), generator=gen).to(images.device)
    for i in range(steps_per_epoch(len(images), cfg)):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        yield images[idx], labels[idx]


def environment(cfg: Config, device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": str(device), "threads": torch.get_num_threads(),
           "autocast": str(amp_dtype(cfg, device)).replace("torch.", ""), "cpu_amx": cpu_has_amx(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "code_commit": code_commit(),
           "code_blob": code_blob(),
           "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


@stage
def start(ctx):
    """Mount Drive if asked, pick the device, say which run this is, and load the data."""
    cfg = ctx.cfg
    configure_progress(cfg)
    use_drive(cfg)
    ctx.device, ctx.out = pick_device(cfg), Path(cfg.out)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = environment(cfg, ctx.device)
    ctx.results.update(config=dataclasses.asdict(cfg), environment=env)
    print(f"run: profile {cfg.profile}, device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
          f"autocast {env['autocast']}, torch {env['torch']}, Python {env['python']}, {env['threads']} threads, "
          f"started {env['started']}\ncode commit: {env['code_commit']}")
    if cfg.drive:
        print(f"outputs and checkpoints go to Google Drive: {ctx.out}")
    elif IN_COLAB:
        print(f"note: {ctx.out} is on this Colab runtime's own disk, which is lost when the runtime disconnects or "
              "is recycled. To keep the outputs and checkpoints, set drive (e.g. MyDrive/mnist-gen) in the settings "
              "cell; after a disconnect, run again with resume ticked to continue where training stopped.")
    if cfg.benchmark:
        print("benchmark: the models are timed in section C8; nothing is trained")
    else:
        print("models: " + ", ".join(f"{MODELS[m].title} {cfg.model_epochs(m)} epochs" for m in cfg.models)
              + f"; {cfg.n_samples} samples each; output folder {ctx.out}")
    if cfg.pretrained:
        print(f"pretrained: nothing is trained here; each model is loaded from its finished checkpoint in "
              f"{ctx.out / 'checkpoints'}, and its losses, per-epoch samples and training times are that run's")
    ctx.train = tuple(t.to(ctx.device) for t in load_mnist(cfg.data_root, train=True, dataset=cfg.dataset))
    ctx.test = load_mnist(cfg.data_root, train=False, dataset=cfg.dataset)
    print(f"{DATASETS[cfg.dataset]['title']}: {len(ctx.train[0])} training and {len(ctx.test[0])} test images")
    if cfg.eval_held_out >= len(ctx.train[0]):
        raise SetupError(f"eval_held_out {cfg.eval_held_out} must be fewer than the {len(ctx.train[0])} training "
                         "images (the evaluator trains on the rest): lower it")


# %% [markdown]
# ### 6.6 How every model is trained
#
# Each model's section (Part A) defines a small **trainer** class: it builds the networks and their Adam
# optimizers, takes one training `step` on a batch of 128 and returns the losses, and draws images
# with `sample`. One loop, `fit`, runs the epochs for every model. Seed 42 fixes the weights'
# initialisation and the batch order. After every epoch `fit` also draws a fixed set of samples,
# untimed, from a random generator of their own; Part B turns them into a per-epoch FID.
#
# **Mixed precision.** On hardware with fast bfloat16 (CUDA GPUs from Ampere on, CPUs with AMX) the
# forward passes run in bf16 under autocast; on older GPUs (Colab's T4) in fp16 with loss scaling;
# elsewhere in float32. Weights and optimizer states stay float32. Conv nets use the channels-last
# layout with mixed precision and on every CPU, where its convolution kernels are faster.
#
# **Nothing lost.** After every epoch `fit` writes `checkpoints/<model>.pt` (a temporary file, then a
# rename): weights, optimizer states, the epoch, the loss history, the per-epoch samples and the random
# generators' states, all as tensors and plain data that `torch.load(..., weights_only=True)` reads
# without running code. With `resume` on, each model continues from its last finished epoch, and on a
# CPU it ends with exactly the weights an uninterrupted run would have; a finished model is loaded,
# not retrained. A loss that turns NaN or infinite stops that model; the run records it and goes on.

# %% jupyter={"source_hidden": true}
# @title The training loop, its history and its checkpoints { display-mode: "form" }
class LossScaler:
    """fp16 gradients can underflow to zero: scale the loss up before backward and the gradients back
    down before the optimizer step, skipping steps whose gradients overflowed (torch's GradScaler).
    bf16 and float32 need none of this, and then it is a plain backward and step."""

    def __init__(self, cfg: Config, device: torch.device):
        fp16 = amp_dtype(cfg, device) == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None

    def backward_step(self, loss, opt):
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict):
        """An fp16 run's scale carries on; a checkpoint from a bf16 or float32 run has none (the scaler starts
        afresh), and a scale saved by an fp16 run means nothing to a bf16 or float32 one."""
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def prepare(model: nn.Module, cfg: Config, device) -> nn.Module:
    """Move to the device; conv nets use the channels-last layout that fast kernels prefer, with mixed
    precision and on any CPU (where it speeds up float32 convolutions as well; the benchmark, section C8,
    times the steps)."""
    model = model.to(device)
    if amp_enabled(cfg, device) or device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(cfg: Config, *modules):
    """With cfg.compile, torch.compile each module's forward in place (its state_dict keys stay the same)."""
    if cfg.compile:
        for module in modules:
            module.compile()


def adam(params, lr: float, device, betas=(0.9, 0.999)):
    """Adam; on CUDA the fused kernel updates all parameters in one launch."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=device.type == "cuda")


class History:
    """Per-step and per-epoch means of named losses, wall time, and the samples drawn after each epoch.

    Losses arrive as tensors and are copied to the CPU every FLUSH_EVERY steps, not every
    step: on a GPU each copy waits for the GPU to finish, which would stall training."""

    FLUSH_EVERY = 50

    def __init__(self, model: str, *names, hint: str = "lower its learning rate"):
        self.model, self.names, self.hint = model, names, hint
        self.step = {n: [] for n in names}
        self.epoch = {n: [] for n in names}
        self.seconds, self._start, self._mark, self._pending = 0.0, time.perf_counter(), 0, []
        self.paused = 0.0  # seconds spent drawing the per-epoch samples, not counted as training
        self.paused_before = 0.0  # the same, in the runs its checkpoint continues (None: not recorded then)
        self.probes = []  # per epoch: the samples drawn after it (uint8 [n, 28, 28])
        self.epoch_seconds = []  # per epoch: the training seconds so far at its end
        self.peak_memory_mb, self.memory_kind, self.memory_parts = None, None, None

    def log(self, **losses):
        """Record one step; every FLUSH_EVERY steps return the latest values (else None)."""
        self._pending.append(torch.stack([losses[n].detach().float() for n in self.names]))
        return self.flush() if len(self._pending) >= self.FLUSH_EVERY else None

    def flush(self):
        if not self._pending:
            return None
        values = torch.stack(self._pending).cpu()
        self._pending = []
        if not torch.isfinite(values).all():
            bad = [n for i, n in enumerate(self.names) if not torch.isfinite(values[:, i]).all()]
            raise FloatingPointError(f"{self.model}: the loss {', '.join(bad)} became non-finite "
                                     f"near step {len(self.step[self.names[0]]) + len(values)}; {self.hint}")
        for i, n in enumerate(self.names):
            self.step[n].extend(values[:, i].tolist())
        return {n: self.step[n][-1] for n in self.names}

    def end_epoch(self):
        self.flush()
        for n, values in self.step.items():
            self.epoch[n].append(float(np.mean(values[self._mark:])))
        self._mark = len(self.step[self.names[0]])
        self.seconds = time.perf_counter() - self._start - self.paused
        self.epoch_seconds.append(self.seconds)

    @property
    def steps(self) -> int:
        return len(self.step[self.names[0]]) + len(self._pending)

    @property
    def epochs_done(self) -> int:
        return len(self.epoch[self.names[0]])

    @property
    def probe_seconds(self) -> float | None:
        """Seconds of per-epoch samples over every run that trained it (None: an older checkpoint's are unknown)."""
        return None if self.paused_before is None else self.paused_before + self.paused

    def as_dict(self):
        return {"epoch": self.epoch, "step": self.step, "train_seconds": self.seconds,
                "epoch_seconds": self.epoch_seconds, "probe_seconds": self.probe_seconds,
                "peak_memory_mb": self.peak_memory_mb, "memory_kind": self.memory_kind,
                "memory_parts": self.memory_parts}

    def load(self, saved: dict, probes=None):
        """Continue from a checkpoint's as_dict(): the clock resumes from its training seconds."""
        self.step, self.epoch = saved["step"], saved["epoch"]
        for n in self.names:  # a loss the code that trained it did not log: NaN, shown as a gap
            if n not in self.step:
                self.step[n] = [float("nan")] * len(self.step[self.names[0]])
                self.epoch[n] = [float("nan")] * len(self.epoch[self.names[0]])
        self.peak_memory_mb, self.memory_kind = saved["peak_memory_mb"], saved["memory_kind"]
        self.memory_parts = saved.get("memory_parts")
        self.epoch_seconds = list(saved.get("epoch_seconds") or [float("nan")] * len(self.epoch[self.names[0]]))
        self.seconds, self._mark = saved["train_seconds"], len(self.step[self.names[0]])
        self._start, self.paused = time.perf_counter() - self.seconds, 0.0
        self.paused_before = saved.get("probe_seconds")
        self.probes = [] if probes is None else list(probes.numpy())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, warmup: int, repeats: int, device) -> list:
    """Wall seconds of `repeats` calls of fn() after `warmup` untimed calls (GPU work included)."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def tensor_bytes(obj, seen: set) -> int:
    """Bytes of the tensors in obj (a tensor, or dicts / lists / tuples of them); a storage already in
    `seen` (shared by a view, or counted before) counts once."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def step_census(trainer, xb, yb) -> tuple:
    """Run one training step and count the tensors it needs: the state of every part of the trainer
    (weights, optimizer moments, an EMA copy), the gradients, and the activations autograd saved for the
    step's backward passes (kept here until the step ends, so none of their storages is reused and
    counted twice). Returns (the step's losses, MB per kind)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = trainer.step(xb, yb)
    seen = set()
    state = sum(tensor_bytes(part.state_dict(), seen) for part in trainer.parts.values()
                if isinstance(part, (nn.Module, torch.optim.Optimizer)))
    grads = sum(tensor_bytes(p.grad, seen) for m in trainer.modules for p in m.parameters() if p.grad is not None)
    activations = tensor_bytes(saved, seen)
    return losses, {"weights and optimizer state": state / 2**20, "gradients": grads / 2**20,
                    "saved activations": activations / 2**20}


class PeakMemory:
    """The memory one model needs to train, not the process's. On a GPU: CUDA's peak allocated bytes
    while the block runs (reset when it starts). On a CPU the resident memory of the process also holds
    Python, the data set and every model trained before, so the model is isolated by counting its
    tensors instead: `step` runs the first training step through `step_census` (the state, gradients
    and saved activations of one step at batch 128; short-lived temporaries are not counted).
    `mb` is None until it was measured."""

    CENSUS = "tensors of one training step (weights and optimizer state, gradients, saved activations)"

    def __init__(self, device: torch.device):
        self.device, self.mb, self.parts = device, None, None
        self.kind = "CUDA peak allocated" if device.type == "cuda" else self.CENSUS

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def step(self, trainer, xb, yb) -> dict:
        """One training step; on a CPU the first one is counted."""
        if self.device.type == "cuda" or self.parts is not None:
            return trainer.step(xb, yb)
        losses, self.parts = step_census(trainer, xb, yb)
        self.mb = sum(self.parts.values())
        return losses

    def so_far(self):
        """The peak until now, in MB (None before it was measured)."""
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.mb

    def __exit__(self, *exc):
        self.so_far()
        return False


def fit(trainer, data, cfg: Config, epochs: int, probe=None, gen: torch.Generator | None = None,
        checkpoint: Path | None = None, resume: bool = False, pretrained: bool = False, on_epoch=None):
    """Train for `epochs` over batches of 128 in the seeded order of `gen`; returns the History.
    probe(trainer), if given, draws samples after every epoch, untimed, kept in History.probes;
    on_epoch(hist, wall_seconds), if given, hears of every finished epoch. With
    `checkpoint`, the whole training state is saved there after every epoch; with `resume` too, training
    continues from the epoch saved there (a finished model is only loaded); with `pretrained` the
    checkpoint must hold all `epochs`, and nothing is trained."""
    images, labels = data
    gen = gen or torch.Generator().manual_seed(cfg.seed)  # the batch order
    hint = "lower its learning rate" + (f", or train in float32 (--amp off, MNIST_GEN_AMP=off; this run used "
                                        f"{str(amp_dtype(cfg, trainer.device)).replace('torch.', '')})"
                                        if amp_enabled(cfg, trainer.device) else "")
    hist = History(trainer.name, *trainer.losses, hint=hint)
    if (resume or pretrained) and checkpoint is not None and checkpoint.exists():
        restore(trainer, hist, gen, load_checkpoint(checkpoint, trainer.name, cfg, epochs))
        print(f"{trainer.name}: resumed from {checkpoint} after epoch {hist.epochs_done} of {epochs}")
    if pretrained and hist.epochs_done < epochs:
        found = (f"{checkpoint} holds {hist.epochs_done} of {epochs} epochs of {trainer.name}"
                 if hist.epochs_done else f"no checkpoint of {trainer.name} at {checkpoint}")
        raise SetupError(f"--pretrained: {found}: run once without --pretrained to train it "
                         f"(or with --resume to finish it) into {cfg.out}")
    if hasattr(trainer, "plan"):  # a learning-rate schedule that ends with the training
        trainer.plan(epochs * steps_per_epoch(len(images), cfg))
    with PeakMemory(trainer.device) as memory:
        for epoch in range(hist.epochs_done, epochs):
            started = time.perf_counter()
            bar = progress_bar(total=steps_per_epoch(len(images), cfg), desc=f"{trainer.name} epoch {epoch + 1}/{epochs}")
            for xb, yb in batches(images, labels, cfg, gen):
                losses = memory.step(trainer, xb, yb)
                bar.update()
                latest = hist.log(**losses)
                if latest:
                    bar.set_postfix({k: format(v, trainer.fmt) for k, v in latest.items()}, refresh=False)
            bar.close()
            hist.end_epoch()
            if probe is not None:
                t0 = time.perf_counter()
                for module in trainer.modules:
                    module.eval()
                hist.probes.append(probe(trainer))
                for module in trainer.modules:
                    module.train()
                hist.paused += time.perf_counter() - t0
            now = memory.so_far()
            if now is not None:  # a checkpoint's figure of another kind is replaced, not compared
                same = hist.memory_kind == memory.kind
                hist.peak_memory_mb = max(hist.peak_memory_mb or 0.0, now) if same else now
                hist.memory_kind, hist.memory_parts = memory.kind, memory.parts
            if checkpoint is not None:
                save_checkpoint(checkpoint, **training_state(trainer, hist, gen, epochs, cfg))
            print(f"{trainer.name} epoch {hist.epochs_done}/{epochs}: "
                  + ", ".join(f"{k} {v[-1]:{trainer.fmt}}" for k, v in hist.epoch.items())
                  + f" ({hist.seconds:.0f} s of training)")
            if on_epoch is not None:
                on_epoch(hist, time.perf_counter() - started)
    for module in trainer.modules:
        module.eval()
    return hist


def training_state(trainer, hist: History, gen: torch.Generator, epochs: int, cfg: Config) -> dict:
    """Everything needed to continue training, as state dicts, tensors and plain data."""
    rng = {"torch": torch.get_rng_state(), "batches": gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    parts = {k: (v.get_state() if isinstance(v, torch.Generator) else v.state_dict())
             for k, v in trainer.parts.items()}
    probes = {"probes": torch.from_numpy(np.stack(hist.probes))} if hist.probes else {}
    return {"model": trainer.name, "epoch": hist.epochs_done, "epochs": epochs,
            "finished": hist.epochs_done == epochs, **parts, "history": hist.as_dict(), **probes, "rng": rng,
            "config": dataclasses.asdict(cfg)}


def trains(setting_name: str, model: str) -> bool:
    """Whether a training setting changes how `model` trains: a setting of the "models" group belongs to the
    models whose entry `reads` its prefix; every other one (seed, data, batches) to all of them."""
    if model not in MODELS or FIELDS[setting_name].metadata["group"] != "models":
        return True
    return setting_name.startswith(MODELS[model].reads)


def load_checkpoint(path: Path, name: str, cfg: Config, epochs: int) -> dict:
    """A checkpoint of `name` made with the same training settings, or a SetupError saying what to do."""
    fix = f"delete {path} to train {name} from scratch, or run without --resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or not a torch file at all
        raise SetupError(f"{path} is not a readable checkpoint ({type(err).__name__}): {fix}") from None
    if not isinstance(state, dict) or state.get("model") != name or "history" not in state:
        raise SetupError(f"{path} is not a training checkpoint of {name} from this notebook: {fix}")
    # a setting added after the checkpoint was made counts as the value the code behaved as before it existed
    saved, now = {**dataclasses.asdict(Config()), **BEFORE, **state["config"]}, dataclasses.asdict(cfg)
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k not in NOT_TRAINING_FIELDS and saved[k] != now[k] and trains(k, name)]
    if changed:
        raise SetupError(f"{path} was trained with other settings ({'; '.join(changed)}): {fix}")
    if state["epoch"] > epochs:
        raise SetupError(f"{path} holds {state['epoch']} epochs of {name}, more than the {epochs} asked for: {fix}")
    return state


def set_generator_state(gen: torch.Generator, saved: torch.Tensor, what: str):
    """Continue a random stream from a checkpoint. A CPU generator's state and a CUDA generator's differ in kind
    (a checkpoint carried between a CPU and a GPU): then the stream restarts from a seed derived from the saved
    state, so the run goes on (reproducibly, though not as the uninterrupted run would have)."""
    try:
        gen.set_state(saved)
    except RuntimeError:
        gen.manual_seed(int.from_bytes(hashlib.sha256(saved.numpy().tobytes()).digest()[:8], "little"))
        print(f"{what}: the saved random state is another device's; its stream restarts from a seed derived from it")


def restore(trainer, hist: History, gen: torch.Generator, state: dict):
    for key, part in trainer.parts.items():
        try:
            if isinstance(part, torch.Generator):
                set_generator_state(part, state[key], f"{trainer.name} {key}")
            else:
                part.load_state_dict(state[key])
        except (KeyError, RuntimeError, ValueError) as err:
            raise SetupError(f"checkpoint of {trainer.name} does not fit this model ({key}: "
                             f"{str(err).splitlines()[0][:120]}): delete it or run without --resume") from None
    hist.load(state["history"], state.get("probes"))
    gen.set_state(state["rng"]["batches"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# %% [markdown]
# ### 6.7 Sampling, exporting, and the figures each model section shows
#
# Every model draws `n_samples` images in batches of 1,000 under `torch.inference_mode`. They are
# exported to `samples/<model>.npz` as `images` (uint8, N×28×28, 0 = background, 255 = ink) and, for
# a conditional model, `labels` (the class asked for, balanced over the ten). The sampler and its
# number of network passes are recorded with every output.

# %% jupyter={"source_hidden": true}
# @title Sampling, export and the figures of a model's section { display-mode: "form" }
SAMPLE_BATCH = 1000


def build_trainer(name: str, cfg: Config, device):
    """The trainer of MODELS[name]: its class is named in the entry and defined in the model's section."""
    return globals()[MODELS[name].trainer](name, cfg, device)


def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... : as balanced over the ten classes as n allows."""
    return torch.arange(n) % 10


def draw(model, n: int, gen: torch.Generator, sampler: Sampler | None = None, labels=None,
         progress: bool = False, noise=None) -> np.ndarray:
    """n images as uint8 [n, 28, 28] from a trained model, in batches of SAMPLE_BATCH.
    labels: the classes asked of a conditional model; sampler: how a diffusion model draws; noise: what
    each image starts from (model.noise's kind; drawn from gen when not given)."""
    out = []
    for start in range(0, n, SAMPLE_BATCH):
        m = min(SAMPLE_BATCH, n - start)
        y = None if labels is None else labels[start:start + m].to(model.device)
        z = None if noise is None else noise[start:start + m]
        with torch.inference_mode(), autocast(model.cfg, model.device):
            out.append(to_uint8(model.sample(m, gen, y, sampler, progress, noise=z), model.signed))
    return np.concatenate(out)


def timed_draw(model, n: int, seed: int, sampler: Sampler | None = None, labels=None, progress: bool = False):
    """(images, seconds per image) of n samples drawn with a fresh generator seeded `seed`."""
    gen = torch.Generator(model.device).manual_seed(seed)
    t0 = time.perf_counter()
    images = draw(model, n, gen, sampler, labels, progress)
    synchronize(model.device)
    return images, (time.perf_counter() - t0) / n


def probe_size(model, cfg: Config, n_test: int) -> int:
    """How many samples are drawn after each epoch for the per-epoch FID (fewer for a diffusion model)."""
    n = cfg.epoch_fid_ddpm_samples if model.uses_sampler else cfg.epoch_fid_samples
    return min(n, cfg.n_samples, n_test)


def epoch_probe(model, n: int) -> np.ndarray:
    """The per-epoch FID's samples: always the same noise (seed + 4), balanced classes for a conditional
    model, DDIM with epoch_fid_ddim_steps (and ddim_eta) for a diffusion model."""
    cfg, spec = model.cfg, MODELS.get(model.name)
    asked = balanced_labels(n) if spec and spec.conditional else None
    return draw(model, n, torch.Generator(model.device).manual_seed(cfg.seed + 4), probe_sampler(cfg), asked)


def probe_sampler(cfg: Config) -> Sampler:
    """How a diffusion model draws its per-epoch samples: DDIM with fewer steps than the export."""
    return Sampler("ddim", cfg.epoch_fid_ddim_steps, eta=cfg.ddim_eta)


def train_model(ctx: Run, name: str, checkpoint: Path | None, cfg: Config | None = None, probes: bool = True,
                on_epoch=None):
    """Train one model from seed cfg.seed (default: the run's config), saving (and with resume,
    resuming from) `checkpoint`; with pretrained the finished checkpoint is loaded, not trained."""
    cfg = cfg or ctx.cfg
    seed_everything(cfg.seed)  # every model starts from the same seed, whichever ran before
    model = build_trainer(name, cfg, ctx.device)
    n = probe_size(model, cfg, len(ctx.test[0]))
    hist = fit(model, ctx.train, cfg, cfg.model_epochs(name), (lambda m: epoch_probe(m, n)) if probes else None,
               checkpoint=checkpoint, resume=cfg.resume, pretrained=cfg.pretrained, on_epoch=on_epoch)
    if hasattr(model, "after_training"):  # the VAE's mixture over its training codes
        model.after_training(ctx.train[0])
    return Trained(name, model, hist, n_params(*model.modules))


def export_samples(ctx: Run, trained: Trained, out: Path | None = None):
    """Draw n_samples images (a conditional model asked for balanced labels), time them, write samples/<name>.npz."""
    n, model = ctx.cfg.n_samples, trained.model
    asked = balanced_labels(n) if trained.spec.conditional else None
    images, per_image = timed_draw(model, n, model.cfg.seed + 1, ctx.export_sampler, asked, progress=True)
    export = {"images": images}
    if asked is not None:
        export["labels"] = asked.numpy().astype(np.int64)
    save_npz((out or ctx.out) / "samples" / f"{trained.name}.npz", **export)
    trained.samples, trained.asked, trained.sample_seconds = images, asked, per_image * n


def image_grid(ax, images, rows: int, cols: int, title: str = ""):
    """Tile uint8 images [rows*cols, 28, 28] into one axes, ink drawn dark on white."""
    tiles = np.asarray(images[:rows * cols]).reshape(rows, cols, 28, 28)
    canvas = tiles.transpose(0, 2, 1, 3).reshape(rows * 28, cols * 28)
    ax.imshow(255 - canvas, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def plot_samples(images, title: str, path: Path):
    fig, ax = plt.subplots(figsize=(10, 1.6))
    image_grid(ax, images, 1, min(10, len(images)), title)
    show(fig, path)


def plot_label_grid(images, labels, path: Path, title: str, classes=DATASETS["mnist"]["classes"]):
    """10x10: row k holds the first ten samples asked to be class k."""
    rows = [images[labels == k][:10] for k in range(10)]
    fig, ax = plt.subplots(figsize=(7, 7.4))
    image_grid(ax, np.concatenate(rows), 10, 10, title)
    ax.set_yticks(np.arange(10) * 28 + 14)
    ax.set_yticklabels(classes)
    show(fig, path)


def plot_losses(histories: dict, path: Path):
    """Per model: its curve losses per step (smoothed) and per epoch."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.2), squeeze=False)
    for ax, (name, hist) in zip(axes[0], histories.items()):
        spec = MODELS[name]
        for k in spec.curves:
            steps = np.asarray(hist["step"][k])
            window = max(1, len(steps) // 50)
            smooth = np.convolve(steps, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window, smooth, label=f"{k} (per step, smoothed)")
            per_epoch = hist["epoch"][k]
            ax.plot(np.arange(1, len(per_epoch) + 1) * len(steps) / len(per_epoch), per_epoch,
                    "o", label=f"{k} (epoch mean)")
        ax.set_title(spec.title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(spec.units, fontsize=8)
        ax.set_yscale("log" if spec.log_curves else "linear")
        ax.legend(fontsize=7)
    fig.suptitle("Training losses")
    fig.tight_layout()
    show(fig, path)


def plot_model_losses(name: str, hist: dict, path: Path):
    """A model's own loss figure: its curve losses per step (smoothed) and per epoch, and beside them its
    `parts` (the loss's terms, or what D says), with the spec's reference line. A loss the checkpoint's
    training did not log (NaN) is left out."""
    spec = MODELS[name]
    panels = [(spec.curves, "losses", None, spec.log_curves, spec.units)]
    if spec.parts:
        panels.append((spec.parts, spec.parts_title, spec.parts_line, spec.log_curves, spec.parts_units or spec.units))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for ax, (keys, panel_title, line, log, units) in zip(axes[0], panels):
        for k in keys:
            steps = np.asarray(hist["step"][k], dtype=float)
            if not np.isfinite(steps).any():
                continue
            window = max(1, len(steps) // 50)
            smooth = np.convolve(steps, np.ones(window) / window, mode="valid")
            drawn = ax.plot(np.arange(len(smooth)) + window, smooth, label=f"{k} (per step, smoothed)")
            per_epoch = hist["epoch"][k]
            ax.plot(np.arange(1, len(per_epoch) + 1) * len(steps) / len(per_epoch), per_epoch, "o",
                    color=drawn[0].get_color(), label=f"{k} (epoch mean)")
        if line is not None:
            ax.axhline(line, color="grey", ls="--", lw=1, label=f"{line:g}")
        ax.set_title(f"{spec.title}: {panel_title}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(units, fontsize=8)
        ax.set_yscale("log" if log else "linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    show(fig, path)


def epoch_frames(probes: list, n: int) -> np.ndarray:
    """The first n of the samples drawn from the same noise after every epoch: [epochs, n, 28, 28]."""
    return np.stack([np.asarray(p[:n]) for p in probes])


def plot_epoch_samples(frames: np.ndarray, title: str, path: Path):
    """One row per epoch: the same noise's samples after epoch 1, 2, ..., so a reader sees them change."""
    epochs, n = frames.shape[:2]
    fig, ax = plt.subplots(figsize=(0.55 * n + 0.6, 0.55 * epochs + 0.7))
    image_grid(ax, frames.reshape(epochs * n, 28, 28), epochs, n, title)
    step = max(1, epochs // 15)
    ax.set_yticks(np.arange(0, epochs, step) * 28 + 14)
    ax.set_yticklabels([f"epoch {e + 1}" for e in range(0, epochs, step)], fontsize=7)
    show(fig, path)


def write_gif(frames: np.ndarray, path: Path, cols: int = 8, ms: int = 500):
    """An animated GIF, one frame per epoch: the frame's samples tiled `cols` wide, ink dark on white,
    shown twice as large; the last frame is held three times as long."""
    from PIL import Image
    epochs, n = frames.shape[:2]
    rows = math.ceil(n / cols)
    tiles = np.zeros((epochs, rows * cols, 28, 28), np.uint8)
    tiles[:, :n] = frames
    canvas = 255 - (tiles.reshape(epochs, rows, cols, 28, 28).transpose(0, 1, 3, 2, 4)
                    .reshape(epochs, rows * 28, cols * 28))
    images = [Image.fromarray(c).resize((c.shape[1] * 2, c.shape[0] * 2), Image.NEAREST) for c in canvas]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=[ms] * (epochs - 1) + [3 * ms])
    os.replace(tmp, path)


def watch_training(ctx: Run, trained: Trained):
    """How the model learned: its fixed-noise samples after every epoch, as one figure and as a GIF."""
    if not trained.history.probes:
        return
    name, spec = trained.name, trained.spec
    frames = epoch_frames(trained.history.probes, 10)
    plot_epoch_samples(frames, f"{spec.title}: the same noise after every epoch", ctx.out / f"{name}_epochs.png")
    write_gif(epoch_frames(trained.history.probes, 32), ctx.out / f"{name}_epochs.gif")


# %% [markdown]
# ### 6.8 How long the run and each model will take
#
# Before any model trains, section 7 times a throwaway copy of every model for a few steps on this
# machine, and the evaluator and the two-sample detector likewise, and prints the whole run's estimate in
# one line. Each model's cell prints its own part again before it trains, and after the first real epoch
# the remaining time from the measured epoch. The end of the run prints the estimate beside the actual
# time; both go into `results.json` and `REPORT.md`.

# %% jupyter={"source_hidden": true}
# @title The two networks the measurements of Part B train (defined here, so the run's estimate can time them) { display-mode: "form" }
class Evaluator(nn.Module):
    """A small CNN digit classifier; `features` is its 128-d penultimate layer phi(x)."""

    def __init__(self):
        super().__init__()

        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),  # 14x14
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.classify = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x):
        return self.classify(self.features(x))


EVALUATOR_VERSION = 4  # bump when the evaluator's architecture or training changes (invalidates the cache)


def evaluator_key(train, cfg: Config) -> dict:
    """What the cached evaluator must have been trained with to be reused."""
    return {"version": EVALUATOR_VERSION, "epochs": cfg.eval_epochs, "seed": cfg.seed,
            "max_batches": cfg.max_batches, "n_train": len(train[0]), "train_sum": int(train[0].sum(dtype=torch.int64))}


def evaluator_reusable(ctx: Run) -> bool:
    """Whether section 8 will load the cached evaluator instead of training it."""
    cache, seen = ctx.out / "checkpoints" / "evaluator.pt", len(ctx.train[0]) - ctx.cfg.eval_held_out
    if not cache.exists():
        return False
    try:
        saved = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: section 8 trains it again
        return False
    return saved.get("key") == evaluator_key((ctx.train[0][:seen], ctx.train[1][:seen]), ctx.cfg)


class Detector(nn.Module):
    """The two-sample test's detector: two strided convolutions and a linear layer, the logit of 'real'."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1), nn.LeakyReLU(0.2),  # 14x14
                                 nn.Conv2d(width, 2 * width, 3, 2, 1), nn.LeakyReLU(0.2),  # 7x7
                                 nn.Flatten(), nn.Linear(2 * width * 49, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


# %% jupyter={"source_hidden": true}
# @title Time estimates { display-mode: "form" }
def random_batch(data, cfg: Config, gen: torch.Generator):
    idx = torch.randint(0, len(data[0]), (cfg.batch_size,), generator=gen).to(data[0].device)
    return data[0][idx], data[1][idx]


def time_estimate(ctx: Run, name: str) -> dict:
    """How long `name` will take on this machine (None when it has nothing left to train): a throwaway copy
    takes two warm-up and three timed training steps and draws once with a single network pass (at the export
    batch and at the preview's); the epochs, the per-epoch samples, the export and the preview follow from
    those. The model then trains from its seed."""
    cfg, spec = ctx.cfg, MODELS[name]
    epochs_left = cfg.model_epochs(name)
    if cfg.resume and ctx.checkpoint(name).exists():
        try:
            epochs_left -= torch.load(ctx.checkpoint(name), map_location="cpu", weights_only=True)["epoch"]
        except Exception:  # unreadable: the real load, in fit, says what is wrong with it
            pass
    if epochs_left <= 0 or cfg.pretrained:
        return None  # nothing to train: the checkpoint is loaded
    seed_everything(cfg.seed)
    model = build_trainer(name, cfg, ctx.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = float(np.median(time_calls(lambda: model.step(*random_batch(ctx.train, cfg, gen)), 2, 3, ctx.device)))
    for module in model.modules:
        module.eval()

    def one_pass(n):  # seconds of one network pass (a whole draw for a one-pass model) at batch n
        asked = balanced_labels(n) if spec.conditional else None
        draw_gen = torch.Generator(ctx.device).manual_seed(cfg.seed)
        return time_calls(lambda: draw(model, n, draw_gen, Sampler("ddim", 1), asked), 1, 1, ctx.device)[0]

    def passes(sampler):
        return (sampler.steps if sampler.kind == "ddim" else cfg.ddpm_T) if model.uses_sampler else 1

    batch = min(SAMPLE_BATCH, cfg.n_samples)
    pass_s, probe_n = one_pass(batch), probe_size(model, cfg, len(ctx.test[0]))
    epoch = (steps_per_epoch(len(ctx.train[0]), cfg) * step
             + pass_s * math.ceil(probe_n / batch) * passes(probe_sampler(cfg)))
    export = pass_s * math.ceil(cfg.n_samples / batch) * passes(ctx.export_sampler)
    if previews(ctx, model, spec):
        export += one_pass(cfg.ancestral_preview) * cfg.ddpm_T
    return {"step": step, "epoch": epoch, "epochs_left": epochs_left, "export": export,
            "total": epochs_left * epoch + export}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def announce_estimate(ctx: Run, name: str, est: dict):
    print(f"time estimate: {MODELS[name].title} about {minutes(est['total'])} on this machine ({est['epochs_left']} "
          f"epochs of {steps_per_epoch(len(ctx.train[0]), ctx.cfg)} steps at {1000 * est['step']:.0f} ms, then "
          f"{ctx.cfg.n_samples} samples); the run so far {minutes(time.perf_counter() - ctx.started)}")


def estimate_after_first_epoch(ctx: Run, name: str, est: dict):
    """An on_epoch hook: after the model's first epoch here, the remaining time from the measured epoch."""
    def hear(hist, seconds):
        if hist.epochs_done == ctx.cfg.model_epochs(name) - est["epochs_left"] + 1:
            left = est["epochs_left"] - 1
            print(f"time estimate after {MODELS[name].title}'s first epoch ({minutes(seconds)}, estimated "
                  f"{minutes(est['epoch'])}): about {minutes(left * seconds + est['export'])} more for it "
                  f"({left} epochs, then its samples)")
    return hear


def detector_step_seconds(ctx: Run) -> float:
    """Seconds of one training step of the two-sample test's detector on this machine (a throwaway copy)."""
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    net = Detector().to(ctx.device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.rand(ctx.cfg.batch_size, 1, 28, 28, generator=gen).to(ctx.device)
    y = torch.randint(0, 2, (ctx.cfg.batch_size,), generator=gen).float().to(ctx.device)

    def step():
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(np.median(time_calls(step, 2, 3, ctx.device)))


def evaluator_step_seconds(ctx: Run) -> float:
    """Seconds of one training step of the evaluator on this machine (a throwaway copy, in the layout,
    precision and optimizer its trainer in section 8 uses)."""
    cfg, gen = ctx.cfg, torch.Generator().manual_seed(ctx.cfg.seed)
    net = prepare(Evaluator(), cfg, ctx.device)
    opt, scaler = adam(net.parameters(), 1e-3, ctx.device), LossScaler(cfg, ctx.device)
    xb, yb = random_batch(ctx.train, cfg, gen)

    def step():
        with autocast(cfg, ctx.device):
            logits = net(to_unit(xb))
        scaler.backward_step(F.cross_entropy(logits.float(), yb), opt)
    return float(np.median(time_calls(step, 2, 3, ctx.device)))


def whole_run_estimate(ctx: Run) -> dict:
    """Seconds the whole run should take on this machine, before anything trains: every selected model as
    its own cell estimates it (time_estimate; 0 for one that is only loaded), the evaluator's epochs (0 when
    its checkpoint will be reused), and the two-sample detectors (one per model and one for the real floor).
    The rest of the measuring (features, FID, bootstrap, figures) is not timed here: it is left out, and so
    are the models of the appendix, whose code comes later (their cells time them when they start)."""
    cfg, seed_state = ctx.cfg, torch.get_rng_state()
    models, later = {}, []
    for name in cfg.models:
        if MODELS[name].trainer not in globals():
            later.append(name)
        elif name not in ctx.models:
            est = time_estimate(ctx, name)
            ctx.arrays[f"{name}_estimate"] = est
            models[name] = est["total"] if est else 0.0
    reuse = evaluator_reusable(ctx)
    eval_steps = cfg.eval_epochs * steps_per_epoch(len(ctx.train[0]) - cfg.eval_held_out, cfg)
    evaluator = 0.0 if reuse else eval_steps * evaluator_step_seconds(ctx)
    detectors = (len(models) + 1) * cfg.detector_steps * detector_step_seconds(ctx)
    torch.set_rng_state(seed_state)
    left_out = "features, FID and its bootstrap, memorisation, figures and the report"
    return {"models": models, "evaluator": evaluator, "detectors": detectors,
            "total": sum(models.values()) + evaluator + detectors, "elapsed_before": time.perf_counter() - ctx.started,
            "left_out": left_out + "".join(f", {MODELS[n].title}" for n in later)}


def estimate_parts(est: dict) -> str:
    """The whole run's estimate, part by part: the models that train, those only loaded, the evaluator, the
    detectors, and what is not counted."""
    loaded = [MODELS[n].title for n, s in est["models"].items() if s <= 0]
    parts = [f"{MODELS[n].title} {minutes(s)}" for n, s in est["models"].items() if s > 0]
    parts += [f"{', '.join(loaded)} loaded from checkpoints, nothing to train"] if loaded else []
    parts += [f"evaluator {minutes(est['evaluator'])}" if est["evaluator"] else "evaluator reused",
              f"two-sample detectors {minutes(est['detectors'])}"]
    return f"{', '.join(parts)}; not counted: {est['left_out']}"


def announce_whole_run(ctx: Run, est: dict):
    print(f"time estimate for the whole run on this machine: about {minutes(est['total'])} ({estimate_parts(est)})")


# %% [markdown]
# ### 6.9 The work of a model's cell in section 7
#
# `train_section(ctx, name)` is all a model's section runs: time the model, train it (or resume, or
# load it), export its samples, then show its loss curves and its assignment figure. A model whose
# loss turns non-finite is recorded, and the run goes on without it.

# %% jupyter={"source_hidden": true}
# @title train_section: train, export, show { display-mode: "form" }
def previews(ctx: Run, model, spec: ModelSpec) -> bool:
    """A diffusion model exported with DDIM also draws ancestral_preview images with the paper's sampler."""
    cfg = ctx.cfg
    return model.uses_sampler and not spec.conditional and cfg.ancestral_preview > 0 and cfg.sampler != "ancestral"


def sample_figures(ctx: Run, trained: Trained):
    """The model's assignment figure: ten random samples, or for a conditional model a 10x10 grid whose
    row k asks for class k."""
    name, spec, model, cfg = trained.name, trained.spec, trained.model, ctx.cfg
    note = model.sampler_note(ctx.export_sampler)
    if spec.conditional:
        grid_labels = torch.arange(10).repeat_interleave(10)  # 0 x10, 1 x10, ..., 9 x10
        grid = draw(model, 100, torch.Generator(ctx.device).manual_seed(cfg.seed + 3), ctx.export_sampler,
                    grid_labels)
        plot_label_grid(grid, grid_labels.numpy(), ctx.out / spec.figure(name),
                        f"{spec.title}: row k = ten samples asked for class k ({note})",
                        DATASETS[cfg.dataset]["classes"])
    else:
        plot_samples(trained.samples, f"{spec.title}: 10 random samples ({note})", ctx.out / spec.figure(name))


def ancestral_preview(ctx: Run, trained: Trained):
    """A diffusion model's few samples from the paper's T-step ancestral sampler (same weights), timed."""
    model, cfg = trained.model, ctx.cfg
    if previews(ctx, model, trained.spec):
        ancestral = Sampler("ancestral", cfg.ddpm_T)
        preview, trained.extras["ancestral_preview_seconds_per_image"] = timed_draw(
            model, cfg.ancestral_preview, cfg.seed + 2, ancestral, progress=True)
        plot_samples(preview, f"{trained.spec.title}: {cfg.ancestral_preview} samples, "
                     f"{model.sampler_note(ancestral)} (same weights)", ctx.out / f"{trained.name}_samples_ancestral.png")


def train_section(ctx: Run, name: str):
    """A model cell's work: train it (or resume / load it), export its samples, show its loss curves, its
    samples and its samples after every epoch. A model whose loss turns non-finite is recorded, and the run goes
    on without it."""
    if not ctx.wants(name):
        return None
    # None when the checkpoint is only loaded; made once, by the whole run's estimate, in a run of section 7
    est = ctx.arrays.pop(f"{name}_estimate") if f"{name}_estimate" in ctx.arrays else time_estimate(ctx, name)
    if est:
        announce_estimate(ctx, name, est)
    try:
        trained = train_model(ctx, name, ctx.checkpoint(name),
                              on_epoch=estimate_after_first_epoch(ctx, name, est) if est else None)
    except FloatingPointError as err:
        ctx.results["failed"][name] = f"{err}; its last finished epoch is kept in {ctx.checkpoint(name)}"
        print(f"{name} FAILED: {ctx.results['failed'][name]}. The other models go on.")
        return None
    export_samples(ctx, trained)
    ctx.models[name] = trained
    print(f"{name}: {trained.history.seconds:.0f} s of training, {trained.parameters:,} parameters; "
          f"{len(trained.samples)} samples in {trained.sample_seconds:.1f} s "
          f"({trained.model.sampler_note(ctx.export_sampler)}) -> {ctx.out / 'samples' / (name + '.npz')}")
    plot_model_losses(name, trained.history.as_dict(), ctx.out / f"{name}_losses.png")
    sample_figures(ctx, trained)
    watch_training(ctx, trained)
    return trained


# %% [markdown]
# <a id="training"></a>
# ## 7. Training and watching each model
#
# Each cell below trains one model of Part A (or, with `resume` or `pretrained`, loads it), exports its
# samples, and shows right there its losses, its samples, pictures of how it works, and its fixed-noise
# samples after every epoch. First the data, and the whole run's time estimate.
#
# <a id="train-data"></a>
# ### 7.1 The data, and how long this run will take

# %%
def class_rows(images, labels, per_class: int = 10) -> np.ndarray:
    """The first `per_class` images of each class 0-9, class by class: [10 * per_class, 28, 28]."""
    return np.concatenate([np.asarray(images[labels == k][:per_class]) for k in range(10)])


def plot_digits_by_class(images, path: Path, title: str, classes, per_class: int = 10):
    """A 10 x per_class grid whose row k holds images of class k."""
    fig, ax = plt.subplots(figsize=(0.7 * per_class, 7.4))
    image_grid(ax, images, 10, per_class, title)
    ax.set_yticks(np.arange(10) * 28 + 14)
    ax.set_yticklabels(classes)
    show(fig, path)


@stage
def data_section(ctx):
    """Show real training digits, one row per class, and estimate the whole run before anything trains."""
    if ctx.cfg.benchmark:
        return
    images, labels = (t.cpu() for t in ctx.train)
    plot_digits_by_class(class_rows(images.numpy(), labels.numpy()), ctx.out / "data_digits.png",
                         f"{DATASETS[ctx.cfg.dataset]['title']}: real training images, row k = class k",
                         DATASETS[ctx.cfg.dataset]["classes"])
    ctx.results["time_estimate"] = whole_run_estimate(ctx)
    announce_whole_run(ctx, ctx.results["time_estimate"])


# %% [markdown]
# <a id="train-vae"></a>
# ### 7.2 Training the VAE (defined in [section 2](#vae))
#
# Its loss and the loss's two terms, ten samples, and its samples from the same codes after every epoch
# (drawn from the prior: the mixture is fitted once training ends).

# %%
@stage
def vae_section(ctx):
    """Train the VAE (or resume / load it), export its samples, show its losses, samples and epochs."""
    train_section(ctx, "vae")


# %% [markdown]
# **How it works.** Test digits beside their reconstructions, with straight lines in code space between
# pairs of them; a walk along the codes' two leading principal directions; and the test digits' codes
# coloured by digit (`vae_latent_2d.png`): clusters with gaps between them, which N(0, I) does not know
# about. Look for smooth changes along each line and walk, and for where the clusters touch.

# %%
@torch.inference_mode()
def reconstructions(ctx: Run, model, pairs: int = 4, steps: int = 10) -> dict:
    """Ten test digits and their reconstructions (decoded codes), straight lines in code space between
    pairs of test digits, and the mean BCE per image of 1,000 test reconstructions."""
    x = to_unit(ctx.test[0][:1000].to(ctx.device))
    mu = model.codes(ctx.test[0][:1000])
    recon = model.decode(mu)
    bce = float(F.binary_cross_entropy(recon, x, reduction="sum") / len(x))
    ends = mu[10:10 + 2 * pairs].reshape(pairs, 2, -1)  # pairs of codes (z_a, z_b)
    w = torch.linspace(0, 1, steps, device=ctx.device)[None, :, None]
    z = (1 - w) * ends[:, :1] + w * ends[:, 1:]  # z = (1 - w) z_a + w z_b
    return {"bce": bce, "pairs": np.concatenate([to_uint8(x[:10], False), to_uint8(recon[:10], False)]),
            "lines": to_uint8(model.decode(z.reshape(pairs * steps, -1)), signed=False), "shape": (pairs, steps)}


def plot_reconstructions(rec: dict, model_title: str, path: Path):
    """Top: ten test digits and their reconstructions. Below: decoded straight lines between codes."""
    pairs, steps = rec["shape"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 2.2 + 1.0 * pairs), gridspec_kw={"height_ratios": [2, pairs]})
    image_grid(axes[0], rec["pairs"], 2, 10,
               f"{model_title}: test digits (top) and their reconstructions (mean BCE {rec['bce']:.1f} per image)")
    image_grid(axes[1], rec["lines"], pairs, steps, "latent interpolation: z = (1 - w) z_a + w z_b, w from 0 to 1")
    show(fig, path)


@torch.inference_mode()
def latent_walk(model, images_uint8, n: int = 9, span: float = 2.0) -> np.ndarray:
    """Decode an n x n grid of codes z = mean + a s_1 v_1 + b s_2 v_2, a and b from -span to span, where v_1, v_2
    are the two leading principal directions of the digits' codes and s_1, s_2 their standard deviations."""
    mu = model.codes(images_uint8).double()
    mean = mu.mean(0)
    _, sing, vt = torch.linalg.svd(mu - mean, full_matrices=False)
    scale = sing[:2] / math.sqrt(len(mu) - 1)  # the codes' standard deviation along v_1 and v_2
    a = torch.linspace(-span, span, n, dtype=torch.float64, device=mu.device)
    steps = torch.stack(torch.meshgrid(a, a, indexing="ij"), -1).reshape(-1, 2) * scale  # row: v_1, column: v_2
    z = mean + steps @ vt[:2]
    return to_uint8(model.decode(z.float()), signed=False)


def plot_latent_walk(images, n: int, span: float, model_title: str, path: Path):
    fig, ax = plt.subplots(figsize=(6.5, 6.8))
    image_grid(ax, images, n, n, f"{model_title}: decoded along the codes' two leading principal directions\n"
                                 f"(down: v1, across: v2, each from -{span:g} to +{span:g} standard deviations)")
    show(fig, path)


@torch.inference_mode()
def latent_pca(ctx: Run, model, n: int = 5000) -> dict:
    """The codes of n test digits on their first three principal components, and the share of the
    codes' variance each component explains."""
    mu, y = model.codes(ctx.test[0][:n]).cpu().double().numpy(), ctx.test[1][:n].numpy()
    centred = mu - mu.mean(0)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    return {"coords": centred @ vt[:3].T, "labels": y, "explained": (sing ** 2 / (sing ** 2).sum())[:3].tolist()}


def plot_latent_2d(pca: dict, model_title: str, path: Path, classes):
    """Codes of test digits on their first two principal components, coloured by digit: the clusters the
    prior's N(0, I) does not know about, and the gaps between them."""
    fig, ax = plt.subplots(figsize=(6.5, 5.2))
    for c, name in enumerate(classes):
        xy = pca["coords"][pca["labels"] == c, :2]
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.6, color=plt.cm.tab10(c), label=name)
    ax.set_xlabel(f"PC1 ({100 * pca['explained'][0]:.0f}% of the codes' variance)")
    ax.set_ylabel(f"PC2 ({100 * pca['explained'][1]:.0f}%)")
    ax.set_title(f"{model_title} latent space: {len(pca['coords'])} test digits' codes (mu), by digit", fontsize=10)
    ax.legend(fontsize=7, markerscale=4, ncol=2, loc="best")
    show(fig, path)


@shows("vae")
def vae_inside(ctx, trained):
    """The trained VAE's reconstructions and interpolations, its latent walk, and its codes by digit."""
    model, out = trained.model, ctx.out
    ctx.arrays["vae_reconstructions"] = rec = reconstructions(ctx, model)
    plot_reconstructions(rec, trained.spec.title, out / "vae_reconstructions.png")
    plot_latent_walk(latent_walk(model, ctx.test[0][:5000]), 9, 2.0, trained.spec.title, out / "vae_latent_walk.png")
    ctx.arrays["vae_latent"] = pca = latent_pca(ctx, model)
    plot_latent_2d(pca, trained.spec.title, out / "vae_latent_2d.png", DATASETS[ctx.cfg.dataset]["classes"])


# %% [markdown]
# **Where its samples' codes come from** (`vae_samplers.png`): codes from the prior, from training
# digits' $q(z \mid x)$ and from the mixture fitted to the training codes, each decoded (left) and placed
# on the training codes' two leading directions (right). The prior's codes spread into the gaps; the
# mixture's stay where the decoder has been.

# %%
@torch.inference_mode()
def code_sources(model, train_uint8, n: int, gen: torch.Generator) -> dict:
    """n codes from each place a VAE can take them: the prior N(0, I); the aggregate posterior, z ~ q(z|x) of
    n random training digits (codes the decoder was trained on); and the mixture fitted to the training codes."""
    x = train_uint8[torch.randperm(len(train_uint8), generator=torch.Generator().manual_seed(gen.initial_seed()))[:n]]
    mu, logvar = model.model.encode(to_unit(x.to(model.device)))
    sources = {"prior N(0, I)": torch.randn(n, model.cfg.vae_latent, generator=gen, device=model.device),
               "training digits' q(z|x)": mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen,
                                                                                 device=model.device)}
    if model.mixture is not None:
        sources[f"mixture of {len(model.mixture['weights'])} Gaussians"] = sample_mixture(model.mixture, n, gen)
    return sources


def plot_code_sources(model, sources: dict, model_title: str, path: Path, shown: int = 10):
    """Left: `shown` images decoded from each source's codes, a row each. Right: the codes on the two leading
    principal directions of the training digits' codes, where the prior's holes show."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.9 * len(sources) + 1.6),
                                      gridspec_kw={"width_ratios": [2.4, 1]})
    images = np.concatenate([to_uint8(model.decode(z[:shown]), signed=False) for z in sources.values()])
    image_grid(left, images, len(sources), shown, f"{model_title}: decoded codes")
    left.set_yticks(np.arange(len(sources)) * 28 + 14)
    left.set_yticklabels(list(sources), fontsize=7)
    codes = list(sources.values())[1].double()
    mean = codes.mean(0)
    _, _, vt = torch.linalg.svd(codes - mean, full_matrices=False)
    for (label, z), colour in zip(sources.items(), ("tab:blue", "grey", "tab:orange")):
        xy = ((z.double() - mean) @ vt[:2].T).cpu().numpy()
        right.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.4, color=colour, label=label)
    right.set_xlabel("principal direction 1 of the training codes")
    right.set_ylabel("principal direction 2")
    right.set_title("where the codes lie", fontsize=10)
    right.legend(fontsize=7, markerscale=4)
    show(fig, path)


@shows("vae")
def vae_codes(ctx, trained):
    """Decoded codes from each place a VAE can take them, and where those codes lie."""
    sources = code_sources(trained.model, ctx.train[0], 2000, torch.Generator(ctx.device).manual_seed(ctx.cfg.seed + 10))
    plot_code_sources(trained.model, sources, trained.spec.title, ctx.out / "vae_samplers.png")


# %% [markdown]
# <a id="train-gan"></a>
# ### 7.3 Training the GAN (defined in [section 3](#gan))
#
# Its two losses, $D$(real) and $D$(fake) against the 0.5 of the equilibrium, ten samples, and its samples
# from the same noise after every epoch.

# %%
@stage
def gan_section(ctx):
    """Train the GAN (or resume / load it), export its samples, show its losses, D's outputs, ten samples and
    its epochs."""
    train_section(ctx, "gan")


# %% [markdown]
# **The trained $D$'s verdicts, image by image** (`gan_d_outputs.png`). The loss figure shows only their
# means, which can sit near the equilibrium while $D$ is sure of every image: two separate humps, real
# digits near 1 and samples near 0, mean a $D$ that still tells them apart; one hump at the equilibrium, a
# $D$ that cannot.

# %%
@torch.inference_mode()
def d_outputs(ctx: Run, trained: Trained, n: int = 1000) -> dict:
    """The trained D's output D(x) (the probability it gives 'real') on n random test digits and on n of G's
    samples; a conditional D sees the test digits' labels and G is asked for the same labels. D is in
    evaluation mode, as training left it: its batch norm uses its running averages."""
    model, device, n = trained.model, ctx.device, min(n, len(ctx.test[0]))
    idx = torch.randperm(len(ctx.test[0]), generator=torch.Generator().manual_seed(ctx.cfg.seed + 13))[:n]
    x, y = to_signed(ctx.test[0][idx].to(device)), ctx.test[1][idx].to(device)
    cond = one_hot(y) if model.conditional else None
    with autocast(model.cfg, device):
        fake = model.sample(n, torch.Generator(device).manual_seed(ctx.cfg.seed + 13), y)
        return {k: torch.sigmoid(model.D(v, cond).float()).cpu().numpy() for k, v in (("real", x), ("fake", fake))}


def plot_d_outputs(outputs: dict, real_target: float, model_title: str, path: Path):
    """Histograms of D(x) on real digits and on G's samples, with D's best answer when G has matched the data
    (real_target / 2: 0.5, or 0.45 with the cGAN's smoothed target 0.9)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bins = np.linspace(0, 1, 41)
    for kind, colour in (("real", "tab:blue"), ("fake", "tab:orange")):
        ax.hist(outputs[kind], bins, alpha=0.6, color=colour,
                label=f"D on {'test digits' if kind == 'real' else 'G samples'} (mean {outputs[kind].mean():.2f})")
    ax.axvline(real_target / 2, color="grey", ls="--", label=f"equilibrium {real_target / 2:g}")
    ax.set(xlabel="D(x): the probability D gives 'real'", ylabel="images",
           title=f"{model_title}: the trained D's verdicts, image by image")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=7)
    show(fig, path)


def d_pictures(ctx: Run, trained: Trained):
    plot_d_outputs(d_outputs(ctx, trained), trained.model.real_target, trained.spec.title,
                   ctx.out / f"{trained.name}_d_outputs.png")


@shows("gan")
def gan_verdicts(ctx, trained):
    d_pictures(ctx, trained)


# %% [markdown]
# <a id="train-cgan"></a>
# ### 7.4 Training the cGAN (defined in [section 4](#cgan))
#
# The same pictures as the GAN's, with the 10×10 grid the assignment asks for (row $k$ asks for class $k$).

# %%
@stage
def cgan_section(ctx):
    """Train the cGAN (or resume / load it), export its samples, show its losses, the 10x10 grid and its epochs."""
    train_section(ctx, "cgan")


# %% [markdown]
# **Its $D$'s verdicts, and its two inputs apart.** The verdicts as for the GAN, with the equilibrium at
# 0.45: the real target of 0.9 moves it. Then the grid that separates the two inputs: the noise $z$ fixed
# along each row, the label $y$ changing across. A row that keeps one slant and thickness through all ten
# digits shows that $z$ carries the style and $y$ the digit.

# %%
@torch.inference_mode()
def style_grid(model, rows: int, gen: torch.Generator) -> np.ndarray:
    """One noise per row, the ten labels y across, as uint8 [rows * 10, 28, 28]: a GAN's G(z_i, y_j); a conditional
    diffusion model's deterministic DDIM (eta 0, ddim_steps, its guidance) from one x_T per row."""
    y = torch.arange(10, device=model.device).repeat(rows)
    with autocast(model.cfg, model.device):
        if hasattr(model, "G"):
            z = torch.randn(rows, model.cfg.gan_noise, generator=gen, device=model.device).repeat_interleave(10, 0)
            return to_uint8(model.generator(z, one_hot(y)), model.signed)
        x_T = torch.randn(rows, 1, 28, 28, generator=gen, device=model.device).repeat_interleave(10, 0)
        return to_uint8(sample_ddim(model.net, model.sched, rows * 10, gen, model.device, model.cfg.ddim_steps, False,
                                    y, model.cfg.cddpm_guidance, 0.0, x_T=x_T), model.signed)


def plot_style_grid(images, rows: int, model_title: str, noise: str, path: Path, classes):
    fig, ax = plt.subplots(figsize=(7, 0.7 * rows + 0.9))
    image_grid(ax, images, rows, 10, f"{model_title}: one {noise} per row (its style), the label y across (the digit)")
    ax.set_xticks(np.arange(10) * 28 + 14)
    ax.set_xticklabels(classes, fontsize=7)
    ax.set_ylabel("z")
    show(fig, path)


@shows("cgan")
def cgan_inside(ctx, trained):
    """The trained cGAN's D verdicts, and the grid that separates z (style) from y (digit)."""
    d_pictures(ctx, trained)
    grid = style_grid(trained.model, 6, torch.Generator(ctx.device).manual_seed(ctx.cfg.seed + 5))
    plot_style_grid(grid, 6, trained.spec.title, "noise z", ctx.out / "cgan_style.png",
                    DATASETS[ctx.cfg.dataset]["classes"])


# %% [markdown]
# <a id="train-ddpm"></a>
# ### 7.5 Training the DDPM (defined in [section 5](#ddpm))
#
# Its weighted and plain losses, its samples, and its samples after every epoch.

# %%
@stage
def ddpm_section(ctx):
    """Train the DDPM (or resume / load it), export its samples, show its losses, samples and epochs."""
    train_section(ctx, "ddpm")


# %% [markdown]
# **The two pictures of section 5.1**: the forward process on real test digits, and the noise schedule
# with the loss weight. Watch the digit fade into noise, and where the weight $w_t$ falls below 1 (small
# $t$, where the noise is faint).

# %%
FORWARD_TIMESTEPS = (0, 50, 100, 200, 400, 700, 1000)  # the maths' t (0: the clean digit), as fractions of T = 1000


def alpha_bar_at(sched: Schedule, t: int) -> float:
    """The maths' alpha-bar_t for t = 0..T (alpha-bar_0 = 1: no noise yet); the code's array holds t = 1..T."""
    return 1.0 if t == 0 else float(sched.alpha_bar[t - 1])


def forward_process(sched: Schedule, x0, ts, gen: torch.Generator) -> torch.Tensor:
    """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps for each maths timestep t in ts, one eps for all:
    [len(ts), n, 1, 28, 28] in the model's [-1, 1] scale."""
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return torch.stack([math.sqrt(alpha_bar_at(sched, t)) * x0 + math.sqrt(1 - alpha_bar_at(sched, t)) * eps
                        for t in ts])


def plot_forward_process(frames: torch.Tensor, ts, path: Path):
    """A column per timestep, a row per digit."""
    steps, n = frames.shape[:2]
    images = to_uint8(frames.transpose(0, 1).reshape(steps * n, 1, 28, 28), signed=True)
    fig, ax = plt.subplots(figsize=(0.8 * steps + 0.6, 0.8 * n + 0.8))
    image_grid(ax, images, n, steps, "forward process q(x_t | x_0) on test digits")
    ax.set_xticks(np.arange(steps) * 28 + 14)
    ax.set_xticklabels([f"t={t}" for t in ts], fontsize=8)
    show(fig, path)


def plot_schedule(sched: Schedule, gamma: float, path: Path):
    """Three panels over the maths' t = 1..T: how much signal x_t keeps (alpha-bar_t, linear), the
    signal-to-noise ratio SNR_t (log), and the min-SNR loss weight w_t (log), each on its own labelled axis."""
    t = np.arange(1, sched.T + 1)
    snr = sched.snr.double().cpu().numpy()
    fig, axes = plt.subplots(1, 3 if gamma > 0 else 2, figsize=(11 if gamma > 0 else 7.5, 3.2))
    axes[0].plot(t, sched.alpha_bar.cpu().numpy(), label=r"$\bar\alpha_t$")
    axes[0].plot(t, 1 - sched.alpha_bar.cpu().numpy(), label=r"$1 - \bar\alpha_t$ (noise variance)")
    axes[0].set(ylabel="share of the variance", title=r"signal kept: $\bar\alpha_t$")
    axes[1].plot(t, snr, color="tab:purple")
    axes[1].set(yscale="log", ylabel=r"SNR$_t = \bar\alpha_t / (1 - \bar\alpha_t)$", title="signal-to-noise ratio")
    if gamma > 0:
        axes[1].axhline(gamma, color="grey", ls=":", lw=1, label=rf"$\gamma = {gamma:g}$")
        axes[2].plot(t, np.minimum(snr, gamma) / snr, color="tab:green")
        axes[2].set(yscale="log", ylabel=r"$w_t$ (weight on the noise MSE)",
                    title=rf"loss weight $w_t = \min(\mathrm{{SNR}}_t, {gamma:g}) / \mathrm{{SNR}}_t$")
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.title.set_fontsize(9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    show(fig, path)


@shows("ddpm")
def ddpm_forward(ctx, trained):
    """The forward process on eight test digits, and the schedule."""
    model, cfg = trained.model, ctx.cfg
    ts = [round(f * model.sched.T / 1000) for f in FORWARD_TIMESTEPS]
    x0 = to_signed(ctx.test[0][:8])
    plot_forward_process(forward_process(model.sched, x0, ts, torch.Generator().manual_seed(cfg.seed + 6)), ts,
                         ctx.out / "ddpm_forward.png")
    plot_schedule(model.sched, cfg.ddpm_min_snr, ctx.out / "ddpm_schedule.png")


# %% [markdown]
# **How it draws**: a few samples from the paper's ancestral sampler (all $T$ steps) beside the export's
# DDIM samples above, from the same weights; then the reverse process of the export sampler, $x_t$ and the
# predicted $\hat x_0$ left to right as $t$ falls. The digit's shape is settled in $\hat x_0$ long before
# the noise in $x_t$ is gone.

# %%
def reverse_process(model, n: int, gen: torch.Generator, sampler: Sampler, points: int = 8) -> dict:
    """n samples drawn with the export sampler, keeping x_t and the predicted x_0 at `points` of its steps
    (evenly spaced, the last one included)."""
    trace = []
    with autocast(model.cfg, model.device):
        final = sample_ddim(model.net, model.sched, n, gen, model.device, sampler.steps, False, eta=sampler.eta,
                            trace=trace)
    keep = sorted({int(round(i)) for i in np.linspace(0, len(trace) - 1, points)})
    return {"t": [trace[i][0] + 1 for i in keep],  # the maths' t of each kept x_t
            "x_t": [to_uint8(trace[i][1], True) for i in keep], "x0_hat": [to_uint8(trace[i][2], True) for i in keep],
            "final": to_uint8(final, True)}


def plot_reverse_process(rev: dict, note: str, path: Path):
    """Two rows per sample: x_t (the sampler's state) and its prediction of x_0, left to right as t falls."""
    n, steps = len(rev["final"]), len(rev["t"])
    rows = []
    for i in range(n):
        rows += [np.stack([x[i] for x in rev["x_t"]]), np.stack([x[i] for x in rev["x0_hat"]])]
    fig, ax = plt.subplots(figsize=(0.6 * steps + 1.2, 0.6 * 2 * n + 0.8))
    image_grid(ax, np.concatenate(rows), 2 * n, steps, f"reverse process ({note}): x_t and the predicted x_0")
    ax.set_xticks(np.arange(steps) * 28 + 14)
    ax.set_xticklabels([f"t={t}" for t in rev["t"]], fontsize=8)
    ax.set_yticks(np.arange(2 * n) * 28 + 14)
    ax.set_yticklabels(["x_t", "x_0 pred."] * n, fontsize=7)
    show(fig, path)


@shows("ddpm")
def ddpm_sampling(ctx, trained):
    """The ancestral sampler's preview, and the reverse process of the export sampler."""
    ancestral_preview(ctx, trained)
    if ctx.export_sampler.kind == "ddim":
        rev = reverse_process(trained.model, 8, torch.Generator(ctx.device).manual_seed(ctx.cfg.seed + 7),
                              ctx.export_sampler)
        plot_reverse_process(rev, trained.model.sampler_note(ctx.export_sampler), ctx.out / "ddpm_reverse.png")


# %% [markdown]
# **Its error per timestep** on 500 test digits it never saw (`ddpm_noise_error.png`): on the left the plain
# noise MSE and the weighted loss, with the crossing $\mathrm{SNR}_t = \gamma$ below which the weight falls
# under 1; on the right what the predicted $\hat x_0$ leaves on the background, whose pixels are exactly 0
# in every real digit. The sampler's last jumps read $\hat x_0$ at the smallest timesteps, so a spread of
# more than about half a grey level there becomes the faint haze that section 9 counts. Since this network
# predicts $x_0$, its noise MSE exceeds 1 at the smallest $t$: there the noise is a grey level or less, and
# an $\hat x_0$ that misses by two grey levels implies a noise estimate off by more than the noise itself.
# The right panel is what reaches the sample.

# %%
def error_timesteps(T: int, n: int = 24) -> list:
    """About n code timesteps from 0 to T-1, spaced evenly on a log scale (the nearly clean ones matter here)."""
    return sorted({int(round(t)) - 1 for t in np.geomspace(1, T, n)})


@torch.inference_mode()
def noise_error_per_timestep(net, sched: Schedule, x0, ts, gen: torch.Generator, gamma: float) -> dict:
    """At each code timestep t of ts, on the digits x0 (in [-1, 1]) with one noise draw each: the plain MSE
    ||eps - eps_theta(x_t, t)||^2 per pixel, the loss weight w_t = min(SNR_t, gamma) / SNR_t (1 when gamma = 0)
    and the weighted loss w_t MSE; and the predicted x_0's error on the background (pixels that are exactly 0
    in x0), in grey levels of 255: its spread, and the share of background pixels it turns faint (1-FAINT)."""
    rows = {"t": [], "mse": [], "weight": [], "weighted": [], "background_sd": [], "background_faint": []}
    background = x0 == -1
    for t in ts:
        tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
        eps = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_t = q_sample(sched, x0, tt, eps)
        eps_hat = predict_eps(net, sched, x_t, tt)
        mse = float((eps_hat - eps).pow(2).mean())
        snr = float(sched.snr[t])
        weight = min(snr, gamma) / snr if gamma > 0 else 1.0
        ab = sched.alpha_bar[t]
        x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        levels = (x0_hat - x0) * 127.5  # [-1, 1] -> grey levels of 255
        shown = torch.as_tensor(to_uint8(x0_hat, signed=True))[background.squeeze(1).cpu()]  # clipped, rounded
        for key, value in (("t", t + 1), ("mse", mse), ("weight", weight), ("weighted", weight * mse),
                           ("background_sd", float(levels[background].std()) if background.any() else float("nan")),
                           ("background_faint", float(((shown > 0) & (shown <= FAINT)).float().mean()))):
            rows[key].append(value)  # t: the maths' t = code index + 1
    return rows


def snr_crossing(sched: Schedule, gamma: float) -> int | None:
    """The maths' t where SNR_t falls to gamma: below it, the min-SNR weight w_t is under 1."""
    below = (sched.snr <= gamma).nonzero()
    return int(below[0]) + 1 if gamma > 0 and len(below) else None


def plot_noise_error(rows: dict, crossing: int | None, path: Path):
    """Left: the plain MSE and the weighted loss per timestep, with the weight. Right: what the predicted x_0
    leaves on the background at that timestep."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(rows["t"], rows["mse"], "o-", label="plain MSE of the noise (1 = a blind guess)")
    left.plot(rows["t"], rows["weighted"], "s-", label="weighted loss $w_t$ MSE (what is optimised)")
    left.plot(rows["t"], rows["weight"], ":", color="grey", label="weight $w_t$")
    right.plot(rows["t"], rows["background_sd"], "o-", color="tab:red", label="spread of $\\hat x_0$'s error (grey levels)")
    right.plot(rows["t"], np.array(rows["background_faint"]) * 100, "s-", color="tab:purple",
               label="background pixels made faint (1-10), %")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("timestep t (log scale)")
        if crossing:
            ax.axvline(crossing, color="k", lw=0.8, ls="--", label=f"SNR$_t = \\gamma$ at t = {crossing}")
        ax.legend(fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("per pixel, on held-out test digits")
    left.set_title("noise-prediction error per timestep", fontsize=10)
    right.set_ylabel("grey levels of 255 / % of background pixels")
    right.set_title("the predicted $x_0$ on the background (real digits: exactly 0)", fontsize=10)
    show(fig, path)


@shows("ddpm")
def ddpm_error(ctx, trained):
    """The DDPM's noise-prediction error per timestep on held-out test digits."""
    model, cfg = trained.model, ctx.cfg
    with autocast(cfg, ctx.device):
        digits = reference_digits(ctx.test[0], 500, cfg.seed + 8).to(ctx.device)  # never trained on
        errors = noise_error_per_timestep(model.net, model.sched, to_signed(digits),
                                          error_timesteps(model.sched.T), torch.Generator(ctx.device).manual_seed(
                                              cfg.seed + 8), cfg.ddpm_min_snr)
    trained.extras["noise_error"] = errors
    plot_noise_error(errors, snr_crossing(model.sched, cfg.ddpm_min_snr), ctx.out / "ddpm_noise_error.png")


# %% [markdown]
# <a id="comparison"></a>
# # Part B: the comparison
#
# ## 8. The evaluator
#
# To say whether a generated image *is* a recognisable digit, and which one, we train a small CNN
# classifier on the MNIST training set right here (no downloaded weights) and report its test
# accuracy. It is cached in `checkpoints/evaluator.pt` and reused while its settings and data are
# unchanged. Its class probabilities $p(y\mid x)$ and its 128-d penultimate features $\phi(x)$ drive
# every metric below. All of them compare `n_samples` generated images with as many MNIST **test**
# digits. The last `eval_held_out` training digits are kept from the evaluator: the same numbers on
# those against the test digits give the **floor**, what a perfect model scores. Both sets are digits
# the evaluator never saw: its features of the digits it trained on are not those of unseen digits,
# and a floor from them would be biased. Its network, `Evaluator`, is defined in section 6.8, where the
# run's time estimate times it; its training is here.
#
# A classifier's features are mostly evidence for a class: a model that draws the right classes in the
# right numbers can look real to them whatever its strokes. So no measure stands on them alone: the
# two-sample test of section 9 looks at the pixels, and the report checks every run for a model that
# scores below the floor by FID, and whether the detector can still tell that model's digits from real ones.

# %%
def random_shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Augmentation: move the whole batch by up to `pixels` in each direction (digits have empty borders)."""
    dy, dx = torch.randint(-pixels, pixels + 1, (2,), generator=gen).tolist()
    return torch.roll(x, (dy, dx), dims=(2, 3))


class EvaluatorTrainer:
    """The evaluator, Adam with a one-cycle schedule (up to 3e-3, then annealed), and one step on a
    batch shifted by random_shift."""
    name, losses, fmt = "evaluator", ("loss",), ".3f"

    def __init__(self, cfg: Config, device, total_steps: int, gen: torch.Generator):
        self.cfg, self.device, self.gen = cfg, device, gen
        self.model = prepare(Evaluator(), cfg, device)
        self.opt = adam(self.model.parameters(), 1e-3, device)
        self.lr = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=3e-3, total_steps=max(total_steps, 2))
        self.scaler = LossScaler(cfg, device)
        self.modules = (self.model,)
        self.parts = {"evaluator": self.model, "opt": self.opt}

    def step(self, xb, yb) -> dict:
        with autocast(self.cfg, self.device):
            logits = self.model(random_shift(to_unit(xb), self.gen))
        loss = F.cross_entropy(logits.float(), yb)
        self.scaler.backward_step(loss, self.opt)
        self.lr.step()
        return {"loss": loss}


def train_evaluator(train, test, cfg: Config, device, cache: Path):
    """Train the evaluator, or load it from `cache` when it was trained with the same settings and data."""
    key = evaluator_key(train, cfg)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order and shifts
    trainer = EvaluatorTrainer(cfg, device, cfg.eval_epochs * steps_per_epoch(len(train[0]), cfg), gen)
    model = trainer.model
    if cache.exists():
        saved = torch.load(cache, map_location=device, weights_only=True)
        if saved.get("key") == key:
            model.load_state_dict(saved["state"])
            return model.eval(), saved["test_accuracy"], True
    fit(trainer, train, cfg, cfg.eval_epochs, gen=gen)
    acc = float((predict(model, test[0]).argmax(1) == test[1].cpu()).float().mean())
    save_checkpoint(cache, state=model.state_dict(), key=key, test_accuracy=acc)
    return model, acc, False


@torch.inference_mode()
def predict(model, images_uint8) -> torch.Tensor:
    """Class probabilities p(y|x) [N, 10] for uint8 images [N, 28, 28] (tensor or array)."""
    x = torch.as_tensor(np.asarray(images_uint8) if not torch.is_tensor(images_uint8) else images_uint8)
    device = next(model.parameters()).device
    probs = [F.softmax(model(to_unit(x[i:i + 2000].to(device))), 1).cpu() for i in range(0, len(x), 2000)]
    return torch.cat(probs)


@torch.inference_mode()
def features(model, images_uint8) -> np.ndarray:
    """The evaluator's penultimate-layer features phi(x) [N, 128] (float64) of uint8 images."""
    x = torch.as_tensor(np.asarray(images_uint8) if not torch.is_tensor(images_uint8) else images_uint8)
    device = next(model.parameters()).device
    feats = [model.features(to_unit(x[i:i + 2000].to(device))).double().cpu() for i in range(0, len(x), 2000)]
    return torch.cat(feats).numpy()


def prepare_evaluation(ctx: Run):
    """Train (or load) the evaluator once, and take its features of the reference test digits."""
    if ctx.evaluator is not None:
        return
    cfg = ctx.cfg
    seen = len(ctx.train[0]) - cfg.eval_held_out  # the evaluator trains on these; the rest are held out
    ctx.evaluator, acc, cached = train_evaluator((ctx.train[0][:seen], ctx.train[1][:seen]), ctx.test, cfg,
                                                 ctx.device, ctx.out / "checkpoints" / "evaluator.pt")
    print(f"evaluator test accuracy {100 * acc:.2f}% (trained on {seen} training digits, {cfg.eval_held_out} "
          "held out for the floor)" + (" (cached)" if cached else ""))
    ctx.results["evaluator"] = {"test_accuracy": acc, "cached": cached, "trained_on": seen,
                                "held_out": cfg.eval_held_out}
    ctx.reference = reference_digits(ctx.test[0], cfg.n_samples, cfg.seed + 10)
    ctx.ref_feats = features(ctx.evaluator, ctx.reference)


@stage
def evaluator_section(ctx):
    """The evaluator, when this run trained a model."""
    if ctx.models:
        prepare_evaluation(ctx)


# %% [markdown]
# <a id="measuring"></a>
# ## 9. Measuring the four axes
#
# ### Clarity: are the samples sharp, realistic digits?
# * **classifier-FID**, the Fréchet distance between Gaussians fitted to $\phi$ of the samples
#   ($\mu_g, \Sigma_g$) and of the test digits ($\mu_r, \Sigma_r$):
#   $\lVert\mu_g-\mu_r\rVert^2 + \mathrm{Tr}\big(\Sigma_g+\Sigma_r-2(\Sigma_g\Sigma_r)^{1/2}\big)$. Lower
# is better.
#   It is FID's formula with an MNIST classifier in place of ImageNet's Inception net, so its
#   values are not comparable with published FIDs.
# * **classifier Inception Score** $\exp\big(\mathbb{E}_x\,\mathrm{KL}(p(y\mid x)\,\Vert\,p(y))\big)$,
# from 1 to 10:
#   high when every image is confidently one digit and all ten digits appear.
# * **precision and recall** (Kynkäänniemi et al., 2019): each set of features spans a manifold,
#   the union of balls around its points whose radius is the distance to the point's
#   $k$-th nearest neighbour ($k=5$). Precision is the share of samples inside the real manifold
#   (are they realistic?), recall the share of real digits inside the samples' manifold
#   (is all of MNIST's variety covered?).
# * **a classifier two-sample test** (Lopez-Paz & Oquab, 2017): a small CNN, the *detector*, is trained
#   afresh (`detector_steps` Adam steps) to tell the model's samples from test digits, on half of each
#   (balanced); its accuracy on the other halves is the share of images it places right. 0.5 means it
# cannot tell them apart at all,
#   1 that it always can. It looks at the pixels, not at the evaluator's class features, so it sees
#   strokes and backgrounds a classifier ignores. The same test on held-out training digits against
#   test digits should give 0.5 (a test of the test). MNIST's test set is ordered (its first 5,000
#   digits are drawn thinner than its last 5,000), so the test digits every measure uses are drawn from
#   it at random and shuffled: halves cut in order would otherwise fit the detector on one kind of
#   digit and test it on another. It sees a faint haze that is hard to see on a screen: real backgrounds
#   are exactly 0, so it runs a second time with the **faint** pixels (1 to `FAINT` = 10 grey levels of
#   255) set to 0 in both sets, and the report gives the share of faint pixels of every model.
# * **sharpness**, the root mean square difference between neighbouring pixels (0-1 scale) after a 3x3
#   median filter, beside the same number on real digits. The filter removes isolated dots and keeps
#   strokes (two pixels wide or more), so blur lowers it and background speckle does not raise it.
#
# * **memorisation**: the pixel distance (Euclidean, 0-1 scale) from each sample to its nearest training
#   digit, against the same distance for real test digits, which no model saw. A sample closer to the
#   training set than 99% of the test digits of its class (as the evaluator reads both) are is a *near
#   copy*; a model that does not copy has about 1% of them, one that copies its training digits close to
#   100%. Per class, because a thin digit has few ink pixels: its distances are small, and one threshold
#   for all digits would flag only 1s, real ones included.
#
# Every number of a set of samples comes with a **95% range**: FID, Inception Score, precision and
# recall as the value ± 1.96 standard deviations over `bootstrap` resamples of the samples and of the
# test digits (precision and recall keep each point's k-NN radius from the full set: a resample holds
# duplicates, whose nearest neighbour is at distance 0); the detector's accuracy and the share of near
# copies as the binomial (Wilson) interval of that many trials. Two models differ on a measure only
# where their ranges do not overlap.
#
# ### Controllability: how cheaply does a user get the digit they want?
# Every model gets the same question: with the best means it offers, what is the probability
# $p_d$ that one attempt yields digit $d$? A conditional model is **asked** for $d$ through its
# label. The VAE can be **steered**: encode the training digits, take the mean and spread of the
# codes of each class, and decode codes drawn from the class-$d$ Gaussian. The GAN and the DDPM have
# no handle, so a user **redraws** until $d$ appears, and $p_d$ is the share of samples the
# evaluator calls $d$. The expected number of attempts for a chosen digit is
# $\frac{1}{10}\sum_d 1/p_d$, and its inverse is the control score (section 10).
# For the asked and steered models we also show the confusion matrix (asked vs seen).
#
# ### Stability and efficiency
# The classifier-FID of the samples each model drew after every epoch (section 7), class coverage
# (entropy of the predicted classes divided by $\log 10$; 1 = all digits equally), the smallest class
# share and recall (mode collapse); wall time, images per second, parameters, time
# per image at batch 1 and at batch 1000, and peak memory during training.

# %%
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets.
    Tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of S_a S_b (real and >= 0: the
    product is similar to S_a^(1/2) S_b S_a^(1/2)); this stays exact when, as here, some features are
    always 0 and the covariances are singular, where a matrix square root warns and loses precision."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_sqrt)


def inception_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over the samples."""
    p_yx = probs.double().clamp_min(1e-12)
    p_y = p_yx.mean(0, keepdim=True)
    return float(torch.exp((p_yx * (p_yx.log() - p_y.log())).sum(1).mean()))


def knn_radius(feats: torch.Tensor, k: int = PR_K) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    return torch.cat([torch.cdist(chunk, feats).kthvalue(k + 1, dim=1).values
                      for chunk in feats.split(2000)])


def inside_manifold(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor, draws: int = 0,
                    seed: int = 0, z: float = 1.96) -> tuple:
    """The share of points that lie within radius[j] of some centre j, and its 95% range: +- z standard
    deviations of that share over `draws` bootstrap resamples of the points and of the centres. A resample
    keeps each centre's radius: redrawn with replacement, a set holds duplicates, whose k-NN distance is 0.
    Resampled centres enter only through which of them are drawn (one matrix product per chunk of points
    does every draw), resampled points through how often each is drawn."""
    rng = np.random.default_rng(seed)
    n, c = len(points), len(centres)
    drawn = np.stack([np.bincount(rng.integers(0, c, c), minlength=c) > 0 for _ in range(draws)], 1) \
        if draws else np.zeros((c, 0), dtype=bool)
    centre_sets = torch.from_numpy(np.concatenate([np.ones((c, 1), dtype=bool), drawn], 1)).to(points).float()
    inside = torch.cat([((torch.cdist(chunk, centres) <= radius[None, :]).float() @ centre_sets > 0).cpu()
                        for chunk in points.split(2000)]).double()  # [n, 1 + draws]: all centres, then each draw
    share = float(inside[:, 0].mean())
    if not draws:
        return share, None
    counts = torch.from_numpy(np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)], 1))
    sd = float(((inside[:, 1:] * counts).sum(0) / n).std())
    return share, [max(0.0, share - z * sd), min(1.0, share + z * sd)]


def precision_recall(real_feats, fake_feats, k: int = PR_K, draws: int = 0, seed: int = 0) -> dict:
    """precision: share of fakes inside the real k-NN manifold; recall: share of reals inside the fake one;
    each with its bootstrap range (inside_manifold) when draws > 0."""
    real, fake = torch.as_tensor(real_feats).float(), torch.as_tensor(fake_feats).float()
    precision, precision_range = inside_manifold(fake, real, knn_radius(real, k), draws, seed)
    recall, recall_range = inside_manifold(real, fake, knn_radius(fake, k), draws, seed + 1)
    return {"precision": precision, "precision_range": precision_range, "recall": recall, "recall_range": recall_range}


def median3(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 median filter of images [N, H, W] (borders repeated): an isolated dot, at most 4 of the 9
    pixels of any window, goes; a stroke two pixels wide or more stays."""
    windows = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1)
    return windows.reshape(*x.shape, 9).median(-1).values


def sharpness(images_uint8) -> float:
    """The root mean square difference between neighbouring pixels (0-1 scale) of the median-filtered
    images, averaged over the images: high for crisp strokes, low for blurred ones (blur spreads an edge's
    step over several pixels, and the squares of smaller steps sum to less), not raised by scattered dots."""
    x = torch.as_tensor(np.asarray(images_uint8))
    total = 0.0
    for chunk in x.split(2000):
        m = median3(chunk.float() / 255.0)
        squares = ((m[:, 1:, :] - m[:, :-1, :]) ** 2).mean(dim=(1, 2)) + ((m[:, :, 1:] - m[:, :, :-1]) ** 2).mean(dim=(1, 2))
        total += float((squares / 2).sqrt().sum())
    return total / len(x)


def faint_share(images_uint8) -> float:
    """The share of pixels that are faint (1 to FAINT): real MNIST backgrounds are exactly 0, and a model
    that leaves a faint haze there is told from real digits by a detector, though no eye sees it."""
    x = np.asarray(images_uint8)
    return float(((x > 0) & (x <= FAINT)).mean())


def pixel_histogram(images_uint8) -> np.ndarray:
    """The share of pixels at each grey level 0..255: a haze shows as mass at the faint levels 1..FAINT,
    where real digits have almost none."""
    counts = np.bincount(np.asarray(images_uint8).ravel(), minlength=256).astype(np.float64)
    return counts / counts.sum()


def without_faint(images_uint8) -> torch.Tensor:
    """The images with their faint pixels set to 0 (the two-sample test again, without the haze)."""
    x = torch.as_tensor(np.asarray(images_uint8) if not torch.is_tensor(images_uint8) else images_uint8).cpu()
    return torch.where(x <= FAINT, torch.zeros_like(x), x)


def share_range(share: float, n: int, z: float = 1.96) -> list:
    """The Wilson 95% interval of a share of n trials (it stays inside 0-1, also at 0 and 1)."""
    centre, half = share + z * z / (2 * n), z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    low, high = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    return [max(0.0, min(low, share)), min(1.0, max(high, share))]  # min/max: rounding at 0 and 1


def span(low_high: list, digits: int = 1, scale: float = 1.0) -> str:
    """A 95% range as text: '40.1-45.5'."""
    return f"{scale * low_high[0]:.{digits}f}-{scale * low_high[1]:.{digits}f}"


def bootstrap_range(measure, value: float, *sets, draws: int, seed: int, z: float = 1.96) -> list:
    """value +- z standard deviations of `measure` over `draws` resamples (with replacement) of each set,
    independently: a 95% range of what another draw of as many samples (and test digits) would give."""
    rng = np.random.default_rng(seed)
    again = [measure(*(s[rng.integers(0, len(s), len(s))] for s in sets)) for _ in range(draws)]
    sd = float(np.std(again, ddof=1))
    return [value - z * sd, value + z * sd]


def two_sample_test(real_uint8, fake_uint8, cfg: Config, device, seed: int) -> dict:
    """Train a Detector on the first half of each set (real = 1, fake = 0) for detector_steps, and report
    its accuracy on the other halves with its 95% range. The halves are cut in order, so each set's order
    must mean nothing about its images: true of samples and of the shuffled reference digits
    (reference_digits), not of MNIST's test set as stored. A conditional model's samples cycle through
    the classes, so each half holds every class equally: random halves of a set whose class counts are
    fixed would hold complementary surpluses, which the detector learns on one half and finds reversed on
    the other (an accuracy below 0.5). The run's own random state is left as it was."""
    real, fake = (torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).cpu()
                  for a in (real_uint8, fake_uint8))
    n = min(len(real), len(fake))
    half = n // 2

    def split(lo, hi):
        return torch.cat([real[lo:hi], fake[lo:hi]]), torch.cat([torch.ones(hi - lo), torch.zeros(hi - lo)])

    (x_fit, y_fit), (x_test, y_test) = split(0, half), split(half, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        detector = Detector().to(device)
        opt = torch.optim.Adam(detector.parameters(), 1e-3)
        order, steps = torch.Generator().manual_seed(seed), 0
        while steps < cfg.detector_steps:  # epochs over the fitting halves, shuffled, until the steps are done
            batches = torch.randperm(len(x_fit), generator=order).split(cfg.batch_size)
            for idx in batches[:cfg.detector_steps - steps]:
                loss = F.binary_cross_entropy_with_logits(detector(to_unit(x_fit[idx].to(device))),
                                                          y_fit[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
    with torch.inference_mode():
        said_real = torch.cat([detector(to_unit(x_test[i:i + 2000].to(device))).cpu() > 0
                               for i in range(0, len(x_test), 2000)])
    accuracy = float((said_real == y_test.bool()).float().mean())
    return {"accuracy": accuracy, "range": share_range(accuracy, len(x_test)), "n_fit": len(x_fit),
            "n_test": len(x_test), "steps": cfg.detector_steps}


def class_stats(probs: torch.Tensor) -> dict:
    """Confidence (mean top probability), class shares, coverage entropy / log 10, smallest share."""
    share = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    nz = share[share > 0]
    return {"confidence": float(probs.max(1).values.mean()), "class_share": share.tolist(),
            "coverage": max(0.0, float(-(nz * nz.log()).sum() / math.log(10))),
            "smallest_class_share": float(share.min())}


def confusion(asked, probs: torch.Tensor) -> np.ndarray:
    """10x10 matrix: row d = share of the samples asked to be d that the evaluator calls each digit."""
    asked = torch.as_tensor(asked).long()
    counts = torch.zeros(10, 10, dtype=torch.float64)
    counts.index_put_((asked, probs.argmax(1)), torch.ones(len(asked), dtype=torch.float64), accumulate=True)
    return (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()


REDRAWN = "cannot be asked: redrawn until the digit appears"


def control_from_hits(p_d, method: str, matrix=None) -> dict:
    """p_d = probability that one attempt yields digit d. Expected attempts per chosen digit:
    mean_d 1/p_d (None when some digit never comes, and then the score is 0); control score: its inverse.
    The hit rate, mean_d p_d, is kept only for a model that can be asked or steered: for a model that is
    redrawn, p_d are its class shares and their mean is 1/10 whatever the model does."""
    p_d = np.asarray(p_d, dtype=float)
    attempts = float(np.mean(1 / p_d)) if (p_d > 0).all() else None  # None: some digit never comes
    return {"method": method, "can_be_asked": method != REDRAWN, "per_class_hit": p_d.tolist(),
            "hit_rate": float(p_d.mean()) if method != REDRAWN else None,
            "attempts_per_digit": attempts, "score": 1 / attempts if attempts else 0.0,
            "confusion": None if matrix is None else np.asarray(matrix).tolist()}


@torch.inference_mode()
def class_codes(model, images_uint8, labels, max_images: int = 10000) -> tuple:
    """Mean and standard deviation of the encoder's codes over the digits of each class: [10, latent] each."""
    mu = model.codes(images_uint8[:max_images])
    y = labels[:max_images].to(mu.device)
    means = torch.stack([mu[y == d].mean(0) for d in range(10)])
    stds = torch.stack([mu[y == d].std(0) for d in range(10)])
    return means, stds


@torch.inference_mode()
def steer(model, means, stds, asked: torch.Tensor, gen: torch.Generator) -> np.ndarray:
    """Decode codes z ~ N(mean_d, std_d^2) for each asked digit d: how an encoder-decoder chooses a digit."""
    device = means.device
    asked = asked.to(device)
    z = means[asked] + stds[asked] * torch.randn(means[asked].shape, generator=gen, device=device)
    return to_uint8(model.decode(z), signed=False)


def controllability(ctx: Run, model, images, asked, probs) -> dict:
    """p_d for every class d, by the best means the model offers: asked, steered, or redrawn."""
    if asked is not None:
        matrix = confusion(asked, probs)
        guidance = f", guidance {model.cfg.cddpm_guidance:g}" if model.uses_sampler else ""
        return control_from_hits(np.diag(matrix), "asked through its label" + guidance, matrix)
    if hasattr(model, "codes"):
        means, stds = class_codes(model, *ctx.train)
        wanted = balanced_labels(len(images))
        steered = steer(model, means, stds, wanted, torch.Generator(ctx.device).manual_seed(model.cfg.seed + 6))
        matrix = confusion(wanted, predict(ctx.evaluator, steered))
        return control_from_hits(np.diag(matrix), "steered to the encoder's class mean", matrix)
    return control_from_hits(class_stats(probs)["class_share"], REDRAWN)


def control_phrase(c: dict, thing: str = "digit") -> str:
    """What a user gets per attempt: the hit rate of a model that can be asked or steered; for one that
    cannot, the attempts a chosen class takes (its hit rate would be 1/10 by construction)."""
    attempts = f"never draws some {thing}" if c["attempts_per_digit"] is None else \
        f"{c['attempts_per_digit']:.1f} attempts per chosen {thing}"
    if not c["can_be_asked"]:
        return f"cannot be asked for a {thing} (redrawn: {attempts})"
    return f"one attempt yields the chosen {thing} {100 * c['hit_rate']:.1f}% ({c['method']}; {attempts})"


COPY_QUANTILE = 0.01  # a near copy is closer to the training set than this share of real test digits of its class


def pixel_pool(images_uint8: torch.Tensor) -> tuple:
    """The images nearest_distances searches, prepared once: flat 0-1 vectors p [N, 784] and ||p||^2 [N]."""
    pool = images_uint8.flatten(1).float() / 255.0
    return pool, (pool * pool).sum(1)


def training_pool(ctx: Run) -> tuple:
    """pixel_pool of the training digits, made once per run and shared by every model and the real digits."""
    if "training_pool" not in ctx.arrays:
        ctx.arrays["training_pool"] = pixel_pool(ctx.train[0])
    return ctx.arrays["training_pool"]


@torch.inference_mode()
def nearest_distances(queries_uint8, pool: tuple) -> tuple:
    """For each query image, the Euclidean pixel distance (0-1 scale) to its nearest image of the pixel_pool,
    and that image's index: ||q - p||^2 = ||q||^2 + ||p||^2 - 2 q.p, a matrix product per chunk of queries."""
    pool, pool_sq = pool
    queries = torch.as_tensor(np.asarray(queries_uint8) if not torch.is_tensor(queries_uint8) else queries_uint8)
    dists, index = [], []
    for chunk in queries.split(1000):
        q = chunk.to(pool.device).flatten(1).float() / 255.0
        d2 = (q * q).sum(1, keepdim=True) + pool_sq[None, :] - 2 * q @ pool.T
        best = d2.min(1)
        dists.append(best.values.clamp_min(0).sqrt().cpu())
        index.append(best.indices.cpu())
    return torch.cat(dists).double().numpy(), torch.cat(index).numpy()


def real_nearest(ctx: Run, classes) -> dict:
    """How far the reference test digits (no model saw them) lie from their nearest training digits: the
    median distance, and per class (the evaluator's `classes` of them) the near-copy threshold, closer than
    all but COPY_QUANTILE of that class. Per class, because a thin digit has few ink pixels: one threshold
    for all would flag only 1s, the real ones too. A class none of them has gets no threshold (nan)."""
    distances, classes = nearest_distances(ctx.reference, training_pool(ctx))[0], np.asarray(classes)
    return {"median_distance": float(np.median(distances)), "n": len(distances),
            "thresholds": [float(np.quantile(distances[classes == c], COPY_QUANTILE)) if (classes == c).any()
                           else float("nan") for c in range(10)]}


def memorisation(ctx: Run, images, classes, thresholds: list, pairs: int = 6) -> dict:
    """How close the samples come to the training digits: the share of near copies (closer than their
    class's threshold from real_nearest; `classes` the evaluator's) with its 95% range, the median distance,
    and the closest pairs relative to their class's threshold, [sample, training digit, distance, ratio]
    (for the figure)."""
    distances, index = nearest_distances(images, training_pool(ctx))
    ratio = distances / np.asarray(thresholds)[np.asarray(classes)]  # below 1: a near copy
    share = float((ratio < 1).mean())
    closest = np.argsort(np.nan_to_num(ratio, nan=np.inf))[:pairs]
    return {"near_copy_share": share, "near_copy_range": share_range(share, len(distances)),
            "median_distance": float(np.median(distances)), "n": len(distances),
            "closest": [[int(i), int(index[i]), float(distances[i]), float(ratio[i])] for i in closest]}


def feature_metrics(ctx: Run, feats: np.ndarray, seed: int) -> dict:
    """The classifier-FID of a set of images' features against the reference digits', with its 95% range, and
    precision and recall with theirs."""
    fid = frechet_distance(feats, ctx.ref_feats)
    return {"fid": fid, "fid_range": bootstrap_range(frechet_distance, fid, feats, ctx.ref_feats,
                                                     draws=ctx.cfg.bootstrap, seed=seed),
            **precision_recall(ctx.ref_feats, feats, draws=ctx.cfg.bootstrap, seed=seed)}


def clarity_metrics(ctx: Run, images, feats: np.ndarray, probs: torch.Tensor, seed: int) -> dict:
    """FID, Inception Score, precision, recall and the two-sample test of one set of images against the
    reference test digits, each with its 95% range (the test also with faint pixels removed from both sets);
    and the images' sharpness and faint share."""
    cfg = ctx.cfg
    inception = inception_score(probs)
    return {**feature_metrics(ctx, feats, seed),
            "inception_score": inception, "inception_score_range": bootstrap_range(
                inception_score, inception, probs, draws=cfg.bootstrap, seed=seed),
            "two_sample": two_sample_test(ctx.reference, images, cfg, ctx.device, seed),
            "two_sample_without_faint": two_sample_test(without_faint(ctx.reference), without_faint(images), cfg,
                                                        ctx.device, seed),
            "sharpness": sharpness(images), "faint_share": faint_share(images)}


def sample_metrics(ctx: Run, model, images, asked) -> dict:
    """Clarity, coverage and controllability of one set of samples against the reference digits."""
    probs, feats = predict(ctx.evaluator, images), features(ctx.evaluator, images)
    return {**clarity_metrics(ctx, images, feats, probs, model.cfg.seed + 9), **class_stats(probs),
            "control": controllability(ctx, model, images, asked, probs),
            "first_predictions": [[int(p.argmax()), float(p.max())] for p in probs[:10]]}


def measure_real(ctx: Run) -> dict:
    """The metrics of held-out training digits against the test digits: the floor for every model."""
    n = len(ctx.reference)
    real = held_out(ctx, n)
    probs = predict(ctx.evaluator, real)
    m = clarity_metrics(ctx, real, real_features(ctx, n), probs, ctx.cfg.seed + 9)
    return {"n": n, "fid_floor": m.pop("fid"), "fid_floor_range": m.pop("fid_range"), **m, **class_stats(probs),
            "memorisation": real_nearest(ctx, predict(ctx.evaluator, ctx.reference).argmax(1).numpy())}


def seconds_per_image_at_batch_1(ctx: Run, trained: Trained) -> float:
    """Median wall time of drawing one image alone (after one warm-up draw): what a user waits."""
    model = trained.model
    repeats = 3 if model.uses_sampler else 20
    gen = torch.Generator(ctx.device).manual_seed(model.cfg.seed + 5)
    asked = torch.tensor([7]) if trained.spec.conditional else None
    times = time_calls(lambda: draw(model, 1, gen, ctx.export_sampler, asked), 1, repeats, ctx.device)
    return float(np.median(times))


def epoch_fids(ctx: Run, probes: list) -> list:
    """The classifier-FID of each epoch's samples against as many reference digits."""
    return [frechet_distance(features(ctx.evaluator, p), ctx.ref_feats[:len(p)]) for p in probes]


def held_out(ctx: Run, n: int) -> torch.Tensor:
    """The first n of the training digits kept from the evaluator (the last eval_held_out), on the CPU."""
    return ctx.train[0][len(ctx.train[0]) - ctx.cfg.eval_held_out:][:n].cpu()


def real_features(ctx: Run, n: int) -> np.ndarray:
    """The evaluator's features of the first n held-out training digits: computed once for the largest n
    asked, sliced for smaller ones."""
    if ctx.real_feats is None or len(ctx.real_feats) < n:
        ctx.real_feats = features(ctx.evaluator, held_out(ctx, n))
    return ctx.real_feats[:n]


def real_gap(ctx: Run, n: int) -> float:
    """The classifier-FID between n held-out training digits and n test digits, two sets the evaluator never
    saw: how far two draws of one distribution lie apart at that size (for n = n_samples, the floor)."""
    return frechet_distance(real_features(ctx, n), ctx.ref_feats[:n])


def epoch_drift(ctx: Run, probes: list) -> dict | None:
    """How far the last epoch moved the model: the classifier-FID between the samples drawn from the same
    noise after the last two epochs, beside `real_gap` for as many digits. None with fewer than two epochs."""
    if len(probes) < 2:
        return None
    n = len(probes[-1])
    return {"fid": frechet_distance(features(ctx.evaluator, probes[-2]), features(ctx.evaluator, probes[-1])),
            "real_gap": real_gap(ctx, n), "n": n}


def prior_sampler_metrics(ctx: Run, model) -> dict:
    """A VAE's other sampler, z ~ N(0, I), measured beside the exported one (the mixture over its training codes):
    classifier-FID with its range, precision and recall, from as many samples and the same seed as the export."""
    images = draw(model, ctx.cfg.n_samples, torch.Generator(ctx.device).manual_seed(model.cfg.seed + 1), PRIOR)
    return {"sampler": model.sampler_note(PRIOR), **feature_metrics(ctx, features(ctx.evaluator, images),
                                                                    model.cfg.seed + 9),
            "faint_share": faint_share(images)}


def measure_model(ctx: Run, trained: Trained) -> dict:
    """Every number of one trained model (section 9): efficiency from its training, stability from its
    per-epoch samples, clarity and controllability from its exported samples."""
    name, model, hist, cfg = trained.name, trained.model, trained.history, ctx.cfg
    epochs = cfg.model_epochs(name)
    probe_n = len(hist.probes[-1]) if hist.probes else 0
    entry = {
        "epochs": epochs, "train_seconds": hist.seconds, "seconds_per_epoch": hist.seconds / epochs,
        "train_images_per_second": hist.steps * cfg.batch_size / hist.seconds, "parameters": trained.parameters,
        "sampler": model.sampler_note(ctx.export_sampler), "sample_seconds": trained.sample_seconds,
        "sample_batch": min(SAMPLE_BATCH, cfg.n_samples), "seconds_per_image": trained.sample_seconds / cfg.n_samples,
        "seconds_per_image_batch1": seconds_per_image_at_batch_1(ctx, trained),
        "peak_memory_mb": hist.peak_memory_mb, "peak_memory_kind": hist.memory_kind,
        "memory_parts": hist.memory_parts,
        "epoch_fid": epoch_fids(ctx, hist.probes), "epoch_drift": epoch_drift(ctx, hist.probes),
        "epoch_fid_note": f"{probe_n} samples" + (f", {model.sampler_note(probe_sampler(cfg))}" if model.uses_sampler else "")
        + (", codes from the prior: the mixture is fitted after training" if getattr(model, "mixture", None) else ""),
        "epoch_fid_floor": {"n": probe_n, "fid": real_gap(ctx, probe_n)} if probe_n else None,  # at its size
        "final_epoch_loss": {k: v[-1] for k, v in hist.epoch.items()}, "epoch_loss": hist.epoch,
        "probe_seconds": hist.probe_seconds, **trained.extras}
    entry.update(sample_metrics(ctx, model, trained.samples, trained.asked))
    entry["memorisation"] = memorisation(ctx, trained.samples, predict(ctx.evaluator, trained.samples).argmax(1).numpy(),
                                         ctx.results["real_test"]["memorisation"]["thresholds"])
    if hasattr(model, "codes"):
        if f"{name}_reconstructions" not in ctx.arrays:  # drawn by its section 7 cell, unless it trained elsewhere
            ctx.arrays[f"{name}_reconstructions"] = reconstructions(ctx, model)
        if f"{name}_latent" not in ctx.arrays:
            ctx.arrays[f"{name}_latent"] = latent_pca(ctx, model)
        entry["test_reconstruction_bce"] = ctx.arrays[f"{name}_reconstructions"]["bce"]
        entry["latent_pca_variance"] = ctx.arrays[f"{name}_latent"]["explained"]
    if getattr(model, "mixture", None) is not None:
        entry["prior_sampler"] = prior_sampler_metrics(ctx, model)
    return entry


@stage
def measure_section(ctx):
    """Measure every trained model that has not been measured yet; print its headline numbers."""
    if not ctx.models:
        return
    if "real_test" not in ctx.results:
        ctx.results["real_test"] = measure_real(ctx)
        real = ctx.results["real_test"]
        print(f"held-out training digits against the test digits (the floor): classifier-FID "
              f"{real['fid_floor']:.1f} ({span(real['fid_floor_range'])}), precision {real['precision']:.2f}, "
              f"recall {real['recall']:.2f}, the detector tells them apart "
              f"{100 * real['two_sample']['accuracy']:.1f}% ({span(real['two_sample']['range'], 1, 100)})")
    for name, trained in ctx.models.items():
        if name in ctx.results["models"]:
            continue
        t0 = time.perf_counter()
        m = ctx.results["models"][name] = measure_model(ctx, trained)
        m["measure_seconds"] = time.perf_counter() - t0
        print(f"{trained.spec.title}: classifier-FID {m['fid']:.1f} ({span(m['fid_range'])}; floor "
              f"{ctx.results['real_test']['fid_floor']:.1f}), detector {100 * m['two_sample']['accuracy']:.1f}% "
              f"({span(m['two_sample']['range'], 1, 100)}), "
              f"precision {m['precision']:.2f}, recall {m['recall']:.2f}, {control_phrase(m['control'])}, "
              f"{1000 * m['seconds_per_image_batch1']:.2f} ms per image at batch 1")


# %% [markdown]
# <a id="scores"></a>
# ## 10. Scores
#
# Each axis becomes a score from 0 (worst) to 1 (best) by one formula, the same for every model,
# from the numbers measured above (no constant is set per model):
#
# * **clarity** $= \frac{1}{3}\Big(\mathrm{clip}\big(1 -
# \frac{\log(\mathrm{FID}/\mathrm{FID}_\text{floor})}{\log 20}\big)
#   + \mathrm{clip}\big(\frac{\mathrm{IS} - 1}{\mathrm{IS}_\text{real} - 1}\big) + \mathrm{clip}\big(2(1 -
# a)\big)\Big)$.
#   FID counts on a log scale between the floor (1) and `CLARITY_WORST` = 20× the floor (0), so halving
#   the FID gains as much anywhere; the Inception Score adds "is each image confidently one digit"; the
#   detector's accuracy $a$ adds what the evaluator's class features miss near real digits (1 at
#   $a = 0.5$, it cannot tell; 0 at $a = 1$, it always can). Precision and sharpness are shown beside it,
#   not mixed in: precision rewards blurred but typical digits, and sharpness says nothing of shapes.
#   How well the score's order agrees with FID's and with the detector's is printed with it
#   (Spearman's $\rho$);
# * **controllability** $= 1 \big/ \frac{1}{10}\sum_d \frac{1}{p_d}$, the inverse of the expected number of
#   attempts to get a chosen digit. A model that cannot be asked (GAN, DDPM) has only its class shares as
#   $p_d$: at best 10 attempts, a score of at most 0.1, and no hit rate (its mean share is $\frac{1}{10}$
#   whatever it draws);
# * **stability** $= \frac{1}{4}\Big(\text{coverage} + \text{recall} + \min(1, 10\,\text{smallest class
# share}) +
#   \frac{g}{g + \text{drift}}\Big)$: no digit missing, MNIST's variety covered, and training that has
#   settled. *drift* is the FID between the samples drawn from the same noise after the last two epochs
#   (how far the last epoch moved the model), $g$ the FID between as many held-out training and test digits
#   (what two draws of one distribution differ by): the term is 1 for a model that stopped moving and
#   $\frac{1}{2}$ for one whose last epoch moved it as far as two real draws differ;
# * **efficiency** $= \frac{1}{4}\sum_{c} \frac{1}{1 + \log_{10}(c / c_\text{min})}$ over four costs $c$:
# training
#   seconds, seconds per image at batch 1000 and at batch 1, and the memory to train (CUDA's peak on a GPU;
#   on a CPU the model's own tensors in one training step), each against the cheapest model of this run
#   ($c_\text{min}$); 10× the cheapest cost scores 0.5, 100× scores 0.33.
#
# The table holds the raw numbers beside the scores.

# %%
CLARITY_WORST = 20  # an FID this many times the floor, or worse, scores 0 on clarity's FID term
SCORE_FORMULAS = {
    "clarity": f"mean of 1 - log(FID / FID_floor) / log({CLARITY_WORST}) (clipped to 0-1: the floor scores 1, "
               f"{CLARITY_WORST}x the floor 0), (IS - 1) / (IS_real - 1) (clipped), IS the classifier "
               "Inception Score, and 2 (1 - a) (clipped), a the two-sample detector's accuracy",
    "control": "1 / mean_d(1 / p_d), p_d = probability that one attempt yields digit d (0 if some p_d = 0)",
    "stability": "mean of coverage, recall, min(1, 10 * smallest class share), g / (g + drift) with drift the "
                 "FID between the samples drawn from the same noise after the last two epochs and g that between "
                 "two sets of real digits of that size",
    "efficiency": "mean over costs c in (train seconds, seconds per image at batch 1000, at batch 1, "
                  "memory to train: CUDA's peak on a GPU, the model's tensors in one training step on a CPU) of "
                  "1 / (1 + log10(c / cheapest model's c))",
}
EFFICIENCY_COSTS = ("train_seconds", "seconds_per_image", "seconds_per_image_batch1", "peak_memory_mb")


def fid_term(fid: float, floor: float) -> float:
    """1 at the floor, 0 at CLARITY_WORST x the floor, linear in log FID between: halving the FID gains
    as much anywhere on the scale."""
    return float(np.clip(1 - math.log(max(fid, 1e-12) / floor) / math.log(CLARITY_WORST), 0.0, 1.0))


def inception_term(inception: float, real_inception: float) -> float:
    """1 for real digits' Inception Score, 0 for a score of 1 (one class, or no confident class)."""
    return float(np.clip((inception - 1) / max(real_inception - 1, 1e-12), 0.0, 1.0))


def detector_term(accuracy: float) -> float:
    """1 when the detector tells the samples from real digits no better than a coin (accuracy 0.5), 0 when
    it always can (accuracy 1)."""
    return float(np.clip(2 * (1 - accuracy), 0.0, 1.0))


def clarity_score(m: dict, real: dict) -> float:
    return float(np.mean([fid_term(m["fid"], real["fid_floor"]),
                          inception_term(m["inception_score"], real["inception_score"]),
                          detector_term(m["two_sample"]["accuracy"])]))


def drift_term(drift: dict | None):
    """g / (g + drift): 1 when the last epoch left the samples as they were, 1/2 when it moved them as far
    as two draws of real digits differ (g), towards 0 beyond."""
    return None if drift is None else float(drift["real_gap"] / (drift["real_gap"] + drift["fid"]))


def stability_score(m: dict) -> float:
    terms = [m["coverage"], m["recall"], min(1.0, 10 * m["smallest_class_share"])]
    settled = drift_term(m.get("epoch_drift"))
    if settled is not None:  # one epoch only, or a checkpoint without per-epoch samples: left out
        terms.append(settled)
    return float(np.mean(terms))


def clarity_agreement(results: dict, measure=lambda m: m["fid"]):
    """Spearman's rank correlation between the clarity scores and -measure (lower is better: FID by default,
    or the detector's accuracy) over the models (None below 3)."""
    models = results["models"]
    clarity, other = (pd.Series([results["scores"][n]["clarity"] for n in models]),
                      pd.Series([-measure(m) for m in models.values()]))
    if len(models) < 3 or clarity.nunique() < 2 or other.nunique() < 2:  # no order to compare
        return None
    rho = clarity.corr(other, method="spearman")
    return None if np.isnan(rho) else round(float(rho), 6)


def detector_accuracy(m: dict) -> float:
    return m["two_sample"]["accuracy"]


def efficiency_scores(models: dict) -> dict:
    """Per model, the mean of 1 / (1 + log10(c / c_min)) over the costs that were measured."""
    terms = {name: [] for name in models}
    for cost in EFFICIENCY_COSTS:
        values = {n: m.get(cost) for n, m in models.items()}
        if any(v is None or v <= 0 for v in values.values()):
            continue  # not measurable here (e.g. memory on a platform without /proc): left out for all
        cheapest = min(values.values())
        for n, v in values.items():
            terms[n].append(1 / (1 + math.log10(v / cheapest)))
    return {n: float(np.mean(t)) for n, t in terms.items()}


def axis_scores(results: dict) -> dict:
    models, real = results["models"], results["real_test"]
    efficiency = efficiency_scores(models)
    return {n: {"clarity": clarity_score(m, real), "control": m["control"]["score"],
                "stability": stability_score(m), "efficiency": efficiency[n]} for n, m in models.items()}


def clarity_columns(m: dict, fid: str) -> dict:
    """The clarity measures of a model (or of the real digits, whose FID is the floor), each with the low and
    high ends of its 95% range."""
    columns = {}
    for column, value, low_high in (("fid", m[fid], m[fid + "_range"]),
                                    ("inception_score", m["inception_score"], m["inception_score_range"]),
                                    ("precision", m["precision"], m["precision_range"]),
                                    ("two_sample_accuracy", m["two_sample"]["accuracy"], m["two_sample"]["range"]),
                                    ("two_sample_without_faint_accuracy", m["two_sample_without_faint"]["accuracy"],
                                     m["two_sample_without_faint"]["range"])):
        columns.update({f"clarity_{column}": value, f"clarity_{column}_low": low_high[0],
                        f"clarity_{column}_high": low_high[1]})
    columns["clarity_sharpness"], columns["clarity_faint_share"] = m["sharpness"], m["faint_share"]
    return columns


def metrics_table(results: dict) -> pd.DataFrame:
    """One row per model (and one for real digits): raw numbers and the four scores."""
    rows = {}
    for name, m in results["models"].items():
        s = results["scores"][name]
        curve = m["epoch_fid"] or [float("nan")]
        drift = m.get("epoch_drift") or {}
        rows[name] = {
            **clarity_columns(m, "fid"), "clarity_confidence": m["confidence"], "clarity_score": s["clarity"],
            "control_hit_rate": m["control"]["hit_rate"] if m["control"]["hit_rate"] is not None else float("nan"),
            "control_attempts_per_digit": m["control"]["attempts_per_digit"] or float("inf"),
            "control_score": s["control"],
            "stability_coverage": m["coverage"], "stability_smallest_class_share": m["smallest_class_share"],
            "stability_recall": m["recall"], "stability_recall_low": m["recall_range"][0],
            "stability_recall_high": m["recall_range"][1], "stability_best_epoch_fid": min(curve),
            "stability_last_epoch_fid": curve[-1],
            "stability_last_epoch_drift_fid": drift.get("fid", float("nan")),
            "stability_real_gap_fid": drift.get("real_gap", float("nan")),
            "stability_score": s["stability"],
            "memorisation_near_copy_share": m["memorisation"]["near_copy_share"],
            "memorisation_median_distance": m["memorisation"]["median_distance"],
            "efficiency_train_seconds": m["train_seconds"], "efficiency_seconds_per_epoch": m["seconds_per_epoch"],
            "efficiency_train_images_per_second": m["train_images_per_second"],
            "efficiency_parameters": m["parameters"],
            "efficiency_ms_per_image_batch1": 1000 * m["seconds_per_image_batch1"],
            f"efficiency_ms_per_image_batch{m['sample_batch']}": 1000 * m["seconds_per_image"],
            "efficiency_peak_memory_mb": m["peak_memory_mb"], "efficiency_score": s["efficiency"]}
        spread = results.get("seed_spread", {}).get(name)
        if spread:
            rows[name].update({f"stability_seed_{k}_{stat}": spread["summary"][k][stat]
                               for k in ("fid", "control_score") for stat in ("mean", "std")})
    real = results["real_test"]
    rows["real " + DATASETS[results["config"]["dataset"]]["title"]] = {
        **clarity_columns(real, "fid_floor"), "clarity_confidence": real["confidence"],
        "stability_coverage": real["coverage"],
        "memorisation_median_distance": real["memorisation"]["median_distance"],
        "stability_smallest_class_share": real["smallest_class_share"], "stability_recall": real["recall"],
        "stability_recall_low": real["recall_range"][0], "stability_recall_high": real["recall_range"][1]}
    return pd.DataFrame.from_dict(rows, orient="index")


def title(name: str) -> str:
    """A model's title (MODELS), or the name itself for a row that is not a model."""
    return MODELS[name].title if name in MODELS else name


@stage
def scores_section(ctx):
    """Score the four axes and show the table: scores first, then every raw number (one column per model)."""
    if not ctx.results["models"]:
        return
    results = ctx.results
    results["scores"] = axis_scores(results)
    results["clarity_fid_spearman"] = clarity_agreement(results)
    results["clarity_detector_spearman"] = clarity_agreement(results, detector_accuracy)
    table = metrics_table(results)
    results["analysis"] = table.to_dict(orient="index")
    scores = pd.DataFrame(results["scores"]).T.rename(index=title)
    print("scores (0-1):\n" + scores.to_string(float_format=lambda v: f"{v:.3f}"))
    for axis, formula in SCORE_FORMULAS.items():
        print(f"  {axis} = {formula}")
    if results["clarity_fid_spearman"] is not None:
        print(f"  clarity ranks the models as FID does with Spearman rho {results['clarity_fid_spearman']:.2f}")
    if results["clarity_detector_spearman"] is not None:
        print(f"  and as the two-sample detector does with rho {results['clarity_detector_spearman']:.2f}")
    print(table.T.rename(columns=title).to_string(float_format=lambda v: f"{v:.4g}"))


# %% [markdown]
# <a id="figures"></a>
# ## 11. Figures
#
# The functions below (folded) only draw: every number they show comes from the results above. The
# cells after them show the figures, a few at a time, each with what to look for.

# %% jupyter={"source_hidden": true}
# @title The comparison figures { display-mode: "form" }
def plot_comparison(samples: dict, notes: dict, path: Path):
    fig, axes = plt.subplots(len(samples), 1, figsize=(10, 1.5 * len(samples) + 0.4))
    axes = np.atleast_1d(axes)
    for ax, (name, images) in zip(axes, samples.items()):
        image_grid(ax, images, 1, 10, f"{title(name)}  ({notes[name]})")
    fig.suptitle("Ten samples from each model", y=1.0)
    show(fig, path)


def draw_epoch_floors(ax, models: dict):
    """The floor beside per-epoch curves: real against real digits at each curve's own sample size (the FID
    of n samples is biased upwards as n shrinks, so the 10,000-sample floor would sit far below them)."""
    floors = {m["epoch_fid_floor"]["n"]: m["epoch_fid_floor"]["fid"] for m in models.values() if m.get("epoch_fid_floor")}
    for n, floor in sorted(floors.items()):
        ax.axhline(floor, color="gray", ls="--", label=f"real vs real digits, {n} of each ({floor:.1f})")


def plot_epoch_fid(models: dict, path: Path):
    """Classifier-FID after every epoch: a falling curve converges, a zig-zag oscillates."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, m in models.items():
        curve = m["epoch_fid"]
        ax.plot(np.arange(1, len(curve) + 1), curve, "o-", color=MODELS[name].colour,
                label=f"{title(name)} ({m['epoch_fid_note']})")
    draw_epoch_floors(ax, models)
    ax.set_xlabel("epoch")
    ax.set_ylabel("classifier-FID (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Stability: classifier-FID after every epoch")
    ax.legend(fontsize=7)
    show(fig, path)


def epoch_seconds(entry: dict, hist: dict) -> tuple:
    """(cumulative training seconds at the end of each epoch, measured?): from the history, or, when the
    checkpoint's training did not record them, its training seconds spread evenly over its epochs."""
    measured = hist.get("epoch_seconds") or []
    n = len(entry["epoch_fid"])
    if len(measured) == n and all(np.isfinite(measured)):
        return np.asarray(measured, dtype=float), True
    return entry["train_seconds"] * np.arange(1, n + 1) / max(n, 1), False


def plot_fid_per_second(models: dict, histories: dict, path: Path):
    """Quality per second of compute: each model's per-epoch classifier-FID against its cumulative training
    seconds, log-log; a model whose epochs were not timed one by one is drawn dashed."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, entry in models.items():
        if not entry["epoch_fid"]:
            continue
        seconds, measured = epoch_seconds(entry, histories[name])
        ax.plot(seconds, entry["epoch_fid"], "o-" if measured else "o--", color=MODELS[name].colour,
                label=f"{title(name)} ({entry['epoch_fid_note']})" + ("" if measured else ", epochs taken as equally long"))
    draw_epoch_floors(ax, models)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training seconds so far (this machine)")
    ax.set_ylabel("classifier-FID (lower is better)")
    ax.set_title("Quality per second of compute: classifier-FID after every epoch")
    ax.legend(fontsize=7)
    show(fig, path)


def plot_pixel_values(samples: dict, real_uint8, path: Path):
    """Each model's share of pixels at every grey level against real digits', on a log scale, the faint
    levels 1..FAINT shaded: a haze the eye cannot see lifts a curve there."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    levels = np.arange(256)
    ax.axvspan(0.5, FAINT + 0.5, color="grey", alpha=0.15, label=f"faint: 1-{FAINT} of 255")
    ax.step(levels, pixel_histogram(real_uint8), where="mid", color="k", lw=2, label="real digits (held out)")
    for name, images in samples.items():
        ax.step(levels, pixel_histogram(images), where="mid", color=MODELS[name].colour, lw=1, label=title(name))
    ax.set_yscale("log")
    ax.set_xlabel("grey level (0 = background, 255 = ink)")
    ax.set_ylabel("share of all pixels")
    ax.set_title("Pixel values: each model against real digits", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    show(fig, path)


def plot_clarity_ranges(models: dict, real: dict, path: Path):
    """Classifier-FID, the detector's accuracy, precision and recall per model with their 95% ranges, beside
    the real digits': two models differ on a measure only where their bars do not overlap."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.2))
    names = list(models)

    def percent(key):  # a share and its range, in %, from an entry's key (the detector's under two_sample)
        def get(m):
            v, r = (m["two_sample"]["accuracy"], m["two_sample"]["range"]) if key == "two_sample" else (m[key], m[key + "_range"])
            return 100 * v, [100 * r[0], 100 * r[1]]
        return get

    panels = [(lambda m: (m["fid"], m["fid_range"]), (real["fid_floor"], real["fid_floor_range"]),
               "classifier-FID (log scale; lower is better)", "log"),
              (percent("two_sample"), percent("two_sample")(real), "the detector tells them from real digits (%)",
               "linear"),
              (percent("precision"), percent("precision")(real), "precision: inside the real manifold (%)", "linear"),
              (percent("recall"), percent("recall")(real), "recall: real digits it covers (%)", "linear")]
    for ax, (value, (real_value, real_range), label, scale) in zip(axes.flat, panels):
        floor = real_value / 100 if scale == "log" else -np.inf  # a log axis shows no range below 0
        for i, name in enumerate(names):
            v, (low, high) = value(models[name])
            ax.errorbar(v, i, xerr=[[v - max(low, floor)], [high - v]], fmt="o", color=MODELS[name].colour,
                        capsize=4)
        ax.axvspan(max(real_range[0], floor), real_range[1], color="gray", alpha=0.25,
                   label=f"real digits {real_value:.1f} (95% range)")
        ax.set_xscale(scale)
        ax.set_yticks(range(len(names)), [title(n) for n in names])
        ax.set_ylim(-0.5, len(names) + 0.3)  # headroom above the top model: the legend sits there
        ax.set_xlabel(label)
        ax.legend(fontsize=7, loc="upper center", frameon=False)
    axes[0, 1].axvline(50, color="k", lw=0.8, ls=":")  # a coin: cannot tell them apart
    fig.suptitle(f"Clarity with 95% ranges ({real['n']} samples and test digits each)")
    fig.tight_layout()
    show(fig, path)


def plot_memorisation(models: dict, samples: dict, train_uint8, path: Path):
    """Per model, its samples closest to a training digit for their class (top) above that training digit
    (below), with the pixel distance and its ratio to the class's threshold: a near copy looks the same twice."""
    rows = [(name, m["memorisation"]["closest"]) for name, m in models.items()]
    cols = max(len(closest) for _, closest in rows)
    fig, axes = plt.subplots(2 * len(rows), cols, figsize=(1.2 * cols, 2.5 * len(rows)), squeeze=False)
    for r, (name, closest) in enumerate(rows):
        for c in range(cols):
            for k, ax in enumerate((axes[2 * r, c], axes[2 * r + 1, c])):
                ax.axis("off")
                if c < len(closest):
                    i, j, d, ratio = closest[c]
                    ax.imshow(255 - (samples[name][i] if k == 0 else train_uint8[j].cpu().numpy()), cmap="gray",
                              vmin=0, vmax=255)
                    ax.set_title(f"{title(name)} {d:.2f} ({ratio:.2f}x)" if k == 0 else "nearest train", fontsize=7)
    fig.suptitle("The samples closest to a training digit for their class, and that digit: pixel distance "
                 "(its ratio to the class's near-copy threshold; below 1x a near copy)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # the title just above the first row
    show(fig, path)


def plot_control(controls: dict, path: Path, classes=DATASETS["mnist"]["classes"]):
    """Per-class success rate of one attempt, and the asked-vs-seen confusion matrices."""
    with_matrix = [n for n, c in controls.items() if c["confusion"] is not None]
    fig = plt.figure(figsize=(5.5 + 3.2 * len(with_matrix), 3.6))
    grid = fig.add_gridspec(1, 1 + len(with_matrix), width_ratios=[1.8] + [1] * len(with_matrix))
    ax = fig.add_subplot(grid[0])
    width = 0.8 / len(controls)
    for i, (name, c) in enumerate(controls.items()):
        ax.bar(np.arange(10) + (i - (len(controls) - 1) / 2) * width, c["per_class_hit"], width,
               color=MODELS[name].colour, label=f"{title(name)}: {c['method']}")
    long_names = len(max(classes, key=len)) >= 3  # Fashion-MNIST's: slanted, and the legend moves down
    ax.set_xticks(range(10), classes, rotation=60 if long_names else 0, fontsize=7)
    ax.set_xlabel("chosen class d")
    ax.set_ylabel("p_d: one attempt yields d")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.45 if long_names else -0.18))
    ax.set_title("Controllability per class")
    for k, name in enumerate(with_matrix, start=1):
        cax = fig.add_subplot(grid[k])
        cax.imshow(np.asarray(controls[name]["confusion"]), cmap="Blues", vmin=0, vmax=1)
        cax.set_xticks(range(10))
        cax.set_yticks(range(10))
        cax.set_xlabel("class the evaluator sees", fontsize=8)
        cax.set_ylabel("class asked for", fontsize=8)
        cax.set_title(f"{title(name)} confusion", fontsize=9)
    show(fig, path)


def plot_scores_3d(scores: dict, path: Path):
    """Clarity, stability and controllability on the axes, efficiency as marker size and colour; beside it
    the same points seen from above (clarity against stability), where models of equal control (the
    unconditional ones) no longer hide each other."""
    fig = plt.figure(figsize=(11, 5))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.computed_zorder = False  # draw in zorder: the names above the markers, not hidden behind them
    eff = np.array([s["efficiency"] for s in scores.values()])
    xyz = {n: (s["clarity"], s["stability"], s["control"]) for n, s in scores.items()}
    points = ax.scatter(*np.array(list(xyz.values())).T, s=60 + 440 * eff, c=eff, cmap="viridis", vmin=0, vmax=1,
                        depthshade=False, edgecolors="k")
    for rank, (name, (x, y, z)) in enumerate(sorted(xyz.items(), key=lambda kv: kv[1][0])):
        ax.plot([x] * 2, [y] * 2, [0, z], ":", color="gray", lw=0.8)  # a dotted stem makes the height readable
        ax.text(x + 0.05, y, z + (0.07 if rank % 2 else -0.12), title(name), fontsize=9, zorder=10,
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="none", pad=1))  # neighbours alternate up and down
    ax.scatter([1], [1], [1], marker="*", s=250, color="gold", edgecolors="k", depthshade=False)
    ax.text(1, 1, 1.08, "ideal", fontsize=9, zorder=10)
    ax.set(xlim=(0, 1), ylim=(0, 1), zlim=(0, 1), xlabel="clarity", ylabel="stability", zlabel="controllability")
    ax.set_title("The four axes (scores 0-1, ideal corner starred)", fontsize=10)
    top = fig.add_subplot(1, 2, 2)
    top.scatter(*np.array([v[:2] for v in xyz.values()]).T, s=60 + 440 * eff, c=eff, cmap="viridis", vmin=0, vmax=1,
                edgecolors="k")
    for rank, (name, (x, y, z)) in enumerate(sorted(xyz.items(), key=lambda kv: -kv[1][1])):
        top.annotate(f"{title(name)} (control {z:.2f})", (x, y), xytext=(10, 6 if rank % 2 == 0 else -14),
                     textcoords="offset points", fontsize=8)  # neighbours alternate above and below
    top.scatter([1], [1], marker="*", s=250, color="gold", edgecolors="k")
    top.set(xlim=(0, 1.05), ylim=(0, 1.05), xlabel="clarity", ylabel="stability", title="seen from above")
    top.title.set_fontsize(10)
    fig.colorbar(points, ax=top, shrink=0.8, label="efficiency (also marker size)")
    fig.tight_layout()
    show(fig, path)


def plot_radar(scores: dict, path: Path):
    axes_names = ["clarity", "control", "stability", "efficiency"]
    angles = np.linspace(0, 2 * np.pi, len(axes_names), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(5, 5), subplot_kw={"projection": "polar"})
    for name, s in scores.items():
        values = [s[a] for a in axes_names]
        ax.plot(angles + angles[:1], values + values[:1], "o-", color=MODELS[name].colour, label=title(name))
        ax.fill(angles + angles[:1], values + values[:1], color=MODELS[name].colour, alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(axes_names)
    ax.tick_params(axis="x", pad=14)  # the axes' names clear of the markers at 1
    ax.set_ylim(0, 1)
    ax.set_rlabel_position(45)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1), fontsize=8)
    ax.set_title("Scores per axis (1 = best)")
    fig.text(0.5, 0.01, "control: a model that cannot be asked for a digit is redrawn until it appears, "
             "about 10 draws, so it scores at most 0.1", ha="center", fontsize=7)
    show(fig, path)


def plot_annotated(samples: dict, predictions: dict, path: Path, classes=DATASETS["mnist"]["classes"]):
    """Ten samples per model, each titled with the evaluator's predicted class and its confidence."""
    fig, axes = plt.subplots(len(samples), 10, figsize=(10, 1.25 * len(samples) + 0.3), squeeze=False)
    for row, (name, images) in zip(axes, samples.items()):
        for ax, image, (label, confidence) in zip(row, images[:10], predictions[name]):
            ax.imshow(255 - image, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{classes[label]} ({confidence:.2f})", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(title(name), fontsize=9)
    fig.suptitle("What the evaluator sees: predicted class (confidence)", y=1.0)
    show(fig, path)


def plot_latent_3d(pca: dict, model_title: str, path: Path):
    """Codes of test digits on their first three principal components, coloured by digit."""
    fig = plt.figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot(projection="3d")
    points = ax.scatter(*pca["coords"].T, c=pca["labels"], cmap="tab10", s=4, alpha=0.7, vmin=-0.5, vmax=9.5)
    for k, label in enumerate("xyz"):
        getattr(ax, f"set_{label}label")(f"PC{k + 1} ({100 * pca['explained'][k]:.0f}% of variance)")
    fig.colorbar(points, ax=ax, ticks=range(10), shrink=0.6, pad=0.12, label="digit")
    ax.set_title(f"{model_title} latent space: {len(pca['coords'])} test digits' codes, 3 principal components")
    show(fig, path)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """The point a fraction w along the great circle from noise a to noise b. A Gaussian noise of d numbers
    has a norm close to sqrt(d); the straight line between two passes through shorter noise than any the
    model was given, the arc does not."""
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - w) * omega) * a + math.sin(w * omega) * b) / math.sin(omega)


def noise_path(model, steps: int, gen: torch.Generator, label: int | None = None) -> np.ndarray:
    """`steps` images from noises on a path between two of the model's own noises (an arc between Gaussian
    ones, a straight line between codes from the VAE's mixture). A diffusion model samples with DDIM, eta 0,
    so that each image depends on its starting noise alone."""
    a, b = model.noise(2, gen)
    path = torch.stack([slerp(a, b, w) if model.gaussian_noise else (1 - w) * a + w * b
                        for w in np.linspace(0, 1, steps)])
    labels = None if label is None else torch.full((steps,), label, dtype=torch.long)
    sampler = Sampler("ddim", model.cfg.ddim_steps, eta=0.0) if model.uses_sampler else None
    return draw(model, steps, gen, sampler, labels, noise=path)


def plot_noise_paths(paths: dict, notes: dict, path: Path):
    """A row per model: the images along a path between two of its noises. A smooth row: nearby noises give
    nearby digits; a jump: the model cuts its noise space into regions."""
    fig, axes = plt.subplots(len(paths), 1, figsize=(10, 1.5 * len(paths) + 0.4))
    for ax, (name, images) in zip(np.atleast_1d(axes), paths.items()):
        image_grid(ax, images, 1, len(images), f"{title(name)}  ({notes[name]})")
    fig.suptitle("From one noise to another", y=1.0)
    show(fig, path)


def measured_samples(ctx: Run) -> dict:
    return {n: ctx.models[n].samples for n in ctx.results["models"]}


def figures_of_clarity(ctx: Run):
    models = ctx.results["models"]
    plot_comparison(measured_samples(ctx), {n: m["sampler"] for n, m in models.items()}, ctx.out / "comparison.png")
    plot_clarity_ranges(models, ctx.results["real_test"], ctx.out / "clarity_ranges.png")
    plot_pixel_values(measured_samples(ctx), held_out(ctx, ctx.cfg.n_samples), ctx.out / "pixel_values.png")


def figures_of_training(ctx: Run):
    histories = {n: ctx.models[n].history.as_dict() for n in ctx.results["models"]}
    plot_epoch_fid(ctx.results["models"], ctx.out / "epoch_fid.png")
    plot_fid_per_second(ctx.results["models"], histories, ctx.out / "fid_per_second.png")
    plot_losses(histories, ctx.out / "loss_curves.png")


def figures_of_copies_and_control(ctx: Run):
    models, classes = ctx.results["models"], DATASETS[ctx.cfg.dataset]["classes"]
    plot_memorisation(models, measured_samples(ctx), ctx.train[0], ctx.out / "memorisation.png")
    plot_control({n: m["control"] for n, m in models.items()}, ctx.out / "controllability.png", classes)
    plot_annotated(measured_samples(ctx), {n: m["first_predictions"] for n, m in models.items()},
                   ctx.out / "annotated_samples.png", classes)


def figures_of_scores(ctx: Run):
    plot_scores_3d(ctx.results["scores"], ctx.out / "scores_3d.png")
    plot_radar(ctx.results["scores"], ctx.out / "scores_radar.png")
    for name in ctx.results["models"]:
        if f"{name}_latent" in ctx.arrays:
            plot_latent_3d(ctx.arrays[f"{name}_latent"], title(name), ctx.out / f"{name}_latent_3d.png")


def figures_of_noise_paths(ctx: Run):
    measured, classes = {n: ctx.models[n] for n in ctx.results["models"]}, DATASETS[ctx.cfg.dataset]["classes"]
    gen, asked = torch.Generator(ctx.device).manual_seed(ctx.cfg.seed + 12), 7 % len(classes)
    plot_noise_paths({n: noise_path(t.model, 10, gen, asked if t.spec.conditional else None) for n, t in measured.items()},
                     {n: ("straight line between two codes" if not t.model.gaussian_noise else "arc between two noises")
                      + (f", asking for {classes[asked]}" if t.spec.conditional else "")
                      + (", DDIM eta 0" if t.model.uses_sampler else "") for n, t in measured.items()},
                     ctx.out / "noise_paths.png")


FIGURE_GROUPS = (figures_of_clarity, figures_of_training, figures_of_copies_and_control, figures_of_scores,
                 figures_of_noise_paths)  # each shown by its own cell below; the appendix's comparison draws all


def figures_section(ctx):
    """Every comparison figure (the appendix's comparison draws them again with its models)."""
    if ctx.results["models"]:
        for group in FIGURE_GROUPS:
            group(ctx)


def figure_cell(group, ctx):
    if ctx.results["models"]:
        group(ctx)


# %% [markdown]
# **Clarity.** Ten samples of each model side by side; the clarity measures with their 95% ranges; and the
# pixel values of each model's samples against real digits' on a log scale. Real backgrounds are exactly
# 0, so a haze shows as mass at the faint grey levels 1-10 (shaded), which a grid of digits hides.

# %%
@stage
def figures_clarity(ctx):
    figure_cell(figures_of_clarity, ctx)


# %% [markdown]
# **How they learned.** The classifier-FID after every epoch, against the epoch and against the training
# seconds spent so far (**quality per second of compute**, the fair view of models trained for different
# times: a curve further left reached its quality sooner), each beside the floor at its own sample size
# (a classifier-FID of 1,000 samples sits higher than one of 10,000 even for real digits), and every
# model's loss curves.

# %%
@stage
def figures_training(ctx):
    figure_cell(figures_of_training, ctx)


# %% [markdown]
# **Copies and control.** The samples closest to a training digit of their class, above that digit (a
# near copy looks the same twice); the share of attempts that yield each chosen digit, with the confusion
# matrices of the models that can be asked; and what the evaluator reads in each model's first samples.

# %%
@stage
def figures_copies_and_control(ctx):
    figure_cell(figures_of_copies_and_control, ctx)


# %% [markdown]
# **The four scores** as a 3D plot (with the same points seen from above, where models of equal control
# no longer hide each other) and a radar chart, and the VAE's latent space on three principal components.

# %%
@stage
def figures_scores(ctx):
    figure_cell(figures_of_scores, ctx)


# %% [markdown]
# **From one noise to another** (`noise_paths.png`): each model's images along a path between two of its
# noises (an arc between two Gaussian noises, the DDPM with DDIM eta 0 so each image depends on its noise
# alone). A smooth row: nearby noises give nearby digits. A row that passes through shapes that are no
# digit: the model fills the space between its clusters with hybrids.

# %%
@stage
def figures_noise_paths(ctx):
    figure_cell(figures_of_noise_paths, ctx)


# %% [markdown]
# <a id="report"></a>
# ## 12. The written report
#
# `results.json` holds everything (with the config and the environment), `metrics.csv` and
# `metrics.json` the table and the scores, and `REPORT.md` the written analysis, generated from these
# numbers so that it cannot disagree with them.

# %% jupyter={"source_hidden": true}
# @title The results files and the written report { display-mode: "form" }
def write_metrics(results: dict, table: pd.DataFrame, out: Path):
    """metrics.csv (the table) and metrics.json (the table, the formulas and the run's environment)."""
    write_text(out / "metrics.csv", table.to_csv(index_label="model"))
    cfg = results["config"]
    write_json(out / "metrics.json", {
        "environment": {**results["environment"], "profile": cfg["profile"], "seed": cfg["seed"],
                        "n_samples": cfg["n_samples"], "seeds": cfg["seeds"]},
        "evaluator_test_accuracy": results["evaluator"]["test_accuracy"],
        "failed": results["failed"], "score_formulas": SCORE_FORMULAS, "scores": results["scores"],
        "clarity_fid_spearman": results.get("clarity_fid_spearman"),
        "clarity_detector_spearman": results.get("clarity_detector_spearman"),
        "titles": {n: title(n) for n in results["models"]},
        "table": json.loads(table.to_json(orient="index")),
        "control": {n: m["control"] for n, m in results["models"].items()},
        "epoch_fid": {n: {"values": m["epoch_fid"], "note": m["epoch_fid_note"]} for n, m in results["models"].items()},
        "config": cfg})


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "never"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 10:  # a count that a table stored as float
        v = int(v)
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and abs(v) >= 1000):
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(1, digits - 1)}f}"


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| | " + " | ".join(df.columns) + " |", "|---" * (len(df.columns) + 1) + "|"]
    for index, row in df.iterrows():
        lines.append(f"| {index} | " + " | ".join(fmt(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def noun(results: dict) -> str:
    """What the report calls one image of the data set: a digit (MNIST) or an item (Fashion-MNIST)."""
    return "digit" if results["config"]["dataset"] == "mnist" else "item"


def fid_range(m: dict) -> list:
    return m["fid_range"]


def detector_range(m: dict) -> list:
    return m["two_sample"]["range"]


def apart(a: dict, b: dict, low_high) -> bool:
    """a lies below b beyond their 95% ranges (low_high: fid_range or detector_range)."""
    return low_high(a)[1] < low_high(b)[0]


def overlapping(m: dict, order: list, low_high) -> list:
    """The neighbours in `order` whose 95% ranges overlap: pairs the measure cannot tell apart."""
    return [(a, b) for a, b in zip(order, order[1:])
            if not apart(m[a], m[b], low_high) and not apart(m[b], m[a], low_high)]


def within_noise(m: dict, order: list, low_high, measure: str) -> str:
    pairs = overlapping(m, order, low_high)
    if not pairs:
        return f" Every neighbour in that order is apart beyond the 95% ranges of {measure}."
    return (f" Within noise by {measure} (their 95% ranges overlap): "
            + ", ".join(f"{title(a)} and {title(b)}" for a, b in pairs) + ".")


def disagreement(m: dict, by_fid: list) -> str:
    """The pairs that FID and the detector both tell apart, but in opposite orders."""
    pairs = [(a, b) for i, a in enumerate(by_fid) for b in by_fid[i + 1:]
             if apart(m[a], m[b], fid_range) and apart(m[b], m[a], detector_range)]
    if not pairs:
        return " Where both measures tell two models apart, they order them alike."
    return (" FID and the detector order these pairs oppositely, each beyond its ranges: "
            + ", ".join(f"{title(a)} better than {title(b)} by FID, worse by the detector" for a, b in pairs)
            + ". The detector sees every pixel (backgrounds, stray dots, stroke texture); the FID sees only "
              "the evaluator's class features.")


def faint_text(m: dict, real: dict, thing: str) -> str:
    """What the detector says once the faint pixels (1 to FAINT grey levels) are 0 in both sets."""
    hazy = max(m, key=lambda n: m[n]["faint_share"])
    return (f" Faint pixels (1 to {FAINT} grey levels of 255: too dark to see one by one, a grey haze on a "
            "black background where there are many) are "
            f"{100 * real['faint_share']:.1f}% of real {thing}s' pixels and "
            + ", ".join(f"{title(n)} {100 * m[n]['faint_share']:.1f}%" for n in sorted(m, key=lambda n: m[n]["faint_share"]))
            + f" of the samples'. With them set to 0 in both sets the detector is right on "
            + ", ".join(f"{title(n)} {100 * m[n]['two_sample_without_faint']['accuracy']:.1f}% "
                        f"({span(m[n]['two_sample_without_faint']['range'], 1, 100)})" for n in m)
            + f" (real {100 * real['two_sample_without_faint']['accuracy']:.1f}%); {title(hazy)} has the most haze.")


def below_floor_text(m: dict, real: dict) -> str:
    """Whether a model scores below the floor by FID, and if so whether the detector agrees it is real."""
    below = [n for n in m if m[n]["fid"] < real["fid_floor"]]
    if not below:
        return " No model scores below the floor by FID."
    return " Below the floor by FID: " + ", ".join(
        f"{title(n)}, which the detector " + ("cannot tell from real (its range holds 50%)"
                                            if detector_range(m[n])[0] <= 0.5 <= detector_range(m[n])[1]
                                            else "still tells from real: the FID's features miss what it sees")
        for n in below) + "."


def prior_sampler_text(m: dict) -> str:
    """For each model measured with its prior too (the VAE): both samplers' FID, and which one was better."""
    text = ""
    for n, entry in m.items():
        if "prior_sampler" not in entry:
            continue
        prior = entry["prior_sampler"]
        better = "better" if entry["fid"] < prior["fid"] else "no better"
        beyond = apart(entry, prior, fid_range) or apart(prior, entry, fid_range)
        text += (f" {title(n)}'s exported samples ({entry['sampler']}) score FID {entry['fid']:.1f} "
                 f"({span(entry['fid_range'])}); from the prior N(0, I) the same decoder scores {prior['fid']:.1f} "
                 f"({span(prior['fid_range'])}), precision {prior['precision']:.2f} against {entry['precision']:.2f}: "
                 f"the fitted mixture is {better}" + (" beyond the ranges." if beyond else ", within noise."))
    return text


def clarity_text(results: dict) -> str:
    m, real, thing = results["models"], results["real_test"], noun(results)
    by_fid = sorted(m, key=lambda n: m[n]["fid"])
    text = ("Classifier-FID (lower is better; 95% range in brackets) ranks "
            + ", ".join(f"{title(n)} {m[n]['fid']:.1f} ({span(m[n]['fid_range'])})" for n in by_fid)
            + f"; held-out training {thing}s against the test {thing}s score {real['fid_floor']:.1f} "
              f"({span(real['fid_floor_range'])}), the floor.")
    text += within_noise(m, by_fid, fid_range, "FID")
    by_detector = sorted(m, key=lambda n: m[n]["two_sample"]["accuracy"])
    text += (f" A detector trained afresh to tell each model's {thing}s from real test {thing}s is right on this "
             "share of its test images (50% = it cannot tell them apart): "
             + ", ".join(f"{title(n)} {100 * m[n]['two_sample']['accuracy']:.1f}% "
                         f"({span(m[n]['two_sample']['range'], 1, 100)})" for n in by_detector)
             + f"; on held-out real {thing}s {100 * real['two_sample']['accuracy']:.1f}% "
               f"({span(real['two_sample']['range'], 1, 100)}).")
    text += within_noise(m, by_detector, detector_range, "the detector")
    text += disagreement(m, by_fid)
    text += faint_text(m, real, thing) + below_floor_text(m, real) + prior_sampler_text(m)
    by_precision = sorted(m, key=lambda n: -m[n]["precision"])
    best, worst = m[by_precision[0]], m[by_precision[-1]]
    text += (f" Precision is highest for {title(by_precision[0])} ({best['precision']:.2f}, "
             f"{span(best['precision_range'], 2)}) and lowest for {title(by_precision[-1])} "
             f"({worst['precision']:.2f}, {span(worst['precision_range'], 2)}); real {thing}s score "
             f"{real['precision']:.2f} ({span(real['precision_range'], 2)}). ")
    gaps = {n: abs(m[n]["sharpness"] - real["sharpness"]) for n in m}
    sharpest = max(m, key=lambda n: m[n]["sharpness"])
    blurriest = min(m, key=lambda n: m[n]["sharpness"])
    text += (f"After a median filter that removes scattered dots, {title(sharpest)} has the sharpest strokes "
             f"({m[sharpest]['sharpness']:.3f}), {title(blurriest)} the blurriest ({m[blurriest]['sharpness']:.3f}), "
             f"against {real['sharpness']:.3f} on real {thing}s; closest to real is {title(min(gaps, key=gaps.get))}. ")
    by_is = sorted(m, key=lambda n: -m[n]["inception_score"])
    text += (f"Classifier Inception Score (1 to 10, real {thing}s " + f"{real['inception_score']:.2f}): "
             + ", ".join(f"{title(n)} {m[n]['inception_score']:.2f}" for n in by_is) + ".")
    by_score = sorted(m, key=lambda n: -results["scores"][n]["clarity"])
    rho, rho_detector = results.get("clarity_fid_spearman"), results.get("clarity_detector_spearman")
    text += (" The clarity score (FID on a log scale between the floor and "
             f"{CLARITY_WORST}x the floor, the Inception Score and the detector's accuracy) ranks "
             + ", ".join(f"{title(n)} {results['scores'][n]['clarity']:.3f}" for n in by_score)
             + (f"; Spearman's rho with the FID order {rho:.2f}" if rho is not None else "")
             + (f", with the detector's {rho_detector:.2f}" if rho_detector is not None else "") + "."
             + (" Precision and sharpness stay out of it: precision rewards typical-looking "
                f"{thing}s even when blurred, and sharpness says nothing of their shapes."))
    if by_is[0] != by_fid[0]:
        text += (f" FID and Inception Score disagree on the best model ({title(by_fid[0])} vs "
                 f"{title(by_is[0])}): IS rewards confident, balanced classes, FID the whole feature distribution.")
    return text


def control_text(results: dict) -> str:
    m, thing = results["models"], noun(results)
    classes = DATASETS[results["config"]["dataset"]]["classes"]
    parts = []
    for n in sorted(m, key=lambda n: -m[n]["control"]["score"]):
        c = m[n]["control"]
        hits = np.asarray(c["per_class_hit"])
        hardest = (f"its hardest {thing} is {classes[int(hits.argmin())]} ({100 * hits.min():.1f}%)" if c["can_be_asked"]
                   else f"its rarest {thing} is {classes[int(hits.argmin())]} ({100 * hits.min():.1f}% of its samples), "
                        f"its commonest {classes[int(hits.argmax())]} ({100 * hits.max():.1f}%)")
        parts.append(f"{title(n)} {control_phrase(c, thing)}, score {c['score']:.3f}; {hardest}")
    redrawn = [title(n) for n in m if not m[n]["control"]["can_be_asked"]]
    return "; ".join(parts) + "." + (
        f" {', '.join(redrawn)} cannot be asked for a {thing} at all: a user redraws until it appears, so the "
        f"attempts follow from its class shares alone (10 when all ten are equally common, more when one is "
        f"rare), and a score above 0.1 is impossible for them." if redrawn else "")


def efficiency_text(results: dict) -> str:
    m = results["models"]
    fastest = min(m, key=lambda n: m[n]["train_seconds"])
    slowest = max(m, key=lambda n: m[n]["train_seconds"])
    quick = min(m, key=lambda n: m[n]["seconds_per_image_batch1"])
    slow = max(m, key=lambda n: m[n]["seconds_per_image_batch1"])
    text = ("Training: " + ", ".join(f"{title(n)} {m[n]['train_seconds']:.0f} s ({m[n]['epochs']} epochs, "
                                     f"{m[n]['train_images_per_second']:.0f} images/s)" for n in m) + ". ")
    text += (f"{title(slowest)} costs {m[slowest]['train_seconds'] / m[fastest]['train_seconds']:.1f}x the "
             f"training time of {title(fastest)}. One image at batch 1 takes "
             + ", ".join(f"{title(n)} {1000 * m[n]['seconds_per_image_batch1']:.2f} ms" for n in m)
             + f": {title(slow)} ({m[slow]['sampler']}) is "
             f"{m[slow]['seconds_per_image_batch1'] / m[quick]['seconds_per_image_batch1']:.0f}x slower than "
             f"{title(quick)}. Parameters: " + ", ".join(f"{title(n)} {m[n]['parameters']:,}" for n in m) + ". ")
    if all(m[n]["peak_memory_mb"] for n in m):
        def parts(n):
            split = m[n].get("memory_parts")
            return f" ({', '.join(f'{k} {v:.1f}' for k, v in split.items())})" if split else ""
        text += (f"Memory to train, per model ({m[fastest]['peak_memory_kind']}): "
                 + ", ".join(f"{title(n)} {m[n]['peak_memory_mb']:.1f} MB{parts(n)}" for n in m) + ".")
    else:
        text += "Memory: not measured for every model (see the end of the report), left out of the score."
    return text


def collapsed_models(models: dict) -> list:
    """Signs of mode collapse: class coverage below 0.9 or a class under 2% of the samples."""
    return [n for n in models if models[n]["coverage"] < 0.9 or models[n]["smallest_class_share"] < 0.02]


CONCLUSIONS = {  # what the report concludes, each read off a run's results (the profile comparison lists them)
    "lowest classifier-FID": lambda r: min(r["models"], key=lambda n: r["models"][n]["fid"]),
    "hardest for the detector to tell from real": lambda r: min(
        r["models"], key=lambda n: r["models"][n]["two_sample"]["accuracy"]),
    "sharpest strokes (after the median filter)": lambda r: max(r["models"], key=lambda n: r["models"][n]["sharpness"]),
    "highest clarity score": lambda r: max(r["scores"], key=lambda n: r["scores"][n]["clarity"]),
    "most stable (stability score)": lambda r: max(r["scores"], key=lambda n: r["scores"][n]["stability"]),
    "signs of mode collapse": lambda r: collapsed_models(r["models"]),
    "the order by classifier-FID": lambda r: sorted(r["models"], key=lambda n: r["models"][n]["fid"]),
}


def profile_comparison_markdown(results: dict) -> list:
    """With compare_run: each conclusion of this run beside the other run's, and whether it changed."""
    other_dir = results["config"].get("compare_run")
    if not other_dir:
        return []
    other = json.loads((Path(other_dir) / "results.json").read_text())
    common = [n for n in results["models"] if n in other["models"]]
    mine, theirs = (dict(r, models={n: r["models"][n] for n in common}, scores={n: r["scores"][n] for n in common})
                    for r in (results, other))

    def said(value):
        names = [title(n) for n in (value if isinstance(value, list) else [value])]
        return (" < " if isinstance(value, list) and len(value) == len(common) else ", ").join(names) or "none"
    rows = {}
    for conclusion, read in CONCLUSIONS.items():
        a, b = read(mine), read(theirs)
        rows[conclusion] = {f"this run ({results['config']['profile']})": said(a),
                            f"{other_dir} ({other['config']['profile']})": said(b),
                            "changed": "yes" if a != b else "no"}
    epochs = lambda r: ", ".join(f"{title(n)} {r['models'][n]['epochs']}" for n in common)
    return ["## What changes against another run", "",
            f"This run's conclusions beside those of `{other_dir}` (profile `{other['config']['profile']}`, code "
            f"{other['environment'].get('code_commit', 'unknown')}), for the models both trained. Epochs here: "
            f"{epochs(results)}; there: {epochs(other)}. {run_differences(results, other)} Each conclusion is "
            "read off the numbers above, without their ranges: where two models lie within noise (see the "
            "analysis), the order between them is not a finding in either run.", "",
            markdown_table(pd.DataFrame.from_dict(rows, orient="index")), ""]


PLACES = {"data_root", "out", "drive", "resume", "pretrained", "compare_run", "progress", "epochs", "models"}  # no cause
ENVIRONMENT_CAUSES = ("device", "autocast", "cpu_amx", "threads", "torch")


def run_differences(results: dict, other: dict) -> str:
    """What differs between two runs and may explain a changed conclusion: the settings both runs know
    (a setting newer than the other run counts as what its code did before it), the settings the other run's
    code did not have, and the machine's precision and device."""
    here, there = (json.loads(json.dumps(r["config"])) for r in (results, other))  # both as JSON reads them
    there = {**BEFORE, **there}
    changed = [f"{k} {there[k]} there, {here[k]} here" for k in here
               if k in there and k not in PLACES and here[k] != there[k]]
    new = [f"{k} {here[k]}" for k in here if k not in there and k not in PLACES]
    env = [f"{k} {other['environment'].get(k)} there, {results['environment'].get(k)} here"
           for k in ENVIRONMENT_CAUSES if other["environment"].get(k) != results["environment"].get(k)]
    return " ".join(filter(None, [
        f"Settings that differ: {'; '.join(changed)}." if changed else "No shared setting differs.",
        f"Settings the other run's code did not have: {'; '.join(new)}." if new else "",
        f"The machine differs: {'; '.join(env)}." if env else "The same device and precision."]))


def stability_text(results: dict) -> str:
    m, real, thing = results["models"], results["real_test"], noun(results)
    collapsed = collapsed_models(m)
    text = ("Class coverage " + ", ".join(f"{title(n)} {m[n]['coverage']:.3f}" for n in m)
            + f" (real {real['coverage']:.3f}); recall " + ", ".join(f"{title(n)} {m[n]['recall']:.2f}" for n in m)
            + f" (real {real['recall']:.2f}). ")
    text += (f"Signs of mode collapse in {', '.join(title(n) for n in collapsed)}: coverage below 0.9 or a {thing} "
             "under 2% of the samples (" + ", ".join(f"{title(n)} smallest class {100 * m[n]['smallest_class_share']:.1f}%"
                                                      for n in collapsed) + "). "
             if collapsed else f"No model shows mode collapse (every {thing} at least 2% of samples, coverage at least "
                               "0.9). ")
    for n in m:
        curve = m[n]["epoch_fid"]
        if not curve:
            text += f"{title(n)}: no per-epoch samples were kept (its checkpoint predates them). "
            continue
        best = int(np.argmin(curve))
        rises = sum(1 for a, b in zip(curve, curve[1:]) if b > a)
        drift = m[n].get("epoch_drift")
        moved = (f"; its last epoch moved its samples (same noise) by an FID of {drift['fid']:.1f}, against "
                 f"{drift['real_gap']:.1f} between two real sets of {drift['n']} (stability term "
                 f"{drift_term(drift):.2f})" if drift else "")
        text += (f"{title(n)}: FID per epoch {curve[0]:.1f} -> {curve[-1]:.1f}, best at epoch {best + 1} of "
                 f"{len(curve)}, {rises} rise(s) between epochs{moved}. ")
    text += "Last-epoch mean losses: " + "; ".join(
        f"{title(n)} " + ", ".join(f"{k} {m[n]['final_epoch_loss'][k]:.2f}" for k in MODELS[n].curves) for n in m) + ". "
    for n in m:
        for key, meaning in MODELS[n].trends.items():
            text += (f"{title(n)} {meaning} per epoch: " + " -> ".join(f"{v:.2f}" for v in m[n]["epoch_loss"][key])
                     + ". ")
    spread = results.get("seed_spread")
    if spread:
        def mean_sd(s):
            fid = s["summary"]["fid"]
            sd = f" ± {fid['std']:.1f}" if fid["std"] is not None else " (one seed)"
            return f"{fid['mean']:.1f}{sd} over seeds {', '.join(map(str, s['seeds']))}"
        text += "Classifier-FID, mean ± sd: " + ", ".join(f"{title(n)} {mean_sd(s)}" for n, s in spread.items()) + "."
    return text.strip()


def memorisation_text(results: dict) -> str:
    m, real, thing = results["models"], results["real_test"]["memorisation"], noun(results)
    by_share = sorted(m, key=lambda n: m[n]["memorisation"]["near_copy_share"])
    classes, known = DATASETS[results["config"]["dataset"]]["classes"], \
        [(t, c) for c, t in enumerate(real["thresholds"]) if np.isfinite(t)]
    (low, c_low), (high, c_high) = min(known), max(known)
    return (f"The nearest training {thing} of every sample, in pixels: a near copy is closer to the training set "
            f"than {100 * (1 - COPY_QUANTILE):.0f}% of real test {thing}s of its class (the evaluator's) are, so a "
            f"model that does not copy has about {100 * COPY_QUANTILE:.0f}% of them. The thresholds run from "
            f"{low:.2f} ({classes[c_low]}) to {high:.2f} ({classes[c_high]}): a thin {thing} has few ink pixels and "
            f"lies close to its neighbours, so one threshold for all would flag only the thinnest class. "
            "Near copies: " + ", ".join(
                f"{title(n)} {100 * m[n]['memorisation']['near_copy_share']:.1f}% "
                f"({span(m[n]['memorisation']['near_copy_range'], 1, 100)})" for n in by_share)
            + ". Median distance to the nearest training " + thing + ": " + ", ".join(
                f"{title(n)} {m[n]['memorisation']['median_distance']:.2f}" for n in by_share)
            + f"; real test {thing}s {real['median_distance']:.2f}.")


ANALYSIS = (("Clarity", clarity_text), ("Controllability", control_text), ("Efficiency", efficiency_text),
            ("Stability", stability_text), ("Memorisation", memorisation_text))
# the appendix's studies (Part C): their key in the results, and the function that writes their report section
STUDY_SECTIONS = {"guidance_study": "guidance_markdown", "sampler_study": "sampler_study_markdown",
                  "sweeps": "sweeps_markdown", "seed_spread": "seed_spread_markdown",
                  "ddpm_design_study": "design_study_markdown", "reference_ddpm": "slower_design_markdown"}


def study_markdown(heading: str, intro: str, table: pd.DataFrame, figure: str) -> list:
    """A study's section of the report: its heading, what was done, its table and its figure."""
    return [f"## {heading}", "", intro, "", markdown_table(table), "", f"![{heading}]({figure})", ""]


def report_figures(results: dict) -> list:
    """(file, caption) of every figure the report shows, in order; a figure the run did not draw is skipped."""
    figures = [("data_digits.png", "Real training digits, one row per class")]
    for n in results["models"]:
        figures += [(f"{n}_losses.png", f"{title(n)}: training losses"
                     + (f" and {MODELS[n].parts_title}" if MODELS[n].parts else "")),
                    (f"{n}_epochs.png", f"{title(n)}: the same noise's samples after every epoch"),
                    (f"{n}_epochs.gif", f"{title(n)}: the same, animated (one frame per epoch)")]
    figures += [("vae_latent_walk.png", "VAE: a walk through its latent space along two principal directions"),
                ("vae_latent_2d.png", "VAE: test digits' codes on two principal components, by digit"),
                ("gan_d_outputs.png", "GAN: the trained D's output on test digits and on G's samples"),
                ("cgan_d_outputs.png", "cGAN: the trained D's output on test digits and on G's samples"),
                ("cgan_style.png", "cGAN: the noise z fixed along each row, the label y across"),
                ("cddpm_style.png", "cDDPM: the starting noise x_T fixed along each row, the label y across"),
                ("ddpm_forward.png", "DDPM: the forward process on test digits"),
                ("ddpm_schedule.png", "DDPM: the noise schedule and the loss weight"),
                ("ddpm_reverse.png", "DDPM: the reverse process of the export sampler"),
                ("ddpm_noise_error.png", "DDPM: its noise-prediction error per timestep, and what the predicted x_0 "
                                         "leaves on the background"),
                ("vae_samplers.png", "VAE: codes from the prior, from training digits and from the fitted mixture")]
    figures += [("comparison.png", "Ten samples from each model"),
                ("noise_paths.png", "From one noise to another: each model's images along a path between two noises")]
    figures += [(MODELS[n].figure(n), f"{title(n)}: " + ("each row asks for one class" if MODELS[n].conditional
                                                          else "ten random samples")) for n in results["models"]]
    figures += [("clarity_ranges.png", "Classifier-FID, the two-sample detector's accuracy, precision and recall, "
                                       "with 95% ranges"),
                ("pixel_values.png", "The share of pixels at each grey level, each model against real digits"),
                ("memorisation.png", "Each model's samples closest to a training digit, above that digit"),
                ("scores_3d.png", "Clarity, stability and controllability; efficiency as colour and size"),
                ("scores_radar.png", "The four scores"), ("epoch_fid.png", "Classifier-FID after every epoch"),
                ("fid_per_second.png", "Quality per second of compute: classifier-FID against training seconds"),
                ("controllability.png", "Per-digit success of one attempt; confusion matrices"),
                ("loss_curves.png", "Training losses"),
                ("annotated_samples.png", "Samples with the evaluator's predicted digit and confidence")]
    for n in results["models"]:
        figures += [(f"{n}_latent_3d.png", f"{title(n)} latent space (3 principal components)"),
                    (f"{n}_reconstructions.png", f"{title(n)} reconstructions and latent interpolations"),
                    (f"{n}_samples_ancestral.png", f"{title(n)} with the {results['config']['ddpm_T']}-step ancestral sampler")]
    figures += [("play_cgan.png", "Play: one digit from the cGAN"), ("play_ddpm.png", "Play: the DDPM with fewer steps"),
                ("play_vae.png", "Play: a VAE morph between two digits")]
    return figures


def timing_markdown(results: dict) -> list:
    """Where the run's time went: per model its parts, then every cell (stage) of the notebook so far."""
    parts = pd.DataFrame.from_dict({title(n): {
        "training s": m["train_seconds"], "per-epoch samples s": m.get("probe_seconds"),
        "export s": m["sample_seconds"], "measuring s": m.get("measure_seconds")}
        for n, m in results["models"].items()}, orient="index")
    cells = pd.DataFrame.from_dict({name: {"wall s": s} for name, s in results.get("stage_seconds", {}).items()
                                    if s >= 0.05}, orient="index")
    est = results.get("time_estimate")
    estimate = ([f"Estimated before any model trained: {minutes(est['total'])} ({estimate_parts(est)}); the whole "
                 f"run took {minutes(results['total_seconds'])}.", ""] if est else [])
    return ["## Where the time went", "", *estimate,
            f"Per model (training without the per-epoch samples; the export of {results['config']['n_samples']} "
            "samples; the measurements of Part B):", "", markdown_table(parts), "",
            "Per cell of the notebook that did work, in order (a model's section holds its time estimate, "
            "training, export and figures; the last cells' times are added when the run ends):", "",
            markdown_table(cells), ""]


def epochs_caveat(results: dict) -> list:
    """When the models trained for different numbers of epochs, the report says that a gap between two of them
    mixes the models with their training time (the GAN and the cGAN first, where both ran)."""
    epochs = {n: m["epochs"] for n, m in results["models"].items()}
    if len(epochs) > 1 and len(set(epochs.values())) == 1:
        e = next(iter(epochs.values()))
        return [f"**Equal training.** Every model trained for {e} epoch{'s' * (e != 1)}, so a gap between "
                "two of them is the models' own, not their training time's. In the `cpu` profile they train for "
                "different numbers of epochs (" + ", ".join(f"{title(n)} {MODELS[n].epochs['cpu']}" for n in epochs)
                + "), and there a gap mixes the model with its training time.", ""]
    if len(set(epochs.values())) < 2:
        return []
    pair = ("gan", "cgan") if {"gan", "cgan"} <= set(epochs) and epochs["gan"] != epochs["cgan"] else None
    example = (f" The {title('gan')}-to-{title('cgan')} gap, for one, mixes conditioning with {epochs['gan']} "
               f"against {epochs['cgan']} epochs of training." if pair else "")
    return [f"**Unequal training.** The models trained for different numbers of epochs (" + ", ".join(
        f"{title(n)} {e}" for n, e in epochs.items()) + "), so a gap between two of them mixes the model with its "
        f"training time.{example} The `full` profile trains every default model for "
        + "/".join(sorted({str(MODELS[n].epochs["full"]) for n in epochs if MODELS[n].default}))
        + " epochs: compare models there, or in the quality-per-second figure, which puts every model's epochs on "
        "one time axis.", ""]


def report_markdown(results: dict, table: pd.DataFrame, out: Path) -> str:
    cfg, env = results["config"], results["environment"]
    scores = pd.DataFrame(results["scores"]).T.rename(index=title)
    lines = [
        f"# {', '.join(title(n) for n in results['models'])} on {DATASETS[cfg['dataset']]['title']}: "
        "measured comparison", "",
        f"Generated by `mnist_generative_models_complete.py` from the numbers of this run: profile "
        f"`{cfg['profile']}`, seed {cfg['seed']}, {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else "")
        + f", torch {env['torch']}, {env['threads']} threads, {cfg['n_samples']} samples per model against as "
        f"many {DATASETS[cfg['dataset']]['title']} test images, total {results['total_seconds'] / 60:.1f} min"
        + (" (with --pretrained: loaded from an earlier run's checkpoints, nothing trained; training times and "
           "per-epoch FIDs are that run's)" if cfg["pretrained"] else "")
        + (" (with --resume: each model continued from its checkpoint, and a finished one was only loaded; "
           "training times and per-epoch FIDs include the epochs of the run that wrote it)" if cfg["resume"] else "")
        + ". Epochs: " + ", ".join(f"{title(n)} {m['epochs']}" for n, m in results["models"].items())
        + f". Code commit: {env.get('code_commit', 'unknown')}.", "", *epochs_caveat(results),
        f"The evaluator behind every metric is a CNN trained in the run: test accuracy "
        f"{100 * results['evaluator']['test_accuracy']:.2f}%. Classifier-FID uses its features, so it is "
        "not comparable with published (Inception) FIDs.", "",
        "## Scores (0 = worst, 1 = best)", "", markdown_table(scores), "",
        *[f"* **{axis}**: {formula}" for axis, formula in SCORE_FORMULAS.items()], "",
        "## Measured numbers", "", "Raw numbers, one column per model (names as in `metrics.csv`).", "",
        markdown_table(table.T.rename(columns=title)), "",
        "## Analysis", ""]
    for axis, text in ANALYSIS:
        lines += [f"**{axis}.** " + text(results), ""]
    for key, section in STUDY_SECTIONS.items():
        if results.get(key):
            lines += globals()[section](results)
    lines += profile_comparison_markdown(results)
    lines += timing_markdown(results)
    lines += ["## Figures", ""]
    for name, caption in report_figures(results):
        if (out / name).is_file():
            lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    missing = [f"{title(n)}: memory to train (loaded from a checkpoint that does not hold it)"
               for n, m in results["models"].items() if m["peak_memory_mb"] is None]
    missing += [f"{title(n)}: per-epoch FID (its checkpoint predates the per-epoch samples)"
                for n, m in results["models"].items() if not m["epoch_fid"]]
    missing += [f"{title(n)}: every metric; training stopped: {why}" for n, why in results["failed"].items()]
    if missing:
        lines += ["## Not measured", "", *[f"* {x}" for x in missing], ""]
    return "\n".join(lines)


def save_results(ctx: Run):
    """results.json, metrics.csv, metrics.json and REPORT.md from the results so far."""
    results = ctx.results
    results["total_seconds"] = time.perf_counter() - ctx.started
    results["histories"] = {n: ctx.models[n].history.as_dict() for n in results["models"]}
    results["figures"] = [{"file": f, "caption": c} for f, c in report_figures(results) if (ctx.out / f).is_file()]
    if results.get("time_estimate"):
        results["time_estimate"]["actual"] = results["total_seconds"]
    table = metrics_table(results)
    write_json(ctx.out / "results.json", results)
    write_metrics(results, table, ctx.out)
    write_text(ctx.out / "REPORT.md", report_markdown(results, table, ctx.out))


def write_results(ctx: Run):
    save_results(ctx)
    print("\n\n".join(f"{axis}: {text(ctx.results)}" for axis, text in ANALYSIS))
    print(f"\nwritten: {ctx.out / 'REPORT.md'}, metrics.csv, metrics.json, results.json")


@stage
def report_section(ctx):
    """Write the results files and the report, and print the analysis."""
    if ctx.results["models"]:
        write_results(ctx)
    elif ctx.results["failed"]:
        write_json(ctx.out / "results.json", ctx.results)
        raise RuntimeError("every model failed: " + "; ".join(ctx.results["failed"].values()))


# %% [markdown]
# <a id="discussion"></a>
# ### 12.1 Why each model behaves as it does
#
# Read against the `full` run (30 epochs each, the numbers above when this notebook shows that run). The
# causes, not the numbers again:
#
# * **VAE: recognisable, and blurred.** Its decoder gives each pixel the *mean* of the digits that could
#   have made its code, so strokes come out with soft grey edges: its sharpness is the lowest, and most of
#   its faint pixels lie within two pixels of a stroke (`outputs/issue-30-tries/faint_where.txt`). The classifier's features hardly see blur (a
#   blurred 3 is still a 3), so its FID is close to the DDPM's, while the detector, which sees every
#   pixel, tells it from real digits most easily. Sampling from the prior instead of the fitted mixture
#   costs it most of its FID (`vae_samplers.png`: prior codes land between the digit clusters of
#   `vae_latent_2d.png`). The mixture sits where training codes are dense, so rare styles are drawn less
#   often, which is its lower recall, and a code drawn next to a training digit's decodes to something
#   close to that digit's reconstruction: its samples come nearer to training digits than unseen test
#   digits do (the memorisation check in Part B), which its prior's samples do not. Steering by a class's
#   mean code misses when that mean lies between two clusters.
# * **GAN: sharp strokes, and many hybrids.** One generator must map one Gaussian onto ten separate
#   clusters with one continuous function, so the noise between two clusters comes out as a hybrid of two
#   digits (`noise_paths.png`), which is its low precision. Its trained $D$ still scores most samples
#   below most real digits (`gan_d_outputs.png`), where the cGAN's $D$ can no longer tell them apart. Its
#   strokes are sharp, so the detector finds it harder to tell apart than the VAE. The tries of issue 30 (`outputs/issue-30-tries`) rule out the
#   usual suspects: an average of G's weights, spectral normalisation, a wider D and the cGAN's smoothed
#   target each left it where it was. What the cGAN has and it lacks is the label.
# * **cGAN: the label splits one hard problem into ten easy ones.** Told which digit to draw, G maps the
#   noise onto one cluster at a time, and its hybrids disappear: the best FID, at the price of asking for
#   a label (which is also what makes it controllable). The trained D's verdicts sit around 0.45, not 0.5:
#   its real target of 0.9 moves the equilibrium (`cgan_d_outputs.png`).
# * **DDPM: the best detector score, at fifty network passes per image.** Each small denoising step is
#   an easy regression, so no mode is left out (the highest recall) and its samples are the hardest to tell
#   from real digits. The haze that once made it the easiest to spot came from a network that could not
#   see the smallest noise; predicting $x_0$ removed most of it, and what remains is the predicted
#   $x_0$'s own error on the background near $t = 0$ (`ddpm_noise_error.png`). Its cost is the sampler:
#   every image is fifty passes of the U-Net where the others need one.

# %% [markdown]
# <a id="checklist"></a>
# ## 13. Assignment checklist
#
# Each item of `assignment_requirements.txt` is checked against the live configuration, the trained
# models and the files this run wrote. The last cell of the notebook raises an error that lists any miss.

# %%
def checklist(cfg: Config, results: dict) -> list:
    """[(item, ok, evidence)]: the assignment's eight items, verified."""
    out = Path(cfg.out)
    ran = list(results["models"])
    items = []

    def check(item, ok, evidence):
        items.append((item, bool(ok), evidence))

    train_images, _ = load_mnist(cfg.data_root, train=True, dataset=cfg.dataset)
    check(f"1 data: {DATASETS[cfg.dataset]['title']} 28x28 grayscale via torchvision",
          tuple(train_images.shape[1:]) == (28, 28)
          and train_images.dtype == torch.uint8, f"train images {tuple(train_images.shape)} uint8")
    for name in ran:  # items 2-5: each model's own facts, checked by its trainer class
        found = globals()[MODELS[name].trainer].assignment(name, cfg, results["models"][name], out)
        if found:
            check(*found)
    check("6 batch 128, Adam, seed 42", cfg.batch_size == 128 and cfg.seed == 42,
          f"batch {cfg.batch_size}, seed {cfg.seed}, epochs {cfg.epochs}")
    wanted = [MODELS[m].figure(m) for m in ran] + ["comparison.png"]
    missing = [f for f in wanted if not (out / f).is_file()]
    shapes = {}
    for m in ran:
        with np.load(out / "samples" / f"{m}.npz") as data:
            shapes[m] = data["images"].shape
    check("7 outputs: 10 samples each, cGAN 10x10 grid, comparison figure",
          not missing and all(s[0] >= 10 and s[1:] == (28, 28) for s in shapes.values()),
          f"missing {missing}" if missing else f"{len(wanted)} figures; samples {shapes}")
    axes = ["clarity", "control", "efficiency", "stability"]
    analysis, scores = results.get("analysis", {}), results.get("scores", {})
    written = [f for f in ("REPORT.md", "metrics.csv", "metrics.json") if (out / f).is_file()]
    check("8 analysis: clarity, controllability, efficiency, stability, measured and scored 0-1",
          all(m in analysis and m in scores for m in ran) and len(written) == 3
          and all(0 <= scores[m][a] <= 1 for m in ran for a in axes)
          and all(any(k.startswith(a) and np.isfinite(v) for k, v in analysis[m].items()) for m in ran for a in axes),
          f"scores and table rows for {', '.join(scores)}; wrote {', '.join(written)}")
    for name, why in results.get("failed", {}).items():
        check(f"{name} trained to the end", False, why)
    not_run = [m for m, spec in MODELS.items() if spec.default and m not in ran and m not in results.get("failed", {})]
    if not_run:
        print(f"not checked (models not run): {', '.join(not_run)}")
    return items


def check_assignment(ctx: Run):
    ctx.results["checklist"] = items = checklist(ctx.cfg, ctx.results)
    for item, ok, evidence in items:
        print(f"[{'x' if ok else ' '}] {item}  -- {evidence}")
    misses = [item for item, ok, _ in items if not ok]
    print("assignment checklist: " + ("missed " + "; ".join(misses) if misses else "all items met"))


@stage
def checklist_section(ctx):
    """Check the assignment's items against this run (the verdict comes in the last cell)."""
    if ctx.results["models"] or ctx.results["failed"]:
        check_assignment(ctx)


# %% [markdown]
# <a id="play"></a>
# ## 14. Play with what was trained
#
# Each call below uses a trained model of this run in one line and draws the result here (and saves it).
# Change a number and run the cell again: ask the cGAN for another digit, give the DDPM's sampler fewer
# or more steps (it was trained on T = `ddpm_T` steps; the export takes `ddim_steps`), or morph the VAE
# between two other digits.

# %% jupyter={"source_hidden": true}
# @title The one-call helpers { display-mode: "form" }
def digits_from_cgan(ctx: Run, digit: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """n samples of one digit from the trained cGAN."""
    model = ctx.models["cgan"].model
    return draw(model, n, torch.Generator(ctx.device).manual_seed(seed), labels=torch.full((n,), digit))


def ddpm_with_steps(ctx: Run, steps: int, n: int = 16, seed: int = 0, eta: float | None = None) -> np.ndarray:
    """n DDPM samples from a DDIM sampler with `steps` network passes (eta: the export's unless given)."""
    model = ctx.models["ddpm"].model
    sampler = Sampler("ddim", steps, eta=ctx.cfg.ddim_eta if eta is None else eta)
    return draw(model, n, torch.Generator(ctx.device).manual_seed(seed), sampler)


@torch.inference_mode()
def vae_morph(ctx: Run, a: int, b: int, steps: int = 10) -> np.ndarray:
    """The VAE's decoded straight line from the code of the first test digit `a` to that of the first `b`."""
    model, (images, labels) = ctx.models["vae"].model, ctx.test
    z_a, z_b = model.codes(images[[int((labels == a).nonzero()[0]), int((labels == b).nonzero()[0])]])
    w = torch.linspace(0, 1, steps, device=z_a.device)[:, None]
    return to_uint8(model.decode((1 - w) * z_a + w * z_b), signed=False)


def plot_row(images, title: str, path: Path):
    fig, ax = plt.subplots(figsize=(0.6 * len(images) + 0.4, 1.3))
    image_grid(ax, images, 1, len(images), title)
    show(fig, path)


# %%
@stage
def play_section(ctx):
    """Three one-call uses of the trained models (each skipped when its model is not in this run)."""
    out = ctx.out
    if "cgan" in ctx.models:
        plot_row(digits_from_cgan(ctx, digit=7, n=16), "sixteen 7s from the cGAN", out / "play_cgan.png")
    if "ddpm" in ctx.models:
        plot_row(ddpm_with_steps(ctx, steps=10, n=16),
                 f"the DDPM with 10 sampler steps instead of the export's {ctx.cfg.ddim_steps}", out / "play_ddpm.png")
    if "vae" in ctx.models:
        plot_row(vae_morph(ctx, a=3, b=8, steps=12), "a VAE morph from a 3 to an 8", out / "play_vae.png")


# %% [markdown]
# <a id="appendix"></a>
# # Part C: appendix (opt in)
#
# Nothing here runs unless a setting asks for it: the models with `--models vae,gan,cgan,ddpm,wgan,cddpm`
# (or the settings cell's `models`), the studies with their own switches. The last cell measures and
# reports again with whatever the appendix added, so that `REPORT.md` and the figures cover it too.
#
# ## C1. Wasserstein GAN with gradient penalty (WGAN-GP; `--models ...,wgan`)
#
# The GAN's discriminator answers "real or fake?"; when the two distributions barely overlap its
# answer saturates and $G$'s gradient carries little information. WGAN replaces it with a **critic**
# $C$ that outputs an unbounded score and estimates the Wasserstein-1 distance (the earth mover's
# distance) between real and generated images:
#
# $$W(P_r, P_g) \approx \max_{\lVert C\rVert_L \le 1} \; \mathbb E_{x\sim P_r}[C(x)] - \mathbb E_{z}[C(G(z))].$$
#
# The maximum is over 1-Lipschitz functions. Gulrajani et al. (2017) enforce that softly with a
# **gradient penalty** on random points between real and fake images,
# $\hat x = \epsilon x + (1-\epsilon)\tilde x$, $\epsilon \sim U(0, 1)$:
#
# $$\mathcal L_C = \mathbb E[C(\tilde x)] - \mathbb E[C(x)] + \lambda\,\mathbb E\big[(\lVert\nabla_{\hat x} C(\hat x)\rVert_2 - 1)^2\big],
#   \qquad \mathcal L_G = -\mathbb E[C(G(z))],$$
#
# with $\lambda = 10$. The penalty is per image, so the critic is the GAN's discriminator without batch
# norm (which would mix the images of a batch). The critic must be near its optimum for $W$ to be a
# good estimate, so it takes `wgan_n_critic` = 5 steps (batches) per generator step, with Adam at
# $10^{-4}$, $\beta = (0, 0.9)$; for the same reason it keeps the full width (`wgan_critic_width`) where the
# GAN's $D$ has half. The report lists the per-epoch mean of
# $\hat W = \mathbb E[C(x)] - \mathbb E[C(\tilde x)]$: unlike the GAN's losses it should fall as the
# samples improve.

# %%
def gradient_penalty(critic, real, fake, gen: torch.Generator | None = None):
    """E[(||grad_x_hat C(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) x_tilde, eps ~ U(0, 1) per image.
    Computed in float32 whatever the autocast around it: in float16 the input gradients of a small critic
    underflow to 0 (no penalty gradient at all), and scaled up they overflow; the loss scaler then scales the
    whole critic loss, penalty included, as for any other loss."""
    eps = torch.rand(len(real), 1, 1, 1, generator=gen, device=real.device)
    with torch.autocast(real.device.type, enabled=False):
        x_hat = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
        scores = critic(x_hat).float()
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)  # create_graph: the penalty is trained
        return (grad.float().flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def critic_loss(real_scores, fake_scores, penalty, gp_weight: float):
    """L_C = E[C(x_tilde)] - E[C(x)] + lambda * GP; the critic minimises it."""
    return fake_scores.float().mean() - real_scores.float().mean() + gp_weight * penalty


def wgan_g_loss(fake_scores):
    """L_G = -E[C(G(z))]: the generator raises the critic's score of its samples."""
    return -fake_scores.float().mean()


class Counter:
    """A count (and the last generator loss, a tensor so that no step waits for the GPU) that a
    checkpoint saves and restores."""

    def __init__(self):
        self.n, self.last = 0, 0.0

    def state_dict(self) -> dict:
        return {"n": self.n, "last": float(self.last)}

    def load_state_dict(self, state: dict):
        self.n, self.last = state["n"], state["last"]


class WGANTrainer:
    """WGAN-GP: the generator G, the critic C (no batch norm), Adam(1e-4, betas 0 and 0.9) for both.
    Every batch is one critic step; every wgan_n_critic-th batch also takes one generator step.
    Logged per batch: W (the critic's Wasserstein estimate), the critic loss, the penalty, and
    the latest generator loss."""
    losses, fmt, signed, uses_sampler = ("W", "critic", "GP", "G"), ".2f", True, False
    gaussian_noise = True  # its noise is N(0, I): a path between two noises follows an arc (slerp)

    def __init__(self, name: str, cfg: Config, device):
        self.name, self.cfg, self.device = name, cfg, device
        self.G = prepare(Generator(cfg.gan_noise, 0, cfg.gan_width), cfg, device)
        self.C = prepare(Discriminator(0, cfg.wgan_critic_width, batch_norm=False), cfg, device)
        self.opt_g, self.opt_c = self.optimizers()
        self.scaler_g, self.scaler_c = LossScaler(cfg, device), LossScaler(cfg, device)
        self.critic_steps = Counter()
        self.modules = (self.G, self.C)
        self.parts = {"generator": self.G, "critic": self.C, "opt_g": self.opt_g, "opt_c": self.opt_c,
                      "scaler_g": self.scaler_g, "scaler_c": self.scaler_c, "critic_steps": self.critic_steps}
        maybe_compile(cfg, *self.modules)

    def optimizers(self) -> tuple:
        """Adam(wgan_lr, betas 0 and 0.9) for G and for the critic."""
        return tuple(adam(m.parameters(), self.cfg.wgan_lr, self.device, (0.0, 0.9)) for m in (self.G, self.C))

    def penalty(self, x, fake):
        """The critic's Lipschitz term: the gradient penalty."""
        return gradient_penalty(self.C, x, fake)

    def after_critic_step(self):
        """Nothing here; the clipping WGAN (end of section C1) clips the critic's weights."""

    def step(self, xb, yb) -> dict:
        G, C = self.G, self.C
        x = to_signed(xb)
        z = torch.randn(len(x), self.cfg.gan_noise, device=self.device)
        with autocast(self.cfg, self.device):
            with torch.no_grad():
                fake = G(z)  # x_tilde; the critic step does not train G
            real_scores, fake_scores = C(x), C(fake)
            penalty = self.penalty(x, fake)
            loss_c = critic_loss(real_scores, fake_scores, penalty, self.cfg.wgan_gp)
        self.scaler_c.backward_step(loss_c, self.opt_c)
        self.after_critic_step()
        w_estimate = real_scores.float().mean() - fake_scores.float().mean()  # W^ = E[C(x)] - E[C(x_tilde)]
        self.critic_steps.n += 1
        if self.critic_steps.n % self.cfg.wgan_n_critic == 0:  # the generator step
            z = torch.randn(len(x), self.cfg.gan_noise, device=self.device)
            with autocast(self.cfg, self.device):
                loss_g = wgan_g_loss(C(G(z)))
            self.scaler_g.backward_step(loss_g, self.opt_g)
            self.critic_steps.last = loss_g.detach()
        return {"W": w_estimate.detach(), "critic": loss_c.detach(), "GP": penalty.detach(),
                "G": torch.as_tensor(self.critic_steps.last, device=self.device)}

    def noise(self, n, gen) -> torch.Tensor:
        return torch.randn(n, self.cfg.gan_noise, generator=gen, device=self.device)

    def sample(self, n, gen, labels=None, sampler=None, progress=False, noise=None):
        return self.G(self.noise(n, gen) if noise is None else noise)

    def sampler_note(self, sampler) -> str:
        return "one generator pass"

    @staticmethod
    def assignment(name: str, cfg: Config, entry: dict, out: Path):
        return None  # not one of the assignment's models


# %%
@stage
def wgan_section(ctx):
    """Train WGAN-GP when asked for (or resume / load it), export its samples, show its losses and samples."""
    train_section(ctx, "wgan")


# %% [markdown]
# <a id="wgan-clip"></a>
# ### C1, continued: the original WGAN, weight clipping (`--models ...,wganclip`)
#
# Arjovsky et al. (2017) kept the critic Lipschitz the blunt way: after every critic step, every weight
# is **clipped** to $[-c, c]$ with $c = 0.01$. A network whose weights are bounded has a bounded slope,
# so $C$ stays $K$-Lipschitz for some $K$, and the critic still estimates $K \cdot W(P_r, P_g)$. There is
# no penalty, $\mathcal L_C = \mathbb E[C(	ilde x)] - \mathbb E[C(x)]$, and the paper trains both
# networks with RMSprop at $5\cdot 10^{-5}$ (momentum-free: with clipping, Adam's momentum made
# training unstable) and 5 critic steps per generator step. The price is what WGAN-GP was made to fix:
# clipped weights push the critic towards the simplest functions (most weights sit at $\pm c$), so its
# gradient says less, and $c$ trades slow learning (small) against exploding gradients (large). Here the
# critic and generator are WGAN-GP's, so the two differ only in how $C$ is kept Lipschitz and in the
# optimiser.

# %%
class WGANClipTrainer(WGANTrainer):
    """The original WGAN: the WGAN-GP networks, no penalty, every critic weight clipped to [-wgan_clip,
    wgan_clip] after each critic step, RMSprop(wgan_clip_lr) for both networks."""
    losses = ("W", "critic", "G")

    def optimizers(self) -> tuple:
        return tuple(torch.optim.RMSprop(m.parameters(), lr=self.cfg.wgan_clip_lr) for m in (self.G, self.C))

    def penalty(self, x, fake):
        return torch.zeros((), device=self.device)

    @torch.no_grad()
    def after_critic_step(self):
        for p in self.C.parameters():
            p.clamp_(-self.cfg.wgan_clip, self.cfg.wgan_clip)


@stage
def wgan_clip_section(ctx):
    """Train the clipping WGAN when asked for (or resume / load it), export its samples, show its losses."""
    train_section(ctx, "wganclip")


# %% [markdown]
# ## C2. Class-conditional DDPM with classifier-free guidance (`--models ...,cddpm`)
#
# The same U-Net, given the label too: $\varepsilon_\theta(x_t, t, y)$, with a learned embedding of
# $y$ added to the time embedding. During training the label is replaced by a **null label**
# $\varnothing$ with probability $p_\text{uncond} = 0.1$, so one network learns both the conditional
# $\varepsilon_\theta(x_t, t, y)$ and the unconditional $\varepsilon_\theta(x_t, t, \varnothing)$.
#
# **Classifier-free guidance** (Ho & Salimans, 2022) samples with the extrapolation
#
# $$\tilde\varepsilon = (1 + w)\,\varepsilon_\theta(x_t, t, y) - w\,\varepsilon_\theta(x_t, t, \varnothing),$$
#
# which pushes each step away from "any digit" and towards "this digit": $w = 0$ is the plain
# conditional model, larger $w$ trades variety for obedience and typicality. Each guided step costs
# two network passes (batched together in `predict_eps`, section 5.3). The code is the DDPM's:
# `UNet(n_classes=10)` and `DDPMTrainer`, which reads `conditional=True` from the cDDPM's entry.
#
# **Guidance study** (whenever the cDDPM is trained): the same noise sampled at $w$ = 0, 1, 3 (and the
# configured one); for each, the share of samples the evaluator sees as the asked class, the
# classifier-FID, and the time per image.

# %%
GUIDANCE_WEIGHTS = (0.0, 1.0, 3.0)


def guidance_study(ctx: Run, trained: Trained) -> dict:
    """Conditional accuracy, classifier-FID and time per image of a conditional diffusion model at each
    guidance weight (DDIM with ddim_steps, whatever the export sampler: four ancestral runs cost too much)."""
    cfg, n = ctx.cfg, ctx.cfg.n_samples
    asked = balanced_labels(n)
    rows, firsts = {}, {}
    for w in progress_bar(sorted({*GUIDANCE_WEIGHTS, cfg.cddpm_guidance}), desc="guidance study"):
        images, seconds = timed_draw(trained.model, n, cfg.seed + 7, Sampler("ddim", cfg.ddim_steps, w), asked)
        probs = predict(ctx.evaluator, images)
        hits = np.diag(confusion(asked, probs))
        rows[f"{w:g}"] = {"guidance": w, "accuracy": float(hits.mean()), "per_class_accuracy": hits.tolist(),
                          "fid": frechet_distance(features(ctx.evaluator, images), ctx.ref_feats),
                          "confidence": float(probs.max(1).values.mean()), "seconds_per_image": seconds}
        firsts[w] = images[:10]  # asked 0, 1, ..., 9
        print(f"{trained.spec.title} guidance {w:g}: accuracy {100 * hits.mean():.1f}%, FID {rows[f'{w:g}']['fid']:.1f}")
    ctx.arrays["guidance_firsts"] = firsts
    return {"n": n, "sampler": f"DDIM, {cfg.ddim_steps} steps", "weights": rows}


def plot_guidance(rows: dict, firsts: dict, path: Path, classes):
    """Left: accuracy and classifier-FID against the guidance weight. Right: one sample per class per weight."""
    fig = plt.figure(figsize=(11.5, 3.6))
    grid = fig.add_gridspec(1, 2, width_ratios=[1, 1.6], wspace=0.55)
    ax = fig.add_subplot(grid[0])
    w = [r["guidance"] for r in rows.values()]
    ax.plot(w, [100 * r["accuracy"] for r in rows.values()], "o-", color=MODELS["cddpm"].colour,
            label="asked class seen (%)")
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel("conditional accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(w, [r["fid"] for r in rows.values()], "s--", color="gray", label="classifier-FID")
    ax2.set_ylabel("classifier-FID (lower is better)")
    ax.legend(handles=ax.get_lines() + ax2.get_lines(), fontsize=7, loc="center right")
    ax.set_title("cDDPM: classifier-free guidance")
    gax = fig.add_subplot(grid[1])
    image_grid(gax, np.concatenate(list(firsts.values())), len(firsts), 10,
               "one sample per class (columns: " + ", ".join(classes[:3]) + ", ...) at each w")
    gax.set_yticks(np.arange(len(firsts)) * 28 + 14)
    gax.set_yticklabels([f"w = {v:g}" for v in firsts])
    show(fig, path)


def guidance_markdown(results: dict) -> list:
    g = results["guidance_study"]
    df = pd.DataFrame.from_dict({f"w = {w}": {
        "conditional accuracy %": 100 * r["accuracy"], "classifier-FID": r["fid"],
        "evaluator confidence": r["confidence"], "ms per image": 1000 * r["seconds_per_image"]}
        for w, r in g["weights"].items()}, orient="index")
    return study_markdown("cDDPM: classifier-free guidance",
                          f"{g['n']} samples per weight ({g['sampler']}), the asked classes balanced, the same noise "
                          "for every weight. Conditional accuracy: the share the evaluator sees as the asked class.",
                          df, "cddpm_guidance.png")


# %%
@stage
def cddpm_section(ctx):
    """Train the cDDPM when asked for (or resume / load it), show its losses and grid, then study guidance."""
    trained = train_section(ctx, "cddpm")
    if trained:
        grid = style_grid(trained.model, 6, torch.Generator(ctx.device).manual_seed(ctx.cfg.seed + 5))
        plot_style_grid(grid, 6, trained.spec.title, "starting noise x_T (deterministic DDIM)",
                        ctx.out / "cddpm_style.png", DATASETS[ctx.cfg.dataset]["classes"])
        prepare_evaluation(ctx)
        ctx.results["guidance_study"] = guidance_study(ctx, trained)
        plot_guidance(ctx.results["guidance_study"]["weights"], ctx.arrays["guidance_firsts"],
                      ctx.out / "cddpm_guidance.png", DATASETS[ctx.cfg.dataset]["classes"])


# %% [markdown]
# ## C3. DDPM samplers from the same weights (`--sampler-study`)
#
# From the same EMA weights of the DDPM, `n_samples` images with the paper's 1000-step ancestral
# sampler and with DDIM at 100, 50, 20 and 10 steps: classifier-FID, precision, recall and time per
# image. How much quality does each skipped step cost? The answer is in the run's `REPORT.md`.

# %%
SAMPLER_STUDY = (Sampler("ancestral", 1000), Sampler("ddim", 100), Sampler("ddim", 50), Sampler("ddim", 20),
                 Sampler("ddim", 10), Sampler("ddim", 100, eta=1.0), Sampler("ddim", 50, eta=1.0),
                 Sampler("ddim", 20, eta=1.0))


def sampler_study(ctx: Run, trained: Trained) -> dict:
    """Classifier-FID, precision, recall and time per image of each SAMPLER_STUDY sampler, same weights."""
    cfg, n, rows = ctx.cfg, ctx.cfg.n_samples, {}
    for sampler in progress_bar(SAMPLER_STUDY, desc="sampler study"):
        sampler = dataclasses.replace(sampler, steps=min(sampler.steps, cfg.ddpm_T))
        label = trained.model.sampler_note(sampler)
        images, seconds = timed_draw(trained.model, n, cfg.seed + 8, sampler)
        feats = features(ctx.evaluator, images)
        pr = precision_recall(ctx.ref_feats, feats)
        rows[label] = {"sampler": sampler.kind, "eta": sampler.eta,
                       "network_passes": cfg.ddpm_T if sampler.kind == "ancestral" else sampler.steps,
                       "fid": frechet_distance(feats, ctx.ref_feats), "precision": pr["precision"],
                       "recall": pr["recall"], "seconds_per_image": seconds}
        print(f"sampler study: {label}: FID {rows[label]['fid']:.1f}, {1000 * seconds:.1f} ms/image")
    return {"n": n, "batch": min(SAMPLE_BATCH, n), "samplers": rows}


def plot_sampler_study(rows: dict, path: Path, n: int):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, r) in enumerate(rows.items()):
        colour = "k" if r["sampler"] == "ancestral" else "tab:purple" if r.get("eta") else "tab:red"
        ax.scatter(1000 * r["seconds_per_image"], r["fid"], s=50, color=colour)
        ax.annotate(label, (1000 * r["seconds_per_image"], r["fid"]), fontsize=8,
                    xytext=(5, 6 if i % 2 else -13), textcoords="offset points")  # alternate: neighbours do not overlap
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per image (batch {min(SAMPLE_BATCH, n)})")
    ax.set_ylabel(f"classifier-FID of {n} samples (lower is better)")
    ax.set_title("DDPM samplers from the same weights: quality against time")
    show(fig, path)


def sampler_study_markdown(results: dict) -> list:
    st = results["sampler_study"]
    df = pd.DataFrame.from_dict({k: {"network passes": r["network_passes"], "classifier-FID": r["fid"],
                                     "precision": r["precision"], "recall": r["recall"],
                                     "ms per image": 1000 * r["seconds_per_image"]}
                                 for k, r in st["samplers"].items()}, orient="index")
    ancestral = [r["fid"] for r in st["samplers"].values() if r["sampler"] == "ancestral"]
    cheap = {k: r for k, r in st["samplers"].items() if r["network_passes"] <= 50}
    verdict = ""
    if ancestral and cheap:
        best = min(cheap, key=lambda k: cheap[k]["fid"])
        gap = cheap[best]["fid"] / ancestral[0] - 1
        verdict = (f" The best sampler of at most 50 network passes, {best}, scores {cheap[best]['fid']:.1f}: "
                   f"{100 * abs(gap):.0f}% {'above' if gap > 0 else 'below'} the ancestral sampler's "
                   f"{ancestral[0]:.1f}, with {st['samplers'][best]['network_passes']} passes instead of "
                   f"{max(r['network_passes'] for r in st['samplers'].values())}.")
    return study_markdown("DDPM samplers from the same weights",
                          f"{st['n']} samples per sampler at batch {st['batch']}, from the EMA weights of the run's "
                          "DDPM. eta is DDIM's fresh noise per jump (0: deterministic; 1: the ancestral sampler's "
                          "amount)." + verdict, df, "sampler_study.png")


@stage
def sampler_study_section(ctx):
    if ctx.cfg.sampler_study and "ddpm" in ctx.models:
        prepare_evaluation(ctx)
        ctx.results["sampler_study"] = sampler_study(ctx, ctx.models["ddpm"])
        plot_sampler_study(ctx.results["sampler_study"]["samplers"], ctx.out / "sampler_study.png", ctx.cfg.n_samples)


# %% [markdown]
# ## C4. Latent-size and width sweeps (`--sweep-steps N`)
#
# The VAE and the GAN trained again for N optimizer steps each, with latent size 5, 10, 50, 100 (the
# VAE's $z$, the GAN's noise) and base width 32, 64, 128, 256 (the VAE decoder's and the GAN generator's
# channels at 14×14; sections 2 and 3), everything else at its setting; classifier-FID of `n_samples`
# samples and training time against each setting. Equal steps, not equal time: a wider net costs more
# per step.

# %%
SWEEPS = {"latent": (5, 10, 50, 100), "width": (32, 64, 128, 256)}
SWEEP_FIELDS = {("vae", "latent"): "vae_latent", ("vae", "width"): "vae_width",
                ("gan", "latent"): "gan_noise", ("gan", "width"): "gan_width"}


def sweeps(ctx: Run) -> dict:
    """Train VAE and GAN for sweep_steps steps at every SWEEPS setting; FID, time, parameters."""
    cfg = ctx.cfg
    full = len(ctx.train[0]) // cfg.batch_size
    epochs = math.ceil(cfg.sweep_steps / full)
    per_epoch = math.ceil(cfg.sweep_steps / epochs)
    rows = []
    for (model, kind), name in SWEEP_FIELDS.items():
        for value in SWEEPS[kind]:
            scfg = dataclasses.replace(cfg, **{name: value}, epochs={**cfg.epochs, model: epochs},
                                       max_batches=per_epoch, resume=False, pretrained=False)
            print(f"sweep: {model} {name} = {value}")
            trained = train_model(ctx, model, None, scfg, probes=False)
            images, _ = timed_draw(trained.model, cfg.n_samples, cfg.seed + 1)
            rows.append({"model": model, "sweep": kind, "field": name, "value": value,
                         "is_setting": value == getattr(cfg, name), "steps": trained.history.steps,
                         "train_seconds": trained.history.seconds, "parameters": trained.parameters,
                         "fid": frechet_distance(features(ctx.evaluator, images), ctx.ref_feats)})
    return {"steps": epochs * per_epoch, "n": cfg.n_samples, "rows": rows}


def plot_sweeps(rows: list, path: Path, steps: int):
    """Per sweep, classifier-FID (solid) and training seconds (dashed) against the setting, per model."""
    fig, axes = plt.subplots(1, len(SWEEPS), figsize=(5.5 * len(SWEEPS), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], SWEEPS):
        twin = ax.twinx()
        for model in ("vae", "gan"):
            pts = [r for r in rows if r["model"] == model and r["sweep"] == kind]
            x = [r["value"] for r in pts]
            ax.plot(x, [r["fid"] for r in pts], "o-", color=MODELS[model].colour, label=f"{title(model)} FID")
            twin.plot(x, [r["train_seconds"] for r in pts], "s--", color=MODELS[model].colour, alpha=0.6,
                      label=f"{title(model)} train s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # a diverged setting can score 10x the others
        ax.set_xticks(SWEEPS[kind], [str(v) for v in SWEEPS[kind]])
        ax.set_xlabel({"latent": "latent size (VAE z, GAN noise)", "width": "base width (channels at 14x14)"}[kind])
        ax.set_ylabel("classifier-FID (lower is better)")
        twin.set_ylabel("training seconds")
        ax.legend(handles=ax.get_lines() + twin.get_lines(), fontsize=7)
        ax.set_title(f"{kind} sweep, {steps} steps per setting")
    fig.tight_layout()
    show(fig, path)


def sweeps_markdown(results: dict) -> list:
    sw = results["sweeps"]
    df = pd.DataFrame.from_dict({f"{title(r['model'])} {r['field']} = {r['value']}"
                                 + (" (the run's)" if r["is_setting"] else ""):
                                 {"classifier-FID": r["fid"], "training s": r["train_seconds"],
                                  "parameters": r["parameters"]} for r in sw["rows"]}, orient="index")
    return study_markdown("Latent-size and width sweeps",
                          f"Each setting trained from seed {results['config']['seed']} for {sw['steps']} optimizer "
                          f"steps (batch 128); classifier-FID of {sw['n']} samples.", df, "sweeps.png")


@stage
def sweeps_section(ctx):
    if ctx.cfg.sweep_steps and not ctx.cfg.benchmark:
        prepare_evaluation(ctx)
        ctx.results["sweeps"] = sweeps(ctx)
        plot_sweeps(ctx.results["sweeps"]["rows"], ctx.out / "sweeps.png", ctx.results["sweeps"]["steps"])


# %% [markdown]
# ## C5. Seeds (`--seeds N`)
#
# Every trained model is trained again with seeds 43, 44, ... (checkpoints and samples in
# `seed-<n>/`), measured the same way, and the report gives the mean and spread of the headline
# metrics over the seeds: how much of a difference between two models is luck?

# %%
SEED_KEYS = ("fid", "inception_score", "precision", "recall", "coverage")


def seed_spread(ctx: Run) -> dict:
    """Train every model again with seeds seed+1 ... seed+seeds-1 and collect the spread of the
    headline metrics (the first seed's values come from the main run)."""
    cfg, models = ctx.cfg, ctx.results["models"]
    spread = {name: {"seeds": [cfg.seed], **{k: [models[name][k]] for k in SEED_KEYS},
                     "control_score": [models[name]["control"]["score"]], "failed_seeds": []} for name in models}
    for seed in range(cfg.seed + 1, cfg.seed + cfg.seeds):
        scfg, out = dataclasses.replace(cfg, seed=seed), ctx.out / f"seed-{seed}"
        for name in spread:
            print(f"seed {seed}: {name}")
            try:
                trained = train_model(ctx, name, out / "checkpoints" / f"{name}.pt", scfg, probes=False)
            except FloatingPointError as err:
                spread[name]["failed_seeds"].append({"seed": seed, "reason": str(err)})
                continue
            export_samples(ctx, trained, out)
            entry = sample_metrics(ctx, trained.model, trained.samples, trained.asked)
            spread[name]["seeds"].append(seed)
            for k in SEED_KEYS:
                spread[name][k].append(entry[k])
            spread[name]["control_score"].append(entry["control"]["score"])
    for name, s in spread.items():
        s["summary"] = {k: {"mean": float(np.mean(s[k])),
                            "std": float(np.std(s[k], ddof=1)) if len(s[k]) > 1 else None}
                        for k in (*SEED_KEYS, "control_score")}
    return spread


def seed_spread_markdown(results: dict) -> list:
    rows = {f"{title(n)}": {f"{k} {stat}": s["summary"][k][stat] for k in ("fid", "control_score")
                            for stat in ("mean", "std")} | {"seeds": len(s["seeds"])}
            for n, s in results["seed_spread"].items()}
    return ["## Seeds", "", "The headline metrics over the seeds (mean and standard deviation).", "",
            markdown_table(pd.DataFrame.from_dict(rows, orient="index")), ""]


@stage
def seeds_section(ctx):
    if ctx.cfg.seeds > 1 and ctx.models:
        prepare_evaluation(ctx)
        measure_section(ctx)  # the first seed's numbers, the appendix's models included
        ctx.results["seed_spread"] = seed_spread(ctx)


# %% [markdown]
# ## C6. DDPM design study (`--ddpm-study-steps N`)
#
# Which of the DDPM choices of section 5.5 make it learn faster? Each variant below is trained from
# the same seed for the same number of optimizer steps, and at seven points along the way we draw
# 1,000 DDIM-50 samples and measure their classifier-FID. The time per step is the same for all
# variants (the EMA update costs little next to a step), so *equal steps* is *equal time*. The
# figure `ddpm_design.png` shows FID against steps; the committed study is `outputs/ddpm-design-study/`.

# %%
DESIGN_VARIANTS = {
    "common DDPM defaults: lr 2e-4, plain MSE, no EMA": dict(ddpm_lr=2e-4, ddpm_warmup=1, ddpm_ema=0.0, ddpm_min_snr=0.0,
                                                             ddpm_predict="eps"),
    "lr 1e-3 + warm-up": dict(ddpm_lr=1e-3, ddpm_warmup=200, ddpm_ema=0.0, ddpm_min_snr=0.0, ddpm_predict="eps"),
    "lr 1e-3 + warm-up + EMA": dict(ddpm_lr=1e-3, ddpm_warmup=200, ddpm_ema=0.999, ddpm_min_snr=0.0, ddpm_predict="eps"),
    "lr 1e-3 + warm-up + EMA + min-SNR-5": dict(ddpm_lr=1e-3, ddpm_warmup=200, ddpm_ema=0.999, ddpm_min_snr=5.0,
                                                ddpm_predict="eps"),
    "lr 1e-3 + warm-up + EMA + min-SNR-5 + x0 prediction": dict(ddpm_lr=1e-3, ddpm_warmup=200, ddpm_ema=0.999,
                                                                ddpm_min_snr=5.0, ddpm_predict="x0"),
}


def ddpm_design_study(ctx: Run, evals: int = 7) -> dict:
    """Train each DESIGN_VARIANTS entry for ddpm_study_steps steps; classifier-FID every steps/evals."""
    cfg = ctx.cfg
    steps_per_eval = max(1, cfg.ddpm_study_steps // evals)
    n_eval = min(1000, len(ctx.ref_feats))
    curves, rows = {}, {}
    for label, overrides in DESIGN_VARIANTS.items():
        vcfg = dataclasses.replace(cfg, **overrides, epochs={**cfg.epochs, "ddpm": evals}, max_batches=steps_per_eval)
        seed_everything(cfg.seed)
        model = build_trainer("ddpm", vcfg, ctx.device)
        hist = fit(model, ctx.train, vcfg, evals, probe=lambda m: draw(
            m, n_eval, torch.Generator(ctx.device).manual_seed(cfg.seed + 1), Sampler("ddim", 50)))
        points = [((e + 1) * steps_per_eval, fid) for e, fid in enumerate(epoch_fids(ctx, hist.probes))]
        curves[label] = points
        rows[label] = {"steps": points[-1][0], "final_fid": points[-1][1], "seconds_per_step": hist.seconds / points[-1][0]}
        print(f"design study: {label}: FID {points[-1][1]:.2f} after {points[-1][0]} steps")
    return {"curves": curves, "summary": rows, "device": str(ctx.device), "width": cfg.ddpm_width}


def plot_design_study(study: dict, path: Path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in study["curves"].items():
        ax.plot(*zip(*points), "o-", label=label)
    ax.set_xlabel("optimizer steps (batch 128)")
    ax.set_ylabel("classifier-FID of 1000 DDIM-50 samples (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"DDPM design study ({study['device']}, width {study['width']})")
    ax.legend(fontsize=7)
    show(fig, path)


def design_study_markdown(results: dict) -> list:
    df = pd.DataFrame.from_dict(results["ddpm_design_study"]["summary"], orient="index")
    return study_markdown("DDPM design study", "Each variant trained from the same seed for the same steps.", df,
                          "ddpm_design.png")


@stage
def design_study_section(ctx):
    if ctx.cfg.ddpm_study_steps and not ctx.cfg.benchmark:
        prepare_evaluation(ctx)
        ctx.results["ddpm_design_study"] = ddpm_design_study(ctx)
        plot_design_study(ctx.results["ddpm_design_study"], ctx.out / "ddpm_design.png")


# %% [markdown]
# ## C7. The slower design at equal training time (`--reference-ddpm`)
#
# Speed only counts if the digits do not suffer. The best-known public notebook for this
# assignment uses a plain DDPM denoiser: three 3×3 convolutions at the full 28×28 resolution
# (1 → 64 → 128 → 256 channels), a 256-d time embedding added to the widest map, and three
# stride-1 transposed convolutions back with skips; plain MSE, Adam at $10^{-3}$, no EMA.
# `PlainDenoiser` re-creates it from those layer sizes. With `--reference-ddpm` the run trains it
# on the same data, from the same seed, with the same mixed precision, for as many **seconds** as
# our DDPM trained, then scores it exactly as our DDPM's last per-epoch FID was scored.

# %%
class PlainDenoiser(nn.Module):
    """The slower public design's eps_theta(x_t, t), re-created from its layer sizes: no down-sampling,
    no normalisation, 256 channels at 28x28."""

    def __init__(self, t_dim: int = 32):
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, 256), nn.ReLU(), nn.Linear(256, 256))
        self.down = nn.ModuleList([nn.Conv2d(1, 64, 3, padding=1), nn.Conv2d(64, 128, 3, padding=1),
                                   nn.Conv2d(128, 256, 3, padding=1)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(256, 128, 3, padding=1),
                                 nn.ConvTranspose2d(128 + 128, 64, 3, padding=1),
                                 nn.ConvTranspose2d(64 + 64, 1, 3, padding=1)])

    def forward(self, x_t, t):
        h1 = F.relu(self.down[0](x_t))
        h2 = F.relu(self.down[1](h1))
        h3 = F.relu(self.down[2](h2)) + self.t_mlp(sinusoidal_embedding(t, self.t_dim))[:, :, None, None]
        h = F.relu(self.up[0](h3))
        h = F.relu(self.up[1](torch.cat([h, h2], dim=1)))
        return self.up[2](torch.cat([h, h1], dim=1))


class PlainDDPMTrainer(DDPMTrainer):
    """The DDPM trainer with PlainDenoiser as its network (the design's plain MSE, Adam 1e-3, no EMA come
    from the config it is given)."""

    def make_net(self) -> nn.Module:
        return PlainDenoiser()


def slower_design_at_equal_time(ctx: Run) -> dict:
    """Train PlainDenoiser for as long as our DDPM trained; its classifier-FID by the protocol of our
    DDPM's last per-epoch FID, and ten samples of each."""
    cfg, ours = ctx.cfg, ctx.results["models"]["ddpm"]
    seed_everything(cfg.seed)
    plain_cfg = dataclasses.replace(cfg, ddpm_lr=1e-3, ddpm_warmup=1, ddpm_ema=0.0, ddpm_min_snr=0.0, ddpm_predict="eps")
    model = PlainDDPMTrainer("slower design", plain_cfg, ctx.device)
    order, budget, steps = torch.Generator().manual_seed(cfg.seed), ours["train_seconds"], 0
    losses = []  # tensors: reading each back would make a GPU wait every step
    bar = progress_bar(total=round(budget), desc="slower design, seconds")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget:
        for xb, yb in batches(*ctx.train, cfg, order):
            losses.append(model.step(xb, yb)["loss"].detach())
            steps += 1
            bar.update(min(round(time.perf_counter() - t0), bar.total) - bar.n)  # the bar counts seconds
            if time.perf_counter() - t0 >= budget:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    model.model.eval()
    n = probe_size(model, cfg, len(ctx.test[0]))  # exactly our DDPM's per-epoch protocol
    ctx.arrays["slower_design"] = {"plain": epoch_probe(model, 10), "ours": epoch_probe(ctx.models["ddpm"].model, 10)}
    result = {"train_seconds": seconds, "steps": steps, "seconds_per_step": seconds / max(1, steps),
              "parameters": n_params(model.model), "final_loss": float(torch.stack(losses[-50:]).float().mean()),
              "fid": epoch_fids(ctx, [epoch_probe(model, n)])[0], "n": n, "protocol": ours["epoch_fid_note"],
              "ours": {"train_seconds": ours["train_seconds"],
                       "steps": round(ours["train_images_per_second"] * ours["train_seconds"] / cfg.batch_size),
                       "seconds_per_step": cfg.batch_size / ours["train_images_per_second"],
                       "fid": ours["epoch_fid"][-1], "parameters": ours["parameters"]}}
    print(f"slower design: {steps} steps in {seconds:.0f} s ({result['seconds_per_step']:.2f} s/step), "
          f"classifier-FID {result['fid']:.1f}; ours {result['ours']['fid']:.1f} in {ours['train_seconds']:.0f} s")
    return result


def plot_slower_design(result: dict, images: dict, ddim_steps: int, path: Path):
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.4))
    ours = result["ours"]
    image_grid(axes[0], images["ours"], 1, 10, f"ours: {ours['steps']} steps in {ours['train_seconds']:.0f} s, "
               f"classifier-FID {ours['fid']:.1f} ({result['protocol']})")
    image_grid(axes[1], images["plain"], 1, 10, f"slower design: {result['steps']} steps in "
               f"{result['train_seconds']:.0f} s, classifier-FID {result['fid']:.1f} (same protocol, DDIM-{ddim_steps} samples)")
    show(fig, path)


def slower_design_markdown(results: dict) -> list:
    ref = results["reference_ddpm"]
    o = ref["ours"]
    df = pd.DataFrame.from_dict({
        "this notebook's U-Net": {"parameters": o["parameters"], "s per step": o["seconds_per_step"],
                                  "steps": o["steps"], "training s": o["train_seconds"], "classifier-FID": o["fid"]},
        "slower public design": {"parameters": ref["parameters"], "s per step": ref["seconds_per_step"],
                                 "steps": ref["steps"], "training s": ref["train_seconds"],
                                 "classifier-FID": ref["fid"]}}, orient="index")
    return study_markdown("The slower DDPM design at equal training time",
                          "Both trained on this machine for the same wall time with the same mixed precision; "
                          f"classifier-FID of {ref['protocol']} samples from the same starting noise (ours with its EMA "
                          "weights, as sampled).", df, "reference_ddpm.png")


@stage
def slower_design_section(ctx):
    if ctx.cfg.reference_ddpm and "ddpm" in ctx.results["models"]:
        ctx.results["reference_ddpm"] = slower_design_at_equal_time(ctx)
        plot_slower_design(ctx.results["reference_ddpm"], ctx.arrays["slower_design"], ctx.cfg.epoch_fid_ddim_steps,
                           ctx.out / "reference_ddpm.png")


# %% [markdown]
# ## C8. Benchmark (`--benchmark`)
#
# How fast is each piece, on this machine? Instead of the whole run, the benchmark times, for every
# selected model and the evaluator: one training step at batch 128 (the median of repeated steps
# after a warm-up), hence images per second and the time of an epoch; the time per generated image
# at batch 1000 (for a diffusion model with the export sampler measured whole, and the T-step
# ancestral sampler from timed network passes × T, since 1000 passes at batch 1000 take minutes on a
# CPU); parameters and peak memory. It also times one epoch of the data path the way a plain
# `DataLoader` with per-sample `ToTensor` does it, beside this notebook's (one uint8 tensor, batches
# by indexing), and writes everything to `benchmark.json`.

# %% jupyter={"source_hidden": true}
# @title The benchmark { display-mode: "form" }
BENCH_REFERENCE = {  # the best-known public notebook's DDPM step, re-created at batch 128 on 2 CPU cores, and our targets
    "ddpm_step_seconds": 4.2, "ddpm_step_target_seconds": 0.3, "ddim50_1000_samples_target_seconds": 45.0}


@torch.inference_mode()
def denoiser_pass_seconds(net, n: int, cfg: Config, device, warmup: int, repeats: int) -> float:
    """Median time of one denoiser pass at batch n: the unit cost of every diffusion sampler."""
    x = torch.randn(n, 1, 28, 28, device=device)
    t = torch.full((n,), cfg.ddpm_T // 2, device=device, dtype=torch.long)

    def one_pass():
        with autocast(cfg, device):
            net(x, t)
    return float(np.median(time_calls(one_pass, warmup, repeats, device)))


def data_path_seconds(ctx: Run) -> dict:
    """One epoch of batches as float tensors on the device: torchvision's MNIST through a DataLoader
    with per-sample ToTensor (PIL image -> tensor), against batches() indexing one uint8 tensor."""
    import torchvision.datasets
    from torch.utils.data import DataLoader
    from torchvision import transforms
    cfg, device = ctx.cfg, ctx.device
    n_batches = steps_per_epoch(len(ctx.train[0]), cfg)
    dataset = getattr(torchvision.datasets, DATASETS[cfg.dataset]["torchvision"])(
        cfg.data_root, train=True, download=True, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == n_batches:
            break
        x, y = x.to(device), y.to(device)
    synchronize(device)
    naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    for xb, yb in batches(*ctx.train, cfg, torch.Generator().manual_seed(cfg.seed)):
        x = to_unit(xb)
    synchronize(device)
    ours = time.perf_counter() - t0
    return {"batches": n_batches, "naive_dataloader_seconds": naive, "project_seconds": ours,
            "speedup": naive / ours}


def benchmark_model(ctx: Run, name: str, warmup: int, repeats: int) -> dict:
    cfg, device = ctx.cfg, ctx.device
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = min(SAMPLE_BATCH, cfg.n_samples)
    evaluator = name == "evaluator"
    with PeakMemory(device) as memory:
        trainer = EvaluatorTrainer(cfg, device, 10 * (warmup + repeats), gen) if evaluator else \
            build_trainer(name, cfg, device)
        sampling = not evaluator and trainer.uses_sampler
        n_steps = repeats if sampling else 3 * repeats  # the fast models get more repeats
        step = time_calls(lambda: memory.step(trainer, *random_batch(ctx.train, cfg, gen)), max(1, warmup), n_steps,
                          device)
        for module in trainer.modules:
            module.eval()
        sample_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
        if evaluator:
            draw_once = lambda: predict(trainer.model, ctx.train[0][:n])  # noqa: E731  (classify n images)
        else:
            asked = balanced_labels(n) if MODELS[name].conditional else None
            draw_once = lambda: draw(trainer, n, sample_gen, ctx.export_sampler, asked)  # noqa: E731
        sample = time_calls(draw_once, 0 if sampling else 1, 1 if sampling else 3, device)
        row = {"parameters": n_params(*trainer.modules), "step_seconds_median": float(np.median(step)),
               "step_seconds_all": step, "sample_batch": n, "seconds_per_image": float(np.median(sample)) / n}
        if sampling:
            unit = denoiser_pass_seconds(trainer.net, n, cfg, device, 1, max(2, repeats // 5))
            row.update(ddim_steps=cfg.ddim_steps, ancestral_steps=cfg.ddpm_T,
                       ancestral_seconds_per_image=unit * cfg.ddpm_T / n, denoiser_pass_seconds=unit,
                       ancestral_note=f"{cfg.ddpm_T} x the median denoiser pass at batch {n}, not a whole run")
    steps = len(ctx.train[0]) // cfg.batch_size
    row.update(train_images_per_second=cfg.batch_size / row["step_seconds_median"],
               epoch_seconds_estimate=steps * row["step_seconds_median"],
               peak_memory_mb=memory.mb, peak_memory_kind=memory.kind)
    return row


def benchmark_targets(ddpm: dict, cfg: Config) -> dict:
    """The speed targets for 2 CPU cores, each with its measured figure and met / missed."""
    step = ddpm["step_seconds_median"]
    ddim_1000 = 1000 * ddpm["seconds_per_image"]
    return {
        "ddpm_step_at_most_0.3_s": {"measured": step, "met": step <= BENCH_REFERENCE["ddpm_step_target_seconds"]},
        "ddpm_step_14x_faster_than_4.2_s": {"measured": BENCH_REFERENCE["ddpm_step_seconds"] / step,
                                            "met": BENCH_REFERENCE["ddpm_step_seconds"] / step >= 14},
        f"1000_ddim{cfg.ddim_steps}_samples_at_most_45_s": {
            "measured": ddim_1000, "met": ddim_1000 <= BENCH_REFERENCE["ddim50_1000_samples_target_seconds"]},
        "1000_ancestral_samples_seconds": {"measured": 1000 * ddpm["ancestral_seconds_per_image"], "met": None}}


def run_benchmark(ctx: Run) -> dict:
    cfg = ctx.cfg
    warmup, repeats = (1, 3) if cfg.profile == "smoke" else (3, 10)
    result = {"environment": ctx.results["environment"], "profile": cfg.profile, "batch_size": cfg.batch_size,
              "warmup_steps": warmup, "models": {}}
    for name in (*cfg.models, "evaluator"):
        result["models"][name] = row = benchmark_model(ctx, name, warmup, repeats)
        print(f"{name}: step {1000 * row['step_seconds_median']:.1f} ms, "
              f"{row['train_images_per_second']:.0f} images/s, epoch ~{row['epoch_seconds_estimate']:.0f} s, "
              f"{1000 * row['seconds_per_image']:.3f} ms/image at batch {row['sample_batch']}")
    result["data_path"] = data_path_seconds(ctx)
    if "ddpm" in result["models"]:
        result["targets"] = benchmark_targets(result["models"]["ddpm"], cfg)
    write_json(ctx.out / "benchmark.json", result)
    return result


def benchmark_table(result: dict) -> pd.DataFrame:
    rows = {}
    for name, r in result["models"].items():
        rows[name] = {"parameters": r["parameters"], "step ms (batch 128)": 1000 * r["step_seconds_median"],
                      "images/s": r["train_images_per_second"], "epoch s (est.)": r["epoch_seconds_estimate"],
                      f"ms/image (batch {r['sample_batch']})": 1000 * r["seconds_per_image"],
                      "ancestral ms/image": 1000 * r.get("ancestral_seconds_per_image", float("nan")),
                      "peak memory MB": r["peak_memory_mb"]}
    return pd.DataFrame.from_dict(rows, orient="index")


@stage
def benchmark_section(ctx):
    """With --benchmark (instead of the run): time every selected model and the evaluator."""
    if not ctx.cfg.benchmark:
        return
    result = run_benchmark(ctx)
    print(benchmark_table(result).to_string(float_format=lambda v: f"{v:.4g}"))
    data = result["data_path"]
    print(f"data path, {data['batches']} batches: DataLoader + ToTensor {data['naive_dataloader_seconds']:.2f} s, "
          f"this notebook's {data['project_seconds']:.3f} s ({data['speedup']:.0f}x)")
    for target, value in result.get("targets", {}).items():
        verdict = {True: "met", False: "MISSED", None: "(no target)"}[value["met"]]
        print(f"{target}: {value['measured']:.3g} {verdict}")
    print(f"written: {ctx.out / 'benchmark.json'}")


# %% [markdown]
# ## C9. The comparison with the appendix, and the verdict
#
# When the appendix trained a model or ran a study, Part B runs again over everything: measurements,
# scores, figures, report and checklist. Then the run's verdict: an error that lists any missed
# checklist item.

# %%
@stage
def appendix_comparison(ctx):
    """Measure, score, draw, report and check again, with what the appendix added."""
    added = [n for n in ctx.models if n not in ctx.results["models"]]
    studies = [key for key in STUDY_SECTIONS if ctx.results.get(key)]
    if not (added or studies):
        return
    print("the comparison again, with " + ", ".join([title(n) for n in added] + studies))
    prepare_evaluation(ctx)
    for part in (measure_section, scores_section, figures_section, report_section, checklist_section):
        part(ctx)


@stage
def verdict(ctx):
    """The run's end: its wall time, and an error if the checklist missed an item."""
    if ctx.cfg.benchmark:
        return
    if ctx.results["models"]:
        save_results(ctx)  # again, with the times of every cell
    est = ctx.results.get("time_estimate")
    print(f"run finished in {(time.perf_counter() - ctx.started) / 60:.1f} min"
          + (f" (estimated before training: {minutes(est['total'])}, without {est['left_out']})" if est else ""))
    flush_drive(ctx.cfg)
    misses = [item for item, ok, _ in ctx.results.get("checklist", []) if not ok]
    if misses:
        raise AssertionError("assignment checklist: missed " + "; ".join(misses))
