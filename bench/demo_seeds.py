"""The demo's gains on several seeds: ``distillkit demo`` once per seed (data and training both seeded),
then per method the distilled and random-init probe metric, the gain, and their mean and minimum.

    .venv/bin/python bench/demo_seeds.py --out /tmp/demo-seeds [--seeds 0 1 2] [--only audio]

Each seed writes under ``OUT/seed-N`` (its own synthetic data, shards and runs) and its ``summary.json``;
the table printed at the end (and written to ``OUT/gains.json``) is what docs/training.md "The demo"
records. The demo's time per seed is printed too: the README's figure is the time of seed 0 on an idle
machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="pipelines (default: every one with a demo)")
    args = ap.parse_args(argv)

    from distillkit.pipelines.demo import run_demo

    per_method: dict[str, list[dict]] = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        run_demo(args.out / f"seed-{seed}", only=args.only, seed=seed)
        wall = time.perf_counter() - t0
        summary = json.loads((args.out / f"seed-{seed}" / "summary.json").read_text())
        for method, row in summary["methods"].items():
            per_method.setdefault(method, []).append({"seed": seed, "demo_s": round(wall, 1), **row})
    lines = ["| method | metric | seed | distilled | random init | gain |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for method, rows in per_method.items():
        for r in rows:
            lines.append(f"| {method} | {r['metric']} | {r['seed']} | {r['distilled']:.3f} | {r['random']:.3f} | "
                         f"{r['gain']:+.3f} |")
        gains = [r["gain"] for r in rows]
        mean = sum(gains) / len(gains)
        lines.append(f"| **{method}** | | **mean / min** | | | **{mean:+.3f} / {min(gains):+.3f}** |")
    table = "\n".join(lines)
    print(table)
    (args.out / "gains.json").write_text(json.dumps(per_method, indent=2) + "\n")
    return 0 if all(r["gain"] > 0 for rows in per_method.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
