"""`eval audio` against the checkpoint's training shards: it refuses shards built with another front end, and the
random-init baseline is normalised with the same (training) statistics as the distilled encoder (issue 20)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.runner import build
from distillkit.sensors.synth.audio import make_audio
from distillkit.train import audio
from distillkit.train.audio import AudioTrainer
from distillkit.train.base import ConfigError
from distillkit.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tests.conftest import keep_audio_files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shards of 8 small synthetic files and a 2-step checkpoint of the small size on them."""
    root = make_audio(tmp_path_factory.mktemp("audio") / "src", seed=1, size="small")
    keep_audio_files(root, 8)
    shards = tmp_path_factory.mktemp("shards")
    build(load_manifest("demo-audio", [f"source.root={root}", f"output.dir={shards}", "cluster.scheduler=serial"]),
          progress=False)
    out = tmp_path_factory.mktemp("run")
    config = AudioTrainer.resolve_config({"max_steps": 2, "batch_size": 4, "log_every": 1})
    AudioTrainer().train(shards, out, config)
    return shards, out / CHECKPOINT_NAME, config


def _copy(shards, dst, edit):
    shutil.copytree(shards, dst)
    index = json.loads((dst / "index.json").read_text())
    edit(index)
    (dst / "index.json").write_text(json.dumps(index))
    if "stats" in index:  # the edited statistics must not be refused against the copied shard records
        for record in dst.glob("*.json"):
            if record.name != "index.json":
                record.unlink()
    return dst


def test_checkpoint_records_the_front_end(trained):
    shards, ckpt, _ = trained
    front = audio.decode_front_end(load_checkpoint(ckpt)["model"]["front_end"])
    assert front == audio.read_norm(shards)[2]
    assert front["mel_scale"] == "slaney" and front["n_mels"] == 64 and front["hop_length"] == 160


@pytest.mark.parametrize("key, value", [("mel_scale", "htk"), ("hop_length", 320)])
def test_eval_refuses_another_front_end(trained, tmp_path, key, value):
    shards, ckpt, config = trained
    other = _copy(shards, tmp_path / "other", lambda i: i["manifest"]["stages"]["logmel"].__setitem__(key, value))
    with pytest.raises(ConfigError, match=f"front end differs.*{key} {value!r} \\(checkpoint: ") as err:
        audio.evaluate(ckpt, [other], config, epochs=1)
    assert "\n" not in str(err.value)


def test_both_networks_normalised_with_the_training_statistics(trained, tmp_path, monkeypatch):
    shards, ckpt, config = trained
    mean, std, _ = audio.read_norm(shards)
    # the evaluated shards' own statistics differ from the training shards'
    other = _copy(shards, tmp_path / "other", lambda i: i["stats"].update(logmel_mean=mean + 10, logmel_std=std * 2))
    seen = []
    real = audio.clip_embeddings

    def spy(method, *args, **kwargs):
        seen.append((float(method.mean), float(method.std)))
        return real(method, *args, **kwargs)

    monkeypatch.setattr(audio, "clip_embeddings", spy)
    audio.evaluate(ckpt, [other], config, epochs=1)
    assert seen == [pytest.approx((mean, std))] * 2  # random init, then distilled


def test_eval_cli_refuses_another_front_end_in_one_line(trained, tmp_path):
    from click.testing import CliRunner

    from distillkit.pipelines.cli import main

    shards, ckpt, _ = trained
    other = _copy(shards, tmp_path / "other", lambda i: i["manifest"]["stages"]["logmel"].__setitem__("n_mels", 128))
    result = CliRunner().invoke(main, ["eval", "audio", "--checkpoint", str(ckpt), "--shards", str(other),
                                       "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert "front end differs" in result.output and "Traceback" not in result.output


def test_a_checkpoint_from_before_the_front_end_was_recorded_still_loads(trained):
    """Resume and eval load strictly: a run saved before issue 20 has no ``front_end`` and must still load."""
    shards, ckpt, config = trained
    state = load_checkpoint(ckpt)["model"]
    state.pop("front_end")
    method = audio.build_method(config, shards, 1)
    method.load_state_dict(state)  # strict
    assert audio.decode_front_end(method.front_end) == {}


def test_eval_runs_and_gains_shared_by_the_audio_protocols():
    assert audio.eval_runs(None) == [("random_init", None)]
    state = {"w": 1}
    assert audio.eval_runs(state) == [("random_init", None), ("distilled", state)]
    result = {"random_init": {"eer": 0.4, "acc": 0.5}, "distilled": {"eer": 0.1, "acc": 0.75}}
    audio.add_gains(result, ("eer",), higher_is_better=False)  # lower is better: random minus distilled
    audio.add_gains(result, ("acc",))
    assert result["gain_eer"] == pytest.approx(0.3) and result["gain_acc"] == pytest.approx(0.25)
    splits = {"random_init": [{"acc": 0.5}, {"acc": 0.25}], "distilled": [{"acc": 0.75}, {"acc": 0.75}]}
    audio.add_gains(result, ("acc",), per_split=splits)  # the mean of the per-split gains
    assert result["gain_acc"] == pytest.approx(0.375)
    alone = {"random_init": {"acc": 0.5}}
    audio.add_gains(alone, ("acc",))
    assert alone == {"random_init": {"acc": 0.5}}


def test_labelled_segments_stay_float16_in_memory(trained):
    """``eval audio`` keeps the stored float16 (half the memory); ``clip_embeddings`` converts one at a time."""
    shards, _, config = trained
    specs = audio.load_labelled([shards])[0]
    assert {s.dtype for s in specs} == {np.dtype(np.float16)}
    method = audio.build_method(config, shards, 1)
    crop = method.student.encoder.base_grid[1] * 4
    half = audio.clip_embeddings(method, specs[:2], crop, "cpu")
    assert np.allclose(half, audio.clip_embeddings(method, [s.astype(np.float32) for s in specs[:2]], crop, "cpu"))
