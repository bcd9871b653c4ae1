"""The script end to end: what its run writes, its exit statuses, and the benchmark that replaces a run.
(The notebook run through papermill is in test_layout.py; resuming and determinism in test_faults.py.)"""
import json
import os
import subprocess
import sys

import jupytext
import pytest

from conftest import (NOTEBOOK, ROOT, SCRIPT, SMOKE_EPOCHS, SMOKE_SAMPLES, check_outputs, in_process)


@pytest.mark.e2e
def test_script_smoke_run(resumed_script_run):
    """The script, run to its end (the resumed half of the shared script run), writes everything."""
    assert "assignment checklist: all items met" in resumed_script_run.resumed.stdout
    check_outputs(resumed_script_run.out, SMOKE_SAMPLES, SMOKE_EPOCHS)


BENCH_FIELDS = {"parameters", "step_seconds_median", "train_images_per_second", "epoch_seconds_estimate",
                "seconds_per_image", "sample_batch", "peak_memory_mb"}


@pytest.mark.e2e
def test_benchmark_writes_every_field(nb, tiny_mnist, tmp_path):
    out = tmp_path / "bench"
    in_process(nb, ["--benchmark", "--profile", "smoke", "--data-root", str(tiny_mnist), "--out", str(out)])
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


def test_setup_errors_end_the_script_like_argparse(nb, capsys, monkeypatch):
    """The script's excepthook: a SetupError prints the usage line and the message, no traceback, exit status 2
    (as argparse does); anything else keeps Python's own report, and its exit status 1."""
    with pytest.raises(SystemExit) as stop:
        nb.script_error(nb.SetupError, nb.SetupError("epochs must be 1 or more"), None)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "\nerror: epochs must be 1 or more\n" in err and "Traceback" not in err
    reported = []
    monkeypatch.setattr(sys, "__excepthook__", lambda *exc: reported.append(exc[0]))
    nb.script_error(ValueError, ValueError("a bug"), None)
    assert reported == [ValueError]


@pytest.mark.e2e
def test_script_refuses_bad_input(tmp_path):
    """A bad input met by a stage (no MNIST, and no network to fetch it) ends the script itself with status 2,
    the usage line and one message: the excepthook is installed before the settings are read and any work."""
    env = dict(os.environ, no_proxy="*", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", "--out", str(tmp_path / "o"),
                           "--data-root", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2  # like argparse's own errors: a setting or an input that cannot work
    assert "could not load MNIST" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: ") and "error: " in proc.stderr


def test_notebook_and_script_hold_the_same_code():
    def code(nb):
        return [c.source.strip() for c in nb.cells if c.cell_type == "code"]

    from_ipynb = jupytext.read(NOTEBOOK)
    from_py = jupytext.read(SCRIPT)
    assert code(from_ipynb) == code(from_py), "run `.ci/sync-notebook` and commit both files"
    assert [c.source.strip() for c in from_ipynb.cells if c.cell_type == "markdown"] == \
        [c.source.strip() for c in from_py.cells if c.cell_type == "markdown"]
    assert ROOT.joinpath(".jupytext.toml").is_file()
