"""The .py run as a script, and the .ipynb run in a real Jupyter kernel, both in the smoke profile."""
import json
import os
import subprocess
import sys

import jupytext
import nbformat
import numpy as np
import pytest
import torch

from conftest import NOTEBOOK, ROOT, SCRIPT

FIGURES = ["vae_samples.png", "gan_samples.png", "cgan_grid.png", "ddpm_samples.png",
           "comparison.png", "loss_curves.png"]


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
        assert all(isinstance(v, dict) for k, v in state.items() if k != "config")
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"vae", "gan", "cgan", "ddpm"}
    assert results["config"]["seed"] == 42 and results["environment"]["torch"] == torch.__version__
    assert results["models"]["ddpm"]["sampler"].startswith("DDIM")
    for name, m in results["models"].items():
        assert m["train_seconds"] > 0 and m["parameters"] > 0 and np.isfinite(m["fid"]), name
        assert len(results["histories"][name]["epoch"]["G" if "gan" in name else "loss"]) == 1
    return results


def test_script_smoke_run(tiny_mnist, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--data-root", str(tiny_mnist),
         "--out", str(out), "--n-samples", "30"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "assignment checklist: all items met" in proc.stdout
    check_outputs(out, 30)


@pytest.mark.parametrize("args, message", [
    (["--models", "vae,foo"], "unknown model"),
    (["--epochs", "0"], "epochs must be 1 or more"),
    (["--data-root", "{empty}"], "could not load MNIST"),
])
def test_script_refuses_bad_input(args, message, tmp_path):
    args = [a.replace("{empty}", str(tmp_path / "nothing")) for a in args]
    env = dict(os.environ, no_proxy="*", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", "--out", str(tmp_path / "o")] + args,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_notebook_runs_in_a_kernel(tiny_mnist, tmp_path):
    from nbclient import NotebookClient

    out = tmp_path / "nb-out"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {"MNIST_GEN_PROFILE": "smoke", "MNIST_GEN_DATA_ROOT": str(tiny_mnist),
           "MNIST_GEN_OUT": str(out), "MNIST_GEN_N_SAMPLES": "20"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    check_outputs(out, 20)
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "assignment checklist: all items met" in text
    images = sum(1 for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images >= len(FIGURES)  # figures are shown inline, not only saved


def test_notebook_and_script_hold_the_same_code():
    def code(nb):
        return [c.source.strip() for c in nb.cells if c.cell_type == "code"]

    from_ipynb = jupytext.read(NOTEBOOK)
    from_py = jupytext.read(SCRIPT)
    assert code(from_ipynb) == code(from_py), "run `jupytext --sync` and commit both files"
    assert [c.source.strip() for c in from_ipynb.cells if c.cell_type == "markdown"] == \
        [c.source.strip() for c in from_py.cells if c.cell_type == "markdown"]
    assert ROOT.joinpath(".jupytext.toml").is_file()
