"""One DDPM design try at equal training: train `steps` optimizer steps with the cpu profile's settings and
the given overrides, then measure faint share, FID (full-run evaluator) and per-timestep errors."""
import argparse, dataclasses, json, sys, time
sys.path.insert(0, "/work/main")
import numpy as np, torch
import mnist_generative_models_complete as nb

ap = argparse.ArgumentParser()
ap.add_argument("--tag", required=True)
ap.add_argument("--steps", type=int, default=1200)
ap.add_argument("--set", nargs="*", default=[])
ap.add_argument("--n", type=int, default=500)
a = ap.parse_args()
over = {}
for kv in a.set:
    k, v = kv.split("=")
    over[k] = nb.parse_value(k, v, "try")
cfg = dataclasses.replace(nb.Config(profile="cpu", **nb.profile_defaults("cpu")), data_root="../shared/data",
                          **over)
nb.validate(cfg)
device = torch.device("cpu")
nb.seed_everything(cfg.seed)
train = nb.load_mnist("/work/shared/data", True)
test = nb.load_mnist("/work/shared/data", False)
model = nb.build_trainer("ddpm", cfg, device)
gen = torch.Generator().manual_seed(cfg.seed)
model.plan(a.steps)
t0 = time.time(); step = 0; losses = []
while step < a.steps:
    for xb, yb in nb.batches(*train, cfg, gen):
        out = model.step(xb, yb)
        losses.append(float(out["loss"]))
        step += 1
        if step % 200 == 0:
            print(f"{a.tag} step {step} loss {np.mean(losses[-200:]):.4f} {time.time()-t0:.0f}s", flush=True)
        if step >= a.steps:
            break
train_s = time.time() - t0
net, sched = model.net, model.sched
# per-timestep errors on 500 test digits (not trained on)
x0 = nb.to_signed(test[0][:500])
bg = (x0 == -1)
g = torch.Generator().manual_seed(1)
per_t = {}
with torch.inference_mode():
    for t in (0, 2, 5, 10, 20, 50, 100, 200, 400, 700, 999):
        tt = torch.full((len(x0),), t, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=g)
        x_t = nb.q_sample(sched, x0, tt, eps)
        e = nb.predict_eps(net, sched, x_t, tt)
        ab = sched.alpha_bar[t]
        x0h = (x_t - (1 - ab).sqrt() * e) / ab.sqrt()
        err_levels = (x0h - x0) * 127.5
        per_t[t] = {"mse": float((e - eps).pow(2).mean()),
                    "bg_x0_sd_levels": float(err_levels[bg].std()),
                    "bg_faint": float(((lambda q: (q > 0) & (q <= 10))(((x0h.clamp(-1, 1) + 1) / 2 * 255).round())[bg]).float().mean())}
imgs = nb.draw(model, a.n, torch.Generator().manual_seed(0), nb.Sampler("ddim", 50, eta=1.0))
ev = nb.Evaluator(); ev.load_state_dict(torch.load("/tmp/exp/evaluator.pt", weights_only=True)["state"]); ev.eval()
ref = nb.reference_digits(test[0], 2000, 42)
fid = nb.frechet_distance(nb.features(ev, imgs), nb.features(ev, ref))
real_fid = nb.frechet_distance(nb.features(ev, nb.reference_digits(test[0], a.n, 7)), nb.features(ev, ref))
res = {"tag": a.tag, "set": over, "steps": a.steps, "train_s": train_s, "faint": nb.faint_share(imgs),
       "real_faint": nb.faint_share(test[0][:2000].numpy()), "fid": fid, "real_fid_same_n": real_fid,
       "per_t": per_t, "final_loss": float(np.mean(losses[-200:]))}
print(json.dumps(res, indent=1))
json.dump(res, open(f"/tmp/exp/res_{a.tag}.json", "w"), indent=1)
np.save(f"/tmp/exp/imgs_{a.tag}.npy", imgs)
