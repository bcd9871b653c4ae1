"""The full run's VAE: near copies of training digits and classifier-FID when its codes come from mixtures of
K = 10, 20, 50 Gaussians (and from the prior), 10,000 samples each, measured as the run measures them (its
evaluator, 10,000 reference test digits, the near-copy threshold of real test digits). Also which digits the
near copies are (by the evaluator's label). Needs outputs/full-run's checkpoints (see
outputs/full-run-checkpoints/README.md) in CKPT (default /work/full-run-next/checkpoints).
    python vae_copies.py > vae_copies.json"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np, torch
import mnist_generative_models_complete as nb

ckpt = Path(os.environ.get("CKPT", "/work/full-run-next/checkpoints"))
data = os.environ.get("DATA", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
cfg = nb.Config(profile="full", **nb.profile_defaults("full"))
device = torch.device("cpu")
train, test = nb.load_mnist(data, True), nb.load_mnist(data, False)
ev = nb.Evaluator(); ev.load_state_dict(torch.load(ckpt / "evaluator.pt", weights_only=True)["state"]); ev.eval()
ref = nb.reference_digits(test[0], cfg.n_samples, cfg.seed + 10)  # as the run draws them
ref_f = nb.features(ev, ref)
pool = nb.pixel_pool(train[0])
threshold = float(np.quantile(nb.nearest_distances(ref, pool)[0], nb.COPY_QUANTILE))
vae = nb.build_trainer("vae", cfg, device)
state = torch.load(ckpt / "vae.pt", weights_only=True)
vae.model.load_state_dict(state["vae"]); vae.model.eval()
codes = vae.codes(train[0])
out = {"threshold": threshold, "n": cfg.n_samples, "rows": []}
for k in (0, 10, 20, 50):
    t0 = time.time()
    vae.mixture = nb.fit_mixture(codes, k, cfg.seed) if k else None
    fit_s = time.time() - t0
    imgs = nb.draw(vae, cfg.n_samples, torch.Generator().manual_seed(cfg.seed + 1), None)
    d = nb.nearest_distances(imgs, pool)[0]
    near = d < threshold
    labels = nb.predict(ev, imgs).argmax(1).numpy()
    row = {"k": k, "fit_s": fit_s, "fid": nb.frechet_distance(nb.features(ev, imgs), ref_f),
           "near_copy_share": float(near.mean()), "median_distance": float(np.median(d)),
           "near_copies_by_digit": np.bincount(labels[near], minlength=10).tolist(),
           "samples_by_digit": np.bincount(labels, minlength=10).tolist()}
    out["rows"].append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
real_d = nb.nearest_distances(ref, pool)[0]
real_labels = test[1][torch.randperm(len(test[0]), generator=torch.Generator().manual_seed(cfg.seed + 10))[:cfg.n_samples]].numpy()
out["real_near_copies_by_digit"] = np.bincount(real_labels[real_d < threshold], minlength=10).tolist()
print(json.dumps(out, indent=1))
