"""COMODO's teacher from a Hugging Face TimeSformer checkpoint: the names of ``facebook/timesformer-base-
finetuned-k400`` (``TimesformerForVideoClassification``) map onto ``preprocess.video_encoder.TimeSformerTeacher``,
and the loaded teacher computes what ``transformers``' own ``TimesformerModel`` computes with the same weights.
A small randomly initialised configuration stands in for the 121 M-parameter checkpoint (nothing is downloaded);
the mapping does not depend on the sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import TimesformerConfig, TimesformerForVideoClassification

from distillkit.preprocess.video_encoder import from_hf_timesformer, load_video_teacher

CONFIG = TimesformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=128, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=512, num_labels=5)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = TimesformerForVideoClassification(CONFIG).eval()
    with torch.no_grad():  # non-trivial norms and embeddings, so a swapped name cannot go unnoticed
        for name, p in model.named_parameters():
            if "layernorm" in name or "embeddings" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_hf_checkpoint_loads_and_matches_transformers(hf_model, tmp_path, fmt):
    path = tmp_path / f"model.{fmt}"
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    torch.save(state, path) if fmt == "bin" else save_file(state, str(path))
    with _no_warning():
        teacher, info = load_video_teacher("timesformer", path)
    assert not info.random_init and info.dim == 128 and info.input_size == 32
    torch.manual_seed(1)
    clips = torch.randn(2, 4, 3, 32, 32)  # (B, F, C, H, W): transformers' layout
    with torch.no_grad():
        ref = hf_model.timesformer(pixel_values=clips).last_hidden_state.mean(1)
        ours = teacher(clips.transpose(1, 2))  # (B, C, F, H, W)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_embed_clips_preprocesses_as_the_checkpoints_image_processor(hf_model, tmp_path):
    """uint8 frames -> embedding, end to end: our preprocessing against transformers' VideoMAEImageProcessor
    with the values of facebook/timesformer-base-finetuned-k400's preprocessor_config.json (mean 0.45, std
    0.225, shortest edge = crop = the input size)."""
    import numpy as np
    from transformers import VideoMAEImageProcessor

    from distillkit.preprocess.video_encoder import embed_clips

    torch.save(hf_model.state_dict(), tmp_path / "model.bin")
    teacher, _ = load_video_teacher("timesformer", tmp_path / "model.bin")
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    proc = VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                  image_mean=[0.45] * 3, image_std=[0.225] * 3)
    pixels = proc([list(clip) for clip in clips], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = hf_model.timesformer(pixel_values=pixels).last_hidden_state.mean(1)
    torch.testing.assert_close(embed_clips(teacher, clips), ref, atol=1e-4, rtol=1e-4)


def test_mapping_reads_sizes_and_rejects_incomplete_state(hf_model):
    state, config = from_hf_timesformer(hf_model.state_dict())
    assert config == {"dim": 128, "depth": 2, "heads": 2, "patch": 8, "input_size": 32, "frames": 4}
    assert not any(k.startswith("classifier") for k in state)
    broken = {k: v for k, v in hf_model.state_dict().items() if "layer.1.temporal_dense" not in k}
    with pytest.raises(ValueError, match="temporal_dense"):
        from_hf_timesformer(broken)


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")  # a checkpoint load must not warn about a random init

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
