"""Shared fixtures: the notebook's .py imported without running, tiny MNIST IDX files, and the whole runs that
several tests read: one notebook run and one killed-then-resumed script run, each made once per test session.

Two kinds of test (README, "Tests"):
* unit tests, unmarked: shapes, maths, metrics, settings, scores, layout. `pytest -m "not e2e"` runs only
  these, in well under a minute: the loop to run while editing;
* `@pytest.mark.e2e` tests: anything that trains a model, runs the notebook's stages, the script or a kernel.
"""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "mnist_generative_models_complete.py"
NOTEBOOK = ROOT / "MNIST_Generative_Models_Complete.ipynb"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: trains models or runs stages, the script or the notebook (the fast "
                                       "loop, pytest -m \"not e2e\", leaves these out)")


@pytest.fixture(scope="session")
def nb():
    """The notebook's code as a module; its guarded cells do not run on import."""
    spec = importlib.util.spec_from_file_location("mnist_gen", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mnist_gen"] = module
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array in the IDX format of the MNIST files (uint8 payload)."""
    code = {1: 0x0801, 3: 0x0803}[array.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", code))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_digits(n: int, seed: int):
    """n 28x28 uint8 images of a crude per-class pattern (a bar at a class-specific row), with labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 30, size=(n, 28, 28))
    for i, y in enumerate(labels):
        images[i, 4 + 2 * y:6 + 2 * y, 6:22] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def make_mnist_root(root: Path, n_train: int = 512, n_test: int = 128, folder: str = "MNIST") -> Path:
    """Tiny IDX files in root/<folder>/raw/ (folder FashionMNIST for --dataset fashion)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    return make_mnist_root(tmp_path_factory.mktemp("data"))


def started(nb, cfg):
    """A run context after its first stage: device picked, data loaded (what each later stage needs)."""
    ctx = nb.Run(cfg)
    nb.start(ctx)
    return ctx


@pytest.fixture(scope="session")
def smoke_ctx(nb, tiny_mnist, tmp_path_factory):
    """One started smoke-profile context on the tiny data, for tests that train a model into a checkpoint path
    of their own: train_model and time_estimate read the context and leave it as it was."""
    out = tmp_path_factory.mktemp("smoke-ctx")
    return started(nb, nb.make_config(["--profile", "smoke", "--data-root", str(tiny_mnist), "--out", str(out)],
                                      env={}))


def in_process(nb, argv, capsys=None):
    """A whole run of the notebook's stages in this process, as `run(ctx)` replays them (no interpreter to
    start, no imports to redo); returns the context and, with capsys, all it printed."""
    ctx = nb.run(nb.Run(nb.make_config(argv, env={})))
    if capsys is None:
        return ctx
    said = capsys.readouterr()
    return ctx, said.out + said.err


# --- the two shared runs ----------------------------------------------------------------

DEFAULT_MODELS = ("vae", "gan", "cgan", "ddpm")
SMOKE_EPOCHS = 2  # two: a run can be stopped between a model's epochs, and the last epoch's drift is measured
SMOKE_SAMPLES = 20


def smoke_args(data_root, out, *extra) -> list:
    """The script's flags for the settings of the shared runs (the notebook run gets the same through papermill)."""
    return ["--profile", "smoke", "--epochs", str(SMOKE_EPOCHS), "--n-samples", str(SMOKE_SAMPLES),
            "--data-root", str(data_root), "--out", str(out), *extra]


@dataclass
class NotebookRun:
    out: Path  # its output folder: read it, never write to it (copy what a test changes)
    notebook: dict  # the executed notebook (an nbformat.NotebookNode), with every cell's outputs
    text: str  # every cell's printed text, in order

    def results(self) -> dict:
        return json.loads((self.out / "results.json").read_text())


@pytest.fixture(scope="session")
def notebook_run(tiny_mnist, tmp_path_factory) -> NotebookRun:
    """The notebook run as a user runs it, once per test session: papermill -p sets the settings cell (tagged
    `parameters`), the rest comes from MNIST_GEN_* variables; smoke profile, the four default models."""
    base = tmp_path_factory.mktemp("notebook-run")
    out, executed = base / "out", base / "executed.ipynb"
    env = dict(os.environ, MNIST_GEN_N_SAMPLES=str(SMOKE_SAMPLES), MNIST_GEN_PROGRESS="off")
    proc = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOK), str(executed), "-k", "python3",
                           "--cwd", str(base), "-p", "profile", "smoke", "-p", "models", ",".join(DEFAULT_MODELS),
                           "-p", "epochs", str(SMOKE_EPOCHS), "-p", "data_root", str(tiny_mnist), "-p", "out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import nbformat  # here, not at the top: the GPU machine runs test_cuda.py without the notebook tools
    notebook = nbformat.read(executed, as_version=4)
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    return NotebookRun(out, notebook, text)


# Runs the script as `python script args`, but kills its own process (SIGKILL: as hard as a lost Colab runtime,
# no clean-up runs) the moment the file `stop_at` has been written (save_checkpoint writes a temporary file and
# renames it with os.replace). The stop comes at the same point of every run: no clock, no race.
KILLED_AFTER = """
import os, runpy, signal, sys
stop_at, script, *args = sys.argv[1:]
rename = os.replace

def replace(src, dst):
    rename(src, dst)
    if os.path.abspath(dst) == stop_at:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


@dataclass
class ResumedScriptRun:
    out: Path
    killed: subprocess.CompletedProcess  # the first run, killed after the DDPM's first epoch was saved
    interrupted_at: int  # the epoch that DDPM checkpoint held when the first run was killed
    results_after_kill: bool  # whether the killed run had written results.json
    resumed: subprocess.CompletedProcess  # the same command again with --resume


@pytest.fixture(scope="session")
def resumed_script_run(tiny_mnist, tmp_path_factory) -> ResumedScriptRun:
    """The script with the notebook run's settings, killed right after the DDPM (the last model) saved its first
    epoch, then run again with --resume to its end: VAE, GAN and cGAN were trained, uninterrupted, by the killed
    process, and the DDPM by both."""
    base = tmp_path_factory.mktemp("script-run")
    out = base / "out"
    checkpoint = out / "checkpoints" / "ddpm.pt"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER, str(checkpoint.absolute()), str(SCRIPT),
                             *smoke_args(tiny_mnist, out)], capture_output=True, text=True, timeout=600, cwd=base)
    interrupted_at = torch.load(checkpoint, weights_only=True)["epoch"] if checkpoint.exists() else None
    results_after_kill = (out / "results.json").exists()
    resumed = subprocess.run([sys.executable, str(SCRIPT), *smoke_args(tiny_mnist, out, "--resume")],
                             capture_output=True, text=True, timeout=600, cwd=base)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return ResumedScriptRun(out, killed, interrupted_at, results_after_kill, resumed)


def copy_run(out: Path, to: Path) -> Path:
    """A copy of a shared run's output folder, for a test that changes it."""
    shutil.copytree(out, to)
    return to


# --- what every whole run writes ----------------------------------------------------------

FIGURES = ["vae_samples.png", "gan_samples.png", "cgan_grid.png", "ddpm_samples.png",
           "comparison.png", "loss_curves.png", "epoch_fid.png", "controllability.png",
           "scores_3d.png", "scores_radar.png", "vae_latent_3d.png", "vae_reconstructions.png",
           "annotated_samples.png", "clarity_ranges.png", "memorisation.png",
           # how each model works and how it learned (section 7), quality per second (Part B), play (section 14)
           "data_digits.png", "vae_losses.png", "gan_losses.png", "cgan_losses.png", "ddpm_losses.png",
           "vae_epochs.png", "gan_epochs.png", "cgan_epochs.png", "ddpm_epochs.png", "vae_latent_walk.png",
           "cgan_style.png", "ddpm_forward.png", "ddpm_schedule.png", "ddpm_reverse.png", "fid_per_second.png",
           "play_cgan.png", "play_ddpm.png", "play_vae.png", "ddpm_noise_error.png", "vae_samplers.png",
           "pixel_values.png", "vae_latent_2d.png", "gan_d_outputs.png", "cgan_d_outputs.png", "noise_paths.png"]
GIFS = [f"{name}_epochs.gif" for name in ("vae", "gan", "cgan", "ddpm")]
AXES = ("clarity", "control", "stability", "efficiency")
NETWORKS = {"vae": ["vae"], "gan": ["generator", "discriminator"], "cgan": ["generator", "discriminator"],
            "ddpm": ["unet", "unet_ema"]}


def check_outputs(out: Path, n_samples: int, epochs: int) -> dict:
    """A run of the four default models wrote every figure, sample file, checkpoint and results file."""
    for figure in FIGURES:
        assert (out / figure).stat().st_size > 1000, figure
    for name in DEFAULT_MODELS:
        with np.load(out / "samples" / f"{name}.npz") as data:
            images = data["images"]
            assert images.dtype == np.uint8 and images.shape == (n_samples, 28, 28)
            if name == "cgan":
                labels = data["labels"]
                assert labels.dtype == np.int64 and labels.shape == (n_samples,)
                counts = np.bincount(labels, minlength=10)
                assert counts.max() - counts.min() <= 1  # balanced over 0-9
            else:
                assert "labels" not in data.files
        state = torch.load(out / "checkpoints" / f"{name}.pt", weights_only=True)
        assert state["model"] == name and state["finished"] and state["epoch"] == epochs
        assert all(isinstance(state[k], dict) and state[k] for k in NETWORKS[name])
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == set(DEFAULT_MODELS)
    listed = {f["file"] for f in results["figures"]}
    for figure in FIGURES + GIFS:  # every figure is listed in results.json and shown in the report
        assert figure in listed and f"]({figure})" in (out / "REPORT.md").read_text(), figure
    for gif in GIFS:
        assert (out / gif).stat().st_size > 1000, gif
    assert results["config"]["seed"] == 42 and results["environment"]["torch"] == torch.__version__
    assert results["models"]["ddpm"]["sampler"].startswith("DDIM")
    for name, m in results["models"].items():
        assert m["train_seconds"] > 0 and m["parameters"] > 0 and np.isfinite(m["fid"]), name
        assert len(results["histories"][name]["epoch"]["G" if "gan" in name else "loss"]) == epochs
        assert len(m["epoch_fid"]) == epochs and m["seconds_per_image_batch1"] > 0 and m["peak_memory_mb"] > 0
        assert m["peak_memory_kind"].startswith("tensors of one training step")
        check_epoch_drift(m, epochs)
    check_metrics_files(out, set(DEFAULT_MODELS))
    return results


def check_epoch_drift(model_results: dict, epochs: int):
    """The FID between the last two epochs' samples: measured from two epochs on, left out (None) after one."""
    drift = model_results["epoch_drift"]
    if epochs == 1:
        assert drift is None
    else:
        assert drift["fid"] >= 0 and drift["real_gap"] > 0 and drift["n"] > 0


def check_metrics_files(out: Path, models: set, real: str = "real MNIST"):
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]) == models
    assert all(0 <= metrics["scores"][m][a] <= 1 for m in models for a in AXES)
    env = metrics["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["seed"] == 42
    assert {"profile", "n_samples", "threads"} <= set(env) and set(metrics["score_formulas"]) == set(AXES)
    table = pd.read_csv(out / "metrics.csv", index_col="model")
    assert set(table.index) == models | {real}
    for column in ("clarity_fid", "clarity_inception_score", "clarity_precision", "stability_recall",
                   "control_score", "efficiency_ms_per_image_batch1", "efficiency_peak_memory_mb"):
        assert table.loc[sorted(models), column].notna().all(), column
    report = (out / "REPORT.md").read_text()
    for heading in ("**Clarity.**", "**Controllability.**", "**Efficiency.**", "**Stability.**",
                    "**Memorisation.**"):
        assert heading in report
    assert "![" in report and "nan" not in report.lower()


def samples(out: Path, name: str) -> np.ndarray:
    with np.load(out / "samples" / f"{name}.npz") as data:
        return data["images"]


def weights(path: Path) -> dict:
    """The networks' tensors a checkpoint holds (both of a GAN's players, the DDPM's live and averaged U-Nets)."""
    state = torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("vae", "unet", "unet_ema", "generator", "discriminator") if part in state
            for k, v in state[part].items()}
