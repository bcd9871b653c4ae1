"""The .py run as a script in the smoke profile (the .ipynb runs in a kernel in test_layout.py)."""
import json
import os
import subprocess
import sys

import jupytext
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import NOTEBOOK, ROOT, SCRIPT

FIGURES = ["vae_samples.png", "gan_samples.png", "cgan_grid.png", "ddpm_samples.png",
           "comparison.png", "loss_curves.png", "epoch_fid.png", "controllability.png",
           "scores_3d.png", "scores_radar.png", "vae_latent_3d.png", "vae_reconstructions.png",
           "annotated_samples.png"]
AXES = ("clarity", "control", "stability", "efficiency")


def check_outputs(out, n_samples):
    for figure in FIGURES:
        assert (out / figure).stat().st_size > 1000, figure
    for name in ("vae", "gan", "cgan", "ddpm"):
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
        assert state["model"] == name and state["finished"] and state["epoch"] == 1
        nets = {"vae": ["vae"], "gan": ["generator", "discriminator"], "cgan": ["generator", "discriminator"],
                "ddpm": ["unet", "unet_ema"]}[name]
        assert all(isinstance(state[k], dict) and state[k] for k in nets)
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"vae", "gan", "cgan", "ddpm"}
    assert results["config"]["seed"] == 42 and results["environment"]["torch"] == torch.__version__
    assert results["models"]["ddpm"]["sampler"].startswith("DDIM")
    for name, m in results["models"].items():
        assert m["train_seconds"] > 0 and m["parameters"] > 0 and np.isfinite(m["fid"]), name
        assert len(results["histories"][name]["epoch"]["G" if "gan" in name else "loss"]) == 1
        assert len(m["epoch_fid"]) == 1 and m["seconds_per_image_batch1"] > 0 and m["peak_memory_mb"] > 0
        assert m["peak_memory_kind"].startswith("tensors of one training step") and m["epoch_drift"] is None
    check_metrics_files(out, {"vae", "gan", "cgan", "ddpm"})
    return results


def check_metrics_files(out, models):
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]) == models
    assert all(0 <= metrics["scores"][m][a] <= 1 for m in models for a in AXES)
    env = metrics["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["seed"] == 42
    assert {"profile", "n_samples", "threads"} <= set(env) and set(metrics["score_formulas"]) == set(AXES)
    table = pd.read_csv(out / "metrics.csv", index_col="model")
    assert set(table.index) == models | {"real MNIST"}
    for column in ("clarity_fid", "clarity_inception_score", "clarity_precision", "stability_recall",
                   "control_score", "efficiency_ms_per_image_batch1", "efficiency_peak_memory_mb"):
        assert table.loc[sorted(models), column].notna().all(), column
    report = (out / "REPORT.md").read_text()
    for heading in ("**Clarity.**", "**Controllability.**", "**Efficiency.**", "**Stability.**"):
        assert heading in report
    assert "![" in report and "nan" not in report.lower()


def test_script_smoke_run(tiny_mnist, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--data-root", str(tiny_mnist),
         "--out", str(out), "--n-samples", "30"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "assignment checklist: all items met" in proc.stdout
    check_outputs(out, 30)


def test_script_repeats_seeds_and_reports_the_spread(tiny_mnist, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--data-root", str(tiny_mnist),
         "--out", str(out), "--models", "vae,cgan", "--seeds", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spread = json.loads((out / "results.json").read_text())["seed_spread"]
    assert set(spread) == {"vae", "cgan"}
    for s in spread.values():
        assert s["seeds"] == [42, 43] and len(s["fid"]) == 2 and s["summary"]["fid"]["std"] >= 0
    table = pd.read_csv(out / "metrics.csv", index_col="model")
    assert table.loc[["vae", "cgan"], "stability_seed_fid_std"].notna().all()
    check_metrics_files(out, {"vae", "cgan"})


BENCH_FIELDS = {"parameters", "step_seconds_median", "train_images_per_second", "epoch_seconds_estimate",
                "seconds_per_image", "sample_batch", "peak_memory_mb"}


def test_benchmark_writes_every_field(tiny_mnist, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--benchmark", "--profile", "smoke", "--data-root", str(tiny_mnist),
         "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads((out / "benchmark.json").read_text())
    assert {"device", "torch", "threads"} <= set(bench["environment"])
    assert set(bench["models"]) == {"vae", "gan", "cgan", "ddpm", "evaluator"}
    for name, row in bench["models"].items():
        assert BENCH_FIELDS <= set(row), (name, BENCH_FIELDS - set(row))
        assert all(row[f] > 0 for f in BENCH_FIELDS), name
    assert bench["models"]["ddpm"]["ancestral_seconds_per_image"] > 0 and bench["models"]["ddpm"]["ddim_steps"] == 5
    data = bench["data_path"]
    assert data["naive_dataloader_seconds"] > 0 and data["project_seconds"] > 0 and data["speedup"] > 0
    assert all("measured" in t and "met" in t for t in bench["targets"].values())
    assert not (out / "results.json").exists()  # the benchmark replaces the run, it does not add to it


@pytest.mark.parametrize("args, message", [
    (["--models", "vae,foo"], "unknown model"),
    (["--epochs", "0"], "epochs must be 1 or more"),
    (["--epochs", "abc"], "not a valid int for epochs"),
    (["--data-root", "{empty}"], "could not load MNIST"),
])
def test_script_refuses_bad_input(args, message, tmp_path):
    args = [a.replace("{empty}", str(tmp_path / "nothing")) for a in args]
    env = dict(os.environ, no_proxy="*", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", "--out", str(tmp_path / "o")] + args,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2  # like argparse's own errors: a setting or an input that cannot work
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: ") and "error: " in proc.stderr


def test_notebook_and_script_hold_the_same_code():
    def code(nb):
        return [c.source.strip() for c in nb.cells if c.cell_type == "code"]

    from_ipynb = jupytext.read(NOTEBOOK)
    from_py = jupytext.read(SCRIPT)
    assert code(from_ipynb) == code(from_py), "run `jupytext --sync` and commit both files"
    assert [c.source.strip() for c in from_ipynb.cells if c.cell_type == "markdown"] == \
        [c.source.strip() for c in from_py.cells if c.cell_type == "markdown"]
    assert ROOT.joinpath(".jupytext.toml").is_file()
