"""``distillkit synth toy OUT``: CSV recordings (one ``value`` column) of sines of several
lengths and frequencies, and one recording with a broken line (rejected by the build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZES = {"small": 5, "medium": 20}


def make_toy(out: Path, seed: int = 0, size: str = "small") -> Path:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (small | medium)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(SIZES[size]):
        n = int(rng.integers(40, 160))
        t = np.arange(n) / 20.0
        values = np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t + rng.uniform(0, 6)) + 0.05 * rng.normal(size=n)
        (out / f"rec{i:02d}.csv").write_text("value\n" + "".join(f"{v:.6f}\n" for v in values))
    (out / "broken.csv").write_text("value\n0.1\nnot-a-number\n")
    return out
