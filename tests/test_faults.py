"""Nothing lost: resumable training, safe checkpoints, clear errors on bad input, determinism."""
import json
import signal

import numpy as np
import pytest
import torch

from conftest import (DEFAULT_MODELS, SMOKE_EPOCHS, copy_run, in_process, make_mnist_root, samples, smoke_args,
                      weights)


@pytest.mark.e2e
def test_resume_after_a_kill_matches_an_uninterrupted_run(resumed_script_run, notebook_run):
    """The script killed right after the DDPM saved its first epoch, then resumed, ends with exactly the weights,
    samples, losses and per-epoch FIDs of the notebook's uninterrupted run with the same settings."""
    run = resumed_script_run
    assert run.killed.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert run.interrupted_at == 1 < SMOKE_EPOCHS and not run.results_after_kill
    ddpm_checkpoint = run.out / "checkpoints" / "ddpm.pt"
    stdout = run.resumed.stdout
    assert f"ddpm: resumed from {ddpm_checkpoint} after epoch {run.interrupted_at} of {SMOKE_EPOCHS}" in stdout
    for name in ("vae", "gan", "cgan"):  # finished before the kill: loaded, not retrained
        assert f"{name}: resumed from {run.out / 'checkpoints' / name}.pt after epoch {SMOKE_EPOCHS} of " \
               f"{SMOKE_EPOCHS}" in stdout
    whole, cut = notebook_run.results(), json.loads((run.out / "results.json").read_text())
    for name in DEFAULT_MODELS:
        a, b = weights(notebook_run.out / "checkpoints" / f"{name}.pt"), weights(run.out / "checkpoints" / f"{name}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert np.array_equal(samples(notebook_run.out, name), samples(run.out, name)), name
        assert whole["histories"][name]["step"] == cut["histories"][name]["step"], name
        assert whole["models"][name]["epoch_fid"] == pytest.approx(cut["models"][name]["epoch_fid"]), name


@pytest.mark.e2e
def test_two_runs_give_identical_results(resumed_script_run, notebook_run):
    """VAE, GAN and cGAN, trained without a stop by the script's first process and by the notebook's kernel,
    two runs on their own: the same weights of every network, and the same samples."""
    for name in ("vae", "gan", "cgan"):
        a, b = (weights(run.out / "checkpoints" / f"{name}.pt") for run in (notebook_run, resumed_script_run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert np.array_equal(samples(notebook_run.out, name), samples(resumed_script_run.out, name)), name


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 half a file", "vae.pt is not a readable checkpoint"),
    ("foreign", "is not a training checkpoint of vae"),
])
def test_damaged_checkpoint_gives_one_line(nb, smoke_ctx, tmp_path, content, message):
    """--resume with a corrupt or a foreign file where vae.pt should be: a SetupError that names the file and
    says what to do (the script prints it as one line, exit status 2: test_end_to_end)."""
    path = tmp_path / "vae.pt"
    if content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        path.write_bytes(content)
    cfg = nb.make_config(["--profile", "smoke", "--resume", "1", "--out", str(tmp_path)], env={})
    with pytest.raises(nb.SetupError, match=message) as err:
        nb.train_model(smoke_ctx, "vae", path, cfg)
    assert "delete" in str(err.value) and "--resume" in str(err.value)


@pytest.mark.e2e
def test_checkpoint_from_other_settings_is_refused(nb, smoke_ctx, tmp_path):
    nb.train_model(smoke_ctx, "vae", tmp_path / "vae.pt")
    other = nb.make_config(["--profile", "smoke", "--resume", "1"], env={})
    other.vae_lr = 5e-4
    with pytest.raises(nb.SetupError, match="vae_lr 0.001 -> 0.0005"):
        nb.train_model(smoke_ctx, "vae", tmp_path / "vae.pt", other)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:len(data) // 2], "is truncated"),
    (lambda data: b"\x00\x00\x08\x01" + data[4:], "is not an MNIST IDX image file"),
    (lambda data: data + b"\x00" * 10, "is too long"),
])
def test_damaged_data_file_is_named(nb, tmp_path, damage, message):
    """The file is named, with what is wrong with it and how to fix it, by load_mnist and so by the run's first
    stage, before any work (the script prints that SetupError as one line, exit status 2: test_end_to_end)."""
    root = make_mnist_root(tmp_path / "data", n_train=64, n_test=32)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(nb.SetupError, match=message) as err:
        nb.load_mnist(str(root))
    assert str(path) in str(err.value) and "--data-root" in str(err.value)
    cfg = nb.make_config(["--profile", "smoke", "--data-root", str(root), "--out", str(tmp_path / "o")], env={})
    with pytest.raises(nb.SetupError, match=message):
        nb.start(nb.Run(cfg))


@pytest.mark.e2e
def test_non_finite_loss_stops_one_model_and_the_others_go_on(nb, tiny_mnist, tmp_path, monkeypatch):
    real_step = nb.VAETrainer.step

    def poisoned(self, xb, yb):
        losses = real_step(self, xb, yb)
        losses["loss"] = losses["loss"] * float("nan")  # as a diverging learning rate would do
        return losses

    monkeypatch.setattr(nb.VAETrainer, "step", poisoned)
    cfg = nb.make_config(["--profile", "smoke", "--models", "vae,cgan", "--data-root", str(tiny_mnist),
                          "--out", str(tmp_path / "out")], env={})
    ctx = nb.Run(cfg)
    with pytest.raises(AssertionError, match="missed vae trained to the end"):  # the verdict, in the last cell
        nb.run(ctx)
    results = ctx.results
    assert set(results["models"]) == {"cgan"} and "non-finite" in results["failed"]["vae"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "non-finite" in metrics["failed"]["vae"]
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "VAE: every metric; training stopped" in report
    assert (tmp_path / "out" / "cgan_grid.png").is_file()  # the cells after the failure went on
    assert any(item.startswith("vae trained") and not ok for item, ok, _ in results["checklist"])


def test_drive_setting_outside_colab_is_refused(nb):
    cfg = nb.make_config(["--drive", "MyDrive/x"], env={})
    with pytest.raises(nb.SetupError, match="Colab"):
        nb.use_drive(cfg)


@pytest.mark.e2e
def test_pretrained_run_loads_and_redoes_everything(nb, notebook_run, tmp_path, capsys):
    """--pretrained on a copy of the notebook run's folder without its samples and report: every checkpoint
    loaded, nothing trained, the same samples drawn again, every file written again."""
    out = copy_run(notebook_run.out, tmp_path / "out")
    for name in ("vae", "cgan"):
        (out / "samples" / f"{name}.npz").unlink()
    (out / "REPORT.md").unlink()
    data_root = notebook_run.results()["config"]["data_root"]
    _, said = in_process(nb, smoke_args(data_root, out, "--models", "vae,cgan", "--pretrained"), capsys)
    assert "vae: resumed" in said and "cgan: resumed" in said and "epoch 1/" not in said  # nothing trained
    assert "pretrained: nothing is trained here" in said.split("MNIST:")[0]  # said before anything else runs
    for name in ("vae", "cgan"):
        assert np.array_equal(samples(notebook_run.out, name), samples(out, name)), name
    assert (out / "REPORT.md").is_file() and (out / "vae_reconstructions.png").is_file()
    with pytest.raises(nb.SetupError, match="--pretrained: no checkpoint of vae"):
        in_process(nb, smoke_args(data_root, tmp_path / "empty", "--models", "vae", "--pretrained"))
