"""The Mantis-8M student (train/models/mantis_student.py) against the mantis-tsfm package itself.

A randomly initialised Mantis8M is saved with the package's own ``save_pretrained``; distillkit loads it with the
network unreachable and must give exactly the package model's outputs on the same windows, handled as the
released ``IMUStudentMLP`` does (Breezelled/COMODO comodo/utils/model_util.py:27-34 and 350-367).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before mantis imports huggingface_hub, which reads it once

mantis_arch = pytest.importorskip("mantis.architecture")

from distillkit.train.models.mantis_student import (  # noqa: E402
    MantisStudent,
    load_mantis_encoder,
    read_mantis_checkpoint,
)


@pytest.fixture(scope="module")
def saved_mantis(tmp_path_factory):
    """(the package's model in eval mode, the folder its save_pretrained wrote)."""
    torch.manual_seed(3)
    model = mantis_arch.Mantis8M(device="cpu").eval()
    folder = tmp_path_factory.mktemp("mantis") / "mantis8m"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _windows(t: int = 1000) -> torch.Tensor:
    # two 5 s windows at 200 Hz (the released Ego4D window, dataloader_util.py:75) in raw units: gravity on one
    # accelerometer axis, so the channels differ in offset and scale as unstandardised IMU does
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, t, generator=g)
    x[:, 2] += 9.81
    x[:, 3:] *= 0.2
    return x


def _released_features(model, x: torch.Tensor) -> torch.Tensor:
    """The released computation, written out: float32, linear resize to 512 (align_corners False), each channel
    alone through Mantis as a (B, 1, 512) series, CLS outputs concatenated."""
    x = F.interpolate(x.float(), size=512, mode="linear", align_corners=False)
    return torch.cat([model(x[:, [c], :]) for c in range(x.shape[1])], dim=-1)


def test_loaded_folder_matches_package_exactly(saved_mantis, no_network):
    model, folder = saved_mantis
    student = MantisStudent.from_checkpoint(folder).eval()
    x = _windows()
    with torch.no_grad():
        want = _released_features(model, x)
        got = student.features(x)
    assert got.shape == (2, 6 * 256)
    assert torch.equal(got, want)
    # the head is the released MLP on those features; forward is its L2-normalised output
    with torch.no_grad():
        emb = student.embed(x)
        assert emb.shape == (2, 128)
        assert torch.equal(emb, student.mlp(want))
        assert torch.allclose(student(x), F.normalize(emb, dim=1))
    assert [type(m).__name__ for m in student.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear"]
    assert (student.mlp[0].in_features, student.mlp[0].out_features, student.mlp[3].out_features) == (1536, 2048, 128)


def test_weights_file_and_released_student_state(saved_mantis, tmp_path, no_network):
    model, folder = saved_mantis
    # a bare weights file of the encoder (torch format), and a MantisV1-style key naming
    state = {k.replace("vit_unit.", "transf_unit."): v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "mantis.pt")
    encoder = load_mantis_encoder(tmp_path / "mantis.pt").eval()
    x = _windows(512)  # already 512: no resize, as released
    with torch.no_grad():
        assert torch.equal(_released_features(encoder, x), _released_features(model, x))
    # a whole released student's state dict (imu_student.* + mlp.*) restores encoder and head
    torch.manual_seed(1)
    trained = MantisStudent.from_checkpoint(folder).eval()
    torch.save(trained.state_dict(), tmp_path / "released.pth")
    restored = MantisStudent.from_checkpoint(tmp_path / "released.pth").eval()
    with torch.no_grad():
        assert torch.equal(restored.embed(x), trained.embed(x))


def test_random_student_differs_and_prj_is_frozen(saved_mantis):
    model, _ = saved_mantis
    torch.manual_seed(4)
    student = MantisStudent().eval()
    with torch.no_grad():
        assert not torch.equal(student.features(_windows()), _released_features(model, _windows()))
    assert not any(p.requires_grad for p in student.imu_student.prj.parameters())
    assert all(p.requires_grad for n, p in student.named_parameters() if not n.startswith("imu_student.prj."))


def test_bad_paths_and_inputs_fail_in_one_line(tmp_path, saved_mantis):
    with pytest.raises(FileNotFoundError, match="no such file or folder") as err:
        MantisStudent.from_checkpoint(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder holds none of"):
        read_mantis_checkpoint(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors or torch state dict") as err:
        load_mantis_encoder(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
    model, _ = saved_mantis
    state = dict(model.state_dict())
    state.pop("vit_unit.cls_token")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="1 missing keys") as err:
        load_mantis_encoder(tmp_path / "partial.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"expects \(batch, 6, time\)"):
        MantisStudent().features(torch.zeros(2, 3, 512))
