"""Where each model's faint pixels (1-10 grey levels) lie: the share within two pixels of ink (above 127), on
the first 2,000 samples of a run (default outputs/full-run). Soft stroke edges lie there; a background
haze does not.   python faint_where.py [RUN] > faint_where.txt"""
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

run = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "full-run")
for name in ("vae", "gan", "cgan", "ddpm"):
    x = np.load(run / "samples" / f"{name}.npz")["images"][:2000]
    faint, ink = (x >= 1) & (x <= 10), x > 127
    near = np.stack([ndimage.binary_dilation(i, iterations=2) for i in ink])
    print(f"{name}: faint {100 * faint.mean():.2f}% of pixels; of them within 2 px of ink "
          f"{100 * (faint & near).sum() / faint.sum():.1f}%")
