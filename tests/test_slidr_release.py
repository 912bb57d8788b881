"""SLidR's downstream and configuration details against the released code (valeoai/SLidR 14729d0):
the last partial batch dropped, fine-tuning BatchNorm momentum, and ``--show-config``'s values and sources."""

from __future__ import annotations

import re

import pytest
import torch

import distillkit.train.probe as probe
import distillkit.train.slidr_eval as slidr_eval
from distillkit.train.slidr import SlidrTrainer, build_point_net


def _recorded_batches(monkeypatch, n: int, batch_size: int, drop_last: bool) -> list[int]:
    """Rows per optimiser step of one probe epoch over ``n`` one-row samples."""
    seen: list[int] = []
    real = probe.segmentation_loss

    def spy(logits, labels, ignore_index=0):
        seen.append(len(labels))
        return real(logits, labels, ignore_index)

    monkeypatch.setattr(probe, "segmentation_loss", spy)
    feats = [torch.randn(1, 4) for _ in range(n)]
    labels = [torch.tensor([1 + i % 2]) for i in range(n)]
    probe.train_linear_head(feats, labels, n_classes=3, epochs=1, batch_size=batch_size, drop_last=drop_last)
    return seen


def test_probe_drops_the_last_partial_batch_only_when_asked(monkeypatch):
    assert _recorded_batches(monkeypatch, 5, 2, drop_last=True) == [2, 2]
    assert _recorded_batches(monkeypatch, 5, 2, drop_last=False) == [2, 2, 1]
    # fewer samples than one batch: the one short batch is kept so the probe trains at all
    assert _recorded_batches(monkeypatch, 3, 16, drop_last=True) == [3]


def test_full_batches_counts_what_an_epoch_uses():
    assert slidr_eval.full_batches(33, 16) == 32
    assert slidr_eval.full_batches(32, 16) == 32
    assert slidr_eval.full_batches(7, 16) == 7
    with pytest.raises(ValueError, match="batch_size"):
        slidr_eval.full_batches(5, 0)


def test_finetuning_sets_every_batchnorm_momentum(monkeypatch):
    made = []

    class Spy(slidr_eval.Segmenter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(slidr_eval, "Segmenter", Spy)
    monkeypatch.setattr(slidr_eval, "score", lambda logits, clouds: {})
    net = build_point_net("small", 0)
    before = {m.momentum for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert before and before != {0.02}  # pretraining's momentum differs, else the test proves nothing
    slidr_eval.finetune(net, [], [], "cpu", epochs=0, seed=0)
    bns = [m for m in made[0].modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and {m.momentum for m in bns} == {slidr_eval.FINETUNE_BN_MOMENTUM}
    assert slidr_eval.set_bn_momentum(net, 0.3) == len(bns)


CITED = re.compile(r"valeoai/SLidR \S+\.(py|yaml):\d+")


def test_paper_config_shows_the_released_values_with_their_lines():
    config = SlidrTrainer.resolve_config({"size": "paper", "random_teacher": True})
    eff = SlidrTrainer.effective_config(config)
    assert (eff["batch_size"], eff["epochs"], eff["sync_batchnorm"]) == (4, 50, True)
    assert eff["max_steps"] is None and eff["grad_clip"] is None
    src = SlidrTrainer.config_sources(config)
    for key in ("batch_size", "epochs", "sync_batchnorm", "grad_clip", "split"):
        assert CITED.search(src[key]), (key, src[key])


def test_small_config_is_distillkits_choice_and_user_values_win():
    config = SlidrTrainer.resolve_config({"size": "small"})
    eff = SlidrTrainer.effective_config(config)
    assert (eff["batch_size"], eff["max_steps"], eff["sync_batchnorm"]) == (2, 100, False)
    src = SlidrTrainer.config_sources(config)
    for key in ("batch_size", "max_steps", "sync_batchnorm", "grad_clip"):
        assert src[key].startswith("distillkit's choice"), (key, src[key])
    mine = SlidrTrainer.resolve_config({"size": "paper", "random_teacher": True, "sync_batchnorm": False,
                                        "batch_size": 8})
    eff = SlidrTrainer.effective_config(mine)
    assert (eff["sync_batchnorm"], eff["batch_size"], eff["epochs"]) == (False, 8, 50)


def test_one_percent_follows_the_scene_table_not_names():
    def cloud(scene: str, index: int | None) -> slidr_eval.LabelledCloud:
        return slidr_eval.LabelledCloud(scene, scene, *([None] * 7), scene_index=index)  # type: ignore[arg-type]

    names = [f"scene-{i:04d}" for i in range(1, 251)]
    table = list(reversed(names))  # the table lists them in reverse name order
    clouds = [cloud(n, table.index(n)) for n in names]
    kept, note = slidr_eval.every_nth_scene(clouds, 1)
    assert {c.scene for c in kept} == {table[99], table[199]} and "scene-table order" in note
    # no recorded index anywhere: name order, and the note says why
    kept, note = slidr_eval.every_nth_scene([cloud(n, None) for n in names], 1)
    assert [c.scene for c in kept] == ["scene-0100", "scene-0200"] and "name order" in note
    with pytest.raises(ValueError, match="percent"):
        slidr_eval.every_nth_scene(clouds, 0)


def test_build_records_the_scene_table_position(nuscenes_copy):
    import json

    from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes

    path = nuscenes_copy / "v1.0-mini" / "scene.json"
    scenes = json.loads(path.read_text())
    assert len(scenes) >= 2
    scenes = list(reversed(sorted(scenes, key=lambda s: s["name"])))  # table order != name order
    path.write_text(json.dumps(scenes))
    nusc = load_nuscenes(nuscenes_copy, "v1.0-mini")
    refs, _ = plan_keyframes(nusc)
    position = {s["name"]: i for i, s in enumerate(scenes)}
    assert refs and all(r.scene_index == position[r.scene] for r in refs)
    by_name = sorted(position)
    assert any(r.scene_index != by_name.index(r.scene) for r in refs)  # the index is not just name order


def _clouds(n: int) -> list[slidr_eval.LabelledCloud]:
    from distillkit.train.models.sparse import cylindrical_voxelize

    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        # dense (2 m x 2 m x 5 cm): many points share a cylindrical voxel, so which point comes first (its
        # label is the voxel's) changes when the cloud is rotated
        xyz = (torch.rand(3000, 3, generator=g) - 0.5) * torch.tensor([2.0, 2.0, 0.05])
        intensity = torch.rand(3000, 1, generator=g)
        labels = 1 + (xyz[:, 0] > 0).long() + (xyz[:, 1] > 0).long()
        coords, first, inverse = cylindrical_voxelize(xyz)
        out.append(slidr_eval.LabelledCloud(f"k{i}", "scene-0001", xyz, intensity, coords, intensity[first],
                                            inverse, labels[first], labels))
    return out


@pytest.mark.parametrize("augment", [False, True])
def test_probe_reaugments_every_epoch_only_when_asked(monkeypatch, augment):
    seen: list[torch.Tensor] = []
    real = probe.segmentation_loss

    def spy(logits, labels, ignore_index=0):
        seen.append(labels.clone())
        return real(logits, labels, ignore_index)

    monkeypatch.setattr(probe, "segmentation_loss", spy)
    clouds = _clouds(2)
    res = slidr_eval.linear_probe(build_point_net("small", 0), clouds, clouds, "cpu", epochs=3, seed=0,
                                  augment=augment)
    assert len(seen) == 3 and res["augmented"] is augment  # one batch of 2 clouds per epoch
    # the order of the two clouds is reshuffled each epoch: compare the label multisets
    counts = [torch.bincount(s, minlength=4) for s in seen]
    same = all(torch.equal(c, counts[0]) for c in counts)
    assert same is not augment  # re-voxelised rotated clouds give other voxels every epoch
