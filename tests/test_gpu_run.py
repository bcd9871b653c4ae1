""".ci/gpu-run, the GPU checks in one command that a device call can repeat: its logic on a CPU, in the smoke
profile (on a GPU machine it runs the full profile and tests/test_cuda.py)."""
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

GPU_RUN = ROOT / ".ci" / "gpu-run"
SMALL = "--models vae,ddpm --epochs 1 --n-samples 20 --ddpm-width 8"


@pytest.fixture(scope="module")
def gpu_run():
    loader = importlib.machinery.SourceFileLoader("gpu_run", str(GPU_RUN))
    spec = importlib.util.spec_from_loader("gpu_run", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def call(*args):
    return subprocess.run([sys.executable, str(GPU_RUN), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_estimates_are_read_from_the_runs_own_lines(gpu_run):
    log = "\n".join([
        "time estimate: VAE about 52 s on this machine (30 epochs of 468 steps at 4 ms, then 10000 samples); ...",
        "vae epoch 1/30: loss 181.4 (2 s of training)",
        "time estimate after VAE's first epoch (2 s, estimated 2 s): about 58 s more for it (29 epochs, then ...)",
        "time estimate: WGAN-GP about 3.8 min on this machine (30 epochs of 468 steps at 15 ms, then 10 samples)",
        "time estimate: VAE about 10 s on this machine (a resumed command: the first estimate stands)",
    ])
    assert gpu_run.estimates(log, {"VAE": "vae", "WGAN-GP": "wgan"}) == {
        "vae": {"before": 52.0, "after_first_epoch": 60.0}, "wgan": {"before": 228.0}}


@pytest.mark.parametrize("args, message", [
    (["{data}", "--limit", "0"], "--limit must be more than 0"),
    (["{data}", "--checkpoints"], "--checkpoints goes with --pack"),
    (["{nothing}"], "MNIST/raw/ not found"),
])
def test_bad_arguments_fail_before_any_work(gpu_run, tiny_mnist, tmp_path, capsys, args, message):
    args = [a.format(data=tiny_mnist, nothing=tmp_path / "nothing") for a in args]
    with pytest.raises(SystemExit) as stop:
        gpu_run.parse_args(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.e2e
def test_a_stopped_command_is_called_again_until_everything_is_done(tiny_mnist, tmp_path):
    out, pack = tmp_path / "gpu", tmp_path / "pack"
    first = call(tiny_mnist, "--out", out, "--profile", "smoke", "--run-args", SMALL, "--limit", "0.01")
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]  # "call again"
    assert "stopped at this command's limit" in first.stdout and not (out / "run" / "results.json").exists()
    state = json.loads((out / "gpu-run.json").read_text())
    assert not state["run_done"] and not state["tests_done"] and len(state["commands"]) == 1

    second = call(tiny_mnist, "--out", out, "--profile", "smoke", "--run-args", SMALL, "--pack", pack,
                  "--checkpoints")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "assignment checklist: all items met" in second.stdout and "skipped" in second.stdout  # no GPU here
    state = json.loads((out / "gpu-run.json").read_text())
    assert state["run_done"] and state["tests_done"] and state["tests_rc"] == 0 and len(state["commands"]) == 2
    summary = (out / "summary.md").read_text()
    assert "2 command(s)" in summary and "no CUDA GPU" in summary
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in summary.splitlines() if line.startswith("| ")]
    rows = {row[0]: row for row in cells[1:]}  # after the header
    assert {"start", "vae_section", "ddpm_section", "measure_section"} <= set(rows)
    for name in ("vae", "ddpm"):  # estimated before and after the first epoch, trained, timed
        assert all(float(cell) >= 0 for cell in rows[f"{name}_section"][1:]), rows[f"{name}_section"]
    assert rows["measure_section"][1] == "-"  # no estimate for a section that trains nothing
    assert "gan_section" not in rows  # not asked for: left out

    with tarfile.open(pack / "run.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu/run/results.json" in names and "gpu/summary.md" in names and "gpu/gpu-run.log" in names
    assert not any("checkpoints" in n for n in names) and (pack / "gpu-run.log").is_file()
    parts = sorted(pack.glob("checkpoints.tar*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert {"gpu/run/checkpoints/vae.pt", "gpu/run/checkpoints/ddpm.pt"} <= set(tar.getnames())

    third = call(tiny_mnist, "--out", out, "--profile", "smoke", "--run-args", SMALL)
    assert third.returncode == 0 and "everything was already done" in third.stdout
    assert "$ " not in third.stdout  # nothing run again
    assert len(json.loads((out / "gpu-run.json").read_text())["commands"]) == 3


def test_the_cuda_tests_need_no_notebook_tools():
    """The GPU machine has torch, numpy, pandas, matplotlib and pytest, not jupytext, nbformat, nbclient or
    papermill: conftest and test_cuda.py import without them."""
    blocked = "import sys; sys.modules.update(dict.fromkeys(['jupytext', 'nbformat', 'nbclient', 'papermill']))"
    proc = subprocess.run([sys.executable, "-c", f"{blocked}; sys.path.insert(0, 'tests'); import conftest, test_cuda"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
