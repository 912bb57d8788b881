"""``distillkit eval audio --protocol verification``: speaker verification with clip embeddings.

One embedding per source file: the file's segments are embedded as the linear protocol embeds them
(``train.audio.clip_embeddings``: ``crop_s`` windows, [CLS, mean patch token], mean over the windows) and
averaged with weights equal to each segment's audio duration, so the file's embedding is about the mean over all
its windows and a 1 s tail counts a tenth of a full 10 s segment. Trials come from ``labels.csv`` (the label is
the speaker; ``train.verification.draw_trials``: balanced, different recordings for a target pair, seeded by
``trials_seed``, not the training seed, so checkpoints of different seeds meet the same trials) or from a trials
file in the VoxCeleb convention (``read_trials``). The shards are read twice (``train.audio_segments``): once for
``meta.json`` and ``label.txt`` alone, to list the files and choose the trials, then for the spectrograms of the
trials' files only, kept in their stored float16: memory follows the trials, not the shard set. Scores are
cosines of the mean-subtracted embeddings; EER and minDCF (P_target 0.05, C_miss = C_fa = 1, VoxSRC's) for the
distilled encoder and for the same encoder at random init, on the same trials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.remote import location
from distillkit.train.base import ConfigError
from distillkit.train.verification import (
    P_TARGET,
    Trials,
    TrialsFileError,
    cosine_scores,
    draw_trials,
    equal_error_rate,
    min_dcf,
    read_trials,
)

log = logging.getLogger(__name__)


@dataclass
class AudioFiles:
    """The source files of the evaluated shards (sorted by path), listed from ``meta.json`` and ``label.txt``
    only: no spectrogram is decoded until the trials say which files they need (``load_segments``)."""

    names: list[str] = field(default_factory=list)  # path relative to source.root, POSIX
    speakers: list[str | None] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)  # the shard directory holding the file
    sources: list[str] = field(default_factory=list)  # meta.json ``source`` as stored (what the reader selects on)


@dataclass
class FileSegments:
    """The segments of some files: frames as stored (float16 for the audio pipeline's shards), audio seconds and
    the file of each (an index into the ``files`` asked for)."""

    specs: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    file_of: list[int] = field(default_factory=list)


def list_files(shards: list[Path]) -> AudioFiles:
    """Every source file of ``shards`` with its speaker label (None when unlabelled) and group, without decoding
    a spectrogram: a VoxCeleb-size shard set lists in the memory of its labels.

    Args:
        shards: audio shard directories. A file is named by its path relative to ``source.root``
            (``meta.json`` ``source``); the same path in two directories is refused (a trial could not say which).
    """
    from distillkit.train.audio_segments import read_segments

    rows: dict[str, dict[str, Any]] = {}
    for d in map(location, shards):  # a local folder or a URL (distillkit.remote)
        for seg in read_segments(d, f"audio verification: listing {Path(d).name}", frames=False):
            meta = seg.meta
            name = Path(meta["source"]).as_posix()
            row = rows.setdefault(name, {"dir": d, "source": meta["source"], "speaker": None,
                                         "group": meta.get("group") or name})
            if row["dir"] != d:
                raise ConfigError(d, "", f"{name} is also in {row['dir']}: evaluate shards of one source root")
            if seg.label is not None:
                row["speaker"] = seg.label
    files = AudioFiles()
    for name in sorted(rows):
        row = rows[name]
        files.names.append(name)
        files.speakers.append(row["speaker"])
        files.groups.append(row["group"])
        files.dirs.append(row["dir"])
        files.sources.append(row["source"])
    return files


def load_segments(files: AudioFiles, wanted: np.ndarray) -> FileSegments:
    """The segments of the files ``wanted`` only (the others are skipped undecoded), in the stored dtype.

    Args:
        files: ``list_files``'s listing.
        wanted: indices into ``files``; ``FileSegments.file_of`` indexes this array.
    """
    from distillkit.train.audio_segments import read_segments
    from distillkit.train.streaming import JsonFieldFilter

    local = {(files.dirs[f], files.sources[f]): k for k, f in enumerate(np.asarray(wanted).tolist())}
    out = FileSegments()
    for d in sorted({d for d, _ in local}):
        keep = JsonFieldFilter("meta.json", "source", [src for dd, src in local if dd == d],
                               label="files of the verification trials")
        for seg in read_segments(d, f"audio verification: reading {Path(d).name}", select=keep):
            out.specs.append(seg.frames)
            out.seconds.append(float(seg.meta["duration_s"]))
            out.file_of.append(local[(d, seg.meta["source"])])
    return out


def file_embeddings(segment_emb: np.ndarray, file_of: np.ndarray, seconds: np.ndarray, n_files: int) -> np.ndarray:
    """(n_files, D): per file, the mean of its segments' embeddings weighted by their audio seconds.

    Args:
        segment_emb: (S, D) per segment.
        file_of: (S,) the file of each segment, in 0..n_files-1; every file must have a segment.
        seconds: (S,) audio seconds of each segment.
        n_files: number of files.
    """
    file_of = np.asarray(file_of, dtype=np.int64)
    w = np.maximum(np.asarray(seconds, dtype=np.float64), 1e-6)  # an all-padding segment still counts a little
    out = np.zeros((n_files, segment_emb.shape[1]), dtype=np.float64)
    weight = np.zeros(n_files, dtype=np.float64)
    np.add.at(out, file_of, np.asarray(segment_emb, dtype=np.float64) * w[:, None])
    np.add.at(weight, file_of, w)
    if (weight == 0).any():
        raise ValueError(f"{int((weight == 0).sum())} file(s) without a segment")
    return out / weight[:, None]


def make_trials(files: AudioFiles, trials_file: Path | str | None, n_trials: int, seed: int) -> tuple[Trials, str]:
    """The trials and a phrase saying where they come from.

    Args:
        files: the evaluated files.
        trials_file: a VoxCeleb-style trials file, or None to draw trials from the speaker labels.
        n_trials: trials to draw (labels only).
        seed: seeds the draw (``trials_seed``).
    """
    if trials_file is not None:
        try:
            trials = read_trials(trials_file, files.names)
        except TrialsFileError as exc:
            raise ConfigError(exc.where, "", exc.reason) from None
        return trials, f"trials file {trials_file}"
    if n_trials < 2:  # checked here so that the message names the option, not the labels
        raise ConfigError("eval audio", "n_trials", f"must be >= 2 (one target and one non-target), got {n_trials}")
    labelled = [i for i, s in enumerate(files.speakers) if s is not None]
    if not labelled:
        raise ConfigError("eval audio", "protocol", "no segment has label.txt: put the speaker of each file in "
                          "labels.csv (path,label[,group]) and rebuild, or give --trials FILE")
    try:
        drawn = draw_trials([files.speakers[i] for i in labelled], [files.groups[i] for i in labelled], n_trials,
                            seed)
    except ValueError as exc:
        raise ConfigError("eval audio", "protocol", f"cannot draw verification trials from the labels: {exc}") from None
    idx = np.asarray(labelled, dtype=np.int64)
    speakers = len({files.speakers[i] for i in labelled})
    return (Trials(idx[drawn.enrol], idx[drawn.test], drawn.label),
            f"trials drawn from the labels ({speakers} speakers, {len(labelled)} files, trials_seed {seed}; target "
            "pairs from different recordings)")


def evaluate_verification(checkpoint: Path | None, state: dict[str, Any] | None, shards: list[Path],
                          config: dict[str, Any], device: str = "cpu", encoder: str = "teacher",
                          trials: Path | str | None = None, n_trials: int = 2000,
                          p_target: float = P_TARGET, trials_seed: int = 0) -> dict[str, Any]:
    """EER and minDCF of cosine-scored file embeddings: the distilled encoder against the same encoder at random
    init, on the same trials (``train.audio.evaluate`` with ``protocol = "verification"``).

    Args:
        checkpoint: the checkpoint (for messages), None for random init only.
        state: its model state dict (already checked against the shards' front end), None for random init only.
        shards: audio shard directories.
        config: the training configuration.
        device: torch device for the embeddings.
        encoder: ``"teacher"`` or ``"student"``.
        trials: a trials file (VoxCeleb convention), or None to draw trials from the speaker labels.
        n_trials: trials drawn from the labels (half target, half non-target).
        p_target: minDCF's target prior (C_miss = C_fa = 1).
        trials_seed: seeds the trials drawn from the labels; not the training seed, so that checkpoints trained
            with different seeds are scored on the same trials.

    Returns:
        ``{"eval_protocol": "verification", "protocol": text, "trials": {...}, "p_target", "random_init":
        {"eer", "eer_threshold", "min_dcf", "min_dcf_threshold"}, "distilled": same (with a checkpoint),
        "gain_eer", "gain_min_dcf" (random minus distilled: positive = distillation helps)}``.
    """
    from distillkit.train.audio import add_gains, clip_embeddings, eval_method, eval_runs

    if not 0.0 < p_target < 1.0:
        raise ConfigError("eval audio", "p_target", f"must be in (0, 1), got {p_target}")
    files = list_files([location(s) for s in shards])
    tr, source = make_trials(files, trials, n_trials, trials_seed)
    # decode and embed only the files the trials use (the labels were listed without any spectrogram), and take
    # the mean to subtract over them
    used = np.unique(np.r_[tr.enrol, tr.test])
    local = np.full(len(files.names), -1, dtype=np.int64)
    local[used] = np.arange(len(used))
    segments = load_segments(files, used)
    local_trials = Trials(local[tr.enrol], local[tr.test], tr.label)
    n_target = int(tr.label.sum())
    result: dict[str, Any] = {
        "eval_protocol": "verification",
        "protocol": (f"speaker verification: cosine of mean-subtracted {encoder} clip embeddings (one per file, its "
                     f"segments averaged by duration); {n_target} target + {len(tr) - n_target} non-target trials "
                     f"over {len(used)} files, {source}; minDCF at P_target {p_target:g}, C_miss = C_fa = 1"),
        "trials": {"source": source, "target": n_target, "nontarget": len(tr) - n_target, "files": len(used),
                   "segments": len(segments.specs)},
        "p_target": p_target,
    }
    for name, weights in eval_runs(state):
        method = eval_method(config, shards, state, weights, checkpoint)
        crop = method.student.encoder.base_grid[1] * 4
        emb = clip_embeddings(method, segments.specs, crop, device, encoder)
        scores = cosine_scores(file_embeddings(emb, np.asarray(segments.file_of), np.asarray(segments.seconds),
                                               len(used)), local_trials)
        eer, eer_threshold = equal_error_rate(scores, tr.label)
        dcf, dcf_threshold = min_dcf(scores, tr.label, p_target)
        result[name] = {"eer": eer, "eer_threshold": eer_threshold, "min_dcf": dcf,
                        "min_dcf_threshold": dcf_threshold}
        log.info("verification %s: EER %.4f, minDCF %.4f", name, eer, dcf)
    add_gains(result, ("eer", "min_dcf"), higher_is_better=False)
    return result


def format_verification(result: dict[str, Any]) -> str:
    """The protocol line and a table of EER and minDCF per encoder (and the gain with a checkpoint).

    Args:
        result: ``evaluate_verification``'s result.
    """
    dcf = f"minDCF({result['p_target']:g})"
    lines = [result["protocol"], f"{'encoder':<12} {'EER':>8} {dcf:>13}"]
    for name, title in (("random_init", "random init"), ("distilled", "distilled")):
        if name in result:
            lines.append(f"{title:<12} {100 * result[name]['eer']:>7.2f}% {result[name]['min_dcf']:>13.4f}")
    if "distilled" in result:
        lines.append(f"{'gain':<12} {100 * result['gain_eer']:>+7.2f}% {result['gain_min_dcf']:>+13.4f}"
                     "   (random init minus distilled: positive = distillation helps; both lower = better)")
    return "\n".join(lines)


def verification_headline(result: dict[str, Any]) -> dict[str, Any]:
    """``AudioTrainer.headline`` of a verification result: the EER, gain = random init minus distilled.

    Args:
        result: ``evaluate_verification``'s result.
    """
    distilled = result["distilled"]["eer"] if "distilled" in result else None
    random = result["random_init"]["eer"]
    return {"metric": "EER (speaker verification; lower is better, gain = random - distilled)",
            "distilled": distilled, "random": random,
            "gain": None if distilled is None else random - distilled}
