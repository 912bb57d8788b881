"""Name -> plug-in registries, filled from package entry points and imported on demand.

distillkit's own pipelines, trainers and synthetic-data kinds register exactly like a lab's
plugin does, in its ``pyproject.toml``::

    [project.entry-points."distillkit.pipelines"]
    slidr = "distillkit.pipelines.slidr:SlidrPipeline"

Listing names reads installed package metadata only; a plug-in's module is imported when it is
first asked for by name, so ``distillkit --help``, ``verify`` of a SLidR directory or a worker
building audio never import nuscenes-devkit, PyAV or torch for pipelines they do not use.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from distillkit.pipelines.base import Pipeline

T = TypeVar("T")

PIPELINES_GROUP = "distillkit.pipelines"
TRAINERS_GROUP = "distillkit.trainers"
SYNTH_GROUP = "distillkit.synth"


class PluginError(Exception):
    """A registry problem a user can fix: an unknown name, a clash, a plug-in of the wrong type."""


class Registry(Generic[T]):
    """Names -> ``"module:object"`` targets of one entry-point group.

    Args:
        group: the entry-point group (``"distillkit.pipelines"``).
        kind: what the entries are, for messages (``"pipeline"``).
        make: turns the loaded object into the registered value and checks its type (for
            example instantiates a ``Pipeline`` subclass); raises ``TypeError`` if wrong.
    """

    def __init__(self, group: str, kind: str, make: Callable[[Any], T]):
        self.group, self.kind, self._make = group, kind, make
        self._loaded: dict[str, T] = {}
        self._lock = threading.Lock()

    def targets(self) -> dict[str, str]:
        """Every registered name -> ``"module:object"`` (reads metadata, imports nothing)."""
        found: dict[str, str] = {}
        for ep in metadata.entry_points(group=self.group):
            if ep.name in found and found[ep.name] != ep.value:
                raise PluginError(f"{self.kind} {ep.name!r} is registered twice: {found[ep.name]} and {ep.value}")
            found[ep.name] = ep.value
        return dict(sorted(found.items()))

    def names(self) -> list[str]:
        return list(self.targets())

    def get(self, name: str) -> T:
        """The plug-in called ``name``, imported on first use.

        Raises:
            PluginError: unknown name, a target that does not import, or the wrong type.
        """
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            targets = self.targets()
            if name not in targets:
                known = ", ".join(targets) or "none installed"
                raise PluginError(f"unknown {self.kind} {name!r} (known: {known})")
            value = self._make(load_target(targets[name], self.kind))
            self._loaded[name] = value
            return value


def load_target(target: str, kind: str = "plug-in") -> Any:
    """Import ``"package.module:attr"`` and return the attribute."""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{kind} target {target!r} cannot be loaded: {exc}") from exc
    return obj


def _make_pipeline(obj: Any) -> Pipeline:
    from distillkit.pipelines.base import Pipeline

    pipeline = obj() if isinstance(obj, type) else obj
    if not isinstance(pipeline, Pipeline):
        raise PluginError(f"{obj!r} is not a distillkit.pipelines.base.Pipeline")
    return pipeline


def _make_synth(obj: Any) -> Callable[..., Path]:
    if not callable(obj):
        raise PluginError(f"synth target {obj!r} is not callable")
    return obj


PIPELINES: Registry[Pipeline] = Registry(PIPELINES_GROUP, "pipeline", _make_pipeline)
SYNTH: Registry[Callable[..., Path]] = Registry(SYNTH_GROUP, "synth kind", _make_synth)
"""``make(out: Path, seed: int = 0, size: str = "small") -> Path``: writes a synthetic source
tree in its native formats; raises ``ValueError`` for an unknown size."""


def get_pipeline(name: str) -> Pipeline:
    """The registered pipeline called ``name``; raises ``PluginError`` for an unknown name."""
    return PIPELINES.get(name)
