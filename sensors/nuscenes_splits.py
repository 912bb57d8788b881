"""nuScenes scene splits by name: nuscenes-devkit's own lists plus SLidR's pretraining split.

Split names (:data:`SPLIT_NAMES`):

- every split of ``nuscenes.utils.splits.create_splits_scenes()`` (``train``, ``val``, ``test``,
  ``mini_train``, ``mini_val``, ``train_detect``, ``train_track``): the devkit's lists, read from the
  installed devkit, never copied (only their names are, so that manifests and trainer options can
  offer them as choices without importing the devkit; a test checks them against the devkit);
- ``pretrain``: SLidR's pretraining set, the official ``train`` scenes minus :data:`SLIDR_HELDOUT`
  (600 scenes; SLidR's ``parametrizing`` phase, selected by ``training: "parametrize"`` in its
  ``config/slidr_minkunet.yaml``);
- ``pretrain_val``: :data:`SLIDR_HELDOUT` itself, the 100 train scenes SLidR validates its pretraining
  on (its ``verifying`` phase);
- ``all``: no selection, every scene of the dataset.

The devkit is imported on first use only: importing it costs ~2 s (it pulls in matplotlib and
OpenCV), which listing plug-ins or verifying shards must not pay.
"""

from __future__ import annotations

import functools

# SLidR's held-out validation scenes: ``CUSTOM_SPLIT`` in valeoai/SLidR, file
# ``pretrain/dataloader_nuscenes.py``, commit 14729d0 (2025-03-07). With the config key
# ``training: parametrize`` SLidR pretrains on ``set(create_splits_scenes()["train"]) - set(CUSTOM_SPLIT)``
# and validates on these. All 100 are in the official train split. Data, copied verbatim in its order.
SLIDR_HELDOUT: tuple[str, ...] = (
    "scene-0008", "scene-0009", "scene-0019", "scene-0029", "scene-0032", "scene-0042",
    "scene-0045", "scene-0049", "scene-0052", "scene-0054", "scene-0056", "scene-0066",
    "scene-0067", "scene-0073", "scene-0131", "scene-0152", "scene-0166", "scene-0168",
    "scene-0183", "scene-0190", "scene-0194", "scene-0208", "scene-0210", "scene-0211",
    "scene-0241", "scene-0243", "scene-0248", "scene-0259", "scene-0260", "scene-0261",
    "scene-0287", "scene-0292", "scene-0297", "scene-0305", "scene-0306", "scene-0350",
    "scene-0352", "scene-0358", "scene-0361", "scene-0365", "scene-0368", "scene-0377",
    "scene-0388", "scene-0391", "scene-0395", "scene-0413", "scene-0427", "scene-0428",
    "scene-0438", "scene-0444", "scene-0452", "scene-0453", "scene-0459", "scene-0463",
    "scene-0464", "scene-0475", "scene-0513", "scene-0533", "scene-0544", "scene-0575",
    "scene-0587", "scene-0589", "scene-0642", "scene-0652", "scene-0658", "scene-0669",
    "scene-0678", "scene-0687", "scene-0701", "scene-0703", "scene-0706", "scene-0710",
    "scene-0715", "scene-0726", "scene-0735", "scene-0740", "scene-0758", "scene-0786",
    "scene-0790", "scene-0804", "scene-0806", "scene-0847", "scene-0856", "scene-0868",
    "scene-0882", "scene-0897", "scene-0899", "scene-0976", "scene-0996", "scene-1012",
    "scene-1015", "scene-1016", "scene-1018", "scene-1020", "scene-1024", "scene-1044",
    "scene-1058", "scene-1094", "scene-1098", "scene-1107",
)

ALL = "all"
"""The split name that selects nothing out: every scene the dataset has."""

DEVKIT_SPLITS: tuple[str, ...] = ("train", "val", "test", "mini_train", "mini_val", "train_detect", "train_track")
"""The names of ``create_splits_scenes()``'s splits (nuscenes-devkit 1.1 and 1.2), in its order."""

OWN_SPLITS: tuple[str, ...] = ("pretrain", "pretrain_val", ALL)
"""Split names defined here, beside the devkit's."""

SPLIT_NAMES: tuple[str, ...] = DEVKIT_SPLITS + OWN_SPLITS
"""Every accepted split name."""


class UnknownSplit(ValueError):
    """A split name that is neither the devkit's nor one of :data:`OWN_SPLITS`; the message lists them."""


@functools.cache
def devkit_splits() -> dict[str, frozenset[str]]:
    """nuscenes-devkit's ``create_splits_scenes()`` as frozen sets of scene names, in the devkit's order."""
    from nuscenes.utils.splits import create_splits_scenes

    return {name: frozenset(scenes) for name, scenes in create_splits_scenes(verbose=False).items()}


def split_scenes(name: str) -> frozenset[str] | None:
    """The scene names of split ``name``; ``None`` for ``"all"`` (no selection).

    Args:
        name: a split name (:data:`SPLIT_NAMES`).

    Raises:
        UnknownSplit: ``name`` is not a known split; the message lists the known names.
    """
    if name not in SPLIT_NAMES:  # checked before importing the devkit: a typo costs nothing
        raise UnknownSplit(f"unknown split {name!r} (known: {', '.join(SPLIT_NAMES)})")
    if name == ALL:
        return None
    if name == "pretrain_val":
        return frozenset(SLIDR_HELDOUT)
    splits = devkit_splits()
    if name == "pretrain":
        return splits["train"] - frozenset(SLIDR_HELDOUT)
    return splits[name]
