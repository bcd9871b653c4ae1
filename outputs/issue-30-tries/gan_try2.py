"""(gan_try.py with --real-target; ran on the Intel AMX machine, bf16) A GAN / cGAN / VAE try at equal epochs: cpu-profile settings plus overrides; FID (full-run evaluator) of
1000 samples against 2000 random test digits, class shares, precision/recall, faint share."""
import argparse, dataclasses, json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import numpy as np, torch
import mnist_generative_models_complete as nb

ap = argparse.ArgumentParser()
ap.add_argument("--tag", required=True)
ap.add_argument("--model", default="gan")
ap.add_argument("--epochs", type=int, default=5)
ap.add_argument("--set", nargs="*", default=[])
ap.add_argument("--n", type=int, default=1000)
ap.add_argument("--real-target", type=float, default=None, help="the GAN D's target for real images (the notebook: 1.0)")
a = ap.parse_args()
over = {}
for kv in a.set:
    k, v = kv.split("=")
    over[k] = nb.parse_value(k, v, "try")
cfg = dataclasses.replace(nb.Config(profile="cpu", **nb.profile_defaults("cpu")), data_root="/work/shared/data", **over)
nb.validate(cfg)
device = torch.device("cpu")
train = nb.load_mnist("/work/shared/data", True)
test = nb.load_mnist("/work/shared/data", False)
ev = nb.Evaluator(); ev.load_state_dict(torch.load("/tmp/exp/evaluator.pt", weights_only=True)["state"]); ev.eval()
ref = nb.reference_digits(test[0], 2000, 42)
ref_f = nb.features(ev, ref)
curve = []
conditional = nb.MODELS[a.model].conditional


def probe(m):
    asked = nb.balanced_labels(a.n) if conditional else None
    imgs = nb.draw(m, a.n, torch.Generator().manual_seed(0), None, asked)
    fid = nb.frechet_distance(nb.features(ev, imgs), ref_f)
    curve.append(fid)
    print(f"{a.tag} epoch {len(curve)} FID {fid:.1f}", flush=True)
    return imgs


nb.seed_everything(cfg.seed)
model = nb.build_trainer(a.model, cfg, device)
if a.real_target is not None:
    model.real_target = a.real_target
    over["real_target"] = a.real_target
t0 = time.time()
hist = nb.fit(model, train, cfg, a.epochs, probe=probe)
imgs = hist.probes[-1]
probs = nb.predict(ev, imgs)
shares = np.bincount(probs.argmax(1).numpy(), minlength=10) / len(imgs)
pr = nb.precision_recall(ref_f[:1000], nb.features(ev, imgs))
res = {"tag": a.tag, "model": a.model, "set": {k: str(v) for k, v in over.items()}, "epochs": a.epochs,
       "train_s": hist.seconds, "fid_curve": curve, "fid": curve[-1], "min_share": float(shares.min()),
       "precision": pr["precision"], "recall": pr["recall"], "faint": nb.faint_share(imgs),
       "last_epoch": {k: v[-1] for k, v in hist.epoch.items()}}
if conditional:
    res["hit"] = float((probs.argmax(1) == nb.balanced_labels(a.n)).float().mean())
print(json.dumps(res, indent=1))
json.dump(res, open(f"/tmp/exp/res_{a.tag}.json", "w"), indent=1)
