"""The Colab GPU path, checked on a CPU: Drive mounted at the start and flushed at the end, checkpoints that
resume across precisions and devices, guards for mixed precision, the Colab metadata, exit statuses."""
import json
import subprocess
import sys
import types

import jupytext
import nbformat
import pytest
import torch
import torch.nn as nn

from conftest import DEFAULT_MODELS, NOTEBOOK, SCRIPT, SMOKE_EPOCHS, in_process, smoke_args, started


def fake_colab(monkeypatch, calls):
    drive = types.SimpleNamespace(mount=lambda path: calls.append(("mount", path)),
                                  flush_and_unmount=lambda: calls.append(("flush",)))
    colab = types.ModuleType("google.colab")
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)


@pytest.mark.e2e
def test_drive_is_mounted_first_and_flushed_last(nb, tiny_mnist, tmp_path, monkeypatch, capsys):
    calls = []
    fake_colab(monkeypatch, calls)
    monkeypatch.setattr(nb, "IN_COLAB", True)
    monkeypatch.setattr(nb, "DRIVE_MOUNT", tmp_path / "drive")
    real_fit = nb.fit

    def fit(*args, **kwargs):  # training starts only after the mount
        assert calls and calls[0][0] == "mount"
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(nb, "fit", fit)
    ctx = in_process(nb, ["--profile", "smoke", "--models", "vae", "--data-root", str(tiny_mnist), "--out", "o",
                          "--drive", "MyDrive/mnist-gen"])
    out = tmp_path / "drive" / "MyDrive" / "mnist-gen" / "o"
    assert calls[0] == ("mount", str(tmp_path / "drive")) and calls[-1] == ("flush",) and len(calls) == 2
    assert ctx.out == out and (out / "REPORT.md").is_file() and (out / "checkpoints" / "vae.pt").is_file()
    assert "disconnect" not in capsys.readouterr().out


def test_colab_without_drive_says_what_a_disconnect_loses(nb, tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nb, "IN_COLAB", True)
    cfg = nb.make_config(["--profile", "smoke", "--data-root", str(tiny_mnist), "--out", str(tmp_path)], env={})
    started(nb, cfg)
    said = capsys.readouterr().out
    assert "lost when the runtime disconnects" in said and "drive" in said and "resume" in said


def train(nb, ctx, name, path, *flags):
    """One batch an epoch: a CPU takes seconds for one fp16 step (it emulates float16)."""
    cfg = nb.make_config(["--profile", "smoke", "--data-root", str(ctx.cfg.data_root), "--out", str(path.parent),
                          "--max-batches", "1", *flags], env={})
    return nb.train_model(ctx, name, path, cfg)


@pytest.mark.e2e
@pytest.mark.parametrize("first, then", [("fp16", "off"), ("off", "fp16"), ("bf16", "fp16"), ("fp16", "bf16")])
def test_resume_across_precisions(nb, smoke_ctx, tmp_path, first, then):
    path = tmp_path / "vae.pt"
    train(nb, smoke_ctx, "vae", path, "--amp", first, "--epochs", "1", "--vae-width", "8")
    trained = train(nb, smoke_ctx, "vae", path, "--amp", then, "--epochs", "2", "--vae-width", "8", "--resume")
    assert trained.history.epochs_done == 2 and all(torch.isfinite(torch.tensor(trained.history.step["loss"])))
    assert (trained.model.scaler.scaler is not None) == (then == "fp16")


@pytest.mark.e2e
def test_generator_state_from_another_device(nb, smoke_ctx, tmp_path, capsys):
    ctx = smoke_ctx
    path = tmp_path / "ddpm.pt"
    train(nb, ctx, "ddpm", path, "--epochs", "1", "--ddpm-width", "16")
    state = torch.load(path, weights_only=True)
    state["noise_gen"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # restored only where CUDA is
    torch.save(state, path)
    trained = train(nb, ctx, "ddpm", path, "--epochs", "2", "--ddpm-width", "16", "--resume")
    assert trained.history.epochs_done == 2
    assert "ddpm noise_gen: the saved random state is another device's" in capsys.readouterr().out


def test_bf16_is_refused_below_ampere(nb, monkeypatch):
    monkeypatch.setattr(nb.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nb, "cuda_capability", lambda: (7, 5))  # a T4
    with pytest.raises(nb.SetupError, match=r"compute capability 8.0 or more.*this one has 7.5.*--amp fp16"):
        nb.make_config(["--amp", "bf16", "--device", "cuda"], env={})
    assert nb.make_config(["--amp", "fp16", "--device", "cuda"], env={}).amp == "fp16"
    assert nb.amp_dtype(nb.Config(), torch.device("cuda")) == torch.float16  # what auto picks on a T4


@pytest.mark.e2e
def test_non_finite_loss_under_mixed_precision_names_amp_off(nb, smoke_ctx, tmp_path, monkeypatch):
    real_step = nb.VAETrainer.step
    monkeypatch.setattr(nb.VAETrainer, "step", lambda self, xb, yb: {k: v * float("nan") for k, v in
                                                                     real_step(self, xb, yb).items()})
    ctx = smoke_ctx
    with pytest.raises(FloatingPointError, match=r"lower its learning rate, or train in float32 \(--amp off"):
        train(nb, ctx, "vae", tmp_path / "a.pt", "--amp", "bf16")
    with pytest.raises(FloatingPointError, match=r"lower its learning rate$"):
        train(nb, ctx, "vae", tmp_path / "b.pt", "--amp", "off")


def test_gradient_penalty_is_right_under_fp16(nb):
    """A critic whose input gradients are too small for float16: computed in fp16 they vanish, and the penalty
    would give the critic no gradient; the notebook's penalty keeps them (float32) under fp16 autocast."""
    critic = nn.Linear(784, 1, bias=False)
    with torch.no_grad():
        critic.weight.fill_(1e-8)  # ||a|| = 2.8e-7, below float16's smallest number
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.rand(8, 1, 28, 28, generator=gen), torch.rand(8, 1, 28, 28, generator=gen)
    with torch.autocast("cpu", dtype=torch.float16):
        penalty = nb.gradient_penalty(lambda x: critic(x.flatten(1)).squeeze(1), real, fake, gen)
        naive_x = real.half().requires_grad_(True)
        (naive,) = torch.autograd.grad(critic(naive_x.flatten(1)).sum(), naive_x)
    assert naive.abs().max() == 0  # what float16 makes of these gradients
    penalty.backward()
    assert penalty.item() == pytest.approx((28e-8 - 1) ** 2, rel=1e-6)
    assert critic.weight.grad.norm().item() == pytest.approx(2 * (1 - 28e-8), rel=1e-4)  # 2 | ||a|| - 1 |


def test_wgan_steps_under_fp16_loss_scaling(nb):
    cfg = nb.make_config(["--profile", "smoke", "--amp", "fp16", "--gan-width", "8", "--wgan-critic-width", "8"],
                         env={})  # narrow: a CPU emulates float16, slowly
    torch.manual_seed(0)
    trainer = nb.build_trainer("wgan", cfg, torch.device("cpu"))
    images, labels = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8), torch.arange(16) % 10
    for _ in range(3):
        losses = trainer.step(images, labels)
        assert all(torch.isfinite(v) for v in losses.values()) and losses["GP"].dtype == torch.float32


def test_the_notebook_asks_colab_for_a_gpu(tmp_path):
    for metadata in (nbformat.read(NOTEBOOK, as_version=4).metadata, jupytext.read(SCRIPT).metadata):
        assert metadata["accelerator"] == "GPU" and metadata["colab"]["gpuType"] == "T4"
    again = tmp_path / "again.ipynb"  # a sync from the script keeps it
    jupytext.write(jupytext.read(SCRIPT), again)
    assert nbformat.read(again, as_version=4).metadata["accelerator"] == "GPU"


@pytest.mark.e2e
def test_a_failure_while_running_keeps_its_own_exit_status(tiny_mnist, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", "--models", "ddpm", "--ddpm-lr", "1e30",
                           "--ddpm-width", "8", "--data-root", str(tiny_mnist), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "every model failed" in proc.stderr and "usage:" not in proc.stderr
    assert "non-finite" in json.loads((tmp_path / "o" / "results.json").read_text())["failed"]["ddpm"]


@pytest.mark.e2e
def test_time_estimates_before_training_and_after_the_first_epoch(nb, notebook_run, tiny_mnist):
    """Before any model trains, one line estimates the whole run; each model's cell estimates its time before
    training and again after its first epoch (the notebook run's output); the estimate and the actual time, and
    the cells' wall times, go into results.json and the report."""
    said = notebook_run.text
    assert said.index("time estimate for the whole run on this machine: about") < said.index("time estimate: VAE about")
    whole = notebook_run.results()["time_estimate"]
    assert whole["total"] > 0 and set(whole["models"]) == set(DEFAULT_MODELS) and whole["detectors"] > 0
    assert whole["actual"] == notebook_run.results()["total_seconds"] > 0
    assert "(estimated before training: " in said
    assert "Estimated before any model trained: " in (notebook_run.out / "REPORT.md").read_text()
    assert "time estimate after VAE's first epoch" in said and "time estimate after DDPM's first epoch" in said
    seconds = notebook_run.results()["stage_seconds"]
    assert {"start", "vae_section", "ddpm_section", "measure_section", "report_section"} <= set(seconds)
    assert seconds["appendix_comparison"] >= 0
    assert "## Where the time went" in (notebook_run.out / "REPORT.md").read_text()
    args = smoke_args(tiny_mnist, notebook_run.out, "--models", "vae")  # its checkpoints, read and left as they are
    est = nb.time_estimate(started(nb, nb.make_config(args, env={})), "vae")
    assert est["epochs_left"] == SMOKE_EPOCHS and est["step"] > 0 and est["total"] >= SMOKE_EPOCHS * est["epoch"] > 0
    resumed = started(nb, nb.make_config(args + ["--resume"], env={}))
    assert nb.time_estimate(resumed, "vae") is None  # finished: only loaded
