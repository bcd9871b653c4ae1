"""The GPU path, where a CUDA GPU is present (skipped elsewhere): every model's step in fp16 with loss scaling
and in bf16, checkpoints carried between CPU and CUDA, and the smoke profile end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import SCRIPT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_every_model_steps_on_cuda(nb, amp):
    if amp == "bf16" and not nb.cuda_has_bf16():
        pytest.skip("this GPU has no native bf16 (the run refuses --amp bf16 here)")
    cfg = nb.make_config(["--profile", "smoke", "--amp", amp, "--device", "cuda"], env={})
    device = torch.device("cuda")
    images = torch.randint(0, 256, (128, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.arange(128, device=device) % 10
    for name in nb.MODELS:
        torch.manual_seed(0)
        trainer = nb.build_trainer(name, cfg, device)
        scalers = [v for v in trainer.parts.values() if isinstance(v, nb.LossScaler)]
        assert all((s.scaler is not None) == (amp == "fp16") for s in scalers), name
        params = [p for m in trainer.modules for p in m.parameters()]
        before = [p.detach().clone() for p in params]
        for _ in range(8):  # fp16: the scaler may skip the first steps while it finds its scale
            losses = trainer.step(images, labels)
            assert all(torch.isfinite(v) for v in losses.values()), (name, losses)
        assert any(not torch.equal(a, b) for a, b in zip(before, params)), name
        for module in trainer.modules:
            module.eval()
        with torch.no_grad():
            images_out = nb.draw(trainer, 4, torch.Generator(device).manual_seed(0), nb.Sampler("ddim", 3),
                                 labels[:4] if nb.MODELS[name].conditional else None)
        assert images_out.shape == (4, 28, 28) and images_out.dtype == np.uint8


def run(args, cwd):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", *args], capture_output=True,
                          text=True, timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.e2e
def test_smoke_profile_end_to_end_on_cuda(tiny_mnist, tmp_path):
    out = tmp_path / "out"
    proc = run(["--data-root", str(tiny_mnist), "--out", str(out), "--device", "cuda", "--n-samples", "30"], tmp_path)
    assert "assignment checklist: all items met" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["device"].startswith("cuda") and "gpu" in results["environment"]
    assert all(m["peak_memory_kind"] == "CUDA peak allocated" for m in results["models"].values())


@pytest.mark.e2e
def test_checkpoints_move_between_cpu_and_cuda(tiny_mnist, tmp_path):
    base = ["--models", "vae,gan,ddpm", "--data-root", str(tiny_mnist), "--max-batches", "3"]
    out = tmp_path / "cpu-then-cuda"
    run([*base, "--out", str(out), "--device", "cpu", "--epochs", "1"], tmp_path)
    proc = run([*base, "--out", str(out), "--device", "cuda", "--epochs", "2", "--resume"], tmp_path)
    assert "ddpm: resumed" in proc.stdout and "after epoch 1 of 2" in proc.stdout
    state = torch.load(out / "checkpoints" / "ddpm.pt", weights_only=True)
    assert state["epoch"] == 2 and state["finished"]
    out = tmp_path / "cuda-then-cpu"
    run([*base, "--out", str(out), "--device", "cuda", "--epochs", "1", "--amp", "fp16"], tmp_path)
    proc = run([*base, "--out", str(out), "--device", "cpu", "--epochs", "2", "--resume"], tmp_path)
    assert "vae: resumed" in proc.stdout and "after epoch 1 of 2" in proc.stdout
