"""COMODO: egocentric video + IMU recordings -> timestamp-aligned windows (IMU, frames, optional teacher embedding).

A ref is one recording (``full_scale/{uid}.mp4`` + ``imu/{uid}.csv`` of an Ego4D ``v2`` folder); its windows are
enumerated on the worker (``samples``), so the plan never opens a video. Per recording: read and clean the IMU
(``sensors.imu``), take the clock offset from ``clock_offsets.json`` or estimate it from the recording itself
(``preprocess.alignment``), cut the span both streams cover into windows on the IMU clock
(``preprocess.imu_windows``), and for each window decode only the frames nearest to its F instants
(``sensors.video.VideoReader``: seek + decode forward). With ``stages.teacher.enabled`` a frozen video teacher,
loaded once per worker (``setup``), embeds the windows in batches across recordings into ``teacher.npy``.
``source.uids_file`` and ``source.splits_dir`` choose the recordings as the released subset list and
train/val/test files do, and stamp each window's split.
Shard contract: ``fields`` below and docs/reading.md; decisions: ``docs/comodo.md``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from distillkit.pipelines.base import (
    Built,
    Demo,
    FieldSpec,
    Pipeline,
    Rejected,
    Rejection,
    Sample,
    SampleRef,
    guarded,
)
from distillkit.pipelines.codecs import SampleView, json_bytes, npy_bytes
from distillkit.pipelines.manifest import Key, Manifest, ManifestError, check_output_outside
from distillkit.pipelines.placement import DEVICES, run_stage
from distillkit.pipelines.schema import check_jpeg, expect_array
from distillkit.sensors.imu import CHANNELS, TIME_COLUMN, ImuRecord
from distillkit.sensors.listing import Found, Unusable, list_inputs, printable, shard_key, sort_key

log = logging.getLogger(__name__)

OFFSET_MODES = ("auto", "given", "estimate", "zero")
LABEL_SOURCES = ("labels", "scenario")
# The released split files (Breezelled/COMODO comodo/train.py:132-134 reads them from the dataset folder).
SPLITS = ("train", "val", "test")
MAX_BAD_TIMESTAMPS = 0.01  # share of IMU rows displaced or duplicated above which a recording is rejected
# A step back in IMU time longer than this many median intervals is a clock jump, not logger jitter: sorting would
# interleave two stretches of the recording, so the recording is rejected whatever its share of displaced rows.
MAX_BACKSTEP_INTERVALS = 4.0
# Median sample intervals of real IMUs (10 Hz .. 10 kHz), ms: outside, the timestamps are in another unit.
IMU_INTERVAL_MS = (0.1, 100.0)
# Video files of a recording, compared case-insensitively (GoPro writes GX010001.MP4, phones .MOV).
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".ts", ".mts")
ESTIMATE_WIDTH = 96  # px: frames are decoded this wide (luma only) to measure motion energy


class ComodoPipeline(Pipeline):
    name = "comodo"
    units = ("windows", "recordings")
    stat_units = {  # stats names them (Pipeline.stat_units)
        r"imu_(mean|std)_accl_[xyz]": "m/s^2 (accelerometer, over all IMU values)",
        r"imu_(mean|std)_gyro_[xyz]": "rad/s (gyroscope, over all IMU values)",
        "windows_labelled": "windows with a label.txt",
        "windows_offset_estimated": "windows whose clock offset was estimated (not from clock_offsets.json)",
        r"windows_split_(train|val|test)": "windows of the split's recordings (source.splits_dir)",
        "uids_listed": "uids in source.uids_file",
        "uids_listed_without_video": "listed uids with no video under full_scale/ (left out)",
        "uids_listed_without_imu": "listed uids with no imu/{uid}.csv (left out)",
        "recordings_not_listed": "recordings under the root left out: not in source.uids_file",
        "recordings_in_no_split": "recordings left out: in none of source.splits_dir's train/val/test.txt",
        "split_uids_without_recording": "uids of the split files (and of uids_file, if set) with no file",
    }
    source_key = "source.root"
    demo = Demo(synth="ego", manifest="demo-comodo", size="demo")
    schema = {
        "source": {
            "kind": Key(str, "ego4d", choices=("ego4d",), doc="an Ego4D v2-style folder"),
            "root": Key("existing_path", required=True, doc="holds full_scale/{uid}.mp4 and imu/{uid}.csv"),
            "offsets": Key(str, "clock_offsets.json", doc="{uid: offset_ms} under root (IMU + offset = video)"),
            "labels": Key(str, "labels.csv", doc="uid,start_ms,end_ms,label under root (video clock); optional"),
            "uids_file": Key(str, "", doc="uids to build, one a line (the format of the released "
                                          "dataset/Ego4D/ego4d_subset_ids.txt), under root or absolute; "
                                          "\"\" = every recording under root"),
            "splits_dir": Key(str, "", doc="folder (under root or absolute) with train.txt, val.txt, test.txt, "
                                           "uid<TAB>scenario a line as released: each window records its "
                                           "recording's split; recordings in none are left out; \"\" = no splits"),
            "label_from": Key(str, "labels", choices=LABEL_SOURCES,
                              doc="label.txt from labels (labels.csv intervals) or scenario (the split files' "
                                  "second column, every window of the recording, as released)"),
        },
        "stages": {
            "imu": {
                "rate_hz": Key(float, 200.0, doc="uniform grid rate"),
                "window_s": Key(float, 5.0),
                "stride_s": Key(float, 5.0),
                "max_gap_s": Key(float, 0.1, doc="a longer hole between IMU samples rejects the window"),
                "max_nan_fraction": Key(float, 0.01, doc="share of a window's samples that may be NaN rows"),
            },
            "frames": {
                "n_frames": Key(int, 8),
                "size": Key(int, 224, doc="side of the centre-cropped square frames, px"),
                "crop_top_px": Key(int, 0, doc="rows cut off the top of every frame first (overlays, counters)"),
                "jpeg_quality": Key(int, 90),
                "max_frame_distance": Key(float, 1.5, doc="a frame further than this many median frame intervals "
                                                          "from its instant (a hole in the video) rejects the window"),
            },
            "offset": {
                "mode": Key(str, "auto", choices=OFFSET_MODES,
                            doc="auto: given if listed else estimated; given: listed only; estimate: always; zero"),
                "max_offset_ms": Key(float, 1000.0, doc="search range of the estimate"),
                "min_peak": Key(float, 0.3, doc="a lower correlation peak rejects the recording"),
                "estimate_s": Key(float, 120.0, doc="seconds of video decoded for the estimate"),
            },
            "teacher": {
                "enabled": Key(bool, False, doc="embed every window's frames offline into teacher.npy"),
                "arch": Key(str, "conv3d", choices=("conv3d", "timesformer")),
                "checkpoint": Key(str, "", doc="local state dict; empty = random init (warned)"),
                "seed": Key(int, 0),
                "batch_size": Key(int, 16, doc="windows per teacher forward"),
                "device": Key(str, "auto", choices=DEVICES,
                              doc='"auto": a GPU worker, else CUDA where the shard is built, else CPU'),
            },
        },
        "output": {"recordings_per_shard": Key(int, 1, doc="recordings per shard task (each gives many windows)")},
    }

    def __init__(self) -> None:
        self._teachers: dict[str, tuple[tuple[Any, ...], Any]] = {}  # device -> (checkpoint identity, teacher)
        # What the last plan left out (uids_file, splits_dir), for index.json's stats: finalize_stats sees only
        # the built windows' totals, and it runs on the client that planned, with this same (registered) instance.
        self._plan_counts: dict[str, float] = {}

    # ---- client ----------------------------------------------------------------------
    def check_manifest(self, m: Manifest) -> None:
        check_output_outside(m, "source.root")
        imu, frames = m.data["stages"]["imu"], m.data["stages"]["frames"]
        checks = {
            "stages.imu.rate_hz": imu["rate_hz"] > 0,
            "stages.imu.window_s": imu["window_s"] > 0,
            "stages.imu.stride_s": imu["stride_s"] > 0,
            "stages.frames.n_frames": frames["n_frames"] >= 1,
            "stages.frames.size": frames["size"] >= 8,
            "stages.frames.jpeg_quality": 1 <= frames["jpeg_quality"] <= 100,
            "stages.frames.crop_top_px": frames["crop_top_px"] >= 0,
            "stages.frames.max_frame_distance": frames["max_frame_distance"] > 0,
            "output.recordings_per_shard": m.get("output.recordings_per_shard") >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ManifestError(m.path, key, "must be >= 0" if key.endswith("crop_top_px") else "out of range")
        if abs(imu["window_s"] * imu["rate_hz"] - round(imu["window_s"] * imu["rate_hz"])) > 1e-6:
            raise ManifestError(m.path, "stages.imu.window_s", "window_s * rate_hz must be a whole number of samples")
        if m.get("stages.teacher.checkpoint") and not Path(m.get("stages.teacher.checkpoint")).is_file():
            raise ManifestError(m.path, "stages.teacher.checkpoint", "file does not exist")
        if m.get("source.label_from") == "scenario" and not m.get("source.splits_dir"):
            raise ManifestError(m.path, "source.label_from", "'scenario' takes the label from the split files: "
                                                             "set source.splits_dir")

    def plan(self, m: Manifest) -> tuple[list[SampleRef], list[dict[str, str]]]:
        root = Path(m.get("source.root"))
        # entries named like a recording's file, usable or not (a folder named x.mp4 is reported, not skipped)
        try:
            videos = _files_by_uid(root, "full_scale", VIDEO_SUFFIXES)
            imus = _files_by_uid(root, "imu", (".csv",))
        except OSError as exc:
            raise ManifestError(m.path, "source.root", printable(f"cannot list {exc.filename}: "
                                                                 f"{exc.strerror or exc}")) from None
        if not videos and not imus:
            raise ManifestError(m.path, "source.root", f"{root} has no full_scale/*.mp4 or imu/*.csv")
        offsets = _read_offsets(root / m.get("source.offsets"), m)
        labels = _read_labels(root / m.get("source.labels"), m)
        uids = sorted(videos.keys() | imus.keys())
        counts: dict[str, float] = {}
        listed = _read_uids(root / m.get("source.uids_file"), m) if m.get("source.uids_file") else None
        if listed is not None:
            # A listed uid without its files is reported, not rejected: the list names what the release could
            # access, a download may hold part of it, and a rejection would count against output.max_rejected
            # as one window without any duration to say how many it stands for.
            counts = {"uids_listed": len(listed),
                      "uids_listed_without_video": sum(u not in videos for u in listed),
                      "uids_listed_without_imu": sum(u not in imus for u in listed),
                      "recordings_not_listed": sum(u not in listed for u in uids)}
            uids = [u for u in uids if u in listed and u in videos and u in imus]
        splits = _read_splits(root / m.get("source.splits_dir"), m) if m.get("source.splits_dir") else None
        if splits is not None:
            # A recording in no split file is left out (the release builds only the uids its split files list,
            # Breezelled/COMODO comodo/utils/dataloader_util.py:130-135), counted, never distilled by accident.
            on_disk = set(uids)
            counts["recordings_in_no_split"] = sum(u not in splits for u in uids)
            counts["split_uids_without_recording"] = sum(
                u not in on_disk and (listed is None or u in listed) for u in splits)
            uids = [u for u in uids if u in splits]
        self._plan_counts = counts
        if counts:
            log.info("%s: %s", m.path, ", ".join(f"{k} {v:g}" for k, v in counts.items()))
        # The teacher's weights decide teacher.npy: a retrained checkpoint at the same path must rebuild the shards,
        # so it stamps every recording's inputs (Pipeline.input_files) with the video and the CSV.
        ckpt = m.get("stages.teacher.checkpoint") if m.get("stages.teacher.enabled") else ""
        refs, rejected = [], []
        for uid in uids:
            entries = {"full_scale": videos.get(uid, []), "imu": imus.get(uid, [])}
            usable = {k: [e for e in v if isinstance(e, Found)] for k, v in entries.items()}
            # An unusable entry (a folder named x.MP4, a loop) is rejected on its own, with its own reason; the
            # recording is built from its usable files when they pair up (x.mp4 beside that x.MP4/ folder).
            bad = {k: [e for e in v if isinstance(e, Unusable)] for k, v in entries.items()}
            rejected.extend({"source": f"{k}/{printable(u.rel)}", "stage": "plan", "reason": printable(u.reason)}
                            for k, v in bad.items() for u in v)
            if any(bad[k] and not usable[k] for k in entries):
                # the file missing only because its entry is unusable: that entry's rejection says why, and the
                # recording is not counted twice nor said to have "no video" when its video is there
                continue
            problem = _pairing_problem(uid, usable["full_scale"], usable["imu"])
            if problem is not None:
                rejected.append({"source": problem[0], "stage": "plan", "reason": problem[1]})
                continue
            video, imu = usable["full_scale"][0], usable["imu"][0]
            files = [video.path, imu.path] + ([str(ckpt)] if ckpt else [])
            # Paths keep the names' bytes (PEP 383) to open them; the uid, written into times.json and messages,
            # and the source are printable; the key is the uid's (sensors.listing.shard_key).
            payload = {"uid": printable(uid), "files": files, "offset_ms": offsets.get(uid),
                       "labels": labels.get(uid, [])}
            if splits is not None:  # only then: shards built without splits keep their plan (and fingerprint)
                payload["split"], payload["scenario"] = splits[uid]
            refs.append(SampleRef(shard_key(uid), f"full_scale/{video.shown}", payload))
        if not refs and not rejected:
            kept_by = " and ".join(k for k in ("source.uids_file", "source.splits_dir") if m.get(k))
            raise ManifestError(m.path, "source", f"no recording under {root} is kept by {kept_by}")
        return refs, rejected

    def refs_per_shard(self, m: Manifest) -> int:
        return int(m.get("output.recordings_per_shard"))

    # ---- worker ----------------------------------------------------------------------
    def torch_stages(self, m: Manifest) -> dict[str, str]:
        t = m.data["stages"]["teacher"]
        return {"teacher": t["device"]} if t["enabled"] else {}

    def teacher_embed(self, clips: np.ndarray, t: dict[str, Any], device: str) -> np.ndarray:
        """The teacher stage (``pipelines.placement``): (B, T, H, W, 3) uint8 clips -> (B, D) float16.
        The teacher is loaded on first use, in the process and on the device that runs it, and again when its
        checkpoint file changed since (a worker process outlives builds: a teacher retrained into the same path
        must not be served from memory)."""
        from distillkit.preprocess.video_encoder import embed_clips, load_video_teacher

        identity = (t["arch"], t["seed"], *_file_identity(t["checkpoint"]))
        if device not in self._teachers or self._teachers[device][0] != identity:
            teacher, _ = load_video_teacher(t["arch"], t["checkpoint"], t["seed"])
            self._teachers[device] = (identity, teacher.to(device))
        return embed_clips(self._teachers[device][1], clips, device).cpu().numpy().astype(np.float16)

    def samples(self, ref: SampleRef, m: Manifest) -> Iterable[Built]:
        from distillkit.preprocess.alignment import frame_instants, nearest_frames
        from distillkit.preprocess.imu_windows import WindowError, imu_window, window_starts
        from distillkit.sensors.imu import read_imu_csv
        from distillkit.sensors.video import VideoReader, frame_times_ms, probe_video

        video_path, imu_path = ref.payload["files"][:2]  # then the teacher checkpoint, when there is one
        uid = ref.payload["uid"]
        st = m.data["stages"]
        imu_cfg, fr = st["imu"], st["frames"]
        try:
            rec = read_imu_csv(imu_path)
        except ValueError as exc:
            raise Rejected("imu", f"{uid}: {exc}") from None
        _check_imu_clock(rec, uid, imu_path)
        try:
            info = probe_video(video_path)
            pts = frame_times_ms(video_path)
        except ValueError as exc:
            raise Rejected("video", f"{uid}: {exc}") from None
        if len(pts) == 0:
            raise Rejected("video", f"{uid}: {video_path} has no frames")
        rot = (info.rotation_deg // 90) % 4
        height = info.width if rot % 2 else info.height  # as displayed, the rows crop_top_px cuts
        if fr["crop_top_px"] >= height:
            raise Rejected("video", f"{uid}: stages.frames.crop_top_px = {fr['crop_top_px']} leaves nothing of "
                                    f"{video_path}'s {height} px high frames")
        offset_ms, source, peak = self._offset(ref, m, rec, video_path, pts, info)
        window_ms = imu_cfg["window_s"] * 1000.0
        # The span both streams cover, on the IMU clock (video time - offset).
        begin = max(float(rec.t_ms[0]), info.start_ms - offset_ms)
        end = min(float(rec.t_ms[-1]), info.end_ms - offset_ms)
        if end - begin < window_ms:
            raise Rejected("align", (
                f"{uid}: IMU [{rec.t_ms[0]:.0f}, {rec.t_ms[-1]:.0f}] ms and video [{info.start_ms:.0f}, "
                f"{info.end_ms:.0f}] ms (offset {offset_ms:+.1f} ms) overlap for {max(end - begin, 0) / 1000:.2f} s, "
                f"less than one {imu_cfg['window_s']:g} s window"))
        n = int(round(imu_cfg["window_s"] * imu_cfg["rate_hz"]))
        starts = window_starts(begin, end, window_ms, imu_cfg["stride_s"] * 1000.0)
        # A frame may be this far from its instant: nearest-frame choice on a steady stream is within half an
        # interval, a dropped frame or two stay within 1.5; further means a hole and a stale frame.
        interval = float(np.median(np.diff(pts))) if len(pts) > 1 else info.duration_ms
        max_distance = fr["max_frame_distance"] * interval
        with VideoReader(video_path) as reader:
            for k, t0 in enumerate(starts):
                where = f"{ref.source}@{t0:.0f}ms"
                try:
                    x = imu_window(rec, float(t0), imu_cfg["rate_hz"], n, imu_cfg["max_gap_s"] * 1000.0,
                                   imu_cfg["max_nan_fraction"])
                except WindowError as exc:
                    yield Rejection(where, "imu", f"{uid} window {k}: {exc}")
                    continue
                want = frame_instants(float(t0), window_ms, fr["n_frames"]) + offset_ms
                chosen = pts[nearest_frames(pts, want)]
                far = int(np.argmax(np.abs(chosen - want)))
                if abs(chosen[far] - want[far]) > max_distance:
                    yield Rejection(where, "video", (
                        f"{uid} window {k}: nearest frame {chosen[far]:.1f} ms is {abs(chosen[far] - want[far]):.1f} "
                        f"ms from its instant {want[far]:.1f} ms (video clock), a hole in the video (limit "
                        f"{max_distance:.1f} ms = stages.frames.max_frame_distance x the median frame interval)"))
                    continue
                try:
                    frames, got = reader.frames_at(chosen)
                except ValueError as exc:
                    yield Rejection(where, "video", f"{uid} window {k}: {exc}")
                    continue
                fields = {"imu.npy": npy_bytes(x)}
                for j, img in enumerate(frames):
                    img = np.rot90(img, rot) if rot else img
                    fields[f"frame{j:02d}.jpg"] = _jpeg(square_crop(img, fr["size"], fr["crop_top_px"]),
                                                        fr["jpeg_quality"])
                times = {"uid": uid, "window": k, "t0_ms": round(float(t0), 3),
                         "t1_ms": round(float(t0) + window_ms, 3), "rate_hz": imu_cfg["rate_hz"],
                         "offset_ms": round(offset_ms, 3), "offset_source": source,
                         "offset_peak": None if peak is None else round(peak, 4),
                         "frame_ms": [round(float(t), 3) for t in got]}
                if "split" in ref.payload:
                    times["split"], times["scenario"] = ref.payload["split"], ref.payload["scenario"]
                fields["times.json"] = json_bytes(times)
                if m.get("source.label_from") == "scenario":
                    label = ref.payload["scenario"] or None  # one label per recording, as released
                else:
                    label = window_label(ref.payload["labels"], float(t0) + offset_ms,
                                         float(t0) + window_ms + offset_ms)
                if label is not None:
                    fields["label.txt"] = label.encode()
                yield Sample(f"{ref.key}_{k:06d}", fields, where)

    def _offset(self, ref: SampleRef, m: Manifest, rec: Any, video_path: str, pts: np.ndarray,
                info: Any) -> tuple[float, str, float | None]:
        """(offset ms, where it came from, correlation peak or None) for one recording."""
        from distillkit.preprocess.alignment import estimate_offset

        cfg = m.data["stages"]["offset"]
        given = ref.payload.get("offset_ms")
        uid = ref.payload["uid"]
        mode = cfg["mode"]
        if mode == "zero":
            return 0.0, "zero", None
        if mode in ("auto", "given") and given is not None:
            return float(given), "given", None
        if mode == "given":
            raise Rejected("offset", f"{uid}: no clock offset in {m.get('source.offsets')} (stages.offset.mode = "
                                     "'given')")
        use = pts[pts < pts[0] + cfg["estimate_s"] * 1000.0]
        if len(use) < 3:
            raise Rejected("offset", f"{uid}: too few frames ({len(use)}) to estimate the clock offset")
        energy = _motion_energy(video_path, use, m.get("stages.frames.crop_top_px"), (info.rotation_deg // 90) % 4)
        try:
            est = estimate_offset(rec.t_ms, rec.x[3:], use, energy, max_offset_ms=cfg["max_offset_ms"])
        except ValueError as exc:
            raise Rejected("offset", f"{uid}: {exc}") from None
        if est.at_edge:
            # The correlation still rises towards the end of the searched range: the true offset is probably
            # beyond it, and the estimate (with its possibly high peak) is only the range's end.
            raise Rejected("offset", f"{uid}: clock offset estimate {est.offset_ms:+.1f} ms for {video_path} is at the "
                                     f"edge of the searched +-{cfg['max_offset_ms']:g} ms: the offset may lie beyond "
                                     "it; raise stages.offset.max_offset_ms")
        if est.peak < cfg["min_peak"]:
            raise Rejected("offset", f"{uid}: clock offset estimate {est.offset_ms:+.1f} ms is unreliable "
                                     f"(correlation peak {est.peak:.2f} < stages.offset.min_peak {cfg['min_peak']})")
        return est.offset_ms, "estimated", est.peak

    def build_refs(self, refs: list[SampleRef], m: Manifest, raise_errors: bool = False) -> Iterator[Built]:
        if not m.get("stages.teacher.enabled"):
            for ref in refs:
                yield from self._counted(ref, m, guarded(ref, lambda ref=ref: self.samples(ref, m), raise_errors))
            return
        batch = int(m.get("stages.teacher.batch_size"))
        pending: list[Built] = []
        for ref in refs:
            for item in self._counted(ref, m, guarded(ref, lambda ref=ref: self.samples(ref, m), raise_errors)):
                pending.append(item)
                if sum(isinstance(x, Sample) for x in pending) >= batch:
                    yield from self._embed(pending, m)
                    pending = []
        yield from self._embed(pending, m)

    def _counted(self, ref: SampleRef, m: Manifest, items: Iterable[Built]) -> Iterator[Built]:
        """``items`` of one recording, with a rejection of the recording as a whole (or of its rest) turned into
        one rejection per window it would have given, so that ``output.max_rejected`` (rejected / (written +
        rejected) entries, ``pipelines.runner.BuildResult``) compares windows with windows.

        Why: counted as one entry, a recording rejected whole weighed as one window; with one of three recordings
        rejected (a third of the windows) the ratio read 1/22 = 4.5% and passed a 5% guard. The estimate is the
        windows of ``stages.imu.window_s`` every ``stride_s`` over the recording's duration (``_expected_windows``),
        less those it already gave; at least one. The first entry (source ``<video>@whole``) keeps the reason and
        says how many it stands for; each other names the key its window would have had (``<uid>_<k>``).

        Args:
            ref: the recording.
            m: the manifest.
            items: ``guarded(ref, ...)``'s samples and rejections.
        """
        done = 0
        for item in items:
            if not (isinstance(item, Rejection) and item.source == ref.source):
                done += 1
                yield item
                continue
            total = _expected_windows(ref, m)
            n = max(total - done, 1)
            yield Rejection(f"{ref.source}@whole", item.stage,
                            f"{item.reason} (recording rejected whole: counted as the {n} windows it would have "
                            f"given, {ref.key}_{done:06d}..{ref.key}_{done + n - 1:06d})")
            for k in range(done + 1, done + n):
                yield Rejection(f"{ref.key}_{k:06d}", item.stage,
                                f"{ref.payload['uid']}: window {k} not built: its recording was rejected whole "
                                f"({ref.source}@whole)")

    def _embed(self, items: list[Built], m: Manifest) -> list[Built]:
        """Add ``teacher.npy`` to the samples among ``items`` with one batched forward (order kept)."""
        from distillkit.sensors.images import decode_rgb

        done = [x for x in items if isinstance(x, Sample)]
        if done:
            clips = np.stack([np.stack([decode_rgb(s.fields[f]) for f in sorted(s.fields) if f.startswith("frame")])
                              for s in done])
            t = m.data["stages"]["teacher"]
            emb = run_stage(m, "teacher", "teacher_embed", clips, t, device=t["device"])
            for s, e in zip(done, emb, strict=True):
                s.fields["teacher.npy"] = npy_bytes(e)
        return items

    # ---- schema, statistics, picture -----------------------------------------------------
    def fields(self, sample: SampleView) -> dict[str, FieldSpec]:
        specs = {
            "imu.npy": FieldSpec("float32 (6, T) accel x/y/z, gyro x/y/z on a uniform grid", check=_check_imu),
            "times.json": FieldSpec("uid, t0_ms, t1_ms, rate_hz, offset_ms, frame_ms (video clock); split and "
                                    "scenario with source.splits_dir",
                                    check=_check_times),
            "teacher.npy": FieldSpec("float16 (D,) frozen video-teacher embedding", required=False,
                                     check=lambda a, s: expect_array(a, "float16", 1)),
            "label.txt": FieldSpec("activity label of the window (majority over it, video clock)", required=False,
                                   check=_check_label),
        }
        times = sample["times.json"] if "times.json" in sample else {}
        n_frames = len(times.get("frame_ms", [])) if isinstance(times, dict) else 0
        for j in range(max(n_frames, 1)):
            specs[f"frame{j:02d}.jpg"] = FieldSpec("centre-cropped square RGB frame (JPEG)", check=check_jpeg)
        return specs

    def sample_stats(self, sample: SampleView) -> dict[str, float]:
        x = sample["imu.npy"].astype(np.float64)
        out = {"samples": 1.0, "imu_values": float(x.shape[1])}
        for c, name in enumerate(CHANNELS):
            out[f"{name}_sum"] = float(x[c].sum())
            out[f"{name}_sqsum"] = float((x[c] ** 2).sum())
        times = sample["times.json"]
        out["offset_estimated"] = float(times.get("offset_source") == "estimated")
        out["labelled"] = float("label.txt" in sample)
        if "split" in times:
            out[f"split_{times['split']}"] = 1.0
        return out

    def finalize_stats(self, totals: dict[str, float]) -> dict[str, float]:
        n = totals.get("imu_values", 0.0)
        if not n:
            return dict(self._plan_counts)
        out = {"samples": totals["samples"], "windows_offset_estimated": totals.get("offset_estimated", 0.0),
               "windows_labelled": totals.get("labelled", 0.0)}
        if self._plan_counts.get("recordings_in_no_split") is not None:  # built with split files: every split
            out.update({f"windows_split_{name}": totals.get(f"split_{name}", 0.0) for name in SPLITS})
        out.update(self._plan_counts)
        for name in CHANNELS:
            mean = totals[f"{name}_sum"] / n
            out[f"imu_mean_{name}"] = mean
            out[f"imu_std_{name}"] = float(np.sqrt(max(totals[f"{name}_sqsum"] / n - mean**2, 0.0)))
        return out

    def render(self, sample: SampleView) -> Any:
        from distillkit.pipelines.render_comodo import render_comodo

        return render_comodo(sample)


# ---- helpers -------------------------------------------------------------------------------
def square_crop(img: np.ndarray, size: int, crop_top_px: int = 0) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3): cut ``crop_top_px`` rows off the top, take the centred square, resize
    (area interpolation when shrinking, bicubic when enlarging).

    Raises:
        ValueError: ``crop_top_px`` is negative or leaves no row.
    """
    if not 0 <= crop_top_px < img.shape[0]:
        raise ValueError(f"crop_top_px {crop_top_px} must be in [0, {img.shape[0]}) for {img.shape[0]} px high frames")
    img = img[crop_top_px:]
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    sq = img[y:y + s, x:x + s]
    interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(sq), (size, size), interpolation=interp)


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def window_label(intervals: list[list[Any]], a_ms: float, b_ms: float) -> str | None:
    """The label covering most of ``[a_ms, b_ms)`` (video clock), if labelled intervals cover at least half of
    it; ``None`` otherwise. ``intervals``: ``[start_ms, end_ms, label]`` rows."""
    cover: dict[str, float] = {}
    for s, e, lab in intervals:
        overlap = min(float(e), b_ms) - max(float(s), a_ms)
        if overlap > 0:
            cover[lab] = cover.get(lab, 0.0) + overlap
    if not cover or sum(cover.values()) < 0.5 * (b_ms - a_ms):
        return None
    return max(sorted(cover), key=lambda lab: cover[lab])


def _motion_energy(video_path: str, pts: np.ndarray, crop_top_px: int, rot: int = 0) -> np.ndarray:
    """Motion energy between consecutive frames at ``pts``: luma planes (no colour conversion), turned by ``rot``
    quarter turns so that ``crop_top_px`` cuts the displayed top (as for the stored frames), shrunk to
    ``ESTIMATE_WIDTH`` px with OpenCV (cheaper than a swscale context per frame), in chunks of 64 frames."""
    from distillkit.preprocess.alignment import motion_energy
    from distillkit.sensors.video import VideoReader

    energies, last = [], None
    with VideoReader(video_path) as reader:
        for i in range(0, len(pts), 64):
            frames, got = reader.frames_at(pts[i:i + 64], pixel_format="gray")
            frames = (np.rot90(frames, rot, axes=(1, 2)) if rot else frames)[:, crop_top_px:]
            h, w = frames.shape[1:]
            scale = min(1.0, ESTIMATE_WIDTH / w)
            size = (max(round(w * scale), 2), max(round(h * scale), 2))
            gray = np.stack([cv2.resize(np.ascontiguousarray(f), size, interpolation=cv2.INTER_AREA) for f in frames])
            if last is not None:
                gray, got = np.concatenate([last[0][None], gray]), np.concatenate([[last[1]], got])
            energies.append(motion_energy(gray, got)[0])
            last = (gray[-1], got[-1])
    return np.concatenate(energies)


def _file_identity(path: str) -> tuple[Any, ...]:
    """(path, size, mtime ns) of a file, the runner's notion of "changed" (``inputs_stamp``); ``(path,)`` for ""
    or a file that cannot be read (its loading then reports why)."""
    if not path:
        return (path,)
    try:
        st = Path(path).stat()
    except OSError:
        return (path,)
    return path, st.st_size, st.st_mtime_ns


def _files_by_uid(root: Path, folder: str, suffixes: tuple[str, ...]) -> dict[str, list[Found | Unusable]]:
    """Entries of ``root/folder`` whose suffix is one of ``suffixes`` in any case (``GX010001.MP4``), by stem (the
    recording uid), sorted: readable files as ``Found``, the others (a folder named ``x.mp4``, a symlink loop, an
    unreadable file) as ``Unusable`` with their reason (``sensors.listing``).

    Args:
        root: the source root.
        folder: ``"full_scale"`` or ``"imu"``.
        suffixes: lower-case suffixes with their dot.

    Raises:
        OSError: the folder exists but cannot be listed.
    """
    listing = list_inputs(root / folder, suffixes, recursive=False)
    found: dict[str, list[Found | Unusable]] = {}
    for entry in sorted([*listing.files, *listing.unusable], key=lambda e: sort_key(e.rel)):
        found.setdefault(Path(entry.rel).stem, []).append(entry)
    return found


def _pairing_problem(uid: str, videos: list[Found], imus: list[Found]) -> tuple[str, str] | None:
    """(source, reason) when recording ``uid`` has no video, no CSV, or several of either (``a.mp4`` and ``a.MOV``:
    which one is meant?); None when it has one of each. Sources and reasons are printable.

    Args:
        uid: the recording id (the files' stem).
        videos: its readable files in ``full_scale/`` (unusable entries are rejected apart, with their reason).
        imus: its readable files in ``imu/``.
    """
    shown = printable(uid)
    for folder, paths in (("full_scale", videos), ("imu", imus)):
        if len(paths) > 1:
            return f"{folder}/{printable(paths[0].rel)}", (f"{shown}: several files in {folder}/ for one recording: "
                                                           f"{', '.join(printable(p.rel) for p in paths)}")
    if not imus:
        return (f"full_scale/{printable(videos[0].rel)}",
                f"{shown}: no imu/{shown}.csv for full_scale/{printable(videos[0].rel)}")
    if not videos:
        imu = printable(imus[0].rel)
        return f"imu/{imu}", f"{shown}: no video full_scale/{shown}.mp4 (or .mov, ...) for imu/{imu}"
    return None


def _check_imu_clock(rec: ImuRecord, uid: str, imu_path: str) -> None:
    """Reject a recording whose IMU clock cannot be trusted (``Rejected``, one line naming the file).

    A few displaced or conflicting rows are logger hiccups (sorted / dropped by ``read_imu_csv``); many mean a
    broken clock, and one step back by more than ``MAX_BACKSTEP_INTERVALS`` median intervals is a clock jump
    (sorting would interleave two stretches of the recording, whatever the share of displaced rows).

    Args:
        rec: the recording (``sensors.imu.ImuRecord``).
        uid: its id, for the message.
        imu_path: its CSV, for the message.
    """
    if len(rec.t_ms) < 2:
        raise Rejected("imu", f"{uid}: fewer than two IMU samples in {imu_path}")
    interval = rec.median_interval_ms
    if not IMU_INTERVAL_MS[0] <= interval <= IMU_INTERVAL_MS[1]:
        # Seconds, microseconds or nanoseconds in the millisecond column would otherwise show up only as every
        # window rejected for a gap or an overlap, never as the one cause.
        raise Rejected("imu", f"{uid}: median IMU interval {interval:.6g} ms in {imu_path} (a {1000 / interval:.4g} Hz "
                              f"IMU); {TIME_COLUMN} must be milliseconds (IMUs log at "
                              f"{1000 / IMU_INTERVAL_MS[1]:g}-{1000 / IMU_INTERVAL_MS[0]:g} Hz)")
    if rec.max_backstep_ms > MAX_BACKSTEP_INTERVALS * interval:
        raise Rejected("imu", f"{uid}: IMU clock steps back {rec.max_backstep_ms:.1f} ms after "
                              f"{rec.backstep_at_ms:.1f} ms in {imu_path} ({rec.max_backstep_ms / interval:.0f} "
                              f"median intervals, limit {MAX_BACKSTEP_INTERVALS:g}; {rec.n_out_of_order} of "
                              f"{rec.n_rows} rows out of order): the IMU clock jumped")
    for what, count in (("out of order", rec.n_out_of_order), ("duplicated with different values",
                                                                rec.n_duplicates)):
        if count > MAX_BAD_TIMESTAMPS * rec.n_rows:
            raise Rejected("imu", f"{uid}: {count} of {rec.n_rows} IMU timestamps in {imu_path} are {what} "
                                  f"(more than {MAX_BAD_TIMESTAMPS:.0%}): the IMU clock cannot be trusted")


def _read_offsets(path: Path, m: Manifest) -> dict[str, float]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {str(k): float(v) for k, v in data.items()}
    except (ValueError, TypeError) as exc:
        raise ManifestError(path, "", f"clock offsets must be a JSON object {{uid: offset_ms}} ({exc})") from None


def _read_labels(path: Path, m: Manifest) -> dict[str, list[list[Any]]]:
    if not path.is_file():
        return {}
    out: dict[str, list[list[Any]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        need = {"uid", "start_ms", "end_ms", "label"}
        if not need <= set(reader.fieldnames or ()):
            raise ManifestError(path, "", f"labels need columns {sorted(need)}, found {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            try:
                out.setdefault(row["uid"], []).append([float(row["start_ms"]), float(row["end_ms"]), row["label"]])
            except (TypeError, ValueError):
                raise ManifestError(path, "", f"line {lineno}: start_ms/end_ms must be numbers") from None
    return out


def _read_uids(path: Path, m: Manifest) -> set[str]:
    """The uids of ``source.uids_file``: one a line (surrounding blanks and empty lines ignored), as the released
    ``dataset/Ego4D/ego4d_subset_ids.txt`` (Breezelled/COMODO; 2,289 lines, the last without a newline).

    Args:
        path: the file (the key's value joined to the source root).
        m: the manifest, for errors.

    Raises:
        ManifestError: the file is missing or lists no uid.
    """
    if not path.is_file():
        raise ManifestError(m.path, "source.uids_file", f"{path} does not exist")
    uids = {line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}
    if not uids:
        raise ManifestError(m.path, "source.uids_file", f"{path} lists no uid")
    return uids


def _read_splits(folder: Path, m: Manifest) -> dict[str, tuple[str, str]]:
    """{uid: (split, scenario)} from ``train.txt``, ``val.txt`` and ``test.txt`` in ``folder``.

    The released format (Breezelled/COMODO dataset/Ego4D/{train,val,test}.txt): one video a line,
    ``uid<TAB>scenario``, read with ``uid, scenario = line.strip().split("\t")`` (comodo/utils/dataloader_util.py:210;
    the scenario is the label, comodo/train.py:149 and dataloader_util.py:251). Empty lines are skipped (the
    release would fail on one); a line without a tab gives an empty scenario.

    Args:
        folder: the key's value joined to the source root.
        m: the manifest, for errors.

    Raises:
        ManifestError: a missing file, a line with more than one tab, or a uid in two files (or twice in one).
    """
    key = "source.splits_dir"
    if not folder.is_dir():
        raise ManifestError(m.path, key, f"{folder} is not a folder")
    out: dict[str, tuple[str, str]] = {}
    where: dict[str, str] = {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if not path.is_file():
            raise ManifestError(m.path, key, f"{path} does not exist (needs {', '.join(s + '.txt' for s in SPLITS)})")
        for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.strip().split("\t")
            if len(parts) > 2:
                raise ManifestError(path, "", f"line {lineno}: expected uid<TAB>scenario, found {len(parts)} fields")
            uid, scenario = parts[0].strip(), parts[1].strip() if len(parts) == 2 else ""
            if uid in out:
                raise ManifestError(path, "", f"line {lineno}: uid {uid} is already in {where[uid]}: a recording "
                                              "belongs to one split")
            out[uid], where[uid] = (split, scenario), f"{path.name} line {lineno}"
    if m.get("source.label_from") == "scenario" and (empty := [u for u, (_, sc) in out.items() if not sc]):
        raise ManifestError(m.path, "source.label_from", f"'scenario' needs uid<TAB>scenario lines; {len(empty)} "
                                                         f"uids in {folder} have no scenario (first {empty[0]})")
    return out


def _expected_windows(ref: SampleRef, m: Manifest) -> int:
    """How many windows recording ``ref`` would have given: windows of ``stages.imu.window_s`` every ``stride_s``
    over its video's duration (or, when the video cannot be read, its IMU's span); 1 when neither can be read.
    An estimate for ``output.max_rejected`` only: the clock offset, holes and gaps are not known here."""
    from distillkit.preprocess.imu_windows import window_starts
    from distillkit.sensors.imu import read_imu_csv
    from distillkit.sensors.video import probe_video

    video_path, imu_path = ref.payload["files"][:2]
    span = 0.0
    # Any failure only moves on to the next source of a duration: the recording is already rejected, with its reason.
    try:
        span = probe_video(video_path).duration_ms
    except Exception:
        pass
    if span <= 0:
        try:
            t = read_imu_csv(imu_path).t_ms
            span = float(t.max() - t.min()) if len(t) else 0.0
        except Exception:
            pass
    imu = m.data["stages"]["imu"]
    return max(len(window_starts(0.0, span, imu["window_s"] * 1000.0, imu["stride_s"] * 1000.0)), 1)


def _check_imu(x: np.ndarray, sample: SampleView) -> None:
    expect_array(x, "float32", 2)
    if x.shape[0] != 6:
        raise ValueError(f"shape {x.shape}, expected (6, T)")
    if not np.isfinite(x).all():
        raise ValueError("non-finite IMU values")
    times = sample["times.json"]
    expected = round((times["t1_ms"] - times["t0_ms"]) * times["rate_hz"] / 1000.0)
    if x.shape[1] != expected:
        raise ValueError(f"{x.shape[1]} samples, expected {expected} for the window and rate in times.json")


def _check_times(t: Any, sample: SampleView) -> None:
    need = ("uid", "t0_ms", "t1_ms", "rate_hz", "offset_ms", "frame_ms")
    if not isinstance(t, dict) or any(k not in t for k in need):
        raise ValueError(f"needs keys {need}")
    if not t["t1_ms"] > t["t0_ms"]:
        raise ValueError("t1_ms must be after t0_ms")
    f = np.asarray(t["frame_ms"], np.float64)
    if len(f) == 0 or np.any(np.diff(f) < 0):
        raise ValueError("frame_ms must be a non-empty, non-decreasing list")
    if "split" in t and t["split"] not in SPLITS:
        raise ValueError(f"split {t['split']!r} is not one of {SPLITS}")


def _check_label(data: bytes, sample: SampleView) -> None:
    if not bytes(data).decode("utf-8", errors="strict").strip():
        raise ValueError("empty label")
