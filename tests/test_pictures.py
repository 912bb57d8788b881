"""The pictures explain themselves: ``curves.png`` names its method, network size and run folder; ``show``
picks an audio segment that is mostly signal; UniSeg's levels come with a legend and plain titles; SLidR's
points are drawn large enough to see; COMODO's frames and IMU panels are numbered and unit-labelled.

Samples are made by hand (a few fields each), so these tests need no build."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from PIL import Image
from torch import nn

from distillkit.pipelines.codecs import SampleView, json_bytes, npy_bytes
from distillkit.pipelines.shards import write_shard
from tests.index_helpers import write_index


def _jpeg(h: int, w: int, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _png(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _texts(fig) -> str:
    """Every string drawn on a figure: suptitle, axes titles and labels, legends, free text."""
    out = [fig.get_suptitle()]
    for ax in fig.axes:
        out += [ax.get_title(loc) for loc in ("left", "center", "right")]
        out += [ax.get_xlabel(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
        if ax.get_legend():
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    for legend in fig.legends:
        out += [t.get_text() for t in legend.get_texts()]
    return "\n".join(out)


# ---- curves.png ---------------------------------------------------------------------------------------

def test_curves_title_names_method_size_and_run_folder(tmp_path):
    from distillkit.train.run_log import append_entry, curves_figure

    out = tmp_path / "runs" / "slidr" / "20261204-0741"
    append_entry(out, {"step": 0, "config": {"size": "paper", "seed": 0}})
    for step in (5, 10, 12):
        append_entry(out, {"step": step, "loss": 1.0 / step, "lr": 0.1, "samples_per_s": 3.0,
                           "data_wait_fraction": 0.1})
    fig = curves_figure(out, method="slidr", max_steps=12)
    title = fig.get_suptitle()
    assert "slidr" in title and str(out) in title and "paper network" in title  # size read from the config line
    assert "12 of 12 steps" in title and "5 steps before it" in title
    assert all(ax.get_xlabel() == "optimiser step" and ax.get_ylabel() for ax in fig.axes)
    assert "small network" in curves_figure(out, method="slidr", size="small").get_suptitle()
    # the run's scale, from the configuration line train.loop writes
    lines = (out / "log.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"step": 0, "config": {"size": "paper"}, "world_size": 8, "global_batch": 32,
                           "rank_batch": 4})
    (out / "log.jsonl").write_text("\n".join(lines) + "\n")
    title = curves_figure(out, method="slidr", max_steps=12).get_suptitle()
    assert "12 of 12 steps of 32 samples (8 processes x 4)" in title
    (out / "log.jsonl").write_text(json.dumps({"step": 0, "config": {}}) + "\n")
    assert curves_figure(out) is None  # no metrics yet: no picture


def test_curves_draw_the_parts_a_method_splits_its_loss_into(tmp_path):
    """A loss against a moving target (UniSeg's DINO loss) can rise while the part the student controls falls:
    the parts a method logs (``log_terms`` -> ``terms``) are drawn and named on the loss panel."""
    from distillkit.train.run_log import append_entry, curves_figure

    for step, (h, kl) in zip((10, 20, 30), ((7.0, 3.0), (9.5, 1.2), (10.0, 0.8)), strict=True):
        append_entry(tmp_path, {"step": step, "loss": h + kl, "lr": 0.1, "samples_per_s": 3.0,
                                "data_wait_fraction": 0.1, "terms": {"part 1: entropy": h, "part 2: KL": kl}})
    loss_ax = curves_figure(tmp_path, method="uniseg").axes[0]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["loss", "part 1: entropy", "part 2: KL"]
    assert [list(line.get_ydata()) for line in loss_ax.get_lines()][2] == [3.0, 1.2, 0.8]
    (tmp_path / "log.jsonl").unlink()
    append_entry(tmp_path, {"step": 10, "loss": 1.0, "lr": 0.1, "samples_per_s": 3.0, "data_wait_fraction": 0.1})
    assert curves_figure(tmp_path).axes[0].get_legend() is None  # no parts: one curve, no legend


def test_uniseg_logs_its_loss_split_into_log_jsonl():
    from distillkit.train.uniseg import QuerySD

    method = QuerySD.__new__(QuerySD)  # log_terms reads only the windows after_step kept
    method.windows = [{"step": 10, "loss": 9.0, "teacher_entropy": 7.0, "kl": 2.0}]
    terms = method.log_terms(10)
    assert sorted(terms.values()) == [2.0, 7.0] and any("KL" in k for k in terms)
    assert method.log_terms(20) == {}  # no window ended at that step


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def loss(self, batch):
        return (self.w * batch).sum() ** 2


def test_train_loop_passes_method_size_and_steps_to_the_picture(tmp_path, monkeypatch):
    from distillkit.train import loop

    seen = {}

    def fake_plot(out, **kw):
        seen.update(kw, out=out)
        return None

    monkeypatch.setattr(loop, "plot_curves", fake_plot)
    cfg = loop.LoopConfig(max_steps=3, lr=0.01, log_every=1, out=tmp_path / "run", run_config={"size": "small"})
    loop.train_loop(_Toy(), lambda: [torch.ones(2)] * 3, cfg)
    assert seen == {"out": tmp_path / "run", "method": "_Toy", "size": "small", "max_steps": 3}


def test_a_trainer_called_from_python_names_its_run(tmp_path, monkeypatch):
    """No CLI, no registry entry, the method's class in another module than the trainer: ``Trainer.train``
    itself names the run, in the checkpoint and in the picture's title."""
    from distillkit.train import loop
    from distillkit.train.base import Trainer
    from distillkit.train.checkpoint import checkpoint_info, current_method

    seen = {}
    monkeypatch.setattr(loop, "plot_curves", lambda out, **kw: seen.update(kw))

    class ToyTrainer(Trainer):
        name, pipeline = "toy-method", "none"

        def train(self, shards, out, config, device="cpu", resume=False, strict=False):
            cfg = loop.LoopConfig(max_steps=2, lr=0.01, log_every=1, out=out)
            return loop.train_loop(_Toy(), lambda: [torch.ones(2)] * 2, cfg)

        def evaluate(self, checkpoint, shards, config, device="cpu", options=None):
            return {}

    assert current_method() is None
    metrics = ToyTrainer().train(tmp_path, tmp_path / "run", {})
    assert seen["method"] == "toy-method"
    assert checkpoint_info(metrics["checkpoint"])[0] == "toy-method"
    assert current_method() is None  # set for the call only


def test_trainer_wrapping_survives_functools_wraps_and_refuses_static_train():
    """A plugin keeping its base's docstring with ``functools.wraps`` is still named; a subclass of a
    wrapped trainer is not wrapped twice; a static ``train`` is refused at class creation."""
    import functools

    from distillkit.train.base import Trainer
    from distillkit.train.checkpoint import current_method

    class Base(Trainer):
        name, pipeline = "base-method", "none"

        def train(self, shards, out, config, device="cpu", resume=False, strict=False):
            return {"method": current_method()}

        def evaluate(self, checkpoint, shards, config, device="cpu", options=None):
            return {}

    class Plugin(Base):
        name = "plugin-method"

        @functools.wraps(Base.train)  # copies the base wrapper's attributes, not its behaviour
        def train(self, *args, **kw):
            return {"method": current_method()}

    class Child(Base):
        name = "child-method"

    assert Plugin().train(None, None, {}) == {"method": "plugin-method"}
    assert Child().train(None, None, {}) == {"method": "child-method"} and Child.train is Base.train
    with pytest.raises(TypeError, match="plain method"):
        class Static(Base):  # noqa: F841 - defining it is the test
            @staticmethod
            def train(shards, out, config):
                return {}


# ---- audio: which sample show draws -------------------------------------------------------------------

AUDIO_META = {"sample_rate": 16000, "hop_length": 160, "n_mels": 8, "fmin": 60.0, "fmax": 7800.0,
              "segment_s": 2.0, "start_s": 0.0, "source": "x.wav", "source_sample_rate": 44100,
              "source_channels": 2}


def _audio(duration_s: float, level_db: float = 0.0, gated: bool = False) -> dict[str, bytes]:
    frames = 201  # a 2 s segment at hop 160
    spec = np.full((8, frames), level_db - 80.0, np.float32)  # top_db floor below the loudest value
    real = int(np.ceil(duration_s * 16000 / 160))
    spec[:, :real] = level_db
    if gated:
        spec[:, 1:real:2] = level_db - 60.0  # every other frame a quiet gap
    if level_db <= -100:
        spec[:] = -100.0  # digital silence: the power floor everywhere
    return {"logmel.npy": npy_bytes(spec.astype(np.float16)),
            "meta.json": json_bytes({**AUDIO_META, "duration_s": duration_s})}


def test_signal_fraction():
    from distillkit.pipelines.render_audio import signal_fraction

    assert signal_fraction(SampleView(_audio(2.0))) == pytest.approx(1.0)
    assert signal_fraction(SampleView(_audio(0.5))) == pytest.approx(0.25)  # the rest is padding
    assert signal_fraction(SampleView(_audio(2.0, level_db=-100.0))) == 0.0  # silence
    assert signal_fraction(SampleView(_audio(2.0, gated=True))) == pytest.approx(0.5, abs=0.01)


def _shard_dir(tmp_path, samples):
    d = tmp_path / "audio"
    d.mkdir()
    write_shard(d / "a-000000.tar", samples)
    write_index(d, "audio")
    return d


def test_show_prefers_an_audio_sample_that_is_mostly_signal(tmp_path, monkeypatch):
    from distillkit.pipelines import inspect
    from distillkit.pipelines.render_audio import MOSTLY_SIGNAL, signal_fraction

    d = _shard_dir(tmp_path, [("a_padded", _audio(0.4)), ("b_silent", _audio(2.0, level_db=-100.0)),
                              ("c_gated", _audio(2.0, gated=True)), ("d_full", _audio(1.9)),
                              ("e_full", _audio(2.0))])
    key, sample, pipeline = inspect.find_sample(d)
    assert (key, pipeline) == ("d_full", "audio")  # the first mostly-signal one, not the first one
    assert signal_fraction(SampleView(sample)) >= MOSTLY_SIGNAL
    assert inspect.find_sample(d, "a_padded")[0] == "a_padded"  # an explicit key is drawn as asked
    monkeypatch.setattr(inspect, "SHOW_SCAN", 3)  # none good among the scanned: the best of them
    assert inspect.find_sample(d)[0] == "c_gated"
    inspect.show(d, tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").size[0] > 600


def test_audio_picture_says_what_it_shows():
    from distillkit.pipelines.render_audio import render_audio

    text = _texts(render_audio(SampleView(_audio(0.5))))
    assert "signal in 25%" in text and "zero padding" in text and "10 ms" in text
    assert "time since segment start (s)" in text and "frequency (Hz, mel scale)" in text
    assert "source 44.1 kHz, 2 channels" in text and "label: none (unlabelled)" in text


# ---- UniSeg ---------------------------------------------------------------------------------------------

def _uniseg_sample() -> SampleView:
    levels = np.array([[[0, 0, 1, 1, -1, -1]] * 4, [[0, 0, 0, 0, -1, -1]] * 4], np.int32)
    meta = {"source": "img/a.png", "levels": ["instance@0.8", "instance@0.5"], "regions": [2, 1],
            "backbone": {"kind": "stats"}, "patch": 8, "grid": [4, 6], "min_size": 4, "update": "sum"}
    gt = np.zeros((32, 48), np.uint8)
    gt[4:20, 4:20] = 1
    return SampleView({"image.jpg": _jpeg(32, 48), "uniap.npy": npy_bytes(levels), "uniap.json": json_bytes(meta),
                       "gt.inst.png": _png(gt)})


def test_uniseg_picture_has_a_legend_and_no_level_jargon():
    from distillkit.pipelines.render_uniseg import render_uniseg

    fig = render_uniseg(_uniseg_sample())
    assert fig.legends, "the levels' colours, boundaries and dropped patches need a legend"
    legend = "\n".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "dropped" in legend and "boundary" in legend and "fewer than 4 patches" in legend
    titles = [ax.get_title() for ax in fig.axes]
    assert "level 1/2: neighbour regions merged at similarity > 0.8\n2 regions, 33% of patches dropped" in titles
    assert not any("instance@" in t for t in titles)
    assert "ground truth objects: 1 object" in titles
    assert "8x8-px patches" in fig.get_suptitle() and "colour and texture" in fig.get_suptitle()


# ---- SLidR ----------------------------------------------------------------------------------------------

def test_slidr_point_size_follows_density_within_bounds():
    from distillkit.pipelines.render_slidr import POINT_PX, SHOW_DPI, point_size

    def px(area):
        return np.sqrt(area) * SHOW_DPI / 72

    assert px(point_size(100_000, 1600, 900)) == pytest.approx(POINT_PX[0])  # dense: never below 3.5 px
    assert px(point_size(10, 1600, 900)) == pytest.approx(POINT_PX[1])  # sparse: never a blob
    assert point_size(500, 384, 216) > point_size(4000, 384, 216)


def test_slidr_points_visible_and_panels_explained():
    from distillkit.pipelines.render_slidr import POINT_PX, SHOW_DPI, render_slidr

    h, w = 90, 160
    cams, raw = [], {}
    rng = np.random.default_rng(0)
    pairs, uvd = [], []
    for i in range(6):
        cams.append({"channel": f"CAM_{i}", "width": w, "height": h})
        raw[f"cam{i}.jpg"] = _jpeg(h, w, i)
        raw[f"cam{i}.sp.png"] = _png(np.arange(h * w).reshape(h, w) // (h * w // 4))
        for p in range(3000):
            pairs.append([p, i, 0, 0])
            uvd.append([rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 60)])
    raw.update({"cams.json": json_bytes(cams), "pairs.npy": npy_bytes(np.array(pairs, np.int32)),
                "pairs_uvd.npy": npy_bytes(np.array(uvd, np.float32)),
                "lidar.npy": npy_bytes(np.zeros((18000, 4), np.float32)),
                "meta.json": json_bytes({"scene": "scene-0061", "timestamp": 1532402928647951})})
    fig = render_slidr(SampleView(raw))
    smallest = (POINT_PX[0] * 72 / SHOW_DPI) ** 2
    sizes = [c.get_sizes()[0] for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection)]
    assert len(sizes) == 6 and min(sizes) >= smallest * 0.999
    text = _texts(fig)
    assert "scene-0061 at 2018-07-24" in text and "superpixels" in text and "SLIC" in text
    assert "CAM_0 (160x90 px): 3000 lidar points, 4 superpixels" in text and "depth along the camera axis (m" in text


# ---- COMODO ---------------------------------------------------------------------------------------------

def test_comodo_picture_numbers_frames_and_names_units():
    from distillkit.pipelines.render_comodo import offset_text, render_comodo

    times = {"uid": "rec1", "window": 3, "t0_ms": 1000.0, "t1_ms": 3000.0, "rate_hz": 100.0, "offset_ms": 50.0,
             "offset_source": "estimated", "offset_peak": 0.91, "frame_ms": [1100.0, 1600.0, 2100.0, 2600.0]}
    raw = {f"frame{j:02d}.jpg": _jpeg(16, 16, j) for j in range(4)}
    raw.update({"imu.npy": npy_bytes(np.zeros((6, 200), np.float32)), "times.json": json_bytes(times),
                "label.txt": b"walking"})
    text = _texts(render_comodo(SampleView(raw)))
    assert "frame 4: video 2.600 s" in text and "acceleration (m/s²)" in text and "angular velocity (rad/s)" in text
    assert "activity label: walking" in text and "correlation 0.91" in text
    assert [t for t in text.split("\n") if t.strip() in {"1", "2", "3", "4"}]  # dashed lines numbered
    assert offset_text({"offset_source": "given"}) == "given with the recording"
