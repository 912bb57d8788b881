"""Reading finished shard directories back: ``verify``, ``stats`` and ``show``."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkit.pipelines.codecs import SampleView
from distillkit.pipelines.registry import get_pipeline
from distillkit.pipelines.schema import SchemaError, validate_sample
from distillkit.pipelines.shards import iter_samples, load_index, sha256_file


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(shard_dir: Path, progress: bool = False) -> VerifyReport:
    """Re-hash every shard listed in ``index.json`` and check every sample's schema.

    Each problem names the shard (and key, for sample faults). Also flags shards on disk
    that the index does not list and keys that repeat across shards.
    """
    from tqdm import tqdm

    shard_dir = Path(shard_dir)
    index = load_index(shard_dir)
    pipeline = get_pipeline(index["pipeline"])
    report = VerifyReport()
    seen: dict[str, str] = {}
    listed = {s["file"] for s in index["shards"]}
    for path in sorted(shard_dir.glob("*.tar")):
        if path.name not in listed:
            report.problems.append(f"{path.name}: shard on disk is not listed in index.json")
    for entry in tqdm(index["shards"], desc="verify", unit="shard", disable=not progress):
        report.shards += 1
        name = entry["file"]
        path = shard_dir / name
        if not path.is_file():
            report.problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            report.problems.append(f"{name}: {path.stat().st_size} bytes, index says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            report.problems.append(f"{name}: sha256 differs from index.json")
        keys = []
        try:
            for key, sample in iter_samples(path):
                keys.append(key)
                if key in seen:
                    report.problems.append(f"{name}: key {key} also in {seen[key]}")
                seen[key] = name
                try:
                    validate_sample(pipeline, key, sample)
                except SchemaError as exc:
                    report.problems.append(f"{name}: {exc}")
        except (tarfile.TarError, ValueError, OSError) as exc:
            report.problems.append(f"{name}: unreadable tar after {len(keys)} samples: {exc}")
        report.samples += len(keys)
        if len(keys) != entry["samples"]:
            report.problems.append(f"{name}: {len(keys)} samples, index says {entry['samples']}")
        if keys and (keys[0] != entry["first_key"] or keys[-1] != entry["last_key"]):
            report.problems.append(f"{name}: first/last key differ from index.json")
    counts = index.get("counts", {})
    if counts and counts.get("written") != report.samples:
        report.problems.append(
            f"index.json counts {counts.get('written')} samples, shards hold {report.samples}"
        )
    return report


def stats_text(shard_dir: Path) -> str:
    """A human summary: counts, sizes, rejected inputs and dataset statistics."""
    index = load_index(Path(shard_dir))
    shards = index["shards"]
    total = sum(s["bytes"] for s in shards)
    c = index.get("counts", {})
    lines = [
        f"{index['name']} ({index['pipeline']}), package {index.get('package_version')}, "
        f"commit {str(index.get('git', {}).get('commit'))[:12]}",
        f"shards: {len(shards)}  samples: {c.get('written')}  planned: {c.get('planned')}  "
        f"rejected: {c.get('rejected')}",
        f"size: {total / 1e6:.1f} MB  ({total / max(c.get('written') or 1, 1) / 1e6:.2f} MB/sample)",
    ]
    for key, value in sorted(index.get("stats", {}).items()):
        lines.append(f"  {key}: {value:.4g}")
    if index["rejected"]:
        lines.append("rejected inputs:")
        lines += [f"  [{r['stage']}] {r['source']}: {r['reason']}" for r in index["rejected"]]
    return "\n".join(lines)


def find_sample(shard_dir: Path, key: str | None = None) -> tuple[str, dict[str, bytes], str]:
    """Return (key, sample, pipeline name): the sample ``key``, or the first one."""
    shard_dir = Path(shard_dir)
    index = load_index(shard_dir)
    for entry in index["shards"]:
        for k, sample in iter_samples(shard_dir / entry["file"]):
            if key is None or k == key:
                return k, sample, index["pipeline"]
    raise KeyError(f"no sample {key!r} in {shard_dir}" if key else f"{shard_dir} holds no samples")


def show(shard_dir: Path, out: Path, key: str | None = None) -> str:
    """Render one sample to a PNG at ``out``; returns its key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, sample, pipeline_name = find_sample(shard_dir, key)
    fig: Any = get_pipeline(pipeline_name).render(SampleView(sample, k))
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return k
