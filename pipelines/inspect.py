"""Reading finished shard directories back: ``verify``, ``stats`` and ``show``."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkit.messages import one_line
from distillkit.pipelines.base import SHOW_DPI, STAT_UNITS
from distillkit.pipelines.codecs import SampleView
from distillkit.pipelines.registry import get_pipeline
from distillkit.pipelines.schema import SchemaError, validate_sample
from distillkit.pipelines.shards import (
    HashingReader,
    compare_with_records,
    iter_samples,
    load_index,
    record_name,
    sha256_file,
    temp_file_pattern,
)
from distillkit.remote import RemoteError, RemoteNotFound, can_list, child, list_folder, location, open_read


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    """Faults: ``verify`` exits 1 when there is any."""
    warnings: list[str] = field(default_factory=list)
    """Things that do not make the dataset wrong but should not be there (a file nobody wrote), or an index
    older than its pipeline (a statistic it lacks)."""
    unchecked: list[str] = field(default_factory=list)
    """What could not be checked, and why (shard records missing or from an older build)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(shard_dir: Path | str, progress: bool = False) -> VerifyReport:
    """Re-hash every shard listed in ``index.json``, check every sample's schema, and recompute the index's
    counts and statistics from the per-shard records (``shards.compare_with_records``).

    Each problem names the shard (and key, for sample faults). Also flags shards on disk that the index does
    not list, keys that repeat across shards and temporary files a killed writer left (faults), and any other
    file a build does not write and any statistic the records give but the index lacks (warnings).

    A URL folder (``s3://``, ``https://``, ``file://``) is checked alike: each shard is streamed once, hashed and
    read sample by sample in that one pass (no local copy). What a URL cannot show is said in ``unchecked``: files
    nobody listed need a listing, which an object store and ``file://`` give and plain HTTP does not.

    Args:
        shard_dir: the shard folder, a ``Path`` or a URL.
        progress: show a bar over the shards.

    Raises:
        FileNotFoundError: no ``index.json``.
        shards.BadIndex: an ``index.json`` that is not JSON or not an index (shape, shard names).
        remote.RemoteError: a URL folder that cannot be read (refused credential, server down after the retries).
    """
    from tqdm import tqdm

    shard_dir = location(shard_dir)
    # The records are compared below, each difference a fault of its own, rather than refused at load.
    index = load_index(shard_dir, check_records=False)
    pipeline = get_pipeline(index["pipeline"])
    report = VerifyReport()
    seen: dict[str, str] = {}
    listed = {s["file"] for s in index["shards"]}
    if isinstance(shard_dir, str):
        _check_remote_folder(shard_dir, index.get("name"), listed, report)
    else:
        _check_folder(shard_dir, index.get("name"), listed, report)
    for entry in tqdm(index["shards"], desc="verify", unit="shard", disable=not progress):
        report.shards += 1
        name = entry["file"]
        if isinstance(shard_dir, str):
            report.samples += _verify_remote_shard(child(shard_dir, name), entry, pipeline, seen, report)
            continue
        path = shard_dir / name
        if not path.is_file():
            report.problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            report.problems.append(f"{name}: {path.stat().st_size} bytes, index says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            report.problems.append(f"{name}: sha256 differs from index.json")
        report.samples += _check_samples(name, iter_samples(path), entry, pipeline, seen, report)
    counts = index["counts"]
    if counts["written"] != report.samples:
        report.problems.append(f"index.json counts {counts['written']} samples, shards hold {report.samples}")
    found = compare_with_records(shard_dir, index)
    report.problems += [f"index.json: {fault}" for fault in found.faults]
    report.warnings += [f"index.json: {warning}" for warning in found.warnings]
    report.unchecked += found.unchecked
    return report


def _check_samples(name: str, samples: Any, entry: dict[str, Any], pipeline: Any, seen: dict[str, str],
                   report: VerifyReport) -> int:
    """Schema, repeated keys, count and first/last keys of one shard's ``samples`` (``iter_samples``); returns
    how many were read."""
    keys = []
    try:
        for key, sample in samples:
            keys.append(key)
            if key in seen:
                report.problems.append(f"{name}: key {key} also in {seen[key]}")
            seen[key] = name
            try:
                validate_sample(pipeline, key, sample)
            except SchemaError as exc:
                report.problems.append(f"{name}: {exc}")
    except RemoteError:
        raise  # the server, not the shard: verify cannot go on (one line naming the URL)
    except (tarfile.TarError, ValueError, OSError) as exc:
        report.problems.append(f"{name}: unreadable tar after {len(keys)} samples: {exc}")
    if len(keys) != entry["samples"]:
        report.problems.append(f"{name}: {len(keys)} samples, index says {entry['samples']}")
    if keys and (keys[0] != entry.get("first_key") or keys[-1] != entry.get("last_key")):
        report.problems.append(f"{name}: first/last key differ from index.json")
    return len(keys)


def _verify_remote_shard(url: str, entry: dict[str, Any], pipeline: Any, seen: dict[str, str],
                         report: VerifyReport) -> int:
    """One shard of a URL folder, streamed once: its samples checked as read, its bytes hashed and counted in the
    same pass (``HashingReader``; the tar's end padding is read and hashed after the last member)."""
    name = entry["file"]
    try:
        raw = open_read(url)
    except RemoteNotFound:
        report.problems.append(f"{name}: missing ({url}: no such object)")
        return 0
    reader, hashing = HashingReader.open(raw)
    with reader:
        n = _check_samples(name, iter_samples(reader), entry, pipeline, seen, report)
        try:
            digest = hashing.finish()  # reads the rest (the tar's end padding): the server may fail here too
        except RemoteError:
            raise  # the server, not the shard: verify cannot go on (one line naming the URL)
        except (OSError, ValueError) as exc:
            report.problems.append(f"{name}: unreadable after its last sample: {exc}")
            return n
    if hashing.size != entry["bytes"]:
        report.problems.append(f"{name}: {hashing.size} bytes, index says {entry['bytes']}")
    if digest != entry["sha256"]:
        report.problems.append(f"{name}: sha256 differs from index.json")
    return n


def _check_remote_folder(url: str, dataset: str | None, listed: set[str], report: VerifyReport) -> None:
    """``_check_folder`` for a URL folder: from the object listing where the protocol gives one (S3, ``file://``);
    over plain HTTP there is none, and that is said in one line of ``unchecked``."""
    if not can_list(url):
        report.unchecked.append(f"files not listed in index.json (stray shards, temporary files of killed writers): "
                                f"{url.split('://', 1)[0]} gives no listing of {url}")
        return
    _classify_folder(sorted(list_folder(url).items()), dataset, listed, report)


def _check_folder(shard_dir: Path, dataset: str | None, listed: set[str], report: VerifyReport) -> None:
    """Every file in the folder is one a build writes: a listed shard, its record, ``index.json``, the build's
    lock. A shard the index does not list and a temporary file of a killed writer are faults (the build that
    survived such a writer removes its files, so one left means the folder was not finished by a build); any
    other file is a warning.

    A temporary file of another dataset's build (``.other-000001.tar.tmp-...``) is a fault too, but no build of
    this dataset removes it (the build removes only its own), and no build of the other may write here (a
    folder holds one dataset): removing it by hand is the one way, and the message says so.
    """
    _classify_folder([(path.name, path.stat().st_size) for path in sorted(shard_dir.iterdir())], dataset, listed,
                     report)


def _classify_folder(files: list[tuple[str, int]], dataset: str | None, listed: set[str],
                     report: VerifyReport) -> None:
    """``_check_folder``'s verdict on a folder's ``(name, size)`` files, local or listed remotely."""
    from distillkit.pipelines.runner import LOCK_FILE

    expected = {"index.json", LOCK_FILE} | listed | {record_name(name) for name in listed}
    own_temp = temp_file_pattern(dataset) if dataset else None
    any_temp = temp_file_pattern()
    for name, size in files:
        if name in expected:
            continue
        temp = any_temp.fullmatch(name)
        if temp and (own_temp is None or own_temp.fullmatch(name)):
            report.problems.append(f"{name}: stray temporary file of a writer killed before it finished "
                                   f"({size} bytes): remove it, or rerun the build, which does")
        elif temp:
            report.problems.append(f"{name}: stray temporary file of a build of another dataset, "
                                   f"{temp.group('dataset')!r}, killed before it finished ({size} "
                                   f"bytes): no build of {dataset!r} removes it; remove it by hand")
        elif name.endswith(".tar"):
            report.problems.append(f"{name}: shard on disk is not listed in index.json")
        else:
            report.warnings.append(f"{name}: not a file a build writes (not listed in index.json)")


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


def stats_text(shard_dir: Path | str) -> str:
    """A human summary: counts, sizes, rejected inputs and dataset statistics (with their units).

    Args:
        shard_dir: the shard folder, a ``Path`` or a URL.
    """
    index = load_index(location(shard_dir), check_records=False)  # a summary of the file as it is: verify checks it
    shards = index["shards"]
    total = sum(s["bytes"] for s in shards)
    c = index.get("counts", {})
    lines = [
        f"{index.get('name')} ({index['pipeline']}), package {index.get('package_version')}, "
        f"commit {str(index.get('git', {}).get('commit'))[:12]}",
        f"shards: {len(shards)}  samples: {c.get('written')}  planned: {c.get('planned')}  "
        f"rejected: {c.get('rejected')}",
        f"size: {total / 1e6:.1f} MB  ({total / max(c.get('written') or 1, 1) / 1e6:.2f} MB/sample)",
    ]
    for key, value in sorted(index.get("stats", {}).items()):
        unit = stat_unit(index["pipeline"], key, index)
        lines.append(f"  {key}: {value:.4g}{' ' + unit if unit else ''}")
    if index.get("rejected"):
        lines.append("rejected inputs:")
        lines += [f"  [{r.get('stage')}] {r.get('source')}: {r.get('reason')}" if isinstance(r, dict) else f"  {r}"
                  for r in index["rejected"]]
    return "\n".join(lines)


# Without --key, ``show`` draws the first sample, except for pipelines with a ``Pipeline.show_preference``: then
# the first sample scoring at least the pipeline's threshold, else the best of the first SHOW_SCAN samples. The
# scan is bounded so that picking a picture never costs a pass over a large dataset.
SHOW_SCAN = 256


class ShowError(ValueError):
    """``show`` cannot draw the sample: the one-line message names the shard, the sample and what is wrong."""


class MissingField(KeyError):
    """A field the picture reads is not in the sample (a ``KeyError``, so renderers' ``view.get`` still works)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _ShowView(SampleView):
    """The sample as ``show`` hands it to the renderer: a field that is missing or does not decode (a pickled
    ``.npy``, broken JSON) is reported by its name, not as numpy's or json's bare error."""

    def __init__(self, raw: dict[str, bytes], key: str, shard: str) -> None:
        super().__init__(raw, key)
        self.shard = shard

    def __getitem__(self, name: str) -> Any:
        if name not in self.raw:
            raise MissingField(name)
        try:
            return super().__getitem__(name)
        except Exception as exc:  # noqa: BLE001 - every decoder's error becomes one line naming the field
            raise self._undecodable(name, exc) from None

    def image(self, name: str) -> Any:
        if name not in self.raw:
            raise MissingField(name)
        try:
            return super().image(name)
        except Exception as exc:  # noqa: BLE001 - as above
            raise self._undecodable(name, exc) from None

    def _undecodable(self, name: str, exc: BaseException) -> ShowError:
        reason = one_line(exc)
        if name.endswith(".npy") and "allow_pickle" in reason:
            reason = "a pickled object array, which distillkit never unpickles"
        return ShowError(f"{self.shard}: sample {self.key}: field {name!r} cannot be decoded ({reason})")


def find_sample(shard_dir: Path | str, key: str | None = None) -> tuple[str, dict[str, bytes], str]:
    """Return (key, sample, pipeline name): the sample ``key``, or without a key the one ``show`` draws
    (the first, or the preferred one of the pipeline's ``show_preference``).

    Args:
        shard_dir: the shard folder, a ``Path`` or a URL.
        key: a sample key, or None for the sample ``show`` picks.
    """
    k, sample, pipeline, _ = _find_sample(location(shard_dir), key)
    return k, sample, pipeline


def _shard_samples(shard: Path | str) -> Any:
    """``iter_samples`` of a local shard, or of a URL one streamed (closed when the generator ends)."""
    if isinstance(shard, Path):
        yield from iter_samples(shard)
        return
    with open_read(shard) as f:
        yield from iter_samples(f)


def _find_sample(shard_dir: Path | str, key: str | None) -> tuple[str, dict[str, bytes], str, str]:
    """``find_sample``, plus the shard the sample is in."""
    index = load_index(shard_dir, check_records=False)  # a look at the data as it is: verify checks the index
    name = index["pipeline"]
    prefer = get_pipeline(name).show_preference() if key is None else None
    best: tuple[float, str, dict[str, bytes], str] | None = None
    seen = 0
    for entry in index["shards"]:
        shard = entry["file"]
        try:
            for k, sample in _shard_samples(child(shard_dir, shard)):
                if key is not None and k != key:
                    continue
                if prefer is None:
                    return k, sample, name, shard
                score_of, good = prefer
                try:
                    score = score_of(SampleView(sample, k))
                except (KeyError, ValueError):  # a sample the scorer cannot read is never the preferred one
                    score = float("-inf")
                if score >= good:
                    return k, sample, name, shard
                if best is None or score > best[0]:
                    best = (score, k, sample, shard)
                seen += 1
                if seen >= SHOW_SCAN:
                    return best[1], best[2], name, best[3]
        except RemoteError:
            raise  # the server, not the shard (one line naming the URL)
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise ShowError(f"{child(shard_dir, shard)}: unreadable shard ({exc})") from None
    if best is not None:
        return best[1], best[2], name, best[3]
    raise KeyError(f"no sample {key!r} in {shard_dir}" if key else f"{shard_dir} holds no samples")


def show(shard_dir: Path | str, out: Path, key: str | None = None) -> str:
    """Render one sample to a PNG at ``out``; returns its key.

    Args:
        shard_dir: the shard folder, a ``Path`` or a URL.
        out: the PNG to write.
        key: the sample to draw; None: the first (or the pipeline's preferred one, ``show_preference``).

    Raises:
        ShowError: the sample lacks a field the picture needs, or a field does not decode (one line naming
            the shard, the sample and the field).
        KeyError: no such sample.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, sample, pipeline_name, shard = _find_sample(location(shard_dir), key)
    pipeline = get_pipeline(pipeline_name)
    view = _ShowView(sample, k, str(child(location(shard_dir), shard)))
    try:
        fig: Any = pipeline.render(view)
    except MissingField as exc:
        raise ShowError(_missing_field_message(pipeline, view, exc.name)) from None
    except KeyError as exc:  # a renderer's own lookup (uniseg: "no image field (one of ...)")
        what = exc.args[0] if exc.args else "a field"
        raise ShowError(f"{view.shard}: sample {k}: {what}; it holds {', '.join(sorted(sample))}") from None
    fig.savefig(out, dpi=SHOW_DPI, bbox_inches="tight")
    plt.close(fig)
    return k


def _missing_field_message(pipeline: Any, view: _ShowView, name: str) -> str:
    """``SHARD: sample K has no field 'f' (what the schema says it holds), which show's picture of a P sample
    needs; the sample holds ...``."""
    try:
        spec = pipeline.fields(view).get(name)
    except Exception:  # noqa: BLE001 - the schema of an incomplete sample may not be computable
        spec = None
    what = f" ({spec.description})" if spec is not None and getattr(spec, "description", "") else ""
    return (f"{view.shard}: sample {view.key} has no field {name!r}{what}, which show's picture of a "
            f"{pipeline.name} sample needs; the sample holds {', '.join(sorted(view.raw)) or 'nothing'} "
            "(distillkit verify checks every sample)")
