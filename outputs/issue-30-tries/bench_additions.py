"""Time what issue 30 adds to a cpu-profile run, side by side in one process (2 cores)."""
import sys, time, json, dataclasses, tempfile
sys.path.insert(0, "/work/main")
import numpy as np, torch
import mnist_generative_models_complete as nb
from pathlib import Path
cfg = nb.make_config(["--profile", "cpu", "--data-root", "/work/shared/data"], env={})
train = nb.load_mnist("/work/shared/data", True); test = nb.load_mnist("/work/shared/data", False)
out = {}
tmp = Path(tempfile.mkdtemp())
def timed(label, fn, repeat=1):
    t0 = time.perf_counter()
    for _ in range(repeat):
        r = fn()
    out[label] = (time.perf_counter() - t0) / repeat
    print(f"{label}: {out[label]:.2f} s", flush=True)
    return r
# DDPM: noise error per timestep (a fresh network: the cost does not depend on the weights)
ddpm = nb.build_trainer("ddpm", cfg, torch.device("cpu"))
digits = nb.to_signed(nb.reference_digits(test[0], 500, 50))
rows = timed("noise_error_per_timestep (500 digits, 24 timesteps)", lambda: nb.noise_error_per_timestep(
    ddpm.net, ddpm.sched, digits, nb.error_timesteps(1000), torch.Generator().manual_seed(0), 5.0))
timed("plot_noise_error", lambda: nb.plot_noise_error(rows, nb.snr_crossing(ddpm.sched, 5.0), tmp / "a.png"))
# DDPM step: eps vs x0 (same network)
xb = train[0][:128]; yb = train[1][:128]
for predict in ("eps", "x0"):
    c = dataclasses.replace(cfg, ddpm_predict=predict)
    tr = nb.build_trainer("ddpm", c, torch.device("cpu"))
    tr.step(xb, yb)
    timed(f"DDPM step, predict {predict} (mean of 20)", lambda: tr.step(xb, yb), 20)
# GAN step with and without the weight average
for ema in (0.0, 0.999):
    c = dataclasses.replace(cfg, gan_ema=ema)
    tr = nb.build_trainer("gan", c, torch.device("cpu"))
    tr.step(xb, yb)
    timed(f"GAN step, gan_ema {ema} (mean of 50)", lambda: tr.step(xb, yb), 50)
# VAE mixture fit on the 60,000 training codes, and the figure of code sources
vae = nb.build_trainer("vae", cfg, torch.device("cpu"))
for xb_, yb_ in nb.batches(*train, dataclasses.replace(cfg, max_batches=200), torch.Generator().manual_seed(0)):
    vae.step(xb_, yb_)
timed(f"fit_mixture (k = {cfg.vae_mixture}, 60,000 codes, incl. encoding)", lambda: vae.after_training(train[0]))
src = timed("code_sources", lambda: nb.code_sources(vae, train[0], 2000, torch.Generator().manual_seed(1)))
timed("plot_code_sources", lambda: nb.plot_code_sources(vae, src, "VAE", tmp / "b.png"))
imgs = nb.draw(vae, 1000, torch.Generator().manual_seed(2), nb.PRIOR)
timed("plot_pixel_values (4 models of 1,000)", lambda: nb.plot_pixel_values({"vae": imgs, "gan": imgs, "cgan": imgs, "ddpm": imgs}, train[0][:1000], tmp / "c.png"))
print(json.dumps(out, indent=1))
