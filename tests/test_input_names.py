"""No single input aborts a build (issue 22, item 1): names that are not valid UTF-8 are built under a reversible
key, and folders named like inputs, symlink loops and unreadable files are listed as rejected with their reason,
for every pipeline with a folder source (uniseg, audio, comodo)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.pipelines.cli import main
from distillkit.pipelines.shards import check_key
from distillkit.sensors.listing import escaped_key, list_inputs, printable, shard_key

from .conftest import keep_audio_files

LATIN1 = b"caf\xe9"  # "café" as Latin-1 wrote it: not valid UTF-8
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode: nothing to refuse")


def plant(folder: Path, suffix: str, good: Path, parent_link: bool = True) -> dict[str, str]:
    """Next to the inputs in ``folder``: a copy of ``good`` under a Latin-1 name, a folder named like an input, a
    pair of symlinks pointing at each other named like inputs and another without a suffix (it might stand for a
    folder, so recursive listings must follow it: ``is_dir`` raised on it and stopped the listing), and
    (``parent_link``) a link to the folder's parent. Returns the printable relative names of the bad entries (for
    the caller's root ``folder``'s parent when nested)."""
    base = os.fsencode(folder)
    shutil.copyfile(good, base + b"/" + LATIN1 + os.fsencode(suffix))
    (folder / f"folder{suffix}").mkdir()
    os.symlink(f"loop_b{suffix}", folder / f"loop_a{suffix}")
    os.symlink(f"loop_a{suffix}", folder / f"loop_b{suffix}")
    os.symlink("bare_b", folder / "bare_a")
    os.symlink("bare_a", folder / "bare_b")
    bad = {"folder": f"folder{suffix}", "loop_a": f"loop_a{suffix}", "loop_b": f"loop_b{suffix}",
           "bare_a": "bare_a", "bare_b": "bare_b"}
    if parent_link:
        os.symlink("..", folder / "up")
        bad["up"] = "up"
    return bad


def cli_build(manifest: str, root: Path, out: Path, *sets: str) -> dict:
    """``distillkit build`` in-process (serial); asserts exit 0 and returns index.json."""
    args = ["build", manifest, "--quiet", "--scheduler", "serial", "--set", f"source.root={root}",
            "--set", f"output.dir={out}", "--set", "output.max_rejected=1.0"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = (out / "index.json").read_text()
    # every name written is printable: no lone surrogate (a byte that was not UTF-8) escaped into the JSON
    assert not re.search(r"\\ud[89a-f]", text, re.IGNORECASE), "index.json holds a lone surrogate"
    return json.loads(text)


def keys_of(out: Path) -> set[str]:
    from distillkit.pipelines.shards import iter_samples

    return {key for t in sorted(out.glob("*.tar")) for key, _ in iter_samples(t)}


def tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def check_rejections(index: dict, expected: dict[str, str]) -> None:
    """Each bad entry rejected while planning, once, with the reason that fits it."""
    by_source = {r["source"]: r for r in index["rejected"]}
    assert len(by_source) == len(index["rejected"]), index["rejected"]  # no entry said twice
    words = {"folder": "a folder named like an input file", "twin": "a folder named like an input file",
             "loop_a": "symlink loop", "loop_b": "symlink loop",
             "bare_a": "symlink loop", "bare_b": "symlink loop", "up": "symlink loop",
             "unreadable": "cannot be read (permission denied)"}
    for what, source in expected.items():
        hit = next((r for s, r in by_source.items() if s == source or s.endswith("/" + source)), None)
        assert hit is not None, (what, index["rejected"])
        assert hit["stage"] == "plan" and words[what] in hit["reason"], hit
        assert "no video" not in hit["reason"], hit  # COMODO said so of a folder named <uid>.mp4


# ---- names and keys ---------------------------------------------------------------------------------------------
def test_keys_are_reversible_valid_and_never_collide_with_sanitised_ones():
    for raw in (LATIN1, b"dir/" + LATIN1 + b" 2", b"\xff\xfe", b"_x\xe9", b"a.b\xe9"):
        name = os.fsdecode(raw)
        key = shard_key(name)
        check_key(key)
        assert urllib.parse.unquote_to_bytes(key) == raw  # the raw bytes, exactly
        assert "%" in key and shard_key(name) == key  # same on every call; sanitised keys hold no '%'
    assert shard_key(os.fsdecode(LATIN1)) == "caf%E9"
    # valid names keep their key (builds of them are reused), unless it would not be a valid key
    assert shard_key("set1/clip 0") == "set1_clip_0" and shard_key("caf\u00e9") == "caf_"
    assert shard_key("_hidden") == escaped_key("_hidden") == "%5Fhidden"
    check_key(shard_key("_hidden"))
    assert printable(os.fsdecode(b"a/" + LATIN1 + b".wav")) == "a/caf\\xe9.wav"
    assert printable("caf\u00e9") == "caf\u00e9"


def test_listing_rejects_each_bad_entry_with_its_reason(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.wav").write_bytes(b"x")
    (root / "notes.txt").write_bytes(b"x")
    bad = plant(root / "sub", ".wav", root / "a.wav")
    os.symlink("missing.wav", root / "dangling.wav")
    os.mkfifo(root / "pipe.wav")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.wav").write_bytes(b"x")
    os.symlink(elsewhere, root / "linked")  # a folder reached by a link is listed
    os.symlink(root / "sub", root / "sub_again")  # the same folder twice: listed once
    # a convenience link walked before the real folder (depth first, "aa" < "sub") must not take its place
    (root / "aa").mkdir()
    os.symlink("../sub", root / "aa" / "latest")
    listing = list_inputs(root, (".WAV",))
    assert [f.rel for f in listing.files] == ["a.wav", "linked/b.wav", "sub/" + os.fsdecode(LATIN1 + b".wav")]
    reasons = {printable(u.rel): u.reason for u in listing.unusable}
    assert set(reasons) == {"aa/latest", "dangling.wav", "pipe.wav", "sub/" + bad["folder"], "sub/" + bad["loop_a"],
                            "sub/" + bad["loop_b"], "sub/bare_a", "sub/bare_b", "sub/up", "sub_again"}
    assert "broken symlink to missing.wav" in reasons["dangling.wav"]
    assert "not a regular file" in reasons["pipe.wav"]
    assert "a folder named like an input file" in reasons["sub/folder.wav"]
    assert all("symlink loop" in reasons[k] for k in ("sub/loop_a.wav", "sub/loop_b.wav", "sub/bare_a", "sub/up"))
    assert all(f"the same folder as {root / 'sub'}," in reasons[k] for k in ("sub_again", "aa/latest"))
    # not followed into a folder at all: a listing without sub-folders never touches the bare loop
    assert [u.rel for u in list_inputs(root / "sub", (".wav",), recursive=False).unusable] == [
        "folder.wav", "loop_a.wav", "loop_b.wav"]
    assert list_inputs(tmp_path / "absent", (".wav",)).files == []
    with pytest.raises(NotADirectoryError):  # a source root that is a file is the manifest's fault, said as such
        list_inputs(root / "a.wav", (".wav",))


@NOT_ROOT
def test_listing_rejects_unreadable_files_and_folders(tmp_path):
    (tmp_path / "locked" / "inner").mkdir(parents=True)
    (tmp_path / "a.wav").write_bytes(b"x")
    (tmp_path / "a.wav").chmod(0)
    os.symlink("locked/inner", tmp_path / "into")  # a link through a folder it may not enter
    (tmp_path / "locked").chmod(0)
    try:
        reasons = {u.rel: u.reason for u in list_inputs(tmp_path, (".wav",)).unusable}
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert "cannot be read (permission denied)" in reasons["a.wav"]
    assert "cannot list the folder" in reasons["locked"]
    assert "cannot enter a folder the link leads through" in reasons["into"]


def test_listing_rejects_a_file_it_may_not_read_even_as_root(tmp_path, monkeypatch):
    """Where the suite runs as root (chmod refuses root nothing) the refusal is simulated: ``os.access`` answers
    as it would for another user."""
    import distillkit.sensors.listing as listing

    for name in ("a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setattr(listing.os, "access", lambda path, mode: not os.fspath(path).endswith("a.wav"))
    got = list_inputs(tmp_path, (".wav",))
    assert [f.rel for f in got.files] == ["b.wav"]
    assert [(u.rel, u.reason) for u in got.unusable] == [("a.wav", f"{tmp_path}/a.wav: cannot be read (permission "
                                                                   "denied)")]


# ---- every pipeline with a folder source ------------------------------------------------------------------------
def test_uniseg_builds_a_latin1_name_and_rejects_bad_entries(tmp_path):
    from distillkit.sensors.synth.images import make_images

    src = make_images(tmp_path / "synth", seed=3) / "images"
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for p in sorted(src.glob("scene_000[01].*")):
        shutil.copyfile(p, root / p.name)
    image = next(p for p in sorted(src.glob("scene_0002.*")) if p.name.count(".") == 1)
    bad = plant(root / "sub", ".jpg", image)  # a PNG or WebP named .jpg is read by its content
    shutil.copyfile(src / "scene_0002.inst.png", os.fsencode(root / "sub") + b"/" + LATIN1 + b".inst.png")
    expected = {k: f"sub/{v}" for k, v in bad.items()}
    if os.geteuid() != 0:  # root reads it anyway
        shutil.copyfile(image, root / "unreadable.jpg")
        (root / "unreadable.jpg").chmod(0)
        expected["unreadable"] = "unreadable.jpg"
    out = tmp_path / "out"
    index = cli_build("uniseg-images", root, out, "output.samples_per_shard=2")
    check_rejections(index, expected)
    assert keys_of(out) == {"scene_0000", "scene_0001", "sub%2Fcaf%E9"} and index["counts"]["written"] == 3
    # the Latin-1 image is built with its ground truth, and named printably inside the sample
    from distillkit.pipelines.shards import iter_samples

    sample = next(f for t in sorted(out.glob("*.tar")) for key, f in iter_samples(t) if key == "sub%2Fcaf%E9")
    assert "gt.inst.png" in sample and json.loads(sample["uniap.json"])["source"] == "sub/caf\\xe9.jpg"
    # the same input gives the same key and the same bytes on every build
    cli_build("uniseg-images", root, tmp_path / "again", "output.samples_per_shard=2")
    assert tar_digests(tmp_path / "again") == tar_digests(out)
    stats = CliRunner().invoke(main, ["stats", str(tmp_path / "out")])
    assert stats.exit_code == 0, stats.output


def test_audio_builds_a_latin1_name_and_rejects_bad_entries(tmp_path):
    from distillkit.sensors.synth.audio import make_audio

    root = make_audio(tmp_path / "src", seed=4, size="small")
    keep = keep_audio_files(root, 2)
    good = root / keep[0]
    bad = plant(good.parent, good.suffix, good)
    sub = good.parent.relative_to(root).as_posix()
    expected = {k: f"{sub}/{v}" for k, v in bad.items()}
    index = cli_build("demo-audio", root, tmp_path / "out")
    check_rejections(index, expected)
    latin = sub.replace("/", "%2F") + "%2Fcaf%E9%2E" + good.suffix[1:]  # the path's bytes, percent-encoded
    assert any(k.startswith(latin + "_") for k in keys_of(tmp_path / "out")), keys_of(tmp_path / "out")
    assert not any(r["source"].startswith(f"{sub}/caf") for r in index["rejected"])  # built, not rejected
    cli_build("demo-audio", root, tmp_path / "again")
    assert tar_digests(tmp_path / "again") == tar_digests(tmp_path / "out")


def test_comodo_builds_a_latin1_recording_and_gives_the_true_reason(tmp_path):
    from distillkit.sensors.synth.ego import make_ego

    root = make_ego(tmp_path / "v2", seed=2, size="small")
    videos = sorted((root / "full_scale").glob("*.mp4"))
    for p in videos[1:]:  # one recording, renamed to a Latin-1 uid, and the bad entries: fast
        p.unlink()
        (root / "imu" / f"{p.stem}.csv").unlink()
    uid = videos[0].stem
    os.rename(videos[0], os.fsencode(root / "full_scale") + b"/" + LATIN1 + b".mp4")
    os.rename(root / "imu" / f"{uid}.csv", os.fsencode(root / "imu") + b"/" + LATIN1 + b".csv")
    fs = root / "full_scale"
    (fs / "folder.mp4").mkdir()
    (root / "imu" / "folder.csv").write_text("canonical_timestamp_ms,accl_x\n")  # its IMU file is there
    os.symlink("loop_b.mp4", fs / "loop_a.mp4")
    os.symlink("loop_a.mp4", fs / "loop_b.mp4")
    os.mkdir(os.fsencode(fs) + b"/" + LATIN1 + b".MP4")  # an unusable twin of the video: the recording still builds
    expected = {"folder": "full_scale/folder.mp4", "loop_a": "full_scale/loop_a.mp4",
                "loop_b": "full_scale/loop_b.mp4", "twin": "full_scale/caf\\xe9.MP4"}
    sets = ("stages.teacher.enabled=false", "stages.frames.size=32", "stages.offset.mode=zero")
    index = cli_build("demo-comodo", root, tmp_path / "out", *sets)
    check_rejections(index, expected)
    keys = keys_of(tmp_path / "out")
    assert keys and all(k.startswith("caf%E9_") for k in keys) and index["counts"]["written"] == len(keys)
    cli_build("demo-comodo", root, tmp_path / "again", *sets)
    assert tar_digests(tmp_path / "again") == tar_digests(tmp_path / "out")


def test_comodo_builds_a_recording_beside_an_unusable_entry_of_its_name(tmp_path):
    """An unusable entry is rejected on its own and the recording's usable files are still paired (a folder
    ``x.MP4/`` beside ``x.mp4`` rejected the recording whole); "no video" is never said of a video that is there,
    and a real pairing problem is still reported. The plan opens no video: empty files do."""
    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.comodo import ComodoPipeline

    root = tmp_path / "v2"
    fs, imu = root / "full_scale", root / "imu"
    fs.mkdir(parents=True)
    imu.mkdir()
    for name in ("good.mp4", "twin.mp4", "pair.mp4", "pair.MOV"):
        (fs / name).write_bytes(b"")
    for uid in ("good", "twin", "only", "pair"):
        (imu / f"{uid}.csv").write_text("canonical_timestamp_ms,accl_x\n")
    (fs / "good.MP4").mkdir()  # beside good.mp4: good still builds
    os.symlink("twin.CSV", imu / "twin.CSV")  # a loop beside twin.csv: twin still builds
    (fs / "only.mp4").mkdir()  # its only "video": rejected as a folder, not as "no video", and once
    (fs / "pair.mkv").mkdir()  # two usable videos and a folder: both problems said
    m = load_manifest("demo-comodo", [f"source.root={root}", f"output.dir={tmp_path / 'out'}",
                                      "cluster.scheduler=serial", "stages.teacher.enabled=false"])
    refs, rejected = ComodoPipeline().plan(m)
    assert [(r.payload["uid"], r.source) for r in refs] == [("good", "full_scale/good.mp4"),
                                                             ("twin", "full_scale/twin.mp4")]
    assert [r["files"][:2] for r in (ref.payload for ref in refs)] == [
        [str(fs / "good.mp4"), str(imu / "good.csv")], [str(fs / "twin.mp4"), str(imu / "twin.csv")]]
    reasons = {r["source"]: r["reason"] for r in rejected}
    assert len(reasons) == len(rejected) and all(r["stage"] == "plan" for r in rejected)
    assert set(reasons) == {"full_scale/good.MP4", "imu/twin.CSV", "full_scale/only.mp4", "full_scale/pair.mkv",
                            "full_scale/pair.MOV"}
    for source in ("full_scale/good.MP4", "full_scale/only.mp4", "full_scale/pair.mkv"):
        assert f"{root / source}: a folder named like an input file" in reasons[source]
    assert "symlink loop" in reasons["imu/twin.CSV"]
    assert "several files in full_scale/" in reasons["full_scale/pair.MOV"]
    assert not any("no video" in r for r in reasons.values())
