"""Reading finished shard directories back: ``verify``, ``stats`` and ``show``."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkit.pipelines.base import SHOW_DPI, STAT_UNITS
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


def stat_unit(pipeline: str, key: str, index: dict[str, Any] | None = None) -> str:
    """What the statistic ``key`` of a ``pipeline`` dataset counts or measures ("" when not known).

    From ``index["stat_units"]`` (written by the build) when given; else (a dataset built before units were
    written) from the pipeline's ``Pipeline.stat_units``, which imports the pipeline.

    Args:
        pipeline: the pipeline name in ``index.json``.
        key: the statistic's name.
        index: the dataset's ``index.json``, if read already.
    """
    if index is not None and isinstance(index.get("stat_units"), dict):
        return str(index["stat_units"].get(key, STAT_UNITS.get(key, "")))
    try:
        return get_pipeline(pipeline).unit_of_stat(key)
    except Exception:  # noqa: BLE001 - a pipeline that is not installed here: the bare value still prints
        return STAT_UNITS.get(key, "")


def stats_text(shard_dir: Path) -> str:
    """A human summary: counts, sizes, rejected inputs and dataset statistics (with their units)."""
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
        unit = stat_unit(index["pipeline"], key, index)
        lines.append(f"  {key}: {value:.4g}{' ' + unit if unit else ''}")
    if index["rejected"]:
        lines.append("rejected inputs:")
        lines += [f"  [{r['stage']}] {r['source']}: {r['reason']}" for r in index["rejected"]]
    return "\n".join(lines)


# Without --key, ``show`` draws the first sample, except for pipelines with a ``Pipeline.show_preference``: then
# the first sample scoring at least the pipeline's threshold, else the best of the first SHOW_SCAN samples. The
# scan is bounded so that picking a picture never costs a pass over a large dataset.
SHOW_SCAN = 256


def find_sample(shard_dir: Path, key: str | None = None) -> tuple[str, dict[str, bytes], str]:
    """Return (key, sample, pipeline name): the sample ``key``, or without a key the one ``show`` draws
    (the first, or the preferred one of the pipeline's ``show_preference``)."""
    shard_dir = Path(shard_dir)
    index = load_index(shard_dir)
    prefer = get_pipeline(index["pipeline"]).show_preference() if key is None else None
    best: tuple[float, str, dict[str, bytes]] | None = None
    seen = 0
    for entry in index["shards"]:
        for k, sample in iter_samples(shard_dir / entry["file"]):
            if key is not None and k != key:
                continue
            if prefer is None:
                return k, sample, index["pipeline"]
            score_of, good = prefer
            try:
                score = score_of(SampleView(sample, k))
            except (KeyError, ValueError):  # a sample the scorer cannot read is never the preferred one
                score = float("-inf")
            if score >= good:
                return k, sample, index["pipeline"]
            if best is None or score > best[0]:
                best = (score, k, sample)
            seen += 1
            if seen >= SHOW_SCAN:
                return best[1], best[2], index["pipeline"]
    if best is not None:
        return best[1], best[2], index["pipeline"]
    raise KeyError(f"no sample {key!r} in {shard_dir}" if key else f"{shard_dir} holds no samples")


def show(shard_dir: Path, out: Path, key: str | None = None) -> str:
    """Render one sample to a PNG at ``out``; returns its key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, sample, pipeline_name = find_sample(shard_dir, key)
    fig: Any = get_pipeline(pipeline_name).render(SampleView(sample, k))
    fig.savefig(out, dpi=SHOW_DPI, bbox_inches="tight")
    plt.close(fig)
    return k
