"""VAE samplers: train the cpu-profile VAE once (or load it), then FID of prior vs mixtures fitted to codes."""
import dataclasses, json, sys, time, os
sys.path.insert(0, "/work/main")
import numpy as np, torch
import mnist_generative_models_complete as nb

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
cfg = dataclasses.replace(nb.Config(profile="cpu", **nb.profile_defaults("cpu")), data_root="/work/shared/data")
cfg.epochs = {**cfg.epochs, "vae": epochs}
device = torch.device("cpu")
train = nb.load_mnist("/work/shared/data", True)
test = nb.load_mnist("/work/shared/data", False)
ev = nb.Evaluator(); ev.load_state_dict(torch.load("/tmp/exp/evaluator.pt", weights_only=True)["state"]); ev.eval()
ref = nb.reference_digits(test[0], 2000, 42)
ref_f = nb.features(ev, ref)
nb.seed_everything(cfg.seed)
model = nb.build_trainer("vae", cfg, device)
ck = f"/tmp/exp/vae_{epochs}.pt"
hist = nb.fit(model, train, cfg, epochs, checkpoint=nb.Path(ck), resume=True)
res = {}


def score(tag, imgs):
    f = nb.features(ev, imgs)
    pr = nb.precision_recall(ref_f[:1000], f)
    probs = nb.predict(ev, imgs)
    shares = np.bincount(probs.argmax(1).numpy(), minlength=10) / len(imgs)
    res[tag] = {"fid": nb.frechet_distance(f, ref_f), "precision": pr["precision"], "recall": pr["recall"],
                "min_share": float(shares.min()), "sharp": nb.sharpness(imgs)}
    print(tag, {k: round(v, 3) for k, v in res[tag].items()}, flush=True)


gen = lambda: torch.Generator().manual_seed(43)
score("prior", nb.draw(model, 1000, gen(), nb.PRIOR))
with torch.inference_mode():
    x = nb.to_unit(train[0])
    mu, logvar = model.model.encode(x)
    zs = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
for k in (1, 10, 20, 50):
    for src, z in (("mu", mu), ("q", zs)):
        t0 = time.time()
        model.mixture = nb.fit_mixture(z, k, 42)
        fit_s = time.time() - t0
        score(f"gmm{k}_{src}", nb.draw(model, 1000, gen()))
        res[f"gmm{k}_{src}"]["fit_s"] = fit_s
# the aggregate posterior itself: decode q(z|x) codes of random training digits (an upper bound of sorts)
with torch.inference_mode():
    idx = torch.randperm(60000, generator=torch.Generator().manual_seed(3))[:1000]
    score("aggregate_q", nb.to_uint8(model.decode(zs[idx]), False))
    score("aggregate_mu", nb.to_uint8(model.decode(mu[idx]), False))
json.dump(res, open(f"/tmp/exp/res_vae_{epochs}.json", "w"), indent=1)
