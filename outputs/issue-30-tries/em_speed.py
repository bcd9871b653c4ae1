import sys, time, json
sys.path.insert(0, "/work/main")
import numpy as np, torch, dataclasses
import mnist_generative_models_complete as nb
cfg = dataclasses.replace(nb.Config(profile="cpu", **nb.profile_defaults("cpu")), data_root="/work/shared/data")
cfg.epochs = {**cfg.epochs, "vae": 10}
train = nb.load_mnist("/work/shared/data", True); test = nb.load_mnist("/work/shared/data", False)
ev = nb.Evaluator(); ev.load_state_dict(torch.load("/tmp/exp/evaluator.pt", weights_only=True)["state"]); ev.eval()
ref_f = nb.features(ev, nb.reference_digits(test[0], 2000, 42))
model = nb.build_trainer("vae", cfg, torch.device("cpu"))
nb.fit(model, train, cfg, 10, checkpoint=nb.Path("/tmp/exp/vae_10.pt"), resume=True)
mu = model.codes(train[0])
for k, tol, iters in [(int(a.split(',')[0]), float(a.split(',')[1]), int(a.split(',')[2])) for a in sys.argv[1:]]:
    t0 = time.time(); model.mixture = nb.fit_mixture(mu, k, 42, iters=iters, tol=tol); s = time.time() - t0
    imgs = nb.draw(model, 1000, torch.Generator().manual_seed(43))
    print(k, tol, iters, f"fit {s:.1f}s", f"FID {nb.frechet_distance(nb.features(ev, imgs), ref_f):.1f}", f"ll {model.mixture['log_likelihood']:.3f}", flush=True)
