"""Reading audio (sensors/audio.py): decode, mix-down, soxr resampling as librosa does it, labels,
and every bad input rejected with a reason naming the file."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile as sf

from distillkit.sensors.audio import AUDIO_EXTENSIONS, AudioReadError, read_audio, read_labels, resample
from distillkit.sensors.listing import list_inputs
from distillkit.sensors.synth.audio import BAD_INPUTS, CLASSES, make_audio, render_clip, write_bad_audio


def test_resample_is_librosas_soxr_hq():
    rng = np.random.default_rng(0)
    y = rng.normal(0, 0.2, 44100).astype(np.float32)
    got = resample(y, 44100, 16000)
    ref = librosa.resample(y, orig_sr=44100, target_sr=16000, res_type="soxr_hq")
    assert got.dtype == np.float32 and got.shape == ref.shape == (16000,)
    assert np.array_equal(got, ref.astype(np.float32))


def test_read_mixes_down_and_resamples(tmp_path):
    t = np.arange(48000) / 48000
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([left, 0.5 * left], 1).astype(np.float32)
    sf.write(tmp_path / "s.flac", stereo, 48000, subtype="PCM_24")
    a = read_audio(tmp_path / "s.flac", 16000)
    assert (a.source_rate, a.source_channels, a.sample_rate, a.decoder) == (48000, 2, 16000, "soundfile")
    assert a.samples.dtype == np.float32 and len(a.samples) == 16000
    ref = librosa.resample(stereo.mean(1), orig_sr=48000, target_sr=16000, res_type="soxr_hq")
    assert np.abs(a.samples - ref).max() < 1e-5  # 24-bit quantisation only
    assert abs(np.sqrt(np.mean(a.samples[2000:-2000] ** 2)) - 0.75 * 0.5 / np.sqrt(2)) < 1e-3


@pytest.mark.parametrize("channels", [1, 2, 6, 9])
def test_blockwise_mix_down_equals_librosa_on_the_whole_file(tmp_path, monkeypatch, channels):
    """Decoded and mixed a block at a time (blocks that do not divide the file), the mono signal is
    bit-equal to librosa's ``to_mono`` of the whole decoded file, for channel counts on both sides of
    NumPy's 8-wide pairwise summation."""
    import distillkit.sensors.audio as mod

    rng = np.random.default_rng(channels)
    x = rng.uniform(-1, 1, (10007, channels)).astype(np.float32)
    sf.write(tmp_path / "m.wav", x, 16000, subtype="FLOAT")
    monkeypatch.setattr(mod, "BLOCK_FRAMES", 999)
    a = read_audio(tmp_path / "m.wav", 16000)
    whole, _ = sf.read(tmp_path / "m.wav", dtype="float32", always_2d=True)
    assert np.array_equal(a.samples, librosa.to_mono(np.ascontiguousarray(whole.T)))
    assert a.source_channels == channels


def test_long_multichannel_file_is_never_held_whole(tmp_path):
    """A 6-channel file is 6x its mono mix: reading it keeps the mix and one block, far below the
    decoded array (measured with tracemalloc, which sees NumPy's and soundfile's allocations)."""
    import tracemalloc

    x = np.random.default_rng(0).uniform(-0.5, 0.5, (48000 * 20, 6)).astype(np.float32)
    sf.write(tmp_path / "long.wav", x, 48000, subtype="PCM_16")
    decoded = x.nbytes  # 23 MB; the mix is 3.8 MB and one block 1.6 MB
    del x
    tracemalloc.start()
    try:
        a = read_audio(tmp_path / "long.wav", 48000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(a.samples) == 48000 * 20
    assert peak < 0.4 * decoded, f"peak {peak / 1e6:.1f} MB for a {decoded / 1e6:.1f} MB decoded file"


def test_truncated_file_keeps_what_it_holds(tmp_path):
    """A WAV cut short (its header still claims every frame) reads the frames present, or is rejected
    naming the file; never padded with garbage."""
    x = (0.25 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    sf.write(tmp_path / "full.wav", x, 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    try:
        a = read_audio(tmp_path / "cut.wav", 16000)
    except AudioReadError as err:
        assert "cut.wav" in str(err)
        return
    n = len(a.samples)
    assert 0 < n < 16000
    np.testing.assert_allclose(a.samples, x[:n], atol=1 / 32768)


def test_bad_inputs_are_rejected_naming_the_file_or_handled(tmp_path):
    expect = write_bad_audio(tmp_path)
    assert expect == BAD_INPUTS
    for rel, fate in expect.items():
        path = tmp_path / rel
        if fate == "rejected":
            with pytest.raises(AudioReadError) as err:
                read_audio(path)
            assert str(path) in str(err.value) and "\n" not in str(err.value)
        else:
            a = read_audio(path)
            assert a.samples.dtype == np.float32 and np.isfinite(a.samples).all() and a.sample_rate == 16000
    assert "empty file" in str(pytest.raises(AudioReadError, read_audio, tmp_path / "bad/empty.wav").value)
    assert "non-finite" in str(pytest.raises(AudioReadError, read_audio, tmp_path / "bad/nan_samples.wav").value)
    six = read_audio(tmp_path / "bad/six_channel_96k.flac")
    assert (six.source_channels, six.source_rate, len(six.samples)) == (6, 96000, 32000)
    low = read_audio(tmp_path / "bad/mono_8k.wav")
    assert (low.source_channels, low.source_rate, len(low.samples)) == (1, 8000, 48000)
    assert not read_audio(tmp_path / "bad/silence.wav").samples.any()


def test_synth_tree_and_labels(tmp_path):
    root = make_audio(tmp_path / "a", seed=1, size="small")
    files = [f.rel for f in list_inputs(root, AUDIO_EXTENSIONS).files]  # as the audio pipeline's plan lists them
    labels = read_labels(root / "labels.csv")
    assert files == sorted(labels) and len(files) == 20
    rates, chans = set(), set()
    for rel in files:
        info = sf.info(str(root / rel))
        rates.add(info.samplerate)
        chans.add(info.channels)
    assert rates == {16000, 22050, 44100, 48000} and chans == {1, 2}
    assert {p.rsplit(".", 1)[1] for p in files} == {"wav", "flac"}
    again = [render_clip(c, 0.5, 22050, 2, np.random.default_rng(5)) for c in CLASSES]
    assert all(np.array_equal(a, render_clip(c, 0.5, 22050, 2, np.random.default_rng(5))) for a, c in zip(
        again, CLASSES, strict=True))
    with pytest.raises(ValueError):
        make_audio(tmp_path / "c", size="huge")
    (tmp_path / "bad.csv").write_text("file,label\nx.wav,a\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_labels(tmp_path / "bad.csv")


@pytest.mark.parametrize(("ext", "fmt", "subtype"), [(".ogg", "OGG", "VORBIS"), (".mp3", "MP3", "MPEG_LAYER_III")])
def test_lossy_formats_decode(tmp_path, ext, fmt, subtype):
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    t = np.arange(44100) / 44100
    y = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / f"tone{ext}"
    sf.write(str(path), y, 44100, format=fmt, subtype=subtype)
    assert [f.rel for f in list_inputs(tmp_path, AUDIO_EXTENSIONS).files] == [f"tone{ext}"]
    a = read_audio(path, 16000)
    assert a.source_rate == 44100 and abs(a.duration_s - 1.0) < 0.1  # MP3 adds encoder padding
    spectrum = np.abs(np.fft.rfft(a.samples[:16000]))
    assert abs(np.argmax(spectrum) * 16000 / len(a.samples[:16000]) - 440) < 3
