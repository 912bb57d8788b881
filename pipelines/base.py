"""The pipeline contract shared by every method: plan, build, schema, render.

A pipeline never knows which executor runs it. The runner (``pipelines.runner``) calls
``plan`` once on the client, cuts the plan into shards and ships ``build`` calls to dask
workers; ``verify``, ``show`` and ``stats`` read the schema and ``render`` back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipelines.manifest import Manifest


class Rejected(Exception):
    """Raised by ``build`` when one input sample is unusable.

    The runner records ``{source, stage, reason}`` in ``index.json`` and goes on.
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class SampleRef:
    """Everything a worker needs to build one sample, computed on the client.

    ``key`` is the dot-free shard key, ``source`` names the input for error reports and
    ``payload`` holds plain data only (paths, lists of floats): it travels to workers and
    is hashed into the input fingerprint, so it must be JSON-serialisable.
    """

    key: str
    source: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FieldSpec:
    """One shard field: its extension and a check of its decoded content.

    ``check`` receives the raw bytes and the whole raw sample (for cross-field checks such
    as "pairs index existing points") and raises ``ValueError`` with a reason.
    """

    description: str
    required: bool = True
    check: Callable[[bytes, dict[str, bytes]], None] | None = None


class Pipeline(Protocol):
    name: str
    schema: dict[str, Any]  # manifest sections beyond the common ones (pipelines.manifest.Key)

    def check_manifest(self, m: Manifest) -> None:
        """Cross-key checks after type validation; raises ``ManifestError``."""
        ...

    def fields(self, sample: dict[str, bytes]) -> dict[str, FieldSpec]:
        """The schema of one sample (field name -> spec); may depend on e.g. camera count."""
        ...

    def plan(self, m: Manifest) -> tuple[list[SampleRef], list[dict[str, str]]]:
        """Cheap and deterministic, on the client: every input sample in shard order, plus
        inputs already rejected while planning (``{source, stage, reason}``)."""
        ...

    def input_files(self, ref: SampleRef) -> list[str]:
        """The files ``build`` reads for ``ref``; their sizes and mtimes decide shard reuse."""
        ...

    def build(self, ref: SampleRef, m: Manifest) -> dict[str, bytes]:
        """Pure, on a worker: one sample's fields; raises ``Rejected`` on bad input."""
        ...

    def render(self, sample: dict[str, bytes]) -> Figure:
        """What ``distillkit show`` draws."""
        ...

    def sample_stats(self, sample: dict[str, bytes]) -> dict[str, float]:
        """Additive per-sample statistics (sums and counts), summed per shard and run."""
        ...

    def finalize_stats(self, totals: dict[str, float]) -> dict[str, float]:
        """Dataset statistics for ``index.json`` (means, stds) from the summed totals."""
        ...
