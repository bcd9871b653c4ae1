"""Print the tries' tables (markdown) from the res_*.json files beside this script: python table.py"""
import json
from pathlib import Path

here = Path(__file__).parent
res = {p.stem[4:]: json.loads(p.read_text()) for p in sorted(here.glob("res_*.json"))}


def setting(r):
    return ", ".join(f"{k}={v}" for k, v in r["set"].items()) or "defaults of the time"


print("### DDPM (cpu-profile settings, equal optimizer steps; 500 DDIM-50 eta-1 samples, seed 0)\n")
print("| try | settings | steps | faint pixels | classifier-FID (500 vs 2,000 test digits) | "
      "noise MSE at t = 1, 21 | background spread of x0_hat at t = 1, 21 (grey levels) |")
print("|---|---|---|---|---|---|---|")
for tag, r in res.items():
    if "per_t" not in r:
        continue
    pt = r["per_t"]
    print(f"| {tag} | {setting(r)} | {r['steps']} | {100 * r['faint']:.1f}% (real {100 * r['real_faint']:.2f}%) | "
          f"{r['fid']:.1f} (real at 500: {r['real_fid_same_n']:.1f}) | {pt['0']['mse']:.3f}, {pt['20']['mse']:.3f} | "
          f"{pt['0']['bg_x0_sd_levels']:.2f}, {pt['20']['bg_x0_sd_levels']:.2f} |")
print("\n### GAN (cpu-profile settings, equal epochs; 1,000 samples, seed 0)\n")
print("| try | settings | epochs | classifier-FID (1,000 vs 2,000) per epoch | smallest class | precision / recall | "
      "faint | training s |")
print("|---|---|---|---|---|---|---|---|")
for tag, r in res.items():
    if r.get("model") not in ("gan", "cgan"):
        continue
    curve = ", ".join(f"{f:.0f}" for f in r["fid_curve"]) if len(r["fid_curve"]) <= 10 else \
        ", ".join(f"{f:.0f}" for f in r["fid_curve"][4::5])
    print(f"| {tag} | {setting(r)} | {r['epochs']} | {curve} | {100 * r['min_share']:.1f}% | "
          f"{r['precision']:.2f} / {r['recall']:.2f} | {100 * r['faint']:.1f}% | {r['train_s']:.0f} |")
if "vae_10" in res:
    print("\n### VAE samplers (the cpu profile's VAE, 10 epochs; 1,000 samples, seed 43)\n")
    print("| codes from | classifier-FID | precision / recall | smallest class | sharpness | fit s |")
    print("|---|---|---|---|---|---|")
    for k, v in res["vae_10"].items():
        print(f"| {k} | {v['fid']:.1f} | {v['precision']:.2f} / {v['recall']:.2f} | {100 * v['min_share']:.1f}% | "
              f"{v['sharp']:.3f} | {v.get('fit_s', 0):.1f} |")
